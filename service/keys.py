"""API key hashing, the keys file, and the CLI that edits it.

python -m service.keys hash KEY      # prints sha256(KEY) for CRISPEDIT_API_KEYS
python -m service.keys new           # prints a fresh random key and its hash
python -m service.keys add NAME [--team T] [--grant MODEL:STREAM:ROLE ...] [--models M,...]
python -m service.keys list          # key id, name, team and grants of each key in the file
python -m service.keys revoke ID|NAME

add, list and revoke work on the keys file (`--file`, default `$CRISPEDIT_API_KEYS_FILE`), a JSON
object of the same form as `CRISPEDIT_API_KEYS` (sha256 -> key), rewritten atomically under a
lock; the API reloads it when it changes (or on SIGHUP), so a revocation takes effect at once.
`add` prints the new key once: only its hash is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from curvature_store.files import atomic_write_json
from service.config import KEY_ID_CHARS, ApiKey, identified_keys

_KEYS = TypeAdapter(dict[str, ApiKey])


class KeysFileError(Exception):
    """The keys file cannot be read or would not be valid."""


def hash_key(key: str) -> str:
    """The lowercase sha256 hex digest of an API key's UTF-8 bytes: what the settings store.

    A plain hash (no salt, no stretching) is enough because keys are long random strings, not
    passwords: there is nothing to guess from a dictionary.
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _problem(err: ValidationError | ValueError) -> str:
    """A validation error as one line: each problem's field path (sha256 keys shortened to the
    key id) and message."""
    if not isinstance(err, ValidationError):
        return str(err).splitlines()[0]
    problems = []
    for error in err.errors():
        where = ".".join(
            str(p)[:KEY_ID_CHARS] if len(str(p)) == 64 else str(p) for p in error["loc"]
        )
        problems.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(problems)


def new_key() -> str:
    """A fresh random key (256 bits, URL-safe), never starting with "-" so that it can follow a
    command-line flag."""
    while (key := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return key


def read_keys_file(path: Path) -> dict[str, ApiKey]:
    """The keys of the file (sha256 -> ApiKey, ids set); {} when it does not exist;
    KeysFileError naming the problem when it is not valid."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise KeysFileError(f"cannot read {path}: {err.strerror}") from None
    try:
        return identified_keys(_KEYS.validate_json(raw))
    except (ValidationError, ValueError) as err:
        raise KeysFileError(f"{path} is not a valid keys file: {_problem(err)}") from None


def _raw_entries(path: Path) -> dict[str, dict]:
    """The file's entries as written (so a rewrite keeps them as they were)."""
    read_keys_file(path)  # refuse to rewrite a file that is not valid
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside the keys file, so that two edits do not lose one another."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _parse_grant(text: str) -> dict:
    """`MODEL:STREAM:ROLE` (globs allowed; `:OWNERS` with teams joined by `+`, or `*`)."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise KeysFileError(f"grant {text!r}: expected MODEL:STREAM:ROLE[:OWNERS]")
    grant: dict = {"model": parts[0], "stream": parts[1], "role": parts[2]}
    if len(parts) == 4:
        grant["owners"] = "*" if parts[3] == "*" else parts[3].split("+")
    return grant


def add_key(
    path: Path,
    name: str,
    team: str | None = None,
    grants: list[str] | None = None,
    models: list[str] | None = None,
) -> tuple[str, ApiKey]:
    """Add a fresh random key to the file; (the key, its entry). KeysFileError when invalid."""
    key = new_key()
    entry: dict = {"name": name}
    if team is not None:
        entry["team"] = team
    if grants:
        entry["grants"] = [_parse_grant(g) for g in grants]
    if models:
        entry["models"] = models
    with _locked(path):
        entries = _raw_entries(path)
        if any(e.get("name") == name for e in entries.values()):
            raise KeysFileError(f"a key named {name!r} is in {path} already")
        entries[hash_key(key)] = entry
        try:
            checked = identified_keys(_KEYS.validate_python(entries))
        except (ValidationError, ValueError) as err:
            raise KeysFileError(f"not a valid key: {_problem(err)}") from None
        atomic_write_json(path, entries)
    return key, checked[hash_key(key)]


def revoke_key(path: Path, which: str) -> list[ApiKey]:
    """Remove the keys whose id (or a longer prefix of the sha256) or name is `which`; the keys
    removed (KeysFileError when none matched)."""
    with _locked(path):
        entries = _raw_entries(path)
        keys = read_keys_file(path)
        gone = [
            d
            for d, k in keys.items()
            if k.name == which or (len(which) >= KEY_ID_CHARS and d.startswith(which))
        ]
        if not gone:
            raise KeysFileError(f"no key with id or name {which!r} in {path}")
        atomic_write_json(path, {d: e for d, e in entries.items() if d not in gone})
    return [keys[d] for d in gone]


def describe(key: ApiKey) -> str:
    """One line for `list`: id, name, team and grants."""
    grants = ", ".join(
        f"{g.role} {g.model}/{g.stream}" + (f" of {g.owners}" if g.owners else "")
        for g in key.grants or []
    )
    return f"{key.id}  {key.name:<20} team {key.team:<16} {grants}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.keys", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("hash", help="print the sha256 of KEY").add_argument("key")
    sub.add_parser("new", help="print a fresh random key and its sha256")
    file_help = "the keys file (default: $CRISPEDIT_API_KEYS_FILE)"
    add = sub.add_parser("add", help="add a fresh key to the keys file and print it once")
    add.add_argument("name")
    add.add_argument("--team", help="default: the name")
    add.add_argument("--grant", action="append", metavar="MODEL:STREAM:ROLE[:OWNERS]")
    add.add_argument("--models", help="legacy form: edit on the team's own streams of these")
    listing = sub.add_parser("list", help="the keys in the keys file (ids, never keys)")
    revoke = sub.add_parser("revoke", help="remove keys by id or name")
    revoke.add_argument("which", help="a key id (12+ hex digits of its sha256) or a name")
    for command in (add, listing, revoke):
        command.add_argument(
            "--file", type=Path, default=os.environ.get("CRISPEDIT_API_KEYS_FILE"), help=file_help
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.command == "hash":
        print(hash_key(args.key))
        return 0
    if args.command == "new":
        key = new_key()
        print(f"key:    {key}\nsha256: {hash_key(key)}")
        return 0
    if args.file is None:
        print("error: no keys file: pass --file or set CRISPEDIT_API_KEYS_FILE", file=sys.stderr)
        return 2
    try:
        if args.command == "add":
            models = args.models.split(",") if args.models else None
            key, entry = add_key(Path(args.file), args.name, args.team, args.grant, models)
            print(f"key:    {key}\n{describe(entry)}")
        elif args.command == "list":
            for entry in read_keys_file(Path(args.file)).values():
                print(describe(entry))
        else:
            for entry in revoke_key(Path(args.file), args.which):
                print(f"revoked {describe(entry)}")
    except KeysFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
