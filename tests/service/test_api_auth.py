"""API keys: every /v1 route needs one; keys are limited to models; per-key rate limits."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from api_helpers import (
    AUTH,
    AUTH_TINY,
    AUTH_TINY_ADMIN,
    KEY_ALL,
    edit_body,
    job_count,
    make_version,
)
from fastapi.testclient import TestClient
from pydantic import ValidationError
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service import auth
from service.config import ApiKey, Settings
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
    """A model the key has no grant on answers as one that is not served (404, not 403)."""
    refused = client.post("/v1/edits", json=edit_body(model="other"), headers=AUTH_TINY)
    unserved = client.post("/v1/edits", json=edit_body(model="nope"), headers=AUTH_TINY)
    assert refused.status_code == unserved.status_code == 404
    assert (refused.json()["error"]["code"], refused.json()["error"]["field"]) == (
        "unknown_model",
        "model",
    )
    assert job_count(redis) == 0
    assert client.get("/v1/streams/other/main/versions", headers=AUTH_TINY).status_code == 404
    rollback = client.post(
        "/v1/streams/other/main/rollback", json={"version": None}, headers=AUTH_TINY
    )
    assert rollback.status_code == 404
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


@pytest.mark.parametrize(
    ("check", "who", "counter", "refusal"),
    [
        (
            auth.check_rate_limit,
            ApiKey(name="ci", id="k1"),
            "crispedit:ratelimit:k1",
            "rate limit of 2 requests per minute exceeded",
        ),
        (
            auth.check_bad_key_limit,
            "10.0.0.7",
            "crispedit:badkey:10.0.0.7",
            "too many requests without a valid API key from this address",
        ),
    ],
)
def test_a_fixed_window_counts_in_redis_and_says_when_to_retry(
    redis, monkeypatch, check, who, counter, refusal
):
    window = 29_000_000
    monkeypatch.setattr(auth.time, "time", lambda: window * 60 + 45.2)  # 14.8 s left
    check(redis, who, 2)
    check(redis, who, 2)
    with pytest.raises(auth.ApiError) as refused:
        check(redis, who, 2)
    assert (refused.value.status, refused.value.code) == (429, "rate_limited")
    assert refused.value.message == f"{refusal}; retry in 15 s"
    assert refused.value.headers["Retry-After"] == "15"
    assert int(redis.get(f"{counter}:{window}")) == 3
    assert 0 < redis.ttl(f"{counter}:{window}") <= 120
    # the next minute is a new window with its own count
    monkeypatch.setattr(auth.time, "time", lambda: (window + 1) * 60 + 1.0)
    check(redis, who, 2)
    assert int(redis.get(f"{counter}:{window + 1}")) == 1
    # off at 0, and open (nothing raised) when Redis cannot be reached
    check(redis, who, 0)
    assert int(redis.get(f"{counter}:{window + 1}")) == 1
    down = Redis(port=1, retry=Retry(NoBackoff(), 0))  # nothing listens: connection refused
    for _ in range(3):
        check(down, who, 1)


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


# --- every route, hashed keys, tenants --------------------------------------------------------

PUBLIC_ROUTES = {"/healthz", "/readyz", "/metrics"}  # orchestrators and scrapers, no key
DOCS_ROUTES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}  # FastAPI's own
CONSOLE_ROUTES = {"/console"}  # the console's static files; the page's API calls carry the key


def app_routes(app) -> list[tuple[str, str]]:
    """(method, concrete path) of every route the app mounts, in the schema or not (included
    routers are walked: newer FastAPI keeps them as one entry of app.routes)."""

    def walk(routes, prefix: str):
        for route in routes:
            if hasattr(route, "original_router"):
                yield from walk(route.original_router.routes, prefix + route.include_context.prefix)
            else:
                # a mount (the console's static files) has no methods: it answers GET
                yield prefix + route.path, getattr(route, "methods", None) or {"GET"}

    found = []
    for template, methods in walk(app.routes, ""):
        path = re.sub(r"\{(\w+)(:\w+)?\}", "abc", template)
        found += [(method, path) for method in sorted(methods) if method != "HEAD"]
    return found


def test_every_mounted_route_but_health_and_docs_needs_a_key(client):
    """Enumerated from app.routes, not the OpenAPI document: a route hidden from the schema, or
    mounted outside /v1, cannot be left open without failing here."""
    routes = app_routes(client.app)
    paths = {path for _, path in routes}
    assert paths >= PUBLIC_ROUTES
    open_paths = {p for p in paths if not p.startswith("/v1/")}
    allowed = PUBLIC_ROUTES | DOCS_ROUTES | CONSOLE_ROUTES
    assert open_paths <= allowed, open_paths - allowed
    protected = [(m, p) for m, p in routes if p.startswith("/v1/")]
    assert len(protected) >= 10
    for method, path in protected:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer "}):
            response = client.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.json()["error"]["code"] == "unauthorized"
    for path in PUBLIC_ROUTES:
        assert client.get(path).status_code in (200, 503)


def test_keys_are_compared_as_sha256_digests_in_constant_time(settings, monkeypatch):
    """Every configured digest is compared with hmac.compare_digest, whichever matches, and the
    presented key itself is never compared: only its sha256."""
    keys = {**settings.api_keys, hash_key("third-key"): settings.api_keys[hash_key(KEY_ALL)]}
    compared = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(
        auth.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b)
    )
    for token, found in ((KEY_ALL, True), ("wrong", False)):
        compared.clear()
        if found:
            assert auth.authenticate(keys, token).name == "all"
        else:
            with pytest.raises(auth.ApiError):
                auth.authenticate(keys, token)
        assert len(compared) == len(keys) == len(settings.api_keys) + 1  # no early exit
        assert all(a == hash_key(token) for a, _ in compared)
        assert {b for _, b in compared} == set(keys)
    assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in keys)
    assert KEY_ALL not in json.dumps(settings.model_dump(mode="json"))  # config: hashes only


def test_a_key_limited_to_a_model_cannot_reach_another_models_data(client, redis, store, settings):
    """Everything of model "other", to a key for "tiny" only: refused, and answered as an
    unknown id wherever an id is given, so ids of other tenants cannot be probed."""
    other = make_version(store, "other", "main", 1.0)["id"]
    mine = make_version(store, "tiny", "main", 2.0)["id"]
    job = client.post("/v1/edits", json=edit_body(model="other"), headers=AUTH).json()["job_id"]
    unknown_job, unknown_version = "0" * 32, "v" + "0" * 26
    settings.sse_max_s = 0.2  # the allowed key's event stream of the waiting job ends quickly
    as_unknown = [
        ("GET", "/v1/jobs/{}", job, unknown_job),
        ("GET", "/v1/jobs/{}/events", job, unknown_job),
        ("POST", "/v1/jobs/{}/cancel", job, unknown_job),
        ("GET", "/v1/versions/{}", other, unknown_version),
        ("GET", "/v1/versions/{}/delta", other, unknown_version),
        ("GET", "/v1/versions/{}/delta?against=base", other, unknown_version),
    ]
    for method, template, foreign, unknown in as_unknown:
        refused = client.request(method, template.format(foreign), headers=AUTH_TINY)
        missing = client.request(method, template.format(unknown), headers=AUTH_TINY)
        assert refused.status_code == missing.status_code == 404, (template, refused.text)
        assert refused.json()["error"]["code"] == missing.json()["error"]["code"]
        assert "other" not in refused.text
        allowed = client.request(method, template.format(foreign), headers=AUTH)
        assert allowed.status_code in (200, 202), (template, allowed.text)
    # rolling the key's own stream back to another model's version: as an unknown version
    for version in (other, unknown_version):
        rollback = client.post(
            "/v1/streams/tiny/main/rollback", json={"version": version}, headers=AUTH_TINY_ADMIN
        )
        assert rollback.status_code == 404, rollback.text
        assert rollback.json()["error"] == {
            "code": "not_found",
            "message": f"no version {version}",
            "field": "version",
        }
    assert store.head("tiny", "main") == mine
    # streams by name: 404 for a served model the key may not use, as for an unknown stream
    assert client.get("/v1/streams/other/main/versions", headers=AUTH_TINY).status_code == 404
    rollback = client.post(
        "/v1/streams/other/main/rollback", json={"version": None}, headers=AUTH_TINY
    )
    assert rollback.status_code == 404 and store.head("other", "main") == other
    listed = client.get("/v1/models", headers=AUTH_TINY).json()["models"]
    assert [m["name"] for m in listed] == ["tiny"]
    assert other not in json.dumps(listed)
