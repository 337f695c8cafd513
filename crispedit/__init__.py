"""CrispEdit: capability-preserving fact edits by K-FAC low-curvature gradient projection.

The library behind the service, usable alone (see README "Python API"):

    model, tokenizer = load_model("smollm2")
    curvature = build_curvature(model, tokenizer, "wikitext", tokens=20_000)
    editor = CrispEditor(model, tokenizer, curvature, gamma=0.9)
    delta = editor.edit(load_facts("facts.json"))
"""

from contract.facts import Fact, Neighbor, load_facts
from crispedit.curvature import Curvature, LayerCurvature, build_curvature, collect_curvature
from crispedit.delta import Delta, apply_delta, revert_delta
from crispedit.editor import CrispEditor
from crispedit.models import load_model, model_fingerprint, parse_layers
from crispedit.projector import KroneckerProjector, build_projector

__all__ = [
    "CrispEditor",
    "Curvature",
    "Delta",
    "Fact",
    "KroneckerProjector",
    "LayerCurvature",
    "Neighbor",
    "apply_delta",
    "build_curvature",
    "build_projector",
    "collect_curvature",
    "load_facts",
    "load_model",
    "model_fingerprint",
    "parse_layers",
    "revert_delta",
]
