"""Safetensors files with a JSON header, written atomically.

Every tensor artifact of the project (curvature, deltas) is one safetensors file whose metadata
holds a JSON document under the key `crispedit` and a sha256 of the tensors under
`crispedit.sha256`, checked on every load: safetensors itself checks only the header, so a byte
flipped in the data would otherwise load as a silently wrong model. A write goes to a temp file in
the same folder, is fsynced and renamed, so a reader sees the old file or the new one, never half
of one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from curvature_store.files import atomic_write_bytes  # one atomic write for the whole project

META_KEY = "crispedit"
DIGEST_KEY = "crispedit.sha256"


class ArtifactError(ValueError):
    """A tensor file that is missing, unreadable or not what the caller expected."""


def artifact_path(path: str | Path, default_name: str) -> Path:
    """The file meant by `path`: itself for a file or a `.safetensors` name, else a folder
    holding `default_name` (so `--out runs/e1` and `--delta runs/e1` name the same file)."""
    path = Path(path)
    if path.is_dir() or (not path.exists() and path.suffix != ".safetensors"):
        return path / default_name
    return path


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Save contiguous CPU copies of `tensors` with `meta` as the JSON header, atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {META_KEY: json.dumps(meta, sort_keys=True), DIGEST_KEY: tensors_digest(tensors)}
    atomic_write_bytes(path, save(tensors, metadata=header))


def load_tensors(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a file written by `save_tensors`; `kind` names it in errors ("delta", "curvature")."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{kind} file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            meta = json.loads(header.get(META_KEY, "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{kind} file {path} is corrupt or not safetensors: {err}") from err
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} is not a crispedit {kind} file (no '{META_KEY}' metadata)")
    # files written before the digest existed have none; every file written now has one
    if DIGEST_KEY in header and tensors_digest(tensors) != header[DIGEST_KEY]:
        raise ArtifactError(f"{kind} file {path} is corrupt: its tensors fail their sha256")
    return tensors, meta
