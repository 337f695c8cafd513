"""The web console: static files (plain JS modules, no build step) served by the API at /console.

The page signs in with an API key that it keeps in the browser's session storage and sends only as
a Bearer header, so the key never appears in a URL or an access log; the files themselves need no
key. A strict Content-Security-Policy allows only this origin's scripts, styles and requests, so a
string a user posted (a fact's target) can never run as code even if a page rendered it as HTML.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

STATIC = Path(__file__).parent / "static"
PATH = "/console"

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # small files: always revalidated, so an upgrade shows at once
}


class ConsoleFiles(StaticFiles):
    """StaticFiles with the console's security headers on every answer."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    *((k.lower().encode(), v.encode()) for k, v in HEADERS.items()),
                ]
            await send(message)

        await super().__call__(scope, receive, with_headers)


def mount_console(app: FastAPI) -> None:
    """Serve the console's files at /console/ (and redirect /console there)."""

    @app.get(PATH, include_in_schema=False)
    async def console_root() -> RedirectResponse:
        return RedirectResponse(f"{PATH}/", status_code=308)

    app.mount(PATH, ConsoleFiles(directory=STATIC, html=True), name="console")
