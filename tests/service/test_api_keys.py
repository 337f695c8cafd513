"""The keys file (reloaded on change and on SIGHUP, edited by `python -m service.keys`), and the
limit on requests without a valid key per client address."""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import pytest
from api_helpers import AUTH, bearer, edit_body
from fastapi.testclient import TestClient

from service.keys import KeysFileError, hash_key, main, read_keys_file
from service.main import create_app


@pytest.fixture
def keys_path(settings, tmp_path):
    path = tmp_path / "keys.json"
    settings.api_keys_file = path
    return path


def added_key(capsys, *args: str) -> str:
    """Run `python -m service.keys add ARGS`; the key it printed."""
    assert main(["add", *args]) == 0
    out = capsys.readouterr().out
    return out.split("key:")[1].split()[0]


def test_keys_cli_adds_lists_and_revokes_and_the_api_follows_at_once(
    settings, keys_path, capsys, monkeypatch
):
    monkeypatch.setenv("CRISPEDIT_API_KEYS_FILE", str(keys_path))
    with TestClient(create_app(settings)) as client:
        key = added_key(capsys, "ci", "--team", "team-c", "--grant", "tiny:*:read")
        assert client.get("/v1/models", headers=bearer(key)).status_code == 200
        stored = json.loads(keys_path.read_text())
        assert list(stored) == [hash_key(key)] and key not in keys_path.read_text()
        assert stored[hash_key(key)]["grants"] == [{"model": "tiny", "stream": "*", "role": "read"}]
        legacy = added_key(capsys, "old", "--models", "tiny,other", "--file", str(keys_path))
        assert main(["list"]) == 0
        listing = capsys.readouterr().out
        assert hash_key(key)[:12] in listing and "team-c" in listing and "read tiny/*" in listing
        assert key not in listing and hash_key(key) not in listing
        assert main(["revoke", "ci"]) == 0
        assert "revoked" in capsys.readouterr().out
        refused = client.get("/v1/models", headers=bearer(key))
        assert refused.status_code == 401  # the next request: no restart, no signal
        assert client.get("/v1/models", headers=bearer(legacy)).status_code == 200
        assert main(["revoke", hash_key(legacy)[:12]]) == 0  # by key id
        assert client.get("/v1/models", headers=bearer(legacy)).status_code == 401
        assert client.get("/v1/models", headers=AUTH).status_code == 200  # the environment's


def test_keys_cli_errors_are_one_line_and_change_nothing(keys_path, capsys, monkeypatch):
    monkeypatch.delenv("CRISPEDIT_API_KEYS_FILE", raising=False)
    assert main(["list"]) == 2
    assert "CRISPEDIT_API_KEYS_FILE" in capsys.readouterr().err
    file = ["--file", str(keys_path)]
    added_key(capsys, "ci", *file)
    before = keys_path.read_bytes()
    for args in (
        ["add", "ci", *file],  # the name is taken
        ["add", "x", "--grant", "tiny:main", *file],  # MODEL:STREAM:ROLE
        ["add", "x", "--grant", "tiny:main:owner", *file],  # not a role
        ["add", "bad name", *file],
        ["revoke", "nobody", *file],
    ):
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert keys_path.read_bytes() == before
    keys_path.write_text("{not json")
    assert main(["add", "y", *file]) == 1  # an invalid file is never rewritten
    assert keys_path.read_text() == "{not json"


def test_an_invalid_keys_file_stops_the_start_and_is_ignored_on_reload(
    settings, keys_path, capsys, caplog
):
    keys_path.write_text('{"abc": {"name": "x"}}')
    with pytest.raises(KeysFileError, match="sha256"):
        create_app(settings)
    keys_path.unlink()
    key = added_key(capsys, "ci", "--file", str(keys_path))
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/models", headers=bearer(key)).status_code == 200
        keys_path.write_text("[]")
        with caplog.at_level(logging.ERROR, logger="service"):
            assert client.get("/v1/models", headers=bearer(key)).status_code == 200
        assert "keeping the previous ones" in caplog.text


def test_sighup_reloads_the_keys_file(settings, keys_path, capsys):
    key = added_key(capsys, "ci", "--file", str(keys_path))
    app = create_app(settings)
    ring = app.state.keys
    with TestClient(app) as client:
        assert client.get("/v1/models", headers=bearer(key)).status_code == 200
        keys_path.write_text("{}")
        ring._stamp = ring._stat()  # a change the file's stat does not show (same second, size)
        assert client.get("/v1/models", headers=bearer(key)).status_code == 200
        os.kill(os.getpid(), signal.SIGHUP)
        assert client.get("/v1/models", headers=bearer(key)).status_code == 401
    assert read_keys_file(keys_path) == {}


def test_requests_without_a_valid_key_are_limited_per_address(settings):
    settings.bad_key_limit_per_minute = 3
    with TestClient(create_app(settings)) as client:
        for headers in ({}, bearer("wrong"), bearer("also-wrong")):
            assert client.get("/v1/models", headers=headers).status_code == 401
        for headers in ({}, bearer("wrong")):
            limited = client.get("/v1/models", headers=headers)
            assert limited.status_code == 429, limited.text
            assert limited.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(limited.headers["retry-after"]) <= 60
        # a bad key with a bad body is counted too (the 401 comes before the body's 422)
        bad_body = client.post(
            "/v1/edits", content=b"{", headers={"Content-Type": "application/json"}
        )
        assert bad_body.status_code == 429
        assert client.get("/v1/models", headers=AUTH).status_code == 200  # a valid key still works
        assert client.get("/healthz").status_code == 200


def test_a_revoked_key_ends_its_event_streams(settings, keys_path, capsys):
    settings.sse_max_s = 30.0
    key = added_key(capsys, "ci", "--file", str(keys_path), "--grant", "*:*:admin")
    with TestClient(create_app(settings)) as client:
        job = client.post("/v1/edits", json=edit_body(), headers=bearer(key)).json()["job_id"]
        started = time.monotonic()
        with client.stream("GET", f"/v1/jobs/{job}/events", headers=bearer(key)) as events:
            lines = events.iter_lines()
            assert next(lines) == "id: 1" and next(lines) == "event: status"
            assert main(["revoke", "ci", "--file", str(keys_path)]) == 0
            rest = list(lines)
        assert "event: error" in rest and any('"code":"unauthorized"' in line for line in rest)
        assert time.monotonic() - started < 10  # not the 30 s the stream may last
