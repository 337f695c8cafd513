"""The stack on one machine, as subprocesses: Redis, the API under uvicorn, workers.

What `make demo`, bench/load.py and the tests' private stacks share: a free port, a private
redis-server, subprocesses whose output goes to a log and which are stopped
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


def start_redis(port: int, data_dir: Path, persist: bool = False) -> subprocess.Popen:
    """Start a private redis-server on 127.0.0.1:`port` keeping its files in `data_dir`, and
    wait until it answers; the caller stops it.

    Private, never the Redis on 6379: that one may be a developer's own, and demos and tests
    flush their databases. `persist` turns on an fsynced append-only file (as docker-compose.yml
    runs Redis), so a SIGKILLed server restarted on the same `data_dir` comes back with its data.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persist else [
        "--appendonly", "no"]  # fmt: skip
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
            "--save", "", *persistence]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server on port {port} exited (status {proc.returncode})")
        cli = ["redis-cli", "-p", str(port)]
        if subprocess.run([*cli, "ping"], capture_output=True).stdout.strip() == b"PONG":
            # the server that answers must be this one: another process (a parallel test run)
            # may have taken the port after free_port(), and would be flushed as ours
            info = subprocess.run([*cli, "info", "server"], capture_output=True).stdout
            if f"process_id:{proc.pid}\r".encode() in info:
                return proc
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"redis-server on port {port} did not answer within 10 s")


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM `proc`, and SIGKILL it when it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def private_redis(stack: ExitStack, data_dir: Path) -> str:
    """A private redis-server on a free port, stopped when `stack` closes; returns its URL.

    A port taken by someone else before the server binds it is given up for another."""
    for attempt in range(3):
        port = free_port()
        try:
            proc = start_redis(port, data_dir)
            break
        except RuntimeError:
            if attempt == 2:
                raise
    stack.callback(stop, proc)
    print(f"started a private redis-server (pid {proc.pid}, port {port})")
    return f"redis://127.0.0.1:{port}"


def start(stack: ExitStack, name: str, argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Start a subprocess whose output goes to `log`; it is stopped when `stack` closes."""
    out = log.open("w")
    proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    stack.callback(out.close)  # after `stop`: callbacks run last in, first out
    stack.callback(stop, proc)
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
