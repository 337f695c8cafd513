"""Health check of a worker container: healthy once its RQ worker is registered in Redis.

The worker registers only after it has loaded the model and its curvature, and the registration
expires unless the worker keeps beating its heartbeat (`ResidentWorker` beats from a thread even
during a long edit). So a registration from this container's hostname means "loaded and serving".
Exit status 0 is healthy, anything else unhealthy (an exception exits with 1).
"""

from __future__ import annotations

import os
import socket
import sys

from redis import Redis
from rq import Worker


def main() -> int:
    """0 when a live RQ worker of this host is registered in `$CRISPEDIT_REDIS_URL`, else 1."""
    redis = Redis.from_url(
        os.environ["CRISPEDIT_REDIS_URL"], socket_connect_timeout=3, socket_timeout=5
    )
    host = socket.gethostname()  # the container id: one per replica
    workers = Worker.all(connection=redis)
    if any(worker.hostname == host for worker in workers):
        return 0
    print(f"no RQ worker registered from {host} (still loading the model?)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
