"""The typed client and `crispedit submit|status|download` against a real uvicorn server."""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager

import pytest
from api_helpers import KEY_ALL, KEY_TINY, make_version, run_worker
from safetensors.numpy import load_file

from crispedit_cli.main import main
from service.client import ApiError, CrispEditClient

FACTS = [{"prompt": "The Eiffel Tower is located in", "target": "Rome"}]


@pytest.fixture
def api(live_server):
    with CrispEditClient(live_server, KEY_ALL) as client:
        yield client


def test_submit_wait_download(api, redis, store, tmp_path):
    accepted = api.submit("tiny", FACTS, stream="s1", idempotency_key="k1")
    assert (
        api.submit("tiny", FACTS, stream="s1", idempotency_key="k1")["job_id"] == accepted["job_id"]
    )
    assert api.job(accepted["job_id"])["status"] == "queued"
    run_worker(redis)
    seen = []
    job = api.wait(accepted["job_id"], timeout=10, poll_s=0.05, on_progress=seen.append)
    assert job["status"] == "succeeded" and seen[-1]["status"] == "succeeded"
    version = job["version"]
    assert api.versions("tiny", "s1")["versions"][0]["id"] == version
    assert [(s["stream"], s["head"]) for s in api.streams("tiny")["streams"]] == [("s1", version)]
    assert api.streams()["streams"] == api.streams("tiny")["streams"]
    assert api.version(version)["id"] == version

    path = api.download_delta(version, tmp_path / "d.safetensors")
    stored = store.version_file(version)
    assert path.read_bytes() == stored.read_bytes()
    cum = api.download_delta(version, tmp_path / "cum.safetensors", against="base")
    for name, array in store.cumulative_delta(version).items():
        assert (load_file(cum)[name] == array).all()


def test_errors_carry_code_and_field(api, live_server):
    with pytest.raises(ApiError) as err:
        api.submit("tiny", [{"prompt": "x", "target": ""}])
    assert err.value.status == 422 and err.value.field and "target" in err.value.field
    with pytest.raises(ApiError) as err:
        api.version("v" + "0" * 26)
    assert err.value.status == 404 and err.value.code
    with CrispEditClient(live_server, "wrong-key") as bad, pytest.raises(ApiError) as err:
        bad.job("abc")
    assert err.value.status == 401
    with CrispEditClient(live_server, KEY_TINY) as tiny, pytest.raises(ApiError) as err:
        tiny.submit("other", FACTS)
    assert (err.value.status, err.value.code) == (404, "unknown_model")


def test_download_refuses_a_body_that_does_not_match_its_etag(api, store, tmp_path, monkeypatch):
    version = make_version(store, "tiny", "s2", 1.0)["id"]
    real = api.http.stream

    @contextmanager
    def tampered(*args, **kwargs):
        with real(*args, **kwargs) as response:
            response.headers["etag"] = '"' + hashlib.sha256(b"other").hexdigest() + '"'
            yield response

    monkeypatch.setattr(api.http, "stream", tampered)
    with pytest.raises(ApiError, match="ETag"):
        api.download_delta(version, tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_cli_submit_status_download(live_server, redis, store, tmp_path, capsys):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(FACTS))
    api = ["--api", live_server, "--key", KEY_ALL]
    assert main(["submit", *api, "--model", "tiny", "--facts", str(facts), "--stream", "c"]) == 0
    job_id = capsys.readouterr().out.split("job ")[-1].strip()
    run_worker(redis)
    assert main(["status", *api, job_id, "--wait", "--timeout", "10"]) == 0
    out = capsys.readouterr().out
    assert "succeeded" in out
    version = store.head("tiny", "c")
    assert version in out
    target = tmp_path / "delta.safetensors"
    assert main(["download", *api, version, "--out", str(target)]) == 0
    assert target.read_bytes() == store.version_file(version).read_bytes()
    capsys.readouterr()
    assert main(["streams", *api, "--model", "tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "stream", "versions", "head", "updated"]
    assert lines[1].split()[:4] == ["tiny", "c", "1", version]

    # errors: one line, exit 2
    assert main(["streams", *api, "--model", "gpt-9"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["status", *api, "nope-no-such-job"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "404" in err
    assert main(["status", "--api", live_server, "--key", "", "x"]) == 2
    assert main(["status", "--api", "http://127.0.0.1:9", "--key", "k", "x"]) == 2
    assert "cannot reach the API" in capsys.readouterr().err
