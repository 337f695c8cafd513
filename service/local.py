"""The stack on one machine, as subprocesses: Redis, the API under uvicorn, workers.

What `make demo`, bench/load.py and the tests' private stacks share: a free port,
Redis started when none answers, subprocesses whose output goes to a log and which are stopped
when their ExitStack closes, and a bounded wait for the API's readiness.
"""

from __future__ import annotations

import socket
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_redis(port: int = 6379) -> None:
    """Start a throwaway redis-server on 127.0.0.1 when none answers there."""
    ping = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True)
    if ping.stdout.strip() == "PONG":
        return
    print(f"starting redis-server on 127.0.0.1:{port}")
    subprocess.run(
        ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port),
         "--save", "", "--appendonly", "no"],
        check=True,
    )  # fmt: skip
    for _ in range(50):
        if (
            subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode
            == 0
        ):
            return
        time.sleep(0.1)
    raise SystemExit("redis-server did not start")


def start(stack: ExitStack, name: str, argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Start a subprocess whose output goes to `log`; it is stopped when `stack` closes."""
    out = log.open("w")
    proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        out.close()

    stack.callback(stop)
    shown = log.relative_to(ROOT) if log.is_relative_to(ROOT) else log
    print(f"started {name} (pid {proc.pid}, log {shown})")
    return proc


def wait_ready(client: httpx.Client, procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait until the API answers /readyz with 200; SystemExit when a process died or time ran
    out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"a process exited early (status {p.returncode}); see its log")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit("the API did not become ready")
