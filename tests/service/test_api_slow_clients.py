"""Slow clients over real sockets: request headers that trickle in are cut off at the read
timeout (service.server.TimedH11Protocol, as the API image runs uvicorn), a body that trickles in
is answered 408, and a prompt client is unaffected, on a fresh connection or a kept-alive one."""

from __future__ import annotations

import json
import socket
import time

from api_helpers import AUTH, KEY_ALL, edit_body
from live import serve

from service.main import create_app

TIMEOUT_S = 1.0


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def closed_by_server(sock: socket.socket, within: float) -> bytes:
    """What the server sent before closing the connection, failing after `within` seconds."""
    sock.settimeout(within)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_headers_that_trickle_in_are_cut_off_at_the_read_timeout(settings):
    slow = settings.model_copy(update={"read_timeout_s": TIMEOUT_S})
    with serve(create_app(slow)) as url:
        sock = connect(url)
        started = time.monotonic()
        request = f"GET /v1/relations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_ALL}\r\n"
        try:
            for byte in request.encode():  # a byte every 0.1 s: each one would reset keep-alive
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            pass  # closed under us: what should happen
        closed_by_server(sock, within=5)
        assert time.monotonic() - started < TIMEOUT_S + 2
        sock.close()

        # a kept-alive connection: the next request's headers have the same deadline
        sock = connect(url)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        try:
            for _ in range(100):
                sock.sendall(b"X")
                time.sleep(0.1)
        except OSError:
            pass
        closed_by_server(sock, within=5)
        assert time.monotonic() - started < TIMEOUT_S + 2
        sock.close()


def test_a_body_that_trickles_in_is_408(settings, redis):
    slow = settings.model_copy(update={"read_timeout_s": TIMEOUT_S})
    body = json.dumps(edit_body()).encode()
    with serve(create_app(slow)) as url:
        sock = connect(url)
        sock.sendall(
            f"POST /v1/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_ALL}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        started = time.monotonic()
        answer = closed_by_server(sock, within=TIMEOUT_S + 5)
        assert time.monotonic() - started < TIMEOUT_S + 2
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:200]
        assert json.loads(payload)["error"]["code"] == "request_timeout"
        sock.close()

        # a prompt client, kept alive across requests, is served as usual
        import httpx

        with httpx.Client(base_url=url, headers=AUTH, timeout=10) as http:
            for _ in range(3):
                assert http.post("/v1/edits", json=edit_body()).status_code == 202
                time.sleep(TIMEOUT_S / 2)
            time.sleep(TIMEOUT_S + 0.5)  # idle past the deadline: a new connection, no error
            assert http.get("/v1/relations").status_code == 200
