"""Weight deltas: what an edit changed, as a safetensors file that any copy of the model can take.

A delta holds, for each edited layer, `W_edited - W_base` in float32 and in the weight's own storage
layout (keys are state-dict names such as `model.layers.20.mlp.down_proj.weight`), plus metadata:
the fingerprints of the model before and after, the layers, method, γ and a digest of the facts.
Applying checks the base fingerprint, so a delta never lands silently on the wrong model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from contract.names import DELTA_FILE
from crispedit.artifacts import artifact_path, load_tensors, save_tensors
from crispedit.models import get_layers, model_fingerprint

FORMAT_VERSION = 1


class DeltaError(ValueError):
    """A delta that does not fit the model it is applied to."""


@dataclass
class Delta:
    """Per-layer weight differences (fp32, storage layout) and their provenance."""

    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)  # metrics of the edit that made it; not saved

    @property
    def layers(self) -> list[str]:
        return [key.removesuffix(".weight") for key in self.tensors]

    def save(self, path: str | Path) -> Path:
        """Write the delta atomically (`DIR/delta.safetensors` when `path` is a folder)."""
        path = artifact_path(path, DELTA_FILE)
        save_tensors(path, self.tensors, {**self.meta, "format_version": FORMAT_VERSION})
        return path

    @classmethod
    def load(cls, path: str | Path) -> Delta:
        """Read a delta file, failing clearly on a corrupt file or one that is not a delta."""
        path = artifact_path(path, DELTA_FILE)
        tensors, meta = load_tensors(path, "delta")
        if meta.get("format_version") != FORMAT_VERSION or "base_fingerprint" not in meta:
            raise DeltaError(f"{path} is not a delta file of format {FORMAT_VERSION}")
        return cls(tensors=tensors, meta=meta)


def weight_delta(model: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`W_now - W_before` in fp32 for each layer in `before` (layer name → weight copy)."""
    layers = get_layers(model, list(before))
    return {
        f"{name}.weight": layers[name].weight.detach().float().cpu() - before[name].float().cpu()
        for name in before
    }


def add_to_weights(model: nn.Module, tensors: dict[str, torch.Tensor], sign: float = 1.0) -> None:
    """W ← W + sign·ΔW in fp32, cast back to the weight's dtype: the one way a delta is added.

    The editor ends its edit with this same operation, so `apply` reproduces its weights bitwise.
    """
    layers = get_layers(model, [key.removesuffix(".weight") for key in tensors])
    with torch.no_grad():
        for key, d in tensors.items():
            w = layers[key.removesuffix(".weight")].weight
            if tuple(w.shape) != tuple(d.shape):
                raise DeltaError(
                    f"delta for {key} has shape {tuple(d.shape)}, weight {tuple(w.shape)}"
                )
            w.copy_((w.float() + sign * d.to(w.device)).to(w.dtype))


def _check_fingerprint(model: nn.Module, delta: Delta, expected_key: str, action: str) -> None:
    modules = dict(model.named_modules())
    missing = [name for name in delta.layers if name not in modules]
    if missing:
        raise DeltaError(f"cannot {action} delta: the model has no layer {missing[0]!r}")
    found = model_fingerprint(model, delta.layers)
    if found != delta.meta[expected_key]:
        raise DeltaError(
            f"cannot {action} delta: it was made for model {delta.meta[expected_key]}, "
            f"this model is {found} (another model, or a different version of it)"
        )


def check_base(model: nn.Module, delta: Delta, action: str = "apply") -> None:
    """Raise DeltaError unless `delta` was made for this model as it is now (its base)."""
    _check_fingerprint(model, delta, "base_fingerprint", action)


def apply_delta(model: nn.Module, delta: Delta) -> None:
    """Add the delta to the model in place, after checking it was made for this model."""
    check_base(model, delta)
    add_to_weights(model, delta.tensors, +1.0)


def revert_delta(model: nn.Module, delta: Delta) -> None:
    """Subtract the delta from a model it was applied to (exact up to one fp32 rounding)."""
    _check_fingerprint(model, delta, "edited_fingerprint", "revert")
    add_to_weights(model, delta.tensors, -1.0)
