"""Bad input: property-based fuzzing of every operation of openapi.yaml, and explicit hostile cases
(oversized bodies, pathological strings, path traversal in every path parameter, wrong content
types). Every answer must be below 500, every error must be `{"error": {"code", "message",
"field"?}}`, and no answer may show a filesystem path or a Python traceback.

The requests are generated from the OpenAPI document itself (a compact JSON-schema → hypothesis
translation below), so a new operation or field is fuzzed without touching this file. They run
against the real app (TestClient, in-process ASGI) on a real store and a real Redis (database 11,
used by no other test); no worker runs, so accepted edits only wait in their queues.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pytest
from api_helpers import AUTH, AUTH_TINY, KEY_ALL, KEY_TINY, edit_body, fact, job_count
from api_helpers import make_version as publish
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from live import redis_db, redis_url

from curvature_store import Store
from service.config import Settings
from service.keys import hash_key
from service.main import create_app

REDIS_URL = redis_url(11)
OPENAPI = json.loads((Path(__file__).resolve().parents[2] / "openapi.yaml").read_text())
OPERATIONS = [
    (method.upper(), template)
    for template, operations in OPENAPI["paths"].items()
    for method in operations
]
MAX_EXAMPLES = 40
CASES: Counter[str] = Counter()  # generated requests sent, per operation (printed by each test)

# Strings that must never appear in an answer unless the request itself contained them.
LEAKS = ("/work", "/tmp", "/home", "/usr", "site-packages", "Traceback", 'File "', '.py"')
# Path parameter values aimed at the filesystem and the router.
ATTACKS = [
    "..",
    "../",
    "../../../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f",
    "..\\..\\windows",
    "/etc/passwd",
    "/tmp",
    "C:\\Windows\\system32",
    "tiny/../other",
    "x" * 5000,
    "\x00",
    "a\x00b",
    "\u202eevil",
    "🔥",
    " ",
    "",
]
WRONG_KEY = {"Authorization": "Bearer not-a-key"}


# --- the world the requests meet --------------------------------------------------------------


@pytest.fixture
def fuzz_redis():
    with redis_db(REDIS_URL) as connection:
        yield connection


@pytest.fixture
def fuzz_settings(tmp_path, fuzz_redis, monkeypatch) -> Settings:
    monkeypatch.setenv("CRISPEDIT_TEST_STORE", str(tmp_path / "store"))
    return Settings(
        redis_url=REDIS_URL,
        store_dir=tmp_path / "store",
        api_keys={
            # admin, so that rollback and curvature requests get past the access check
            hash_key(KEY_ALL): {"name": "all", "grants": [{"role": "admin"}]},
            hash_key(KEY_TINY): {"name": "tiny-only", "models": ["tiny"]},
        },
        models={"tiny": {"layers": ["model.layers.1.mlp.down_proj"]}, "other": {}},
        bad_key_limit_per_minute=0,  # the fuzzer sends bad keys by the hundred
        max_facts=5,
        max_body_bytes=16 * 1024,
        rate_limit_per_minute=0,  # the fuzzer sends hundreds of requests a minute
        job_function="jobs_for_tests.apply_edit",
        sse_poll_s=0.02,
        sse_max_s=0.2,  # event streams of waiting jobs end quickly
        sse_keepalive_s=0.05,
    )


@pytest.fixture
def world(fuzz_settings):
    """A client on the app, two streams with versions, and queued jobs of both models."""
    store = Store(fuzz_settings.store_dir)
    versions = [publish(store, "tiny", "main", v)["id"] for v in (1.0, 2.0)]
    versions.append(publish(store, "other", "main", 3.0)["id"])
    with TestClient(create_app(fuzz_settings), raise_server_exceptions=False) as client:
        jobs = [
            client.post("/v1/edits", json=edit_body(model=m), headers=AUTH).json()["job_id"]
            for m in ("tiny", "other")
        ]
        yield {
            "client": client,
            "store_dir": str(fuzz_settings.store_dir),
            "values": {
                "job_id": [*jobs, "0" * 32],
                "model": ["tiny", "other", "nope"],
                "stream": ["main", "dev"],
                "version_id": [*versions, "v" + "0" * 26],
                "version": [*versions, None],
                "expected_head": [*versions, None],
                "parent_version": [*versions, None],
                "relation": ["P36", "P17", "P999", "The capital of {} is", "is located in"],
                "subject": ["France", "The Eiffel Tower"],
                "target": ["Lyon", "Italy"],
                "prompt": ["The capital of France is"],
                "method": ["crispedit", "ft"],
            },
        }


# --- the checks every answer must pass ---------------------------------------------------------


def check_answer(response, sent: str, store_dir: str) -> None:
    """No 5xx, the error shape on every error, no path or traceback that the request lacked."""
    where = f"{response.request.method} {response.request.url} -> {response.status_code}"
    assert response.status_code < 500, f"{where}: {response.text[:500]}"
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/json"), where
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, f"{where}: {body}"
        error = body["error"]
        assert isinstance(error.get("code"), str) and error["code"], f"{where}: {body}"
        assert isinstance(error.get("message"), str) and error["message"], f"{where}: {body}"
        assert set(error) <= {"code", "message", "field", "head"}, f"{where}: {body}"
        assert isinstance(error.get("field", ""), str), f"{where}: {body}"
    if response.headers.get("content-type", "").startswith("application/octet-stream"):
        return  # a delta file: tensors, not text
    text = response.text
    for leak in (store_dir, *LEAKS):
        assert leak not in text or leak in sent, f"{where}: shows {leak!r}: {text[:500]}"


# --- requests from the OpenAPI document -------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)


def resolve(schema: dict) -> dict:
    while "$ref" in schema:
        node: dict = OPENAPI
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def from_schema(schema: dict, values: dict, name: str | None = None) -> st.SearchStrategy:
    """Values valid for a JSON schema (with the world's ids mixed in for names it knows)."""
    schema = resolve(schema)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, values, name) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        text = st.text(min_size=low, max_size=min(high or 40, 40))
        if high and high > 40:  # the length limit itself, and one past it
            text |= st.text(st.just("é"), min_size=high, max_size=high + 1)
        known = [v for v in values.get(name, []) if isinstance(v, str)]
        return st.sampled_from(known) | text if known else text
    if kind == "integer":
        return st.integers(schema.get("minimum", -(2**40)), schema.get("maximum", 2**40))
    if kind == "number":
        return st.floats(
            schema.get("minimum", schema.get("exclusiveMinimum")),
            schema.get("maximum"),
            exclude_min="exclusiveMinimum" in schema,
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        low = schema.get("minItems", 0)
        high = min(schema.get("maxItems", 7), 7)  # 7 > the 5 facts the test settings allow
        return st.lists(
            from_schema(schema.get("items", {}), values, name), min_size=low, max_size=high
        )
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: from_schema(v, values, k) for k, v in props.items() if k in required},
            optional={k: from_schema(v, values, k) for k, v in props.items() if k not in required},
        )
    return JSON_VALUES


def mutated(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A valid object with one member replaced by (or added as) any JSON value."""

    def mutate(args):
        obj, key, value = args
        if not isinstance(obj, dict):
            return value
        keys = sorted(obj)
        obj = dict(obj)
        obj[keys[key % len(keys)] if keys and key >= 0 else "unexpected"] = value
        return obj

    return st.tuples(valid, st.integers(-2, 20), JSON_VALUES).map(mutate)


def requests_for(method: str, template: str, world: dict) -> st.SearchStrategy:
    """Strategy of (method, url, params, headers, body bytes) for one operation."""
    operation = OPENAPI["paths"][template][method.lower()]
    values = world["values"]
    parts: dict[str, st.SearchStrategy] = {}
    for param in operation.get("parameters", []):
        name, where = param["name"], param["in"]
        if where == "path":
            known = [v for v in values.get(name, []) if isinstance(v, str)]
            parts[f"path:{name}"] = st.sampled_from(known + ATTACKS) | st.text(max_size=80)
        elif where == "query":
            parts[f"query:{name}"] = st.none() | from_schema(param["schema"], values) | st.text()
        elif where == "header":
            parts[f"header:{name}"] = st.none() | HEADER_TEXT
    schema = (
        operation.get("requestBody", {})
        .get("content", {})
        .get("application/json", {})
        .get("schema")
    )
    if schema is not None:
        valid = from_schema(schema, values)
        parts["body"] = st.one_of(valid, valid, mutated(valid), JSON_VALUES)
        parts["content-type"] = st.sampled_from(
            ["application/json"] * 6 + ["application/problem+json", "text/plain", ""]
        )
    parts["auth"] = st.sampled_from([AUTH, AUTH, AUTH, AUTH_TINY, {}, WRONG_KEY])

    def build(drawn: dict) -> tuple:
        url = template
        params, headers = {}, dict(drawn["auth"])
        for key, value in drawn.items():
            where, _, name = key.partition(":")
            if where == "path":
                url = url.replace("{" + name + "}", quote(value, safe=""))
            elif where == "query" and value is not None:
                params[name] = value
            elif where == "header" and value is not None:
                headers[name] = value
        body = None
        if "body" in drawn:
            body = json.dumps(drawn["body"]).encode()
            if drawn["content-type"]:
                headers["Content-Type"] = drawn["content-type"]
        return method, url, params, headers, body

    return st.fixed_dictionaries(parts).map(build)


@pytest.mark.parametrize(
    ("method", "template"), OPERATIONS, ids=[f"{m} {t}" for m, t in OPERATIONS]
)
def test_generated_requests_never_fail_the_contract(world, method, template):
    strategy = requests_for(method, template, world)
    client = world["client"]
    operation = f"{method} {template}"

    @hsettings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategy)
    def one(request):
        method, url, params, headers, body = request
        response = client.request(method, url, params=params, headers=headers, content=body)
        CASES[operation] += 1
        sent = url + json.dumps(params) + json.dumps(headers) + (body or b"").decode()
        check_answer(response, sent, world["store_dir"])

    one()
    print(f"\nfuzz: {operation}: {CASES[operation]} cases")
    # an operation with no parameters has only its 6 authorisations to vary
    has_inputs = (
        "{" in template
        or method == "POST"
        or "parameters" in OPENAPI["paths"][template][method.lower()]
    )
    assert CASES[operation] >= (MAX_EXAMPLES // 2 if has_inputs else 4)


def test_the_fuzzer_covers_every_operation_of_the_app():
    assert len(OPERATIONS) >= 13
    assert {t for _, t in OPERATIONS} >= {
        "/v1/edits",
        "/v1/jobs/{job_id}",
        "/v1/versions/{version_id}/delta",
        "/v1/streams/{model}/{stream}/rollback",
    }


# --- explicit hostile cases --------------------------------------------------------------------

PATH_PARAM_ROUTES = [
    ("GET", "/v1/jobs/{job_id}"),
    ("POST", "/v1/jobs/{job_id}/cancel"),
    ("GET", "/v1/jobs/{job_id}/events"),
    ("GET", "/v1/versions/{version_id}"),
    ("GET", "/v1/versions/{version_id}/delta"),
    ("GET", "/v1/versions/{version_id}/adapter"),
    ("POST", "/v1/versions/{version_id}/checkpoint"),
    ("GET", "/v1/versions/{version_id}/checkpoint"),
    ("GET", "/v1/versions/{version_id}/checkpoint/files/{name}"),
    ("GET", "/v1/streams/{model}/{stream}/versions"),
    ("GET", "/v1/streams/{model}/{stream}/log"),
    ("POST", "/v1/streams/{model}/{stream}/rollback"),
    ("GET", "/v1/streams/{model}/{stream}/policy"),
    ("PUT", "/v1/streams/{model}/{stream}/policy"),
    ("DELETE", "/v1/streams/{model}/{stream}/policy"),
    ("POST", "/v1/versions/{version_id}/publish"),
    ("POST", "/v1/versions/{version_id}/generate"),
]
TRAVERSALS = [
    "..",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e",
    "%2E%2E%2F",
    "..%5C..%5C",
    "%2Fetc%2Fpasswd",
    "%2Ftmp",
    "%00",
    "x" * 10_000,
]


def test_path_parameters_refuse_traversal_and_long_ids(world):
    """Every path parameter of every route, with traversal and absurd ids: 4xx, never a file."""
    assert {t for _, t in PATH_PARAM_ROUTES} == {t for _, t in OPERATIONS if "{" in t}
    client = world["client"]
    for method, template in PATH_PARAM_ROUTES:
        names = re.findall(r"\{(\w+)\}", template)
        for name in names:
            for attack in TRAVERSALS:
                url = template
                for other in names:  # the other parameters valid, this one hostile
                    valid = {"model": "tiny", "stream": "main"}.get(other, "x")
                    url = url.replace("{" + other + "}", attack if other == name else valid)
                kwargs = {"json": {"version": None}} if method == "POST" else {}
                response = client.request(method, url, headers=AUTH, **kwargs)
                check_answer(response, url, world["store_dir"])
                assert 400 <= response.status_code < 500, (url, response.status_code)
                assert response.status_code != 200


def test_raw_dot_segments_never_reach_a_file(fuzz_settings, world):
    """The same over real HTTP with the dot segments unnormalised by the client."""
    import socket

    from live import serve

    with serve(create_app(fuzz_settings)) as url:
        host, port = url.removeprefix("http://").split(":")
        for path in (
            "/v1/versions/../../store.json",
            "/v1/streams/../../main/versions",
            "/v1/jobs/..%2F..%2Fstore.json",
            "/v1/versions/%2e%2e%2fstore.json/delta",
        ):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(
                    f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_ALL}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                raw = b""
                while chunk := sock.recv(65536):
                    raw += chunk
            head, _, body = raw.partition(b"\r\n\r\n")
            status = int(head.split()[1])
            assert 400 <= status < 500, (path, raw[:300])
            error = json.loads(body)["error"]
            assert error["code"] and world["store_dir"] not in body.decode()


PATHOLOGICAL = {
    "10k chars": "x" * 10_000,
    "control characters": "Paris\x01\x02\x1b[31m\x7f",
    "NUL": "Par\x00is",
    "RTL and emoji": "\u202eParis\u202c 🇫🇷🔥 باريس",
    "empty": "",
    "whitespace only": " \t\n ",
    "lone surrogate escape": "\\ud800",
    "braces": "{} {0} {subject} %s",
}


@pytest.mark.parametrize("field", ["subject", "target", "object", "prompt", "relation"])
@pytest.mark.parametrize("text", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_pathological_strings_in_facts(world, fuzz_redis, field, text):
    client = world["client"]
    before = job_count(fuzz_redis)
    record = fact(**{field: text})
    if field in ("prompt", "object"):  # prompt replaces subject+relation; object aliases target
        record = {"prompt": "The capital of France is", "target": "Lyon", field: text}
    response = client.post("/v1/edits", json={"model": "tiny", "facts": [record]}, headers=AUTH)
    check_answer(response, json.dumps(record), world["store_dir"])
    assert response.status_code in (202, 400, 413, 422), response.text
    if response.status_code in (400, 422):
        assert response.json()["error"]["field"].startswith("facts[0]")
        assert job_count(fuzz_redis) == before  # nothing enqueued for a refused edit
    if len(text) > 2000:
        assert response.status_code == 422  # the 2000-character limit of every text field
    elif field != "object" and any(char in text for char in "\x00\x01\x1b\x7f\u202e"):
        assert response.json()["error"]["code"] == "control_character", response.text
    if not text.strip() and field != "relation":
        assert response.status_code == 422, response.text  # blank subject / target / prompt


UNDECODABLE = [
    b'{"model": "tiny\x00", "facts": []}',  # a raw NUL inside a JSON string
    b'{"model": "\xff\xfe"}',  # not UTF-8
    b"\x00" * 64,
    b"[" * 5000 + b"]" * 5000,  # deeper than the JSON decoder goes
]


@pytest.mark.parametrize("url", ["/v1/edits", "/v1/streams/tiny/main/rollback"])
def test_undecodable_bodies_are_422_and_401_without_a_key(world, url):
    client = world["client"]
    for body in UNDECODABLE:
        for auth, status in ((AUTH, 422), ({}, 401), (WRONG_KEY, 401)):
            headers = {**auth, "Content-Type": "application/json"}
            response = client.post(url, content=body, headers=headers)
            check_answer(response, "", world["store_dir"])
            assert response.status_code == status, (body[:20], auth, response.text)
            if status == 422:
                assert response.json()["error"]["field"] == "body"


BODY_ROUTES = [("/v1/edits", edit_body()), ("/v1/streams/tiny/main/rollback", {"version": None})]


@pytest.mark.parametrize(("url", "valid"), BODY_ROUTES, ids=[u for u, _ in BODY_ROUTES])
def test_wrong_content_types_and_shapes(world, url, valid):
    client = world["client"]
    cases = [
        ({"content": json.dumps(valid), "headers": {"Content-Type": "text/plain"}}, 415),
        ({"data": {"model": "tiny"}}, 415),  # a form
        ({"files": {"f": ("a.json", json.dumps(valid))}}, 415),  # multipart
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 422),
        ({"content": b"", "headers": {"Content-Type": "application/json"}}, 422),
        ({"json": [valid]}, 422),  # an array, not an object
        ({"json": "just a string"}, 422),
        ({"content": b"null", "headers": {"Content-Type": "application/json"}}, 422),
        ({"json": 42}, 422),
        ({"content": json.dumps(valid), "headers": {}}, 415),  # no Content-Type at all
    ]
    for kwargs, status in cases:
        headers = {**AUTH, **kwargs.pop("headers", {})}
        response = client.post(url, headers=headers, **kwargs)
        check_answer(response, "", world["store_dir"])
        assert response.status_code == status, (kwargs, response.text)


@pytest.mark.parametrize(("url", "valid"), BODY_ROUTES, ids=[u for u, _ in BODY_ROUTES])
def test_oversized_bodies_on_every_body_route(world, fuzz_redis, url, valid):
    client = world["client"]
    before = job_count(fuzz_redis)
    padded = {**valid, "pad": "x" * 20_000}
    declared = client.post(url, json=padded, headers=AUTH)
    assert declared.status_code == 413
    lying = client.post(
        url,
        content=json.dumps(padded).encode(),
        headers={**AUTH, "Content-Type": "application/json", "Content-Length": "12"},
    )
    assert lying.status_code in (413, 422)  # h11 cuts the body at the declared length
    bogus = client.post(
        url,
        content=b"{}",
        headers={**AUTH, "Content-Type": "application/json", "Content-Length": "-1"},
    )
    assert bogus.status_code in (400, 413)
    for response in (declared, lying, bogus):
        check_answer(response, "", world["store_dir"])
    assert job_count(fuzz_redis) == before


def test_too_many_facts_and_deep_nesting(world, fuzz_redis):
    client = world["client"]
    before = job_count(fuzz_redis)
    many = client.post("/v1/edits", json=edit_body(6), headers=AUTH)
    assert (many.status_code, many.json()["error"]["code"]) == (422, "too_many_facts")
    huge_list = client.post("/v1/edits", json={"model": "tiny", "facts": [{}] * 2000}, headers=AUTH)
    assert huge_list.status_code in (413, 422)
    deep = b'{"model": "tiny", "facts": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    nested = client.post(
        "/v1/edits", content=deep, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert (nested.status_code, nested.json()["error"]["field"]) == (422, "body")
    for response in (many, huge_list, nested):
        check_answer(response, "", world["store_dir"])
    assert job_count(fuzz_redis) == before


# A lone surrogate (valid JSON, not valid Unicode text), a template that would multiply its
# subject, and control characters, in every text field of a fact: refused (400/422), never a 500.
HOSTILE_FIELDS = {
    "subject": '"Fr\\ud800ance"',
    "target": '"L\\udfffyon"',
    "ground_truth": '"\\ud800"',
    "paraphrases": '["a\\ud800", "\\u0000\\u001b[2J"]',
    "neighbors": '[{"prompt": "p\\ud800", "target": "t"}]',
    "relation": '"' + "{}" * 1000 + '"',
}


@pytest.mark.parametrize("field", HOSTILE_FIELDS)
def test_hostile_fact_fields_are_refused_never_a_500(world, fuzz_redis, field):
    client = world["client"]
    before = job_count(fuzz_redis)
    subject = '"' + "s" * 2000 + '"' if field == "relation" else '"France"'
    record = {"subject": subject, "relation": '"P36"', "target": '"Lyon"'}
    record[field] = HOSTILE_FIELDS[field]
    body = (
        '{"model": "tiny", "facts": [{'
        + ", ".join(f'"{key}": {value}' for key, value in record.items())
        + "}]}"
    )
    for headers in ({}, {"Idempotency-Key": "kë\u202e".encode()}):
        response = client.post(
            "/v1/edits",
            content=body.encode(),
            headers={**AUTH, **headers, "Content-Type": "application/json"},
        )
        check_answer(response, body, world["store_dir"])
        assert response.status_code in (400, 422), response.text
        assert response.json()["error"]["field"].startswith("facts[0]")
    assert job_count(fuzz_redis) == before
