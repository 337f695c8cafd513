"""API keys: every /v1 route needs one; keys are limited to models; per-key rate limits."""

from __future__ import annotations

import hashlib

import pytest
from api_helpers import AUTH, AUTH_TINY, KEY_ALL, edit_body, job_count
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.config import Settings
from service.keys import hash_key, main
from service.main import create_app


def v1_routes(app) -> list[tuple[str, str]]:
    """(method, concrete path) of every /v1 operation in the app's OpenAPI document."""
    values = {"{job_id}": "abc", "{model}": "tiny", "{stream}": "main", "{version_id}": "v1"}
    found = []
    for template, operations in app.openapi()["paths"].items():
        if template.startswith("/v1"):
            path = template
            for name, value in values.items():
                path = path.replace(name, value)
            found += [(method.upper(), path) for method in operations]
    return found


def test_every_v1_route_needs_a_valid_key(client):
    routes = v1_routes(client.app)
    assert len(routes) >= 10
    for method, path in routes:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {KEY_ALL}"},
        ):
            response = client.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"


def test_the_key_is_checked_before_the_body(client):
    garbage = {"Content-Type": "application/json"}
    response = client.post("/v1/edits", content=b"{not json", headers=garbage)
    assert response.status_code == 401
    response = client.post("/v1/edits", content=b"{not json", headers={**garbage, **AUTH})
    assert (response.status_code, response.json()["error"]["field"]) == (422, "body")


def test_a_key_limited_to_a_model(client, redis):
    refused = client.post("/v1/edits", json=edit_body(model="other"), headers=AUTH_TINY)
    assert refused.status_code == 403
    assert (refused.json()["error"]["code"], refused.json()["error"]["field"]) == (
        "forbidden",
        "model",
    )
    assert job_count(redis) == 0
    assert client.get("/v1/streams/other/main/versions", headers=AUTH_TINY).status_code == 403
    rollback = client.post(
        "/v1/streams/other/main/rollback", json={"version": None}, headers=AUTH_TINY
    )
    assert rollback.status_code == 403
    assert client.post("/v1/edits", json=edit_body(), headers=AUTH_TINY).status_code == 202


def test_rate_limit_per_key(settings, redis):
    settings.rate_limit_per_minute = 3
    with TestClient(create_app(settings)) as client:
        for _ in range(3):
            assert client.get("/v1/relations", headers=AUTH).status_code == 200
        limited = client.get("/v1/relations", headers=AUTH)
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        # other keys have their own budget; health checks are not counted
        assert client.get("/v1/relations", headers=AUTH_TINY).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_relations_listed(client):
    relations = client.get("/v1/relations", headers=AUTH).json()["relations"]
    table = {r["id"]: r["template"] for r in relations}
    assert table["P36"] == "The capital of {} is"
    assert table["P103"] == "The mother tongue of {} is"
    assert len(table) == 31 and all("{}" in t for t in table.values())


def test_keys_cli_prints_the_sha256(capsys):
    assert main(["hash", "s3cret"]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"s3cret").hexdigest()
    assert main(["new"]) == 0
    out = capsys.readouterr().out.split()
    assert hash_key(out[1]) == out[3]
    assert main([]) == 2


def test_settings_refuse_unhashed_keys():
    with pytest.raises(ValidationError, match="sha256"):
        Settings(api_keys={"plain-key": {"name": "x"}})
