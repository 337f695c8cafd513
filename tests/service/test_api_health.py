"""Health, readiness, metrics, the error shape, and the rule that the API never imports torch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from api_helpers import AUTH, edit_body
from fastapi.testclient import TestClient

from service.errors import scrub
from service.main import create_app


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_importing_the_app_imports_no_torch():
    code = (
        "import sys, service.main, service.openapi\n"
        "service.main.create_app()\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "CRISPEDIT_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"redis": "ok", "store": "ok"}}


def test_readyz_503_when_redis_is_unreachable(settings):
    settings.redis_url = f"redis://127.0.0.1:{closed_port()}/0"
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"] == {"redis": "unreachable", "store": "ok"}
        # routes that need Redis answer 503 in the error shape; nothing leaks
        down = client.post("/v1/edits", json=edit_body(), headers=AUTH)
        assert down.status_code == 503 and down.json()["error"]["code"] == "unavailable"


def test_readyz_503_when_the_store_is_unavailable(settings, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    settings.store_dir = blocker / "store"
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"] == {"redis": "ok", "store": "unavailable"}
        down = client.get("/v1/streams/tiny/main/versions", headers=AUTH)
        assert down.status_code == 503
        assert str(tmp_path) not in down.text and str(tmp_path) not in ready.text


def test_metrics(client):
    client.post("/v1/edits", json=edit_body(3), headers=AUTH)
    client.get("/v1/jobs/nosuch", headers=AUTH)
    text = client.get("/metrics").text
    assert 'crispedit_http_requests_total{method="POST",route="/v1/edits",status="202"} 1.0' in text
    assert 'route="/v1/jobs/{job_id}",status="404"' in text
    assert "crispedit_http_request_duration_seconds_bucket" in text
    assert 'crispedit_edits_accepted_total{model="tiny"} 1.0' in text
    assert 'crispedit_facts_accepted_total{model="tiny"} 3.0' in text
    assert 'crispedit_queue_depth{model="tiny"} 1.0' in text
    assert 'crispedit_jobs{model="tiny",status="queued"} 1.0' in text
    assert "crispedit_redis_up 1.0" in text


def test_metrics_behind_a_key_when_the_setting_says_so(client, settings):
    assert client.get("/metrics").status_code == 200  # the default: open, for scrapers
    locked = settings.model_copy(update={"metrics_require_key": True})
    with TestClient(create_app(locked)) as keyed:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = keyed.get("/metrics", headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "unauthorized"
            assert "crispedit_" not in refused.text
        allowed = keyed.get("/metrics", headers=AUTH)
        assert allowed.status_code == 200 and "crispedit_redis_up" in allowed.text
        assert keyed.get("/healthz").status_code == 200  # probes stay open


def test_unknown_routes_and_methods_use_the_error_shape(client):
    missing = client.get("/v2/nothing")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "not_found", "message": "Not Found"}}
    wrong = client.delete("/healthz")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_a_trailing_slash_is_a_json_404_not_a_redirect_to_the_host_header(client):
    for path in ("/healthz/", "/v1/relations/", "/v1/jobs/abc/", "/metrics/"):
        response = client.get(
            path, headers={**AUTH, "Host": "evil.example"}, follow_redirects=False
        )
        assert response.status_code == 404, (path, response.status_code)
        assert "location" not in response.headers
        assert response.json()["error"]["code"] == "not_found"
        assert "evil.example" not in response.text


def test_job_errors_lose_absolute_paths():
    assert scrub("/srv/store/versions/v1/delta.safetensors is missing") == (
        "delta.safetensors is missing"
    )
    assert scrub("ratio 1/2 of a/b") == "ratio 1/2 of a/b"
