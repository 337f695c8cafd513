"""Merged checkpoints: the full model at a version, as a Hugging Face folder kept in the store.

Layout: ``ROOT/checkpoints/<version>/`` holds the files the engine saved (config, tokenizer,
safetensors shards) and ``checkpoint.json`` ({version, model, stream, created_at, files: {name:
{sha256, bytes}}}), written last. A checkpoint is filled in a staging folder (`Store.staging_dir`)
and renamed into place whole, so a reader sees a complete checkpoint or none; a second writer of
the same version finds it there and drops its own. Retention (`prune`) keeps the newest few.
Standard library and the store only, like the rest of the package: the API lists and serves
these files without torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from contract.names import CHECKPOINT_FILE_RE, CHECKPOINT_MANIFEST
from curvature_store.files import atomic_write_json, fsync_dir, hash_and_sync, remove
from curvature_store.store import NotFound, Store, StoreError, _check_version_id, _now

FOLDER = "checkpoints"


def checkpoint_dir(store: Store, version: str) -> Path:
    """Where the checkpoint of `version` lives (whether or not it exists)."""
    return store.root / FOLDER / _check_version_id(version)


def read_checkpoint(store: Store, version: str) -> dict | None:
    """The checkpoint manifest of `version`, or None when it has none (yet)."""
    path = checkpoint_dir(store, version) / CHECKPOINT_MANIFEST
    try:
        return store._read_json(path, "checkpoint manifest")
    except FileNotFoundError:
        return None


def checkpoint_file(store: Store, version: str, name: str) -> tuple[Path, dict]:
    """(path, {sha256, bytes}) of one file of the checkpoint; NotFound for a name it lacks (a
    name is looked up in the manifest, never joined into a path unchecked)."""
    manifest = read_checkpoint(store, version)
    if manifest is None:
        raise NotFound(f"version {version} has no checkpoint")
    if not CHECKPOINT_FILE_RE.fullmatch(name) or name not in manifest["files"]:
        raise NotFound(f"the checkpoint of {version} has no file {name!r}")
    return checkpoint_dir(store, version) / name, manifest["files"][name]


def publish_checkpoint(store: Store, version: str, staged: Path) -> dict:
    """Move the files in `staged` (a folder under the store's tmp/) in as the checkpoint of
    `version`, with its manifest; the manifest already there when another writer was first."""
    doc = store.manifest(version)
    existing = read_checkpoint(store, version)
    if existing is not None:
        remove(staged)
        return existing
    files = {}
    for path in sorted(staged.iterdir()):
        if not path.is_file() or not CHECKPOINT_FILE_RE.fullmatch(path.name):
            raise StoreError(f"a checkpoint holds plain files only, not {path.name!r}")
        files[path.name] = hash_and_sync(path)
    manifest = {
        "version": version,
        "model": doc["model"],
        "stream": doc["stream"],
        "created_at": _now(),
        "bytes": sum(f["bytes"] for f in files.values()),
        "files": files,
    }
    atomic_write_json(staged / CHECKPOINT_MANIFEST, manifest)
    target = checkpoint_dir(store, version)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staged, target)  # a whole folder at once: complete, or not there
    except OSError:
        remove(staged)
        existing = read_checkpoint(store, version)
        if existing is None:
            raise
        return existing  # another writer renamed its copy first
    fsync_dir(target.parent)
    return manifest


def list_checkpoints(store: Store) -> list[dict]:
    """Every complete checkpoint's manifest, newest first."""
    root = store.root / FOLDER
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            manifest = read_checkpoint(store, entry.name) if entry.is_dir() else None
            if manifest is not None:
                found.append(manifest)
    return sorted(found, key=lambda m: m["created_at"], reverse=True)


def prune(store: Store, keep: int) -> list[str]:
    """Remove all but the `keep` newest checkpoints; the versions whose checkpoint went."""
    if keep < 1:
        raise ValueError(f"keep at least 1 checkpoint, not {keep}")
    gone = [m["version"] for m in list_checkpoints(store)[keep:]]
    for version in gone:
        remove(checkpoint_dir(store, version))
    return gone
