"""The PEFT LoRA adapter of a version: its files, key names, rank rule and factors, in one place.

A version's cumulative delta holds, per edited layer, ΔW = W_version - W_base. As a LoRA adapter
each layer's ΔW (as a `Linear` weight: d_out × d_in) is truncated to rank k by its SVD
ΔW = U S Vᵀ and split evenly, `lora_B = U_k √S_k` (d_out × k) and `lora_A = √S_k V_kᵀ` (k × d_in),
so that PEFT's `W + (lora_alpha / r) · B A` is W_base + ΔW_k with `lora_alpha = r` (scale 1).
k is `rank` (the same for every layer), or the smallest rank holding the fraction `energy` of
the layer's squared singular values. Every layer is padded with zero rows/columns to the largest
k, so the adapter has one `r` (what vLLM and LoRAX load) while each layer keeps its own rank.

Key names are the ones `peft` 0.21 writes (`get_peft_model(...).save_pretrained`):
`base_model.model.<module>.lora_A.weight` and `.lora_B.weight`. A layer stored transposed
(GPT-2's `Conv1D`, weight d_in × d_out) has its delta in that layout: it is transposed before the
SVD, and the config sets `fan_in_fan_out`, as peft does for `Conv1D`.

The factor math is written once for numpy and torch alike (`lora_factors` takes the SVD to use):
the engine runs it in torch on the delta's device (crispedit.adapter), the API, which never
imports torch, in numpy (service.adapters). Standard library only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_MANIFEST_FILE = "crispedit_adapter.json"  # per layer rank and error: ours, not peft's
ARCHIVES = ("tar.gz", "zip")
# The rank when neither rank nor energy is given (capped at each layer's min(d_out, d_in)).
# bench/results/adapter.md (SmolLM2, 100 CounterFact edits, the editor's defaults, merged with
# peft): rank 64 keeps 0.98 of the full delta's efficacy, 128 all of it, each with less drift than
# the full delta (perplexity +0.12 % and +0.40 % against +0.72 %); 128 for the margin. At 1,000
# edits 128 still keeps 0.999 of the full delta's efficacy (+2.11 % against +2.47 %) where 64
# keeps 0.83: past ~1,000 edits on a stream, pass a larger rank or an energy.
DEFAULT_RANK = 128
FORMATS = ("peft",)
# Layers stored (d_in, d_out) in versions that predate the manifest's `transposed_layers`: the
# names of GPT-2's Conv1D layers. Newer versions record their layout (crispedit.streams).
CONV1D_NAMES = ("c_attn", "c_fc", "c_proj")


class AdapterError(ValueError):
    """A rank or energy that does not fit the delta; the message names the field and why."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def check_rank_choice(rank: int | None, energy: float | None) -> None:
    """At most one of `rank` (an integer ≥ 1) and `energy` (a fraction in (0, 1]; neither:
    DEFAULT_RANK), or AdapterError naming the offending field."""
    if rank is not None and energy is not None:
        raise AdapterError("give rank or energy, not both", "energy")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise AdapterError(f"rank must be an integer ≥ 1, not {rank!r}", "rank")
    if energy is not None and not (
        isinstance(energy, int | float) and math.isfinite(energy) and 0 < energy <= 1
    ):
        raise AdapterError(f"energy must be a fraction in (0, 1], not {energy!r}", "energy")


def choose_rank(
    singular_values: Sequence[float], rank: int | None, energy: float | None, layer: str
) -> int:
    """The rank kept of a layer with these singular values (descending): `rank` itself (refused
    above min(d_out, d_in) = len(singular_values)), or the smallest k whose squared singular
    values hold the fraction `energy` of their sum (0 for a layer the edit left unchanged)."""
    n = len(singular_values)
    if rank is not None:
        if rank > n:
            raise AdapterError(
                f"rank {rank} is above min(d_out, d_in) = {n} of layer {layer}", "rank"
            )
        return rank
    squares = [float(s) ** 2 for s in singular_values]
    total = sum(squares)
    if total == 0:
        return 0
    kept = 0.0
    for k, sq in enumerate(squares, start=1):
        kept += sq
        if kept >= energy * total * (1 - 1e-6):  # float sums: energy 1 must reach full rank
            return k
    return n


def lora_factors(
    delta: Any,
    svd: Callable[[Any], tuple[Any, Any, Any]],
    rank: int | None,
    energy: float | None,
    layer: str,
) -> tuple[Any, Any, dict]:
    """(lora_B, lora_A, info) of one layer's delta as a (d_out, d_in) float32 array (numpy or
    torch, both work), truncated per `choose_rank`. `svd(delta)` returns (U, S, Vᵀ) thin, as
    `numpy.linalg.svd(x, full_matrices=False)` and `torch.linalg.svd(x, full_matrices=False)` do.
    `info` holds the rank and the relative Frobenius error ‖ΔW - B A‖ / ‖ΔW‖ of the truncation
    (from the discarded singular values; 0 for an unchanged layer). AdapterError for a delta
    that is not a matrix (a LoRA adapter factors weight matrices only)."""
    if len(delta.shape) != 2:
        raise AdapterError(
            f"layer {layer}'s delta has shape {tuple(delta.shape)}, not a weight matrix: "
            "no LoRA adapter can hold it",
            "version_id",
        )
    u, s, vt = svd(delta)
    values = [float(x) for x in s.tolist()]
    k = choose_rank(values, rank, energy, layer)
    root = s[:k] ** 0.5
    b = u[:, :k] * root[None, :]
    a = vt[:k, :] * root[:, None]
    total = sum(x * x for x in values)
    rest = sum(x * x for x in values[k:])
    error = math.sqrt(rest / total) if total > 0 else 0.0
    return b, a, {"rank": k, "relative_error": error, "max_rank": len(values)}


def build_adapter(
    deltas: dict[str, Any],
    transposed: Callable[[str], bool],
    svd: Callable[[Any], tuple[Any, Any, Any]],
    zeros: Callable[[tuple[int, int], Any], Any],
    rank: int | None,
    energy: float | None,
    base_model: str | None,
) -> tuple[dict[str, Any], dict, dict]:
    """(weights, config, manifest) of the adapter of `deltas` (state-dict key → float32 delta in
    the weight's storage layout; `transposed(layer)` says which are stored (d_in, d_out)).

    `svd` and `zeros(shape, like)` (a zero array of `like`'s kind, dtype and device) come from
    the caller's array library. `weights` maps `lora_key` names to (d_out, r) and (r, d_in)
    arrays, each layer zero-padded to the adapter's `r`, the largest rank kept (at least 1);
    `manifest` records per layer its rank, its relative Frobenius error and min(d_out, d_in).
    With neither `rank` nor `energy`, every layer gets DEFAULT_RANK (at most its own size).
    Raises AdapterError for a bad rank or energy before any SVD.
    """
    check_rank_choice(rank, energy)
    default = rank is None and energy is None
    names = [key.removesuffix(".weight") for key in deltas]
    fan_in_fan_out = any(transposed(layer) for layer in names)
    if fan_in_fan_out and not all(transposed(layer) for layer in names):
        # peft's fan_in_fan_out is one flag for the whole adapter
        raise AdapterError(
            "the layers mix Linear and Conv1D layouts: one adapter cannot", "version"
        )
    factors, layers = {}, {}
    for key, delta in deltas.items():
        layer = key.removesuffix(".weight")
        if not default and rank is not None and rank > min(delta.shape):
            raise AdapterError(
                f"rank {rank} is above min(d_out, d_in) = {min(delta.shape)} of layer {layer}",
                "rank",
            )
        matrix = delta.T if transposed(layer) else delta
        kept = min(DEFAULT_RANK, min(delta.shape)) if default else rank
        b, a, layers[layer] = lora_factors(matrix, svd, kept, energy, layer)
        factors[layer] = (b, a)
    r = max([1, *(info["rank"] for info in layers.values())])
    weights = {}
    for layer, (b, a) in factors.items():
        k = a.shape[0]
        padded_b, padded_a = zeros((b.shape[0], r), b), zeros((r, a.shape[1]), a)
        padded_b[:, :k], padded_a[:k, :] = b, a
        weights[lora_key(layer, "lora_B")] = padded_b
        weights[lora_key(layer, "lora_A")] = padded_a
    config = adapter_config(list(layers), r, base_model, fan_in_fan_out)
    manifest = {
        "format": "peft",
        "r": r,
        "rank": DEFAULT_RANK if default else rank,
        "energy": energy,
        "default_rank": default,
        "layers": layers,
    }
    return weights, config, manifest


def lora_key(module: str, which: str) -> str:
    """The state-dict key peft and vLLM expect for `module`'s `lora_A` or `lora_B` weight."""
    return f"base_model.model.{module}.{which}.weight"


def is_transposed(layer: str, manifest: dict) -> bool:
    """Whether a version stores `layer`'s delta as (d_in, d_out): per the manifest's
    `transposed_layers` when it records them, else by GPT-2's Conv1D names."""
    if "transposed_layers" in manifest:
        return layer in manifest["transposed_layers"]
    return layer.startswith("transformer.h.") and layer.rsplit(".", 1)[-1] in CONV1D_NAMES


def adapter_config(
    modules: Sequence[str], r: int, base_model: str | None, fan_in_fan_out: bool
) -> dict:
    """The `adapter_config.json` of a LoRA adapter on `modules` with rank `r` and scale 1."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "target_modules": list(modules),
        "r": r,
        "lora_alpha": r,  # scale lora_alpha / r = 1: B A is the delta itself
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def adapter_documents(config: dict, manifest: dict) -> dict[str, bytes]:
    """The adapter's two JSON files as bytes, by file name (beside `ADAPTER_WEIGHTS_FILE`)."""
    return {
        ADAPTER_CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
        ADAPTER_MANIFEST_FILE: (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(),
    }


def archive_kind(name: str) -> str | None:
    """`tar.gz` or `zip` when `name` ends like one of ARCHIVES (`.tgz` too), else None (a
    folder)."""
    if name.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    return "zip" if name.endswith(".zip") else None
