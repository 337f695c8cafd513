"""Adapters: a cumulative delta as a PEFT LoRA adapter, by a truncated SVD of each edited layer.

A delta ΔW (fp32, per edited layer, in the weight's storage layout) becomes `lora_B` (d_out × r)
and `lora_A` (r × d_in) with B A ≈ ΔW, r set by `rank` or by `energy` (the share of squared
singular values kept); `lora_alpha = r`, so peft's scale is 1 and merging the adapter adds B A
to the base weights. The format, key names and rank rule are `contract.adapters` (shared with the
API, which builds the same adapter in numpy); this module runs the SVD in float32 on the delta's
device and casts the factors to the model's dtype.

    tensors = Store(path).cumulative_delta(version)      # or Delta.load(file).tensors
    save_adapter("runs/adapter", tensors, manifest, rank=16)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from contract.adapters import ADAPTER_WEIGHTS_FILE, adapter_documents, build_adapter, is_transposed
from curvature_store.files import write_bundle

DTYPE = torch.float32  # of the saved factors, unless the caller names the model's dtype


def _svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(x.float(), full_matrices=False)


def adapter_tensors(
    deltas: dict[str, torch.Tensor | np.ndarray],
    version_manifest: dict,
    rank: int | None = None,
    energy: float | None = None,
    dtype: torch.dtype = DTYPE,
    device: torch.device | str | None = None,
    base_model: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights, adapter_config, manifest) of the LoRA adapter of `deltas` (state-dict key →
    fp32 delta, torch or numpy, as `Store.cumulative_delta` gives them).

    `version_manifest` says which layers are stored transposed (`contract.adapters.is_transposed`)
    and names the base model (unless `base_model` does). The SVD runs in float32 on `device`
    (default: the deltas' own); the factors come back on the host in `dtype`. Raises
    AdapterError for a bad rank or energy before any SVD.
    """
    tensors = {
        key: (torch.from_numpy(np.ascontiguousarray(d)) if isinstance(d, np.ndarray) else d)
        for key, d in deltas.items()
    }
    if device is not None:
        tensors = {key: d.to(device) for key, d in tensors.items()}
    weights, config, manifest = build_adapter(
        {key: d.float() for key, d in tensors.items()},
        lambda layer: is_transposed(layer, version_manifest),
        _svd,
        lambda shape, like: like.new_zeros(shape),
        rank,
        energy,
        base_model or version_manifest.get("model"),
    )
    weights = {k: w.to("cpu", dtype).contiguous() for k, w in weights.items()}
    manifest = {**manifest, "version": version_manifest.get("id"), "dtype": str(dtype)}
    return weights, config, manifest


def save_adapter(
    out: str | Path,
    deltas: dict[str, torch.Tensor | np.ndarray],
    version_manifest: dict,
    **options: Any,
) -> dict:
    """Write the adapter of `deltas` (`adapter_tensors`, given its keyword `options`: `rank`,
    `energy`, `dtype`, `device`, `base_model`) to `out`: a folder, or a `.tar.gz`/`.tgz`/`.zip`
    archive of its files, atomically. Returns the adapter's manifest."""
    # the options are adapter_tensors' own, named once there; an unknown one is its TypeError
    weights, config, manifest = adapter_tensors(deltas, version_manifest, **options)
    files = {ADAPTER_WEIGHTS_FILE: save(weights, metadata={"format": "pt"})}
    files.update(adapter_documents(config, manifest))
    write_bundle(Path(out), files)
    return manifest
