"""How uvicorn serves the API: its h11 protocol with a deadline on each request's headers.

uvicorn (0.55) has no read timeout: `--timeout-keep-alive` only limits the idle time between two
requests of a connection, and any byte received disarms it, so a client that sends its headers a
byte at a time holds a connection (and a file descriptor) for as long as it likes; a thousand such
clients stayed open for minutes. `TimedH11Protocol` gives every request `read_timeout_s` seconds
(the app's `Settings.read_timeout_s`) from the moment the server waits for it until its headers
are complete, however the bytes trickle in, and closes the connection otherwise. The body has the
same deadline, enforced by `service.middleware.BodyLimitMiddleware` (408).

Run it with uvicorn's `--http` option, which takes an import path:

    uvicorn --factory service.main:create_app --http service.server:TimedH11Protocol
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_READ_TIMEOUT_S = 10.0  # when the served app carries no settings (service.config's too)
HTTP_PROTOCOL = "service.server:TimedH11Protocol"  # uvicorn's --http value


def read_timeout_of(app: object) -> float:
    """The `read_timeout_s` of the settings of `app`, looked for through the middleware uvicorn
    wraps around it (each keeps the app it wraps as `.app`)."""
    for _ in range(8):
        settings = getattr(getattr(app, "state", None), "settings", None)
        if settings is not None:
            return settings.read_timeout_s
        app = getattr(app, "app", None)
    return DEFAULT_READ_TIMEOUT_S


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers take longer than the
    read timeout to arrive (counted from the connection, or from the end of the last response)."""

    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timeout_s = read_timeout_of(self.app)
        self._arm()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are complete: the app has it now
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        idle = self.cycle is None or self.cycle.response_complete  # no pipelined request began
        if idle and not self.transport.is_closing():  # waiting for the next request's headers
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self._read_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers took too long")
            self.transport.close()
