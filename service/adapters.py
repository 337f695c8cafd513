"""Adapter archives to download: a version's delta as a PEFT LoRA adapter, built in numpy.

The API never imports torch, so the SVD of each layer runs here in numpy (float32); the format,
key names and rank rule are `contract.adapters`, the same the engine's `crispedit.adapter` uses.
A version never changes, so neither does its adapter for one (against, rank | energy, archive):
it is built once into the cache folder (`Settings.cumulative_cache_dir`) and served from there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save

from contract.adapters import (
    ADAPTER_WEIGHTS_FILE,
    DEFAULT_RANK,
    adapter_documents,
    build_adapter,
    check_rank_choice,
    is_transposed,
)
from curvature_store import Store, sha256_file
from curvature_store.files import write_bundle


def _svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.linalg.svd(x.astype(np.float32, copy=False), full_matrices=False)


def adapter_archive(
    store: Store,
    cache_dir: Path,
    version_id: str,
    rank: int | None,
    energy: float | None,
    archive: str,
) -> tuple[Path, str]:
    """(path, sha256) of the adapter archive (`tar.gz` or `zip`) of the version's cumulative
    delta against the base, built and cached on first request.
    Raises AdapterError (a bad rank or energy, or a rank above a layer's size) before any SVD
    and NotFound for an unknown version."""
    check_rank_choice(rank, energy)
    manifest = store.manifest(version_id)
    # the default's value is in the name: a changed DEFAULT_RANK never serves a stale archive
    spec = f"e{energy!r}" if energy is not None else f"r{rank}" if rank else f"d{DEFAULT_RANK}"
    path = cache_dir / "adapters" / f"{version_id}-{spec}.{archive}"
    if not path.is_file():
        deltas = store.cumulative_delta(version_id)
        weights, config, report = build_adapter(
            {k: v.astype(np.float32, copy=False) for k, v in deltas.items()},
            lambda layer: is_transposed(layer, manifest),
            _svd,
            lambda shape, like: np.zeros(shape, like.dtype),
            rank,
            energy,
            manifest["model"],
        )
        report = {**report, "version": version_id, "against": "base", "dtype": "float32"}
        weights = {k: np.ascontiguousarray(w) for k, w in weights.items()}
        files = {ADAPTER_WEIGHTS_FILE: save(weights, metadata={"format": "pt"})}
        files.update(adapter_documents(config, report))
        write_bundle(path, files)  # atomic: two requests at once both write a whole archive
    return path, sha256_file(path)
