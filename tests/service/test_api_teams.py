"""Teams: the access matrix over every route of openapi.yaml, ownership of streams, who did what.

Team A owns stream tiny/a-stream (made through the API by A's admin key, run by a real RQ worker
on a real Redis and store). Every route is called with no key, a revoked key (from the keys file),
team B's key (admin on every model, but only of its own team's streams), A's read key on a write
route, and the right key; what a key may not see answers 404, like something that does not exist.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from api_helpers import (
    AUTH,
    KEY_A,
    KEY_A_READ,
    KEY_ALL,
    KEY_B,
    bearer,
    edit_body,
    job_count,
    make_version,
    run_worker,
)
from fastapi.testclient import TestClient

from contract.jobs import curvature_index_key
from service.config import Settings
from service.keys import add_key, hash_key, revoke_key
from service.main import create_app
from service.openapi import OPENAPI_FILE

STREAM = "a-stream"


@dataclass
class Scene:
    """Team A's stream and what it made: a finished job, a queued one, a version."""

    job: str
    queued: str
    version: str
    revoked: str  # a key that was in the keys file and is revoked now


@dataclass(frozen=True)
class Expect:
    """What a route needs: `role` (None: no key at all; "key": any valid key), whether it is
    scoped to A's stream (else to the model, or nothing), its body, and its success statuses."""

    role: str | None
    scoped: bool = True
    ok: tuple[int, ...] = (200,)
    body: Callable[[Scene], dict] | None = None
    # the same call on something that does not exist (its 404 must look the same)
    missing: dict = field(default_factory=dict)


UNKNOWN_JOB, UNKNOWN_VERSION = "0" * 32, "v" + "0" * 26

# Every route of openapi.yaml, with what it needs. A route missing here fails the matrix test.
EXPECT: dict[tuple[str, str], Expect] = {
    ("GET", "/healthz"): Expect(role=None, scoped=False),
    ("GET", "/readyz"): Expect(role=None, scoped=False),
    ("GET", "/metrics"): Expect(role=None, scoped=False),
    ("GET", "/v1/relations"): Expect(role="key", scoped=False),
    ("GET", "/v1/models"): Expect(role="read", scoped=False),
    ("GET", "/v1/streams"): Expect(role="read", scoped=False),
    ("POST", "/v1/curvature"): Expect(
        role="admin", scoped=False, body=lambda s: {"model": "tiny", "kind": "kfac"}
    ),
    ("POST", "/v1/edits"): Expect(role="edit", ok=(202,), body=lambda s: edit_body(stream=STREAM)),
    ("GET", "/v1/jobs/{job_id}"): Expect(role="read", missing={"job_id": UNKNOWN_JOB}),
    ("GET", "/v1/jobs/{job_id}/events"): Expect(role="read", missing={"job_id": UNKNOWN_JOB}),
    ("POST", "/v1/jobs/{job_id}/cancel"): Expect(role="edit", missing={"job_id": UNKNOWN_JOB}),
    ("GET", "/v1/streams/{model}/{stream}/versions"): Expect(
        role="read", missing={"stream": "no-such"}
    ),
    ("GET", "/v1/streams/{model}/{stream}/log"): Expect(role="read", missing={"stream": "no-such"}),
    ("POST", "/v1/streams/{model}/{stream}/rollback"): Expect(
        role="admin", body=lambda s: {"version": None}, missing={"stream": "no-such"}
    ),
    ("GET", "/v1/versions/{version_id}"): Expect(
        role="read", missing={"version_id": UNKNOWN_VERSION}
    ),
    ("GET", "/v1/versions/{version_id}/delta"): Expect(
        role="read", missing={"version_id": UNKNOWN_VERSION}
    ),
    ("GET", "/v1/streams/{model}/{stream}/policy"): Expect(
        role="read", missing={"stream": "no-such"}
    ),
    # (no `missing`: a policy may guard a stream before its first version)
    ("PUT", "/v1/streams/{model}/{stream}/policy"): Expect(role="admin", body=lambda s: {}),
    ("DELETE", "/v1/streams/{model}/{stream}/policy"): Expect(
        role="admin", ok=(204,), missing={"stream": "no-such"}
    ),
    # the scene's version is the head already: the right key gets as far as 409 not_held
    ("POST", "/v1/versions/{version_id}/publish"): Expect(
        role="admin",
        ok=(409,),
        body=lambda s: {"force": True},
        missing={"version_id": UNKNOWN_VERSION},
    ),
    ("GET", "/v1/versions/{version_id}/adapter"): Expect(
        role="read", missing={"version_id": UNKNOWN_VERSION}
    ),
    # written in the scene already: the right key's second request answers 200
    ("POST", "/v1/versions/{version_id}/checkpoint"): Expect(
        role="edit", ok=(200, 202), missing={"version_id": UNKNOWN_VERSION}
    ),
    ("GET", "/v1/versions/{version_id}/checkpoint"): Expect(
        role="read", missing={"version_id": UNKNOWN_VERSION}
    ),
    ("GET", "/v1/versions/{version_id}/checkpoint/files/{name}"): Expect(
        role="read", missing={"version_id": UNKNOWN_VERSION}
    ),
    ("POST", "/v1/versions/{version_id}/generate"): Expect(
        role="read",
        ok=(202,),
        body=lambda s: {"prompts": ["The Eiffel Tower is in"]},
        missing={"version_id": UNKNOWN_VERSION},
    ),
}


def openapi_routes() -> list[tuple[str, str]]:
    """(METHOD, path template) of every operation in openapi.yaml (written as JSON)."""
    document = json.loads(OPENAPI_FILE.read_text())
    return [(m.upper(), path) for path, ops in document["paths"].items() for m in ops]


def fill(template: str, scene: Scene, **override: str) -> str:
    """The concrete path of A's resources (or of `override`s)."""
    values = {
        "model": "tiny",
        "stream": STREAM,
        "job_id": scene.queued if template.endswith("/cancel") else scene.job,
        "version_id": scene.version,
        "name": "config.json",  # a file of the scene's checkpoint
        **override,
    }
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


@pytest.fixture
def keys_file(settings, tmp_path) -> Settings:
    """The settings with a keys file holding one key of team A, revoked before the test uses it."""
    path = tmp_path / "keys.json"
    settings.api_keys_file = path
    return settings


def make_scene(client: TestClient, redis, settings) -> Scene:
    """A's stream with a finished job and its version, a queued job, and a revoked key."""
    revoked, _ = add_key(settings.api_keys_file, "gone", team="team-a", grants=["*:*:admin"])
    assert client.get("/v1/models", headers=bearer(revoked)).status_code == 200
    revoke_key(settings.api_keys_file, "gone")
    first = client.post("/v1/edits", json=edit_body(stream=STREAM), headers=bearer(KEY_A))
    assert first.status_code == 202, first.text
    run_worker(redis)
    job = first.json()["job_id"]
    version = client.get(f"/v1/jobs/{job}", headers=bearer(KEY_A)).json()["version"]
    assert version is not None
    written = client.post(f"/v1/versions/{version}/checkpoint", headers=bearer(KEY_A))
    assert written.status_code == 202, written.text
    run_worker(redis)
    queued = client.post("/v1/edits", json=edit_body(stream=STREAM), headers=bearer(KEY_A))
    guarded = client.put(f"/v1/streams/tiny/{STREAM}/policy", json={}, headers=bearer(KEY_A))
    assert guarded.status_code == 200, guarded.text
    return Scene(job=job, queued=queued.json()["job_id"], version=version, revoked=revoked)


def test_every_route_of_openapi_yaml_against_every_kind_of_key(keys_file, redis):
    keys_file.sse_max_s = 0.2
    routes = openapi_routes()
    unknown = [route for route in routes if route not in EXPECT]
    assert not unknown, f"routes of openapi.yaml with no access expectation here: {unknown}"
    assert len(routes) >= 15
    with TestClient(create_app(keys_file)) as client:
        scene = make_scene(client, redis, keys_file)
        for method, template in routes:
            expect = EXPECT[(method, template)]
            path = fill(template, scene)
            body = expect.body(scene) if expect.body else None

            def call(key: str | None, path=path, method=method, body=body):
                headers = bearer(key) if key is not None else {}
                return client.request(method, path, headers=headers, json=body)

            where = f"{method} {template}"
            if expect.role is None:  # health and metrics: open to orchestrators and scrapers
                assert call(None).status_code == 200, where
                continue
            for key in (None, scene.revoked):
                refused = call(key)
                assert refused.status_code == 401, (where, refused.text)
                assert refused.json()["error"]["code"] == "unauthorized"

            other = call(KEY_B)
            if expect.scoped:
                assert other.status_code == 404, (where, other.text)
                assert "a-stream" not in other.text.replace(f"no stream tiny/{STREAM}", "")
                if expect.missing:  # answered exactly as something that does not exist
                    missing = client.request(
                        method, fill(template, scene, **expect.missing), headers=bearer(KEY_A),
                        json=body,
                    )  # fmt: skip
                    assert missing.status_code == 404, (where, missing.text)
                    assert other.json()["error"]["code"] == missing.json()["error"]["code"]
                    assert other.json()["error"]["field"] == missing.json()["error"]["field"]
            else:  # a model-wide route: B holds a grant on the model, and sees only its own
                assert other.status_code in (200, 202), (where, other.text)
                assert STREAM not in other.text and scene.version not in other.text

            reader = call(KEY_A_READ)
            if expect.role in ("edit", "admin"):
                assert reader.status_code == 404, (where, reader.text)
            else:
                assert reader.status_code in expect.ok, (where, reader.text)

            right = call(KEY_A)
            assert right.status_code in expect.ok, (where, right.text)
            if template in ("/v1/models", "/v1/streams"):
                assert STREAM in right.text and STREAM not in other.text


def test_a_team_cannot_touch_another_teams_stream(client, redis, store):
    a = client.post("/v1/edits", json=edit_body(stream="shared"), headers=bearer(KEY_A))
    assert a.status_code == 202
    before = job_count(redis)
    b = client.post("/v1/edits", json=edit_body(stream="shared"), headers=bearer(KEY_B))
    assert b.status_code == 404 and b.json()["error"]["code"] == "unknown_stream"
    assert job_count(redis) == before  # nothing enqueued
    assert store.stream_owner("tiny", "shared")["team"] == "team-a"
    run_worker(redis)
    assert client.get("/v1/streams/tiny/shared/versions", headers=bearer(KEY_B)).status_code == 404
    b_own = client.post("/v1/edits", json=edit_body(stream="b-own"), headers=bearer(KEY_B))
    assert b_own.status_code == 202
    run_worker(redis)
    models = {
        m["name"]: m for m in client.get("/v1/models", headers=bearer(KEY_B)).json()["models"]
    }
    assert [s["stream"] for s in models["tiny"]["streams"]] == ["b-own"]


def test_two_teams_racing_to_create_a_stream_one_owns_it(client, redis, store):
    statuses: dict[str, list[int]] = {KEY_A: [], KEY_B: []}

    def submit(key: str) -> None:
        response = client.post("/v1/edits", json=edit_body(stream="race"), headers=bearer(key))
        statuses[key].append(response.status_code)

    threads = [threading.Thread(target=submit, args=(k,)) for k in [KEY_A, KEY_B] * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    owner = store.stream_owner("tiny", "race")["team"]
    winner, loser = (KEY_A, KEY_B) if owner == "team-a" else (KEY_B, KEY_A)
    assert statuses[winner] == [202] * 4 and statuses[loser] == [404] * 4
    jobs = [k for k in redis.scan_iter("rq:job:*") if k.count(b":") == 2]  # not :dependents
    assert len(jobs) == 4


def test_legacy_keys_edit_their_own_streams_only(client, redis, store):
    """{"name", "models"}: team `name`, edit on its own streams; rollback needs admin."""
    mine = client.post("/v1/edits", json=edit_body(stream="legacy"), headers=AUTH)
    assert mine.status_code == 202
    run_worker(redis)
    assert store.stream_owner("tiny", "legacy")["team"] == "all"
    assert client.get("/v1/streams/tiny/legacy/versions", headers=AUTH).status_code == 200
    rollback = client.post("/v1/streams/tiny/legacy/rollback", json={"version": None}, headers=AUTH)
    assert rollback.status_code == 404
    assert client.get("/v1/streams/tiny/legacy/log", headers=bearer(KEY_A)).status_code == 404
    # a stream made before owners were recorded belongs to the first team that edits it
    make_version(store, "tiny", "old", 1.0)
    assert client.get("/v1/streams/tiny/old/versions", headers=bearer(KEY_B)).status_code == 200
    assert client.post("/v1/edits", json=edit_body(stream="old"), headers=AUTH).status_code == 202
    assert client.get("/v1/streams/tiny/old/versions", headers=bearer(KEY_B)).status_code == 404


def test_forcing_past_a_policy_needs_admin_on_the_stream(client, redis):
    """An edit key may submit to its own stream, but not with `options.force`: 403 (it sees the
    stream, so not 404), and nothing is queued; an admin key may."""
    assert client.post("/v1/edits", json=edit_body(stream="mine"), headers=AUTH).status_code == 202
    before = job_count(redis)
    forced = edit_body(stream="mine", options={"force": True})
    refused = client.post("/v1/edits", json=forced, headers=AUTH)
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["field"]) == ("forbidden", "options.force")
    assert job_count(redis) == before  # nothing enqueued
    admin = edit_body(stream="admins", options={"force": True})
    assert client.post("/v1/edits", json=admin, headers=bearer(KEY_A)).status_code == 202


def test_configured_owners_and_grant_order(settings, redis, store):
    narrow = "key-read-on-prod-admin-elsewhere"
    keys = {
        hash_key(KEY_A): {"name": "a", "team": "team-a", "grants": [{"role": "admin"}]},
        hash_key(KEY_B): {"name": "b", "team": "team-b", "grants": [{"role": "admin"}]},
        hash_key(narrow): {
            "name": "narrow",
            "team": "team-a",
            "grants": [
                {"model": "tiny", "stream": "prod", "role": "read"},
                {"model": "tiny", "role": "admin"},
            ],
        },
    }
    configured = Settings(
        **{
            **settings.model_dump(exclude={"api_keys"}),
            "api_keys": keys,
            "stream_owners": {"tiny/team-b-*": "team-b"},
        }
    )
    with TestClient(create_app(configured)) as client:
        refused = client.post("/v1/edits", json=edit_body(stream="team-b-x"), headers=bearer(KEY_A))
        assert refused.status_code == 404  # a team-b stream by configuration
        accepted = client.post(
            "/v1/edits", json=edit_body(stream="team-b-x"), headers=bearer(KEY_B)
        )
        assert accepted.status_code == 202
        for stream in ("prod", "dev"):
            make_version(store, "tiny", stream, 1.0)
        roll = {"version": None}
        prod = client.post("/v1/streams/tiny/prod/rollback", json=roll, headers=bearer(narrow))
        dev = client.post("/v1/streams/tiny/dev/rollback", json=roll, headers=bearer(narrow))
        assert (prod.status_code, dev.status_code) == (404, 200)  # the first matching grant
        assert client.get("/v1/streams/tiny/prod/log", headers=bearer(narrow)).status_code == 200


def test_who_did_it_is_in_the_job_the_manifest_and_the_log(client, redis, store):
    key_id = hash_key(KEY_A)[:12]
    actor = {"team": "team-a", "key_id": key_id}
    job = client.post("/v1/edits", json=edit_body(stream="who"), headers=bearer(KEY_A)).json()
    run_worker(redis)
    view = client.get(f"/v1/jobs/{job['job_id']}", headers=bearer(KEY_A)).json()
    assert view["submitted_by"] == actor
    version = view["version"]
    assert client.get(f"/v1/versions/{version}", headers=bearer(KEY_A)).json()["actor"] == actor
    rolled = client.post(
        "/v1/streams/tiny/who/rollback", json={"version": None}, headers=bearer(KEY_A)
    )
    assert rolled.status_code == 200
    log = client.get("/v1/streams/tiny/who/log", headers=bearer(KEY_A_READ))
    assert log.status_code == 200
    doc = log.json()
    assert doc["owner"]["team"] == "team-a" and doc["owner"]["claimed_at"]
    assert [(e["op"], e["version"], e["actor"]) for e in doc["entries"]] == [
        ("create", version, actor),
        ("rollback", None, actor),
    ]
    assert all(e["at"] for e in doc["entries"])
    for text in (log.text, json.dumps(view), json.dumps(store.manifest(version))):
        assert KEY_A not in text and hash_key(KEY_A) not in text  # an id, never the key
    assert client.get("/v1/streams/tiny/nope/log", headers=bearer(KEY_A)).status_code == 404


def test_the_legacy_key_form_still_loads(settings):
    keys = settings.api_keys
    legacy = keys[hash_key(KEY_ALL)]
    assert legacy.team == "all" and [(g.model, g.stream, g.role) for g in legacy.grants] == [
        ("*", "*", "edit")
    ]
    with pytest.raises(ValueError, match="not both"):
        Settings(api_keys={"a" * 64: {"name": "x", "models": ["m"], "grants": [{"role": "read"}]}})
    with pytest.raises(ValueError):
        Settings(api_keys={"a" * 64: {"name": "x", "grants": [{"role": "owner"}]}})
    for bad in (  # nothing may end in a newline: not a name, a pattern or a key's digest
        {"a" * 64: {"name": "x\n"}},
        {"a" * 64: {"name": "x", "team": "team\n"}},
        {"a" * 64: {"name": "x", "grants": [{"stream": "s\n", "role": "read"}]}},
        {"a" * 64 + "\n": {"name": "x"}},
    ):
        with pytest.raises(ValueError):
            Settings(api_keys=bad)


# --- the same cross-team matrix through the typed client and the CLI -------------------------


def answered(status: int, call: Callable[[], object]) -> None:
    """Run `call`, taking the ApiError of `status` as its answer (the scene's version is the
    head already, so the right key's publish gets as far as 409)."""
    from service.client import ApiError

    try:
        call()
    except ApiError as err:
        if err.status != status:
            raise
        return
    raise AssertionError(f"expected the answer {status}")


def accepted(call: Callable[[], object]) -> None:
    """Run a call that posts a job and then waits for it with no time to wait: the API accepted
    it (an error answer raises ApiError before any waiting), and no worker need run it."""
    with pytest.raises(TimeoutError):
        call()


# Public methods of CrispEditClient that are not in `client_calls`, and why.
CLIENT_EXEMPT = {
    "close": "closes the client's connection; no request",
    "wait": "polls `job` (in the matrix) until the job ends",
}
# Calls that are the model's, not a stream's: team B's key succeeds and sees none of A's streams.
MODEL_WIDE = {"streams", "models", "build_curvature"}


def client_calls(scene: Scene, tmp_path) -> dict[str, tuple[str, Callable]]:
    """One call per public method of the typed client: (the role it needs, the call). In order:
    the policy is read, deleted and put back; publish comes before the rollback."""
    facts = edit_body()["facts"]
    prompts = ["The Eiffel Tower is in"]
    return {
        "submit": ("edit", lambda c: c.submit("tiny", facts, stream=STREAM)),
        "job": ("read", lambda c: c.job(scene.job)),
        "cancel": ("edit", lambda c: c.cancel(scene.queued)),
        "streams": ("read", lambda c: c.streams("tiny")),
        "models": ("read", lambda c: c.models()),
        "versions": ("read", lambda c: c.versions("tiny", STREAM)),
        "stream_log": ("read", lambda c: c.stream_log("tiny", STREAM)),
        "version": ("read", lambda c: c.version(scene.version)),
        "download_delta": ("read", lambda c: c.download_delta(scene.version, tmp_path / "d.st")),
        "download_adapter": (
            "read",
            lambda c: c.download_adapter(scene.version, tmp_path / "a.tar.gz", rank=1),
        ),
        "policy": ("read", lambda c: c.policy("tiny", STREAM)),
        "delete_policy": ("admin", lambda c: c.delete_policy("tiny", STREAM)),
        "set_policy": ("admin", lambda c: c.set_policy("tiny", STREAM, {})),
        "publish": ("admin", lambda c: answered(409, lambda: c.publish(scene.version))),
        "generate": (
            "read",
            lambda c: accepted(lambda: c.generate(scene.version, prompts, timeout=0)),
        ),
        "create_checkpoint": ("edit", lambda c: c.create_checkpoint(scene.version)),
        "checkpoint": ("read", lambda c: c.checkpoint(scene.version)),
        "download_checkpoint": (
            "read",
            lambda c: c.download_checkpoint(scene.version, tmp_path / "checkpoint"),
        ),
        "build_curvature": ("admin", lambda c: c.build_curvature("tiny")),
        "rollback": ("admin", lambda c: c.rollback("tiny", STREAM, None)),
    }


def test_the_cross_team_matrix_through_the_typed_client(keys_file, redis, tmp_path):
    from live import serve

    from service.client import ApiError, CrispEditClient

    public = {
        name
        for name, value in vars(CrispEditClient).items()
        if callable(value) and not name.startswith("_")
    }
    with TestClient(create_app(keys_file)) as client:
        scene = make_scene(client, redis, keys_file)
    with serve(create_app(keys_file)) as url:
        calls = client_calls(scene, tmp_path)
        forgotten = public - set(calls) - set(CLIENT_EXEMPT)
        assert not forgotten, f"client methods with no cross-team check here: {forgotten}"
        assert not set(calls) & set(CLIENT_EXEMPT)
        for name, (role, call) in calls.items():
            for key, allowed in (
                ("never-issued", False),
                (scene.revoked, False),
                (KEY_B, name in MODEL_WIDE),
                (KEY_A_READ, role == "read"),
                (KEY_A, True),
            ):
                with CrispEditClient(url, key) as api:
                    if allowed:
                        answer = call(api)
                        if key == KEY_B:
                            assert STREAM not in json.dumps(answer, default=str), (name, answer)
                        continue
                    with pytest.raises(ApiError) as err:
                        call(api)
                expected = 401 if key in ("never-issued", scene.revoked) else 404
                assert err.value.status == expected, (name, key, err.value)
        with CrispEditClient(url, KEY_A) as api:
            assert STREAM in json.dumps(api.streams("tiny"))
            assert api.policy("tiny", STREAM) is not None  # deleted and put back by A
            log = api.stream_log("tiny", STREAM)
            assert [e["op"] for e in log["entries"]] == ["create", "rollback"]


# Commands of the CLI that call the API but are not in the CLI matrix, and why (none yet).
CLI_EXEMPT: dict[str, str] = {}


def api_commands() -> set[str]:
    """The `crispedit` commands that call the API: those taking `--api`."""
    import argparse

    from crispedit_cli.main import parser

    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name
        for name, command in sub.choices.items()
        if any("--api" in action.option_strings for action in command._actions)
    }


def test_the_cross_team_matrix_through_the_cli(keys_file, redis, tmp_path, capsys):
    from live import serve

    from crispedit_cli.main import main as cli

    with TestClient(create_app(keys_file)) as client:
        scene = make_scene(client, redis, keys_file)
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(edit_body()["facts"]))
    out, adapter = str(tmp_path / "d.safetensors"), str(tmp_path / "a.tar.gz")
    with serve(create_app(keys_file)) as url:
        commands = {  # every command that calls the API: (the role it needs, its arguments)
            "submit": (
                "edit",
                ["submit", "--model", "tiny", "--stream", STREAM, "--facts", str(facts)],
            ),
            "status": ("read", ["status", scene.job]),
            "streams": ("read", ["streams", "--model", "tiny"]),
            "download": ("read", ["download", scene.version, "--out", out]),
            "download --format peft": (
                "read",
                ["download", scene.version, "--out", adapter, "--format", "peft", "--rank", "1"],
            ),
            "log": ("read", ["log", "--model", "tiny", "--stream", STREAM]),
            "checkpoint": ("edit", ["checkpoint", scene.version]),
        }
        covered = {args[0] for _, args in commands.values()}
        forgotten = api_commands() - covered - set(CLI_EXEMPT)
        assert not forgotten, f"CLI commands that call the API, unchecked here: {forgotten}"
        for name, (role, args) in commands.items():
            for key, allowed in (
                (scene.revoked, False),
                (KEY_B, name == "streams"),  # the streams B may read: none of A's
                (KEY_A_READ, role == "read"),
                (KEY_A, True),
            ):
                # --key=KEY: a key may start with "-" (token_urlsafe)
                code = cli([args[0], "--api", url, f"--key={key}", *args[1:]])
                captured = capsys.readouterr()
                if allowed:
                    assert code == 0, (name, key, captured.err)
                    if name == "streams":
                        assert (STREAM in captured.out) == (key != KEY_B), captured.out
                    continue
                assert code == 2, (name, key)
                expected = "401" if key == scene.revoked else "404"
                assert captured.err.count("\n") == 1 and expected in captured.err, captured.err
                assert STREAM not in captured.err.replace(f"no stream tiny/{STREAM}", "")
        assert (
            cli(["log", "--api", url, "--key", KEY_A, "--model", "tiny", "--stream", STREAM]) == 0
        )
        shown = capsys.readouterr().out
        assert "owned by team-a" in shown and scene.version in shown
        assert f"team-a (key {hash_key(KEY_A)[:12]})" in shown


def test_a_curvature_build_is_seen_by_every_team_but_not_who_asked(client, redis):
    redis.delete(curvature_index_key("tiny"))  # not built: the request starts a job
    job = client.post("/v1/curvature", json={"model": "tiny"}, headers=bearer(KEY_A)).json()
    mine = client.get(f"/v1/jobs/{job['job_id']}", headers=bearer(KEY_A)).json()
    theirs = client.get(f"/v1/jobs/{job['job_id']}", headers=bearer(KEY_B)).json()
    assert mine["submitted_by"] == {"team": "team-a", "key_id": hash_key(KEY_A)[:12]}
    assert theirs["submitted_by"] is None and theirs["status"] == mine["status"]
    cancel = client.post(f"/v1/jobs/{job['job_id']}/cancel", headers=bearer(KEY_A_READ))
    assert cancel.status_code == 404  # cancelling a build needs admin


def test_may_reads_grants_in_order_with_their_owners():
    from service.access import may, role_of
    from service.config import ApiKey

    key = ApiKey(
        name="ops",
        team="ops",
        grants=[
            {"model": "tiny", "stream": "prod-*", "role": "read", "owners": "*"},
            {"model": "tiny", "stream": "*", "role": "edit", "owners": ["team-a"]},
            {"model": "t*", "stream": "*", "role": "admin"},
        ],
    )
    assert role_of(key, "tiny", "prod-eu", "team-b") == "read"  # the first match decides
    assert may(key, "read", "tiny", "prod-eu", "team-b")
    assert not may(key, "edit", "tiny", "prod-eu", "ops")
    assert role_of(key, "tiny", "dev", "team-a") == "edit"
    assert role_of(key, "tiny", "dev", "team-b") is None  # no grant covers team-b's dev
    assert role_of(key, "tiny", "dev", "ops") == "admin"  # its own team's
    assert role_of(key, "tiny", "dev", None) == "admin"  # nobody's yet: as its own
    assert role_of(key, "other", "dev", "ops") is None
    assert role_of(key, "tiny") == "admin" and role_of(key, "titan") == "admin"  # model-wide
    with pytest.raises(ValueError, match="unknown role"):
        may(key, "owner", "tiny")
