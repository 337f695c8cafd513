# The REST API image (service/): FastAPI under uvicorn on a slim Python, without torch.
#
# The API never imports the engine (tests/service checks it), so this image installs only
# docker/requirements-api.txt and then the project with --no-deps: the project's own dependencies
# name torch and transformers, which would add gigabytes and nothing the API uses.
#
# Build from the repository root (docker-compose.yml does this):
#   docker build -f docker/api.Dockerfile -t crispedit-api .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The same uid/gid as in worker.Dockerfile: both containers write into the shared store volume,
# and files one of them creates must stay writable by the other.
ARG UID=10001
RUN groupadd --gid "${UID}" crispedit \
    && useradd --uid "${UID}" --gid crispedit --create-home --shell /usr/sbin/nologin crispedit

# Dependencies in their own layer, so that a code change does not reinstall them.
COPY docker/requirements-api.txt /tmp/requirements-api.txt
RUN pip install -r /tmp/requirements-api.txt

WORKDIR /src
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY crispedit ./crispedit
COPY curvature_store ./curvature_store
COPY service ./service
COPY workers ./workers
# --no-deps: see the top of this file. The API validates facts and options with `contract`
# (pure standard library), exactly as the engine does; crispedit is installed, never imported.
# The checks fail the build if torch got in, or if the app cannot be created without it.
RUN pip install --no-deps . \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && python -c "import sys, service.main; service.main.create_app(); assert 'torch' not in sys.modules"

# The store is a volume shared with the workers. Created here, owned by the service user, so that
# a fresh named volume mounted on it starts with that owner (Docker copies it on first use).
RUN mkdir -p /data/store && chown crispedit:crispedit /data/store
ENV CRISPEDIT_STORE_DIR=/data/store
VOLUME ["/data/store"]

USER crispedit
# Run from an empty home, not /src: the installed package is what gets imported.
WORKDIR /home/crispedit
EXPOSE 8000
# uvicorn's processes: the API's handlers are synchronous Python, so one process holds one core;
# two kept p99 job polls at 34 ms for 200 clients on 2 cores (bench/load.py). Override per host.
ENV WEB_CONCURRENCY=2

# Liveness only (the process answers). docker-compose.yml checks /readyz, which also needs Redis
# and a writable store. Python instead of curl: the slim image has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# --http: uvicorn's h11 protocol with a deadline on request headers (service/server.py)
CMD ["uvicorn", "--factory", "service.main:create_app", "--http", "service.server:TimedH11Protocol", \
     "--host", "0.0.0.0", "--port", "8000"]
