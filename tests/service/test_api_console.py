"""The console's static files as the API serves them: where, with which headers, and nothing else
of the package. (The pages themselves are tested in a browser: tests/e2e/test_console.py.)"""

from __future__ import annotations

import httpx


def test_console_is_served_with_a_strict_content_security_policy(live_server):
    page = httpx.get(f"{live_server}/console", follow_redirects=True)
    assert page.status_code == 200 and str(page.url).endswith("/console/")
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert '<script type="module" src="app.js"></script>' in page.text
    script = httpx.get(f"{live_server}/console/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert script.headers["x-content-type-options"] == "nosniff"


def test_console_serves_only_its_static_folder(live_server):
    assert httpx.get(f"{live_server}/console/__init__.py").status_code == 404
    assert httpx.get(f"{live_server}/console/../main.py").status_code == 404
    assert "/console" not in httpx.get(f"{live_server}/openapi.json").json()["paths"]


def test_console_needs_no_key_but_the_api_still_does(live_server):
    assert httpx.get(f"{live_server}/console/").status_code == 200
    assert httpx.get(f"{live_server}/v1/streams").status_code == 401
