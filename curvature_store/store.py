"""The store: content-addressed curvature artifacts and edit streams made of versions.

Three rules keep it safe with several processes (and hosts) on one directory:

1. *Nothing half-written is ever visible.* A file is written to a temp name in its final folder,
   fsynced and renamed; a version or curvature folder is assembled under `tmp/` (files moved in,
   hashed, fsynced, manifest written) and renamed into place as a whole (`curvature_store.files`
   holds the atomic writes, fsyncs and hashing).
2. *The head moves last, under a lock.* Creating a version or rolling back takes the stream's
   flock, re-reads HEAD.json, refuses when the caller's expected parent is not the head
   (`Conflict`), and only then publishes the version folder and rewrites HEAD.json. Readers never
   lock: HEAD.json is replaced atomically and always names a complete version.
3. *Reads verify.* Every manifest records each file's sha256 and size; reading a file checks them
   (a hash is remembered per file identity and modification time, so a big file is hashed once per
   process) and a mismatch raises `Corrupt`, never a silently wrong tensor.

Error messages are meant for users: they name paths relative to the store root, never the root's
absolute path. Malformed names and ids raise `StoreError` before any filesystem access, which is
also the web API's guard against path traversal. `_failpoint` calls mark the steps where the crash
tests kill a writer (an environment variable turns one on; otherwise they do nothing).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import secrets
import signal
import stat
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import EllipsisType
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from contract.names import (
    CURVATURE_FILE,
    DELTA_FILE,
    NAME_RULE,
    VERSION_RULE,
    is_curvature_key,
    is_file_name,
    is_name,
    is_sha256,
    is_version_id,
)
from contract.names import HEAD_FILE as HEAD
from contract.names import MANIFEST_FILE as MANIFEST
from contract.names import POLICY_FILE as POLICY
from curvature_store.files import (
    age_s,
    atomic_write,
    atomic_write_json,
    fsync_dir,
    hash_and_sync,
    move_file,
    remove,
    sha256_file,
)

STORE_FORMAT = 1
LOG = "log.jsonl"
OWNER = "OWNER.json"  # the team that owns a stream (written once, by `claim_stream`)
LOCK = ".lock"
META_KEY = "crispedit"  # the safetensors metadata key the engine uses for its JSON header
CUMULATIVE_FORMAT = 1  # format_version of a cumulative delta file (the engine's delta format)
GARBAGE_AGE_S = 3600.0


CURVATURE_FIELDS = (
    "model_fingerprint",
    "layers",
    "corpus_digest",
    "tokens",
    "labels",
    "kind",
    "format_version",
)
# Manifest keys the store writes itself; a caller's manifest may not set them.
VERSION_FIELDS = ("id", "model", "stream", "parent", "number", "created_at", "files", "actor")


class StoreError(Exception):
    """Anything the store refuses or cannot do; the message is safe to show a user."""


class NotFound(StoreError):
    """A well-formed name or id that the store does not hold."""


class Conflict(StoreError):
    """The caller's expected parent (or expected head) is not the stream's head.

    `head` is the head the store found, so the caller can rebase and retry.
    """

    def __init__(self, message: str, head: str | None = None):
        super().__init__(message)
        self.head = head

    def __reduce__(self):  # keep `head` when the error crosses a process boundary (RQ, pickling)
        return (type(self), (str(self), self.head))


class Corrupt(StoreError):
    """A file or manifest that is missing, unreadable or does not match its recorded sha256/size."""


# --- small helpers ---------------------------------------------------------------------------

# flock(2) excludes other processes and other open descriptors, but on NFS Linux emulates it with
# per-process POSIX locks; a per-path thread lock keeps threads of one process (a web server's
# thread pool) apart there too.
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _now() -> str:
    """The current UTC time as ISO 8601 with milliseconds, e.g. `2025-11-22T02:29:00.123Z`."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _show(value: object) -> str:
    """A user-supplied value for an error message, cut short so a message stays one line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _failpoint(name: str) -> None:
    """Die here, as `kill -9` would, when the environment asks for it (crash tests only)."""
    if os.environ.get("CURVATURE_STORE_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _check_name(value: object, field: str) -> str:
    """A model or stream name, or StoreError naming the field (the path-traversal guard)."""
    if not is_name(value):
        raise StoreError(f"invalid {field} name {_show(value)}: {NAME_RULE}")
    return value


def _check_version_id(value: object, field: str = "version id") -> str:
    """A well-formed version id (`v` + 26 hex digits), or StoreError."""
    if not is_version_id(value):
        raise StoreError(f"invalid {field} {_show(value)}: {VERSION_RULE}")
    return value


def _check_key(value: object) -> str:
    """A well-formed curvature key (32 hex digits), or StoreError."""
    if not is_curvature_key(value):
        raise StoreError(f"invalid curvature key {_show(value)}: expected 32 hex digits")
    return value


def _check_file_name(value: object) -> str:
    """A file name a version may hold (`NAME.safetensors`, no folders), or StoreError."""
    if not is_file_name(value):
        raise StoreError(f"invalid file name {_show(value)}: expected NAME.safetensors")
    return value


def _check_json(obj: object, what: str) -> None:
    """StoreError unless `obj` is plain JSON (no NaN), so every manifest stays readable anywhere."""
    try:
        json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise StoreError(f"{what} is not plain JSON: {err}") from None


def _source_file(path: str | Path, label: str) -> Path:
    """A caller's staged file: it must be a regular file (a symlink could point anywhere)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise StoreError(f"{label} ({path.name}) is not a regular file")
    return path


# --- the store -------------------------------------------------------------------------------


def _check_version_args(
    parent: str | None, files: dict[str, str | Path], manifest: dict
) -> dict[str, Path]:
    """The checks `Store.create_version` makes before touching anything; returns its source files
    by name."""
    if parent is not None:
        _check_version_id(parent, "parent version id")
    if DELTA_FILE not in files:
        raise StoreError(f"a version needs a {DELTA_FILE}")
    if not isinstance(manifest, dict):
        raise StoreError("the version manifest must be a JSON object")
    reserved = sorted(set(manifest) & set(VERSION_FIELDS))
    if reserved:
        raise StoreError(f"manifest fields {reserved} are set by the store")
    _check_json(manifest, "the version manifest")
    return {_check_file_name(name): _source_file(p, name) for name, p in files.items()}


class Store:
    """A curvature/stream/version store rooted at one directory (see the package docstring).

    One instance per process is the intended use: it remembers which files it has already hashed.
    Instances in different processes (or hosts sharing the volume) coordinate through flock(2).
    """

    lock_timeout_s: float = 60.0  # how long a writer waits for a stream's lock before giving up

    def __init__(self, root: str | Path, create: bool = True):
        self.root = Path(root).absolute()
        marker = self.root / "store.json"
        if not marker.exists():
            if not create:
                raise NotFound("no curvature store at the given path (store.json is missing)")
            for sub in ("curvature", "streams", "versions", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            if not marker.exists():  # another process may have just created it
                atomic_write_json(marker, {"format": STORE_FORMAT, "created_at": _now()})
        info = self._read_json(marker, "store.json")
        if info.get("format") != STORE_FORMAT:
            raise StoreError(f"store format {_show(info.get('format'))} is not supported")
        for sub in ("curvature", "streams", "versions", "tmp"):
            (self.root / sub).mkdir(exist_ok=True)
        # path -> ((inode, size, mtime_ns, ctime_ns), sha256) of files this process has hashed
        self._hashes: dict[str, tuple[tuple[int, int, int, int], str]] = {}

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # --- paths, reading and verifying (private) ---

    def _rel(self, path: Path) -> str:
        """`path` relative to the root, for error messages (never the root's absolute path)."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.name

    def _stream_dir(self, model: str, stream: str) -> Path:
        return self.root / "streams" / _check_name(model, "model") / _check_name(stream, "stream")

    def _version_dir(self, version_id: str) -> Path:
        return self.root / "versions" / _check_version_id(version_id)

    def _curvature_dir(self, key: str) -> Path:
        return self.root / "curvature" / _check_key(key)

    def _tmp_dir(self, prefix: str) -> Path:
        """A fresh, empty folder under tmp/ (same filesystem as everything else)."""
        path = self.root / "tmp" / f"{prefix}-{int(time.time() * 1000):012x}-{secrets.token_hex(6)}"
        path.mkdir(parents=True)
        return path

    def _read_json(self, path: Path, what: str) -> dict:
        """A JSON object from disk; FileNotFoundError passes through, anything else is Corrupt."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as err:
            raise Corrupt(f"{what} ({self._rel(path)}) is unreadable: {err.strerror}") from None
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise Corrupt(f"{what} ({self._rel(path)}) is not valid JSON") from None
        if not isinstance(doc, dict):
            raise Corrupt(f"{what} ({self._rel(path)}) is not a JSON object")
        return doc

    def _check_file(self, path: Path, record: dict, use_cache: bool = True) -> Path:
        """`path` after checking its size and sha256 against `record`, or Corrupt."""
        rel = self._rel(path)
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise Corrupt(f"{rel} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise Corrupt(f"{rel} is not a regular file")
        if st.st_size != record["bytes"]:
            raise Corrupt(f"{rel} has {st.st_size} bytes, its manifest says {record['bytes']}")
        identity = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if use_cache and self._hashes.get(str(path)) == (identity, record["sha256"]):
            return path
        try:
            digest = sha256_file(path)
        except OSError as err:
            raise Corrupt(f"{rel} is unreadable: {err.strerror}") from None
        if digest != record["sha256"]:
            raise Corrupt(
                f"{rel} does not match its manifest (sha256 {digest[:12]}..., "
                f"expected {record['sha256'][:12]}...)"
            )
        self._hashes[str(path)] = (identity, digest)
        return path

    def _remember(self, path: Path, record: dict) -> None:
        """Note a file the store has just hashed itself, so the next read need not rehash it."""
        st = path.lstat()
        self._hashes[str(path)] = (
            (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns),
            record["sha256"],
        )

    @contextlib.contextmanager
    def _lock(self, path: Path) -> Iterator[None]:
        """Hold an exclusive flock(2) on `path` (created if needed); released even on kill -9."""
        deadline = time.monotonic() + self.lock_timeout_s
        with _THREAD_LOCKS_GUARD:
            thread_lock = _THREAD_LOCKS.setdefault(str(path), threading.Lock())
        if not thread_lock.acquire(timeout=self.lock_timeout_s):
            raise StoreError(f"timed out waiting for the lock {self._rel(path)}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            message = f"timed out waiting for the lock {self._rel(path)}"
                            raise StoreError(message) from None
                        # Poll (with jitter, so waiting writers do not move in lockstep) rather
                        # than block, so a stuck holder becomes an error, not a hung request.
                        time.sleep(random.uniform(0.001, 0.01))
                yield
            finally:
                os.close(fd)  # closing the descriptor releases the flock
        finally:
            thread_lock.release()

    # --- staging ---

    def staging_dir(self) -> Path:
        """A fresh empty folder under ROOT/tmp for the caller to write files into.

        Files written there can be handed to `create_version` or `put_curvature`, which move them
        (a rename: same filesystem). An abandoned staging folder is garbage (`collect_garbage`).
        """
        return self._tmp_dir("stage")

    def checkpoint_file(self, key: str) -> Path:
        """Where a build of curvature `key` keeps its partial sums until the curvature is stored.

        A fixed name under tmp/, so that a build started again finds it; like any staging file it
        is garbage once untouched for an hour (a live build rewrites it more often than that).
        """
        return self.root / "tmp" / f"checkpoint-{_check_key(key)}.safetensors"

    def _drop_empty_staging(self, files: list[Path]) -> None:
        """Remove the callers' staging folders under tmp/ once the store has taken their files."""
        tmp = self.root / "tmp"
        for parent in {f.parent for f in files}:
            if parent.parent == tmp:
                with contextlib.suppress(OSError):
                    parent.rmdir()  # only succeeds when empty

    # --- curvature (content-addressed) ---

    @staticmethod
    def curvature_key(
        model_fingerprint: str,
        layers: list[str],
        corpus_digest: str,
        tokens: int,
        labels: str,
        kind: str,
        format_version: int,
    ) -> str:
        """The content address of a curvature: sha256 of its key fields as canonical JSON, 32 hex.

        The layer order is part of the key (the engine passes layers in model order).
        """
        fields = Store._key_fields(
            {
                "model_fingerprint": model_fingerprint,
                "layers": layers,
                "corpus_digest": corpus_digest,
                "tokens": tokens,
                "labels": labels,
                "kind": kind,
                "format_version": format_version,
            }
        )
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    @staticmethod
    def _key_fields(fields: dict) -> dict:
        """The seven curvature key fields, type-checked, or StoreError naming what is wrong."""
        missing = [name for name in CURVATURE_FIELDS if name not in fields]
        extra = sorted(set(fields) - set(CURVATURE_FIELDS))
        if missing or extra:
            raise StoreError(
                f"curvature key fields: missing {missing or 'none'}, unknown {extra or 'none'}"
            )
        out = {name: fields[name] for name in CURVATURE_FIELDS}
        layers = out["layers"]
        if not isinstance(layers, list | tuple) or not all(isinstance(x, str) for x in layers):
            raise StoreError("curvature key field 'layers' must be a list of strings")
        out["layers"] = list(layers)
        for name in ("tokens", "format_version"):
            if isinstance(out[name], bool) or not isinstance(out[name], int):
                raise StoreError(f"curvature key field {name!r} must be an integer")
        for name in ("model_fingerprint", "corpus_digest", "labels", "kind"):
            if not isinstance(out[name], str):
                raise StoreError(f"curvature key field {name!r} must be a string")
        return out

    def _curvature_manifest(self, key: str) -> dict | None:
        """The manifest of curvature `key`, None when absent, Corrupt when unreadable or wrong."""
        path = self._curvature_dir(key) / MANIFEST
        try:
            doc = self._read_json(path, "curvature manifest")
        except FileNotFoundError:
            return None
        rel = self._rel(path)
        if doc.get("key") != key or not isinstance(doc.get("key_fields"), dict):
            raise Corrupt(f"{rel} does not describe curvature {key}")
        if not is_sha256(doc.get("sha256")) or not isinstance(doc.get("bytes"), int):
            raise Corrupt(f"{rel} has no valid sha256/bytes record")
        return doc

    def put_curvature(self, file: str | Path, key_fields: dict, meta: dict | None = None) -> dict:
        """Take ownership of a curvature file and file it under its content key; the manifest.

        The file is moved in (it is gone from where it was, whatever the outcome) and the manifest
        records the key fields, `meta`, sha256, size and time. When the key is already stored and
        intact, the existing artifact wins: the new file is deleted and the existing manifest is
        returned with `"cache_hit": True`. A stored artifact that fails verification is replaced.
        """
        fields = self._key_fields(key_fields)
        meta = {} if meta is None else meta
        _check_json(meta, "curvature meta")
        src = _source_file(file, "curvature file")
        key = self.curvature_key(**fields)
        final = self._curvature_dir(key)

        def intact() -> dict | None:  # the stored manifest if present and verified, else None
            with contextlib.suppress(Corrupt):
                doc = self._curvature_manifest(key)
                if doc is not None:
                    self._check_file(final / CURVATURE_FILE, doc)
                    return doc
            return None

        work: Path | None = None
        try:
            existing = intact()
            if existing is not None:
                return {**existing, "cache_hit": True}
            work = self._tmp_dir("curvature")
            move_file(src, work / CURVATURE_FILE)
            record = hash_and_sync(work / CURVATURE_FILE)
            doc = {
                "key": key,
                "key_fields": fields,
                "meta": meta,
                "file": CURVATURE_FILE,
                **record,
                "created_at": _now(),
            }
            atomic_write_json(work / MANIFEST, doc)
            _failpoint("curvature:staged")
            trash: Path | None = None
            with self._lock(self.root / "curvature" / LOCK):
                existing = intact()  # a concurrent put of the same key may have won meanwhile
                if existing is not None:
                    return {**existing, "cache_hit": True}
                if final.exists():  # stored but corrupt: move it aside, then replace it
                    trash = self._tmp_dir("trash")
                    os.rename(final, trash / key)
                os.rename(work, final)
                fsync_dir(final.parent)
            if trash is not None:
                remove(trash)
            self._remember(final / CURVATURE_FILE, record)
            return {**doc, "cache_hit": False}
        finally:
            src.unlink(missing_ok=True)
            if work is not None:
                remove(work)  # already renamed away on success
            self._drop_empty_staging([src])

    def find_curvature(self, **key_fields: Any) -> dict | None:
        """The manifest stored for these key fields, or None (the file is not verified here)."""
        return self._curvature_manifest(self.curvature_key(**self._key_fields(key_fields)))

    def curvature_file(self, key: str, verify: bool = True) -> Path:
        """The path of curvature `key`'s file, checked against its manifest's sha256 and size."""
        doc = self._curvature_manifest(key)
        if doc is None:
            raise NotFound(f"no curvature {key}")
        path = self._curvature_dir(key) / CURVATURE_FILE
        _failpoint("curvature:read")
        if verify:
            return self._check_file(path, doc)
        if not path.is_file():
            raise Corrupt(f"{self._rel(path)} is missing")
        return path

    def list_curvature(self) -> list[dict]:
        """Manifests of all stored curvature, oldest first (unreadable ones are left to verify)."""
        docs = []
        for entry in sorted((self.root / "curvature").iterdir()):
            if is_curvature_key(entry.name):
                with contextlib.suppress(Corrupt):
                    doc = self._curvature_manifest(entry.name)
                    if doc is not None:
                        docs.append(doc)
        return sorted(docs, key=lambda d: (str(d.get("created_at")), d["key"]))

    def verify_curvature(self, key: str) -> None:
        """Rehash curvature `key` (no cached result): NotFound or Corrupt on a problem."""
        doc = self._curvature_manifest(key)
        if doc is None:
            raise NotFound(f"no curvature {key}")
        self._check_file(self._curvature_dir(key) / CURVATURE_FILE, doc, use_cache=False)

    def remove_curvature(self, key: str) -> None:
        """Delete curvature `key`: renamed out of sight, then deleted (NotFound if absent)."""
        final = self._curvature_dir(key)
        with self._lock(self.root / "curvature" / LOCK):
            if not final.exists():
                raise NotFound(f"no curvature {key}")
            trash = self._tmp_dir("trash")
            os.rename(final, trash / key)
            fsync_dir(final.parent)
        remove(trash)

    # --- streams: HEAD and log (private) ---

    def _read_head(self, sdir: Path) -> dict:
        """HEAD.json of a stream folder; a stream never written is at the base (version None)."""
        path = sdir / HEAD
        try:
            info = self._read_json(path, "stream head")
        except FileNotFoundError:
            return {"version": None, "count": 0, "moves": 0, "moved_at": None}
        version = info.get("version")
        if version is not None and not is_version_id(version):
            raise Corrupt(f"{self._rel(path)} names an invalid version")
        if not isinstance(info.get("count"), int) or not isinstance(info.get("moves"), int):
            raise Corrupt(f"{self._rel(path)} has no valid count/moves")
        return info

    def _read_log(self, sdir: Path) -> list[dict]:
        """The stream's head moves, oldest first. A torn line (a crash mid-append) is skipped."""
        try:
            lines = (sdir / LOG).read_bytes().splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict) and isinstance(entry.get("moves"), int):
                    entries.append(entry)
        return entries

    def _append_log(self, sdir: Path, entry: dict) -> None:
        """Append one JSON line to the stream's log and fsync it."""
        path = sdir / LOG
        data = (json.dumps(entry, sort_keys=True) + "\n").encode()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # keep a torn last line a line of its own
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if size == 0:
            fsync_dir(sdir)

    def _repair_log(self, sdir: Path, info: dict) -> None:
        """Log the head move a crash kept out of the log (it died between HEAD.json and log).

        Called under the stream's lock before every head move. HEAD.json counts its moves; when
        the log's last entry has a smaller count, exactly the current head's move is missing.
        """
        entries = self._read_log(sdir)
        if info["moves"] <= (entries[-1]["moves"] if entries else 0):
            return
        created = {e.get("version") for e in entries if e.get("op") in ("create", "publish")}
        held = {e.get("version") for e in entries if e.get("op") == "held"}
        op = (
            ("publish" if info["version"] in held else "create")
            if info["version"] is not None and info["version"] not in created
            else "rollback"
        )
        self._append_log(
            sdir,
            {
                "op": op,
                "version": info["version"],
                "at": info["moved_at"],
                "moves": info["moves"],
                "recovered": True,
            },
        )

    def _move_head(
        self,
        sdir: Path,
        old: dict,
        version: str | None,
        count: int,
        op: str,
        actor: dict | None = None,
        note: dict | None = None,
    ) -> dict:
        """Rewrite HEAD.json (the commit point), then log the move (with `actor`, who made it,
        when known, and `note`'s fields, such as `forced`). Call under the stream's lock."""
        info = {"version": version, "count": count, "moves": old["moves"] + 1, "moved_at": _now()}
        atomic_write_json(sdir / HEAD, info)
        if old["moves"] == 0:  # a new stream: make its folders' own entries durable too
            fsync_dir(sdir.parent)
            fsync_dir(sdir.parent.parent)
        _failpoint(f"{op}:head_moved")
        entry = {
            "op": op,
            "version": version,
            "from": old["version"],
            "at": info["moved_at"],
            "moves": info["moves"],
            **(note or {}),
        }
        if actor is not None:
            entry["actor"] = actor
        # The move is committed; a failed append is repaired by the next move (_repair_log).
        with contextlib.suppress(OSError):
            self._append_log(sdir, entry)
        return info

    # --- versions (private) ---

    def _read_manifest(self, version_id: str, missing: type[StoreError] = NotFound) -> dict:
        """A version's manifest, structurally checked; `missing` is raised when it is absent."""
        vdir = self._version_dir(version_id)
        path = vdir / MANIFEST
        try:
            doc = self._read_json(path, "version manifest")
        except FileNotFoundError:
            if missing is NotFound:
                raise NotFound(f"no version {version_id}") from None
            raise missing(f"version {version_id} is missing ({self._rel(vdir)})") from None
        rel = self._rel(path)
        files = doc.get("files")
        parent = doc.get("parent")
        number = doc.get("number")
        if (
            doc.get("id") != version_id
            or not is_name(doc.get("model"))
            or not is_name(doc.get("stream"))
            or not (parent is None or is_version_id(parent))
            or isinstance(number, bool)
            or not isinstance(number, int)
            or number < 1
            or not isinstance(files, dict)
            or DELTA_FILE not in files
        ):
            raise Corrupt(f"{rel} is not a valid version manifest")
        for name, record in files.items():
            if (
                not is_file_name(name)
                or not isinstance(record, dict)
                or not is_sha256(record.get("sha256"))
                or not isinstance(record.get("bytes"), int)
            ):
                raise Corrupt(f"{rel} has an invalid record for file {_show(name)}")
        return doc

    def _chain(self, version_id: str | None, model: str, stream: str) -> list[dict]:
        """Manifests from `version_id` back to the stream's first version, newest first.

        Checks every link: each version exists, is on the same stream and has number one less than
        its child, and the chain ends at number 1 with no parent. A broken link is Corrupt.
        """
        chain: list[dict] = []
        current = version_id
        while current is not None:
            doc = self._read_manifest(current, missing=Corrupt)
            if (doc["model"], doc["stream"]) != (model, stream):
                raise Corrupt(f"version {current} is not on stream {model}/{stream}")
            if chain and doc["number"] != chain[-1]["number"] - 1:
                raise Corrupt(f"version {chain[-1]['id']} has a parent with a wrong number")
            chain.append(doc)
            current = doc["parent"]
        if chain and chain[-1]["number"] != 1:
            raise Corrupt(
                f"version {chain[-1]['id']} has no parent but number {chain[-1]['number']}"
            )
        return chain

    def _load_tensors(self, path: Path) -> tuple[dict[str, np.ndarray], dict]:
        """(tensors, safetensors metadata) of a verified file; Corrupt if it does not parse."""
        try:
            with safe_open(path, framework="np") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError, TypeError) as err:
            message = err.strerror if isinstance(err, OSError) else type(err).__name__
            raise Corrupt(
                f"{self._rel(path)} is not a readable safetensors file ({message})"
            ) from None
        return tensors, metadata

    # --- streams and versions (public) ---

    def head_info(self, model: str, stream: str) -> dict:
        """The stream's HEAD.json: `{"version", "count", "moves", "moved_at"}`.

        `count` is the number of versions in the head's lineage (0 at the base), `moves` counts
        every head move ever (creates and rollbacks), so it changes whenever the head does.
        """
        return self._read_head(self._stream_dir(model, stream))

    def head(self, model: str, stream: str) -> str | None:
        """The stream's head version id, or None at the base (also for a stream never written)."""
        return self.head_info(model, stream)["version"]

    def has_stream(self, model: str, stream: str) -> bool:
        """Whether any version was ever created on the stream."""
        return (self._stream_dir(model, stream) / HEAD).exists()

    def stream_owner(self, model: str, stream: str) -> dict | None:
        """The stream's owner record (`{"team", ...}` as `claim_stream` wrote it), or None."""
        path = self._stream_dir(model, stream) / OWNER
        try:
            doc = self._read_json(path, "stream owner")
        except FileNotFoundError:
            return None
        if not isinstance(doc.get("team"), str):
            raise Corrupt(f"{self._rel(path)} names no team")
        return doc

    def claim_stream(self, model: str, stream: str, owner: dict) -> dict:
        """Record `owner` (`{"team": ..., ...}`) as the stream's owner unless it has one; the
        owner record now in force. Under the stream's lock, so of two racing claims one wins and
        both callers see the same owner; a claim may precede the stream's first version."""
        if not isinstance(owner.get("team"), str):
            raise StoreError("a stream owner needs a team")
        _check_json(owner, "owner")
        sdir = self._stream_dir(model, stream)
        with self._lock(sdir / LOCK):
            found = self.stream_owner(model, stream)
            if found is not None:
                return found
            doc = {**owner, "claimed_at": _now()}
            atomic_write_json(sdir / OWNER, doc)
            return doc

    def log(self, model: str, stream: str) -> list[dict]:
        """The stream's head moves, oldest first: `{"op": "create"|"rollback", "version",
        "from", "at", "moves", "actor"?}` (`actor` when the writer said who it was)."""
        return self._read_log(self._stream_dir(model, stream))

    def streams(self) -> list[tuple[str, str]]:
        """Every `(model, stream)` that has a head, sorted."""
        found = []
        for head in (self.root / "streams").glob(f"*/*/{HEAD}"):
            model, stream = head.parent.parent.name, head.parent.name
            if is_name(model) and is_name(stream):
                found.append((model, stream))
        return sorted(found)

    def create_version(
        self,
        model: str,
        stream: str,
        parent: str | None,
        files: dict[str, str | Path],
        manifest: dict,
        actor: dict | None = None,
        publish: bool = True,
        note: dict | None = None,
    ) -> dict:
        """Create a version on the stream's head and move the head to it; the stored manifest.

        With `publish=False` the version is kept but the head stays (a guarded stream's version
        outside its policy): the log records it as `held`, `versions` lists it with `held` true,
        and `publish_version` can move the head to it later. `note`'s fields go into the log
        entry (e.g. `{"forced": true}`).

        `files` maps names (`delta.safetensors`, required; `rows.safetensors`, optional; any
        `NAME.safetensors`) to files the caller wrote, best under `staging_dir()`. `parent` is the
        head the caller built on: when it is not the head any more, Conflict (with `.head`) and
        nothing changes. The store takes the files whatever the outcome (moved in, or deleted),
        except when the arguments themselves are invalid. The manifest is `manifest` plus id,
        model, stream, parent, number (parent's + 1, or 1), created_at and files
        (`{name: {"sha256", "bytes"}}`), and `actor` (who made it, e.g. `{"team", "key_id"}`)
        when given, which the stream's log records too.
        """
        sdir = self._stream_dir(model, stream)
        sources = _check_version_args(parent, files, manifest)
        if actor is not None:
            _check_json(actor, "actor")
        work: Path | None = None
        try:
            # Cheap check first, so a stale caller fails before the costly hashing; the binding
            # check is repeated under the lock in `_publish`.
            self._check_head(sdir, model, stream, self._read_head(sdir), parent)
            number = (
                1 if parent is None else self._read_manifest(parent, missing=Corrupt)["number"] + 1
            )
            version_id = f"v{int(time.time() * 1000):012x}{secrets.token_hex(7)}"
            work = self._tmp_dir("version")
            records = {}
            for name, src in sources.items():
                move_file(src, work / name)
                records[name] = hash_and_sync(work / name)
            self._drop_empty_staging(list(sources.values()))  # now, so a crash leaves less behind
            doc = {
                **manifest,
                "id": version_id,
                "model": model,
                "stream": stream,
                "parent": parent,
                "number": number,
                "created_at": _now(),
                "files": records,
            }
            if actor is not None:
                doc["actor"] = actor
            atomic_write_json(work / MANIFEST, doc)
            _failpoint("create:staged")
            final = self._publish(
                sdir, model, stream, parent, work, version_id, number, actor, publish, note
            )
        finally:
            for src in sources.values():
                src.unlink(missing_ok=True)  # moved in already, unless we failed before that
            if work is not None:
                remove(work)  # renamed away on success
            self._drop_empty_staging(list(sources.values()))
        with contextlib.suppress(OSError):  # only a cache: the version is committed either way
            for name, record in records.items():
                self._remember(final / name, record)
        return doc

    @staticmethod
    def _check_head(sdir: Path, model: str, stream: str, info: dict, parent: str | None) -> None:
        """Conflict (with `.head`) unless the stream's head, as `info` read it, is `parent`."""
        if info["version"] != parent:
            head = info["version"]
            raise Conflict(f"stream {model}/{stream} has head {head}, not {parent}", head=head)

    def _publish(
        self,
        sdir: Path,
        model: str,
        stream: str,
        parent: str | None,
        work: Path,
        version_id: str,
        number: int,
        actor: dict | None,
        publish: bool = True,
        note: dict | None = None,
    ) -> Path:
        """Under the stream's lock: check the head again, rename the staged version `work` into
        place and move the head to it (or, with `publish=False`, log it as held); returns the
        version's folder."""
        with self._lock(sdir / LOCK):
            info = self._read_head(sdir)
            self._check_head(sdir, model, stream, info, parent)
            self._repair_log(sdir, info)
            final = self._version_dir(version_id)
            os.rename(work, final)
            fsync_dir(final.parent)
            _failpoint("create:published")
            if publish:
                self._move_head(sdir, info, version_id, number, "create", actor, note)
            else:
                self._hold(sdir, info, version_id, actor, note)
        return final

    def _hold(
        self, sdir: Path, info: dict, version_id: str, actor: dict | None, note: dict | None
    ) -> None:
        """Log a version that was kept without moving the head. The log is what keeps it out of
        `garbage`, so its append must succeed (unlike a head move's, which `_repair_log`
        repairs); a stream first written this way gets its HEAD.json (at the base) too."""
        if not (sdir / HEAD).exists():
            atomic_write_json(sdir / HEAD, info)
            fsync_dir(sdir.parent)
            fsync_dir(sdir.parent.parent)
        entry = {
            "op": "held",
            "version": version_id,
            "from": info["version"],
            "at": _now(),
            "moves": info["moves"],  # the head did not move: repair must not count this one
            **(note or {}),
        }
        if actor is not None:
            entry["actor"] = actor
        self._append_log(sdir, entry)

    def publish_version(
        self,
        model: str,
        stream: str,
        version_id: str,
        expected_head: str | EllipsisType | None = ...,
        note: dict | None = None,
        actor: dict | None = None,
    ) -> dict:
        """Move the head to a held version (`create_version(publish=False)`) whose parent is the
        head; the new head info. The log entry records `actor` (who published it) and `note`'s
        fields.

        NotFound for an unknown version; StoreError when it is on another stream or was
        published already; Conflict (with `.head`) when its parent is not the head any more (the
        stream moved on since it was made) or the head is not `expected_head`."""
        sdir = self._stream_dir(model, stream)
        _check_version_id(version_id)
        doc = self._read_manifest(version_id)
        if (doc["model"], doc["stream"]) != (model, stream):
            raise StoreError(f"version {version_id} is not on stream {model}/{stream}")
        with self._lock(sdir / LOCK):
            info = self._read_head(sdir)
            if expected_head is not ...:
                self._check_head(sdir, model, stream, info, expected_head)
            if version_id not in self._held(sdir):
                raise StoreError(f"version {version_id} was published already")
            if doc["parent"] != info["version"]:
                raise Conflict(
                    f"version {version_id} was made on {doc['parent'] or 'the base'}, but the "
                    f"head of {model}/{stream} is now {info['version'] or 'the base'}",
                    head=info["version"],
                )
            self._repair_log(sdir, info)
            return self._move_head(sdir, info, version_id, doc["number"], "publish", actor, note)

    def _held(self, sdir: Path) -> set[str]:
        """The versions of a stream that were kept without ever becoming its head."""
        entries = self._read_log(sdir)
        held = {e["version"] for e in entries if e.get("op") == "held"}
        published = {e.get("version") for e in entries if e.get("op") in ("create", "publish")}
        return held - published

    # --- stream policies ---

    def policy(self, model: str, stream: str) -> dict | None:
        """The stream's publishing policy as stored (`contract.policy.Policy.to_dict`), or None
        for an unguarded stream. Corrupt when the file is not a JSON object."""
        path = self._stream_dir(model, stream) / POLICY
        try:
            return self._read_json(path, "stream policy")
        except FileNotFoundError:
            return None

    def set_policy(self, model: str, stream: str, policy: dict) -> None:
        """Store `policy` (a JSON object, validated by the caller) with the stream, atomically;
        the stream need not have a version yet."""
        _check_json(policy, "policy")
        sdir = self._stream_dir(model, stream)
        sdir.mkdir(parents=True, exist_ok=True)
        with self._lock(sdir / LOCK):
            atomic_write_json(sdir / POLICY, policy)

    def delete_policy(self, model: str, stream: str) -> bool:
        """Remove the stream's policy; whether it had one."""
        sdir = self._stream_dir(model, stream)
        if not (sdir / POLICY).exists():
            return False
        with self._lock(sdir / LOCK):
            existed = (sdir / POLICY).exists()
            (sdir / POLICY).unlink(missing_ok=True)
            fsync_dir(sdir)
        return existed

    def manifest(self, version_id: str) -> dict:
        """A version's manifest (StoreError for a malformed id, NotFound for an unknown one)."""
        return self._read_manifest(version_id)

    def version_file(self, version_id: str, name: str = DELTA_FILE, verify: bool = True) -> Path:
        """The path of one of a version's files, checked against its sha256 and size."""
        _check_version_id(version_id)
        _check_file_name(name)
        doc = self._read_manifest(version_id)
        if name not in doc["files"]:
            raise NotFound(f"version {version_id} has no {name}")
        path = self._version_dir(version_id) / name
        if verify:
            return self._check_file(path, doc["files"][name])
        if not path.is_file():
            raise Corrupt(f"{self._rel(path)} is missing")
        return path

    def lineage(self, model: str, stream: str, upto: str | None = None) -> list[dict]:
        """Manifests from the head (or from `upto`, any version of the stream) back to the first.

        Newest first; empty when the stream is at the base. A version of another stream as `upto`
        is a StoreError.
        """
        sdir = self._stream_dir(model, stream)
        if upto is None:
            return self._chain(self._read_head(sdir)["version"], model, stream)
        doc = self._read_manifest(_check_version_id(upto, "version id"))
        if (doc["model"], doc["stream"]) != (model, stream):
            raise StoreError(f"version {upto} is not on stream {model}/{stream}")
        return self._chain(upto, model, stream)

    def versions(self, model: str, stream: str) -> list[dict]:
        """Every version ever created on the stream, newest first, each with `"in_lineage"` and
        `"held"` (kept without ever being published: outside the stream's policy).

        Versions rolled back past stay listed (with `in_lineage` False): nothing is ever deleted.
        The order is the order in which they were committed.
        """
        sdir = self._stream_dir(model, stream)
        lineage = self._chain(self._read_head(sdir)["version"], model, stream)
        order: list[str] = []
        for entry in self._read_log(sdir):
            version = entry.get("version")
            kept = entry.get("op") in ("create", "held")
            if kept and isinstance(version, str) and version not in order:
                order.append(version)
        # A head committed just before a crash may be missing from the log; its lineage is known.
        order += [doc["id"] for doc in reversed(lineage) if doc["id"] not in order]
        in_lineage = {doc["id"] for doc in lineage}
        held = self._held(sdir) - in_lineage
        result = []
        for version in reversed(order):
            doc = self._read_manifest(_check_version_id(version), missing=Corrupt)
            result.append({**doc, "in_lineage": version in in_lineage, "held": version in held})
        return result

    def rollback(
        self,
        model: str,
        stream: str,
        version_id: str | None,
        expected_head: str | EllipsisType | None = ...,
        actor: dict | None = None,
    ) -> dict:
        """Move the head back to `version_id`, an ancestor of the head (None: the base model).

        Nothing is deleted; later versions stay listed by `versions`. `expected_head`, when given,
        must be the current head (else Conflict), which makes a rollback safe to race. Rolling back
        to the head itself changes nothing. `actor`, who asked, goes into the stream's log.
        Returns the new head info (see `head_info`).
        """
        sdir = self._stream_dir(model, stream)
        if version_id is not None:
            _check_version_id(version_id)
        if expected_head is not ... and expected_head is not None:
            _check_version_id(expected_head, "expected head")
        if not (sdir / HEAD).exists():
            raise NotFound(f"no stream {model}/{stream}")
        with self._lock(sdir / LOCK):
            info = self._read_head(sdir)
            if expected_head is not ...:
                self._check_head(sdir, model, stream, info, expected_head)
            count = 0
            if version_id is not None:
                doc = self._read_manifest(version_id)
                if (doc["model"], doc["stream"]) != (model, stream):
                    raise StoreError(f"version {version_id} is not on stream {model}/{stream}")
                ancestors = {d["id"] for d in self._chain(info["version"], model, stream)}
                if version_id not in ancestors:
                    raise StoreError(
                        f"version {version_id} is not an ancestor of the head {info['version']}"
                    )
                count = doc["number"]
            if version_id == info["version"]:
                return info
            self._repair_log(sdir, info)
            return self._move_head(sdir, info, version_id, count, "rollback", actor)

    def cumulative_delta(self, version_id: str) -> dict[str, np.ndarray]:
        """The sum of the deltas from the stream's first version to `version_id`, in float32.

        Added in chain order — `acc = d1; acc = acc + d2; ...`, each delta cast to float32 — which
        the engine reproduces for bitwise-equal weights. A layer first changed by a later version
        starts as that version's delta (as `zeros + delta`, up to the sign of a zero).
        """
        doc = self._read_manifest(_check_version_id(version_id))
        chain = list(reversed(self._chain(version_id, doc["model"], doc["stream"])))
        acc: dict[str, np.ndarray] = {}
        for version in chain:
            tensors, _ = self._load_tensors(self.version_file(version["id"], DELTA_FILE))
            for name, delta in tensors.items():
                delta = delta.astype(np.float32)
                if name not in acc:
                    acc[name] = delta.copy()
                elif acc[name].shape != delta.shape:
                    raise Corrupt(
                        f"version {version['id']} changes the shape of {name} "
                        f"from {acc[name].shape} to {delta.shape}"
                    )
                else:
                    acc[name] = acc[name] + delta
        return acc

    def write_cumulative_delta(self, version_id: str, out: str | Path) -> Path:
        """Write `cumulative_delta(version_id)` as a safetensors delta file at `out`, atomically.

        Its metadata (`crispedit` key, JSON) holds `version`, `against: "base"`, the model and
        stream, the number of versions summed, and the first version's `base_fingerprint` and the
        last version's `edited_fingerprint` when their manifests (or delta files) record them.
        A folder as `out` means `out/delta.safetensors`. Returns the path written.
        """
        out = Path(out)
        if out.is_dir():
            out = out / DELTA_FILE
        tensors = self.cumulative_delta(version_id)
        doc = self._read_manifest(version_id)
        chain = self._chain(version_id, doc["model"], doc["stream"])
        meta: dict[str, Any] = {
            "kind": "cumulative_delta",
            "format_version": CUMULATIVE_FORMAT,
            "version": version_id,
            "against": "base",
            "model": doc["model"],
            "stream": doc["stream"],
            "versions": len(chain),
            "layers": [name.removesuffix(".weight") for name in tensors],
        }
        for field, source in (("base_fingerprint", chain[-1]), ("edited_fingerprint", chain[0])):
            value = source.get(field)
            if value is None:  # fall back to the engine's header inside the delta file
                _, header = self._load_tensors(self.version_file(source["id"], DELTA_FILE))
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    value = json.loads(header.get(META_KEY, "{}")).get(field)
            if value is not None:
                meta[field] = value
        header = {META_KEY: json.dumps(meta, sort_keys=True)}
        atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=header))
        return out

    # --- whole-store checks and garbage ---

    def verify(self) -> list[str]:
        """Problems across the store, one line each; [] when clean. Rehashes every file.

        Looks for bad or missing files (sha256/size), unreadable manifests, heads naming a missing
        version, broken parent links and logs naming missing versions. Leftovers of interrupted
        writes (staging folders, unpublished version folders) are not problems: see `garbage`.
        """
        problems: list[str] = []
        for entry in sorted((self.root / "curvature").iterdir()):
            if entry.name == LOCK or (entry.name.startswith(".") and entry.name.endswith(".tmp")):
                continue
            try:
                doc = self._curvature_manifest(_check_key(entry.name))
                if doc is None:
                    raise Corrupt(f"{self._rel(entry)} has no manifest")
                if self.curvature_key(**self._key_fields(doc["key_fields"])) != entry.name:
                    raise Corrupt(f"{self._rel(entry)}: key fields do not hash to its key")
                self._check_file(entry / CURVATURE_FILE, doc, use_cache=False)
            except StoreError as err:
                problems.append(
                    str(err) if isinstance(err, Corrupt) else f"{self._rel(entry)}: {err}"
                )
        for entry in sorted((self.root / "versions").iterdir()):
            try:
                doc = self._read_manifest(_check_version_id(entry.name), missing=Corrupt)
                for name, record in doc["files"].items():
                    self._check_file(entry / name, record, use_cache=False)
            except StoreError as err:
                problems.append(
                    str(err) if isinstance(err, Corrupt) else f"{self._rel(entry)}: {err}"
                )
        for model, stream in self.streams():
            sdir = self._stream_dir(model, stream)
            try:
                self._chain(self._read_head(sdir)["version"], model, stream)
                for entry in self._read_log(sdir):
                    version = entry.get("version")
                    if version is not None:
                        doc = self._read_manifest(_check_version_id(version), missing=Corrupt)
                        if (doc["model"], doc["stream"]) != (model, stream):
                            raise Corrupt(f"log names version {version} of another stream")
            except StoreError as err:
                problems.append(f"stream {model}/{stream}: {err}")
        return problems

    def _referenced_versions(self, model: str, stream: str) -> set[str]:
        """Versions a stream knows of: those in its log and in its head's lineage."""
        sdir = self._stream_dir(model, stream)
        found = {e["version"] for e in self._read_log(sdir) if isinstance(e.get("version"), str)}
        with contextlib.suppress(StoreError):
            version = self._read_head(sdir)["version"]
            while version is not None and is_version_id(version):
                found.add(version)
                try:
                    version = self._read_manifest(version, missing=Corrupt).get("parent")
                except StoreError:
                    break
        return found

    def garbage(self) -> list[Path]:
        """Leftovers of interrupted or abandoned writes, safe to delete once old enough.

        Everything under tmp/, stray `.*.tmp` files of atomic writes, and version folders that no
        stream knows of (a writer died after publishing the folder but before moving the head).
        """
        found = sorted((self.root / "tmp").iterdir())
        for folder in [self.root, self.root / "curvature", *(self.root / "streams").glob("*/*")]:
            found += sorted(folder.glob(".*.tmp"))
        referenced: set[str] = set()
        for model, stream in self.streams():
            referenced |= self._referenced_versions(model, stream)
        for entry in sorted((self.root / "versions").iterdir()):
            if is_version_id(entry.name) and entry.name not in referenced:
                with contextlib.suppress(StoreError):  # unreadable ones are verify's business
                    self._read_manifest(entry.name, missing=Corrupt)
                    found.append(entry)
        return found

    def collect_garbage(self, max_age_s: float = GARBAGE_AGE_S) -> list[Path]:
        """Delete the `garbage()` entries older than `max_age_s` (an hour); the paths deleted.

        The age guard keeps staging folders that a live writer is still filling. An unpublished
        version folder is re-checked under its stream's lock, so a create in progress is safe.
        """
        removed = []
        for path in self.garbage():
            if age_s(path) < max_age_s:
                continue
            if path.parent == self.root / "versions":
                try:
                    doc = self._read_manifest(path.name, missing=Corrupt)
                    with self._lock(self._stream_dir(doc["model"], doc["stream"]) / LOCK):
                        if path.name in self._referenced_versions(doc["model"], doc["stream"]):
                            continue
                        remove(path)
                except StoreError:
                    continue
            else:
                remove(path)
            removed.append(path)
        return removed
