"""docker-compose.yml rendered and validated in-process, as `docker compose config` would.

No docker or docker-compose binary: the file is read with PyYAML, its `${...}` are filled in
from an env file the way Compose interpolates, and the result is parsed and validated against
the Compose Specification by the `compose-spec` library (the dev extra), which refuses unknown
keys, wrong types, bad durations, ports and enum values. Its reference checks miss undefined
named volumes, so `render` checks those itself, as Compose does.

Only the env file given is read, never the calling shell's variables: Compose would let those
override the file, and a test must not depend on the shell it runs in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from compose_spec import PyCompose


class ComposeError(ValueError):
    """The compose file cannot be rendered: Compose would refuse it."""


# `$$` (a literal `$`), `$NAME`, or `${NAME}` with an optional `:-`, `-`, `:?`, `?`, `:+`, `+`
# and its word, as the Compose Specification's interpolation section defines them.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<bare>[A-Za-z_]\w*)"
    r"|\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<word>[^}]*))?\})"
)
# Where Compose turns an interpolated string into the number the specification asks for (the
# library takes numbers only there). A field missing here fails to parse with "expected u64",
# which says where to add it.
_INTEGER_FIELDS = [
    ("services", "*", "deploy", "replicas"),
    ("services", "*", "healthcheck", "retries"),
    ("services", "*", "scale"),
]


def env_file_values(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file, surrounding quotes removed."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """`text` with its variables filled in from `env`; ComposeError for a required one unset.

    `${X:-word}` takes the word when X is unset or empty, `${X-word}` only when unset; `:?` and
    `?` refuse the same cases with the word as the message; `:+` and `+` give the word when X is
    set (and not empty, for `:+`), else nothing.
    """

    def replace(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["bare"] or match["name"]
        value, op, word = env.get(name), match["op"], match["word"]
        if "${" in (word or ""):
            raise ComposeError(f"${{{name}{op}...}}: nested variables are not handled here")
        missing = value is None or (op is not None and op.startswith(":") and value == "")
        if op is None:
            return value or ""
        if op.endswith("-"):
            return word if missing else value
        if op.endswith("?"):
            if missing:
                raise ComposeError(f"required variable {name} is missing a value: {word}")
            return value
        return "" if missing else word  # `+`

    return _VARIABLE.sub(replace, text)


def _interpolated(node, env: dict[str, str]):
    """`node` (parsed YAML) with every string value interpolated; keys stay as written."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolated(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolated(value, env) for key, value in node.items()}
    return node


def _cast_integers(node, path: tuple[str, ...]) -> None:
    """Turn the string at `path` (`*`: every key) into an int, in place, where it is one."""
    head, *rest = path
    if not isinstance(node, dict):
        return
    keys = list(node) if head == "*" else [head] if head in node else []
    for key in keys:
        if rest:
            _cast_integers(node[key], tuple(rest))
        elif isinstance(node[key], str) and re.fullmatch(r"-?\d+", node[key].strip()):
            node[key] = int(node[key])


def _check_named_volumes(config: dict) -> None:
    declared = set(config.get("volumes") or {})
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, str):
                source = volume.split(":")[0] if ":" in volume else None
            else:
                source = volume.get("source") if volume.get("type") == "volume" else None
            if source and not source.startswith((".", "/", "~")) and source not in declared:
                raise ComposeError(f"service {name} mounts volume {source!r}, never declared")


def render(compose_file: Path, env_file: Path) -> dict:
    """The compose file with `env_file`'s values, validated, as the library normalises it.

    Raises ComposeError for what Compose refuses: an unset required variable, a file that does
    not follow the Compose Specification, a named volume no top-level `volumes:` declares.
    """
    config = _interpolated(yaml.safe_load(compose_file.read_text()), env_file_values(env_file))
    for path in _INTEGER_FIELDS:
        _cast_integers(config, path)
    try:
        compose = PyCompose.from_json(json.dumps(config))
        compose.validate()
        compose.to_spec()  # the full specification's model, on top of the parser's types
    except ValueError as error:
        raise ComposeError(f"{compose_file.name}: {error}") from error
    rendered = compose.to_dict()
    _check_named_volumes(rendered)
    return rendered
