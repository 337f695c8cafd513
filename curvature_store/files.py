"""File safety: the store's writes are atomic and durable, and its reads are hashed.

A file is written to a temp name in its final folder, fsynced and renamed, and the folder is
fsynced so that the rename survives a power loss; a reader sees the old content or the new one,
never part of either. These helpers are the only place the project writes a file that another
process may read at the same time (crispedit's artifacts use them too).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract.adapters import archive_kind


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def hash_and_sync(path: Path) -> dict:
    """`{"sha256", "bytes"}` of a file the store now owns, after fsyncing it to disk.

    The file came from the caller, who may not have fsynced it; it must be durable before any
    manifest or head points at it.
    """
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return {"sha256": digest.hexdigest(), "bytes": size}


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Let `write(tmp)` fill a temp file in `path`'s folder, then fsync it, rename it to `path`
    and fsync the folder.

    A reader sees the old content or the new one, never part of either; a crash leaves at most a
    stray `.NAME.*.tmp` file, which `Store.garbage` lists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` with `atomic_write`."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON with `atomic_write_bytes` (NaN is refused)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


def move_file(src: Path, dst: Path) -> None:
    """Move a caller's file into the store: a rename, or copy + delete across filesystems."""
    try:
        os.replace(src, dst)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        shutil.copyfile(src, dst)
        src.unlink()


def remove(path: Path) -> None:
    """Delete a file or a folder tree, ignoring what is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def age_s(path: Path) -> float:
    """Seconds since `path` (or, for a folder, anything directly in it) was last modified."""
    try:
        newest = path.lstat().st_mtime
        if path.is_dir() and not path.is_symlink():
            for child in path.iterdir():
                with contextlib.suppress(OSError):
                    newest = max(newest, child.lstat().st_mtime)
    except OSError:
        return 0.0
    return time.time() - newest


def write_bundle(out: Path, files: dict[str, bytes]) -> None:
    """Write `files` (name → bytes) as one unit: into the folder `out`, or as the archive `out`
    when its name ends in `.tar.gz`/`.tgz` or `.zip` (`contract.adapters.archive_kind`).

    An archive is written with `atomic_write`. A folder is filled in a temp folder beside it and
    renamed into place when `out` does not exist yet; an existing folder gets each file replaced
    (atomically one by one), so what is there is either the old file or the new one.
    """
    kind = archive_kind(out.name)
    if kind is not None:
        atomic_write(out, lambda tmp: _write_archive(tmp, kind, files))
        return
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    if out.is_dir():
        for name, data in files.items():
            atomic_write_bytes(out / name, data)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for name, data in files.items():
            (stage / name).write_bytes(data)
            with open(stage / name, "rb") as f:
                os.fsync(f.fileno())
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    fsync_dir(out.parent)


def _write_archive(path: Path, kind: str, files: dict[str, bytes]) -> None:
    """A gzipped tar or a zip of `files` at `path`, every member dated now."""
    if kind == "zip":
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        return
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            archive.addfile(info, io.BytesIO(data))
