"""Memory plan: what each phase of an edit keeps in GPU memory, before anyone rents a GPU.

A model is named by its config alone (a shipped config under `assets/configs/`, a local Hugging
Face folder, or the `smollm2` alias) and built on PyTorch's `meta` device: exact parameter counts
and layer shapes, no weights read, no memory used. From them the plan adds up, phase by phase,
the tensors the code holds at each phase's peak, every line named after the file that holds it:

    curvature build   crispedit/curvature.py collect_curvature (K-FAC sums, captures, backward)
    steady editing    a worker's job: the resident curvature, the projector, the editor's state
    stream update     crispedit/sequential.py: the edit-set sums, the stream curvature, its eigh
    version write     crispedit/streams.py: the delta and the stream state as they are saved

Three rules keep it honest. Every tensor counts on the model's device except those the code keeps
on the host (the stream states, added up and stored on the CPU; the delta); those are listed, as
host memory, and left out of the GPU peak. A capability curvature counts on the device, where a
worker that built it keeps it (read from the store, it stays on the host). A phase's peak is its
resident tensors plus its costliest moment (the backward, the factor products, the eigh...),
since the code frees each moment's temporaries before the next. Tensors the code allocates by
formula (factors, sums, Adam state, projector) are exact; activations and logits follow a
Llama-shaped block and the workload's token counts, so they are estimates. The editor is planned
with fp32 master copies of the edited layers, Adam on them, as crispedit/editor.py runs a bf16
model.

Where a phase misses its target (24 GiB for a worker's GPU, 40 GiB for the curvature build), the
plan applies levers one after the other, the issue's first, and prints the peak after each.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from crispedit.anchors import ANCHORS
from crispedit.corpus import BATCH_SIZE, SEQ_LEN
from crispedit.editor import BATCH_SIZE as EDIT_FACTS
from crispedit.models import ModelError, parse_layers, resolve_model, transformer_blocks
from crispedit.projector import PROJECTOR_DTYPES
from crispedit.streams import HEADS_CACHED

GIB = 1 << 30
CONFIGS = Path(__file__).parent / "assets" / "configs"
# A GPU's memory as sold (an RTX 4090 or A10 "24 GB", an A100 "40 GB") is that many GiB.
TARGETS = {"curvature build": 40 * GIB, "steady editing": 24 * GIB}
WORKER_TARGET = TARGETS["steady editing"]  # stream update and version write run on that GPU
# Tokens of one fact's `prompt target` text, and of one anchor prompt: CounterFact and zsRE
# prompts run 10-20 tokens with Llama-3's tokenizer, so 24 leaves room; 4 of them are targets.
FACT_TOKENS = 24
TARGET_TOKENS = 4
FP64, FP32, BOOL = 8, 4, 1


class PlanError(ValueError):
    """A model, layer set or workload the plan cannot be made for; the message says why."""


# ---------------------------------------------------------------------------------------------
# The model, from its config alone


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: counts, block dimensions, and the edited layers' shapes."""

    name: str
    architecture: str
    parameters: int  # distinct parameters (tied embeddings counted once)
    buffer_bytes: int  # buffers (rotary tables) as the model builds them, fp32
    hidden: int
    intermediate: int
    blocks: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    layers: dict[str, tuple[int, int]]  # edited layer -> (d_out, d_in)
    lowest_block: int  # the block of the lowest edited layer: the backward starts there

    @property
    def sum_squares(self) -> int:
        """Σ over the edited layers of d_in² + d_out²: the elements of all K-FAC factors."""
        return sum(d_in * d_in + d_out * d_out for d_out, d_in in self.layers.values())

    @property
    def weights(self) -> int:
        """Σ over the edited layers of d_out · d_in: the elements of all edited weights."""
        return sum(d_out * d_in for d_out, d_in in self.layers.values())


def shipped_configs() -> list[str]:
    """The names of the configs shipped under `assets/configs` (`llama-3-8b`, ...)."""
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def load_config(model: str):
    """The transformers config of `model`: a shipped config's name, else whatever
    `crispedit.models.resolve_model` accepts (alias, folder, cached hub id); nothing downloaded."""
    from transformers import AutoConfig

    shipped = CONFIGS / f"{model.lower()}.json"
    if shipped.is_file():
        data = json.loads(shipped.read_text())
        return AutoConfig.for_model(**data)
    try:
        path = resolve_model(model)
    except ModelError as err:
        raise PlanError(f"{err}; or a shipped config: {', '.join(shipped_configs())}") from err
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:  # a config transformers cannot read or does not know
        raise PlanError(f"cannot read the config of {model!r}: {err}") from err


def meta_model(config) -> nn.Module:
    """The causal LM of `config` on the `meta` device: every shape, no storage."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as err:  # no causal LM of this architecture in transformers
        raise PlanError(f"cannot build a causal LM from this config: {err}") from err


def model_shape(
    model: nn.Module, layers: str | list[str] | None = None, name: str = ""
) -> ModelShape:
    """Measure `model` (on `meta` or loaded) and resolve `layers` with `parse_layers`."""
    config = model.config.get_text_config()
    try:
        names = parse_layers(model, layers)
    except ModelError as err:
        raise PlanError(str(err)) from err
    modules = dict(model.named_modules())
    shapes = {n: _matrix_shape(modules[n]) for n in names}
    prefix, blocks = transformer_blocks(model)
    # a layer outside the blocks (the head, say): the backward then crosses every block
    lowest = min(
        (
            int(n.removeprefix(prefix + ".").split(".")[0])
            for n in names
            if n.startswith(prefix + ".")
        ),
        default=-1,
    )
    heads = config.num_attention_heads
    return ModelShape(
        name=name or getattr(model, "name_or_path", "") or type(model).__name__,
        architecture=type(model).__name__,
        parameters=sum(p.numel() for p in model.parameters()),
        buffer_bytes=sum(b.numel() * FP32 for b in model.buffers()),
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        blocks=len(blocks),
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        layers=shapes,
        lowest_block=lowest,
    )


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a Linear, or of GPT-2's Conv1D, whose weight is stored transposed."""
    d0, d1 = module.weight.shape
    return (d1, d0) if type(module).__name__ == "Conv1D" else (d0, d1)


# ---------------------------------------------------------------------------------------------
# The workload and the levers


@dataclass(frozen=True)
class Workload:
    """What the phases run with: the defaults are the code's, the lever flags start off."""

    dtype: torch.dtype = torch.bfloat16
    batch_size: int = BATCH_SIZE  # curvature batches (crispedit/corpus.py)
    seq_len: int = SEQ_LEN
    facts: int = EDIT_FACTS  # one editor batch of facts (crispedit/editor.py)
    anchors: int = ANCHORS
    kind: str = "kfac"
    projector_dtype: str = "float32"
    # levers (the issue's): fp32 device sums flushed into fp64 host totals every few batches;
    # one layer at a time; A and B off the GPU once their eigenbases exist
    fp32_sums: bool = False
    layer_by_layer: bool = False
    drop_factors: bool = False
    # further levers the plan finds necessary: the base copies and W_before on the host; the
    # K-FAC mask as its staircase's row counts
    host_copies: bool = False
    staircase_mask: bool = False
    free_model_grads: bool = False  # the weights' own gradients freed once cast to fp32
    eigh_fp32: bool = False
    heads_cached: int = HEADS_CACHED  # stream curvatures a worker keeps (crispedit/streams.py)

    @property
    def e(self) -> int:
        """Bytes of one element in the model's dtype."""
        return torch.empty((), dtype=self.dtype).element_size()


FP32_SUMS = ("accumulate in fp32, chunked into fp64 host totals", {"fp32_sums": True})
DROP_FACTORS = ("drop A and B once their eigenbases exist", {"drop_factors": True})
SMALL_BATCHES = ("[more] edit batches of 8 facts", {"facts": 8})
HOST_COPIES = ("[more] base copies and W_before on the host", {"host_copies": True})
ONE_HEAD = ("[more] a stream curvature cache of one head", {"heads_cached": 1})
PROJECTOR_IN_MODEL_DTYPE = (
    "projector in the model's dtype (projector_dtype='model')",
    {"projector_dtype": "model"},
)
# The levers first, then (marked [more]) those the plan finds a miss still needs.
LEVERS = {
    "curvature build": [FP32_SUMS, ("build layer by layer", {"layer_by_layer": True})],
    "steady editing": [
        DROP_FACTORS,
        FP32_SUMS,
        PROJECTOR_IN_MODEL_DTYPE,
        ONE_HEAD,
        SMALL_BATCHES,
        HOST_COPIES,
        ("[more] K-FAC mask as its staircase's row counts", {"staircase_mask": True}),
        ("[more] the weights' gradients freed once cast to fp32", {"free_model_grads": True}),
    ],
    "stream update": [
        FP32_SUMS,
        ("update layer by layer", {"layer_by_layer": True}),
        DROP_FACTORS,
        ONE_HEAD,
        PROJECTOR_IN_MODEL_DTYPE,
        SMALL_BATCHES,
        HOST_COPIES,
        (
            "[more] the eigh in fp32 (check its accuracy on near-singular factors)",
            {"eigh_fp32": True},
        ),
    ],
    "version write": [DROP_FACTORS, ONE_HEAD, HOST_COPIES],
}


# ---------------------------------------------------------------------------------------------
# The phases


@dataclass(frozen=True)
class Item:
    """One tensor group: its bytes, the file whose code holds it, and whether it is host memory
    (listed, but not part of a GPU peak)."""

    name: str
    bytes: int
    source: str
    host: bool = False


@dataclass
class Phase:
    """A phase's resident tensors and its moments (temporaries of one step, freed before the
    next); the peak is the resident bytes plus the costliest moment."""

    name: str
    resident: list[Item]
    moments: dict[str, list[Item]] = field(default_factory=dict)

    @property
    def peak_moment(self) -> str | None:
        sizes = {m: _device_bytes(items) for m, items in self.moments.items()}
        return max(sizes, key=sizes.__getitem__) if sizes else None

    @property
    def items(self) -> list[Item]:
        """The tensors alive at the peak."""
        moment = self.peak_moment
        return self.resident + (self.moments[moment] if moment else [])

    @property
    def peak(self) -> int:
        """GPU bytes at the peak."""
        return _device_bytes(self.items)


def _device_bytes(items: list[Item]) -> int:
    return sum(i.bytes for i in items if not i.host)


def _common(s: ModelShape, w: Workload) -> list[Item]:
    """What a worker holds in every phase: the weights and the base copies of the edited
    layers each job starts from."""
    return [
        Item(f"model weights ({_dt(w.dtype)})", s.parameters * w.e + s.buffer_bytes, "models.py"),
        Item("base copies of the edited layers", 0 if w.host_copies else s.weights * w.e,
             "streams.py base_weights"),
    ]  # fmt: skip


def _largest_factor(s: ModelShape) -> int:
    return max(max(d_in, d_out) for d_out, d_in in s.layers.values())


def _layer_count(s: ModelShape, w: Workload) -> int:
    return 1 if w.layer_by_layer else len(s.layers)


def _held_squares(s: ModelShape, w: Workload) -> int:
    """Factor elements held at once: every layer's, or the largest layer's alone."""
    if w.layer_by_layer:
        return max(d_in * d_in + d_out * d_out for d_out, d_in in s.layers.values())
    return s.sum_squares


def block_activation_bytes(s: ModelShape, w: Workload) -> int:
    """Bytes a Llama-shaped block saves for its backward per token when no weight in it needs a
    gradient: each RMSNorm's fp32 input and 1/rms, the attention's q, k, v (repeated to every
    head), output and log-sum-exp, the MLP's gate, its activation and up projection. Frozen
    linear layers save nothing but their (resident) weight."""
    norms = 2 * (FP32 * s.hidden + FP32)
    attention = w.e * 4 * s.heads * s.head_dim + FP32 * s.heads
    mlp = 3 * w.e * s.intermediate
    return norms + attention + mlp


def _backward(s: ModelShape, w: Workload, tokens: int, grads: bool) -> int:
    """Saved activations from the lowest edited block up (the backward starts there), plus the
    edited layers' inputs when their weights take gradients."""
    above = s.blocks - s.lowest_block - 1
    saved = above * block_activation_bytes(s, w) + FP32 * s.hidden + FP32  # + final norm
    if grads:
        saved += len(s.layers) * w.e * s.intermediate
    return tokens * saved


def _logits(s: ModelShape, w: Workload, rows: int) -> int:
    """Logits of `rows` positions in the model's dtype, their fp32 log-softmax (saved by the
    cross-entropy) and the two gradients of the backward (fp32, then the model's dtype)."""
    return rows * s.vocab * (w.e + FP32 + FP32 + w.e)


def curvature_build(s: ModelShape, w: Workload) -> Phase:
    """crispedit/curvature.py collect_curvature: fp64 sums of every layer for the whole pass."""
    tokens = w.batch_size * w.seq_len
    sums = FP32 if w.fp32_sums else FP64
    layers = _layer_count(s, w)
    widths = sorted((d_in + d_out for d_out, d_in in s.layers.values()), reverse=True)
    d = _largest_factor(s)
    resident = [
        *_common(s, w),
        Item(f"K-FAC sums ΣaaT, ΣggT ({_dt_bytes(sums)})", _held_squares(s, w) * sums,
             "curvature.py collect_curvature"),
        Item("captured layer inputs a and output gradients g", tokens * sum(widths[:layers]) * w.e,
             "curvature.py _Capture"),
    ]  # fmt: skip
    moments = {
        "backward": [
            Item(f"activations saved above block {s.lowest_block}", _backward(s, w, tokens, False),
                 "curvature.py _batch_pass"),
            Item(f"logits of a batch ({w.batch_size} x {w.seq_len} x {s.vocab})",
                 _logits(s, w, tokens), "curvature.py _batch_pass"),
        ],
        "factor products": [
            Item("a, g rows of one layer (fp32)", tokens * widths[0] * FP32, "curvature.py _rows"),
            Item("aTa of one layer (fp32) and its fp64 copy", d * d * (FP32 + sums),
                 "curvature.py collect_curvature"),
        ],
        "factors out": [
            Item("factors A, B (fp32)", _held_squares(s, w) * FP32, "curvature.py LayerCurvature"),
            Item("ΣaaT / n of one layer (fp64)", d * d * sums, "curvature.py collect_curvature"),
        ],
    }  # fmt: skip
    if w.kind == "ekfac":
        moments["EK-FAC pass"] = _ekfac_pass(s, w, tokens)
    return Phase("curvature build", resident, moments)


def _ekfac_pass(s: ModelShape, w: Workload, tokens: int) -> list[Item]:
    """The second pass of crispedit/curvature.py _ekfac_pass: bases, fp64 eigenvalue sums and a
    batch's per-sequence gradients in the bases, next to the factors."""
    d_out, d_in = max(s.layers.values(), key=lambda shape: shape[0] * shape[1])
    return [
        Item("factors A, B (fp32)", _held_squares(s, w) * FP32, "curvature.py LayerCurvature"),
        Item("eigenbases U_A, U_B (fp32)", _held_squares(s, w) * FP32, "curvature.py _ekfac_pass"),
        Item("EK-FAC eigenvalue sums (fp64)", s.weights * FP64, "curvature.py _ekfac_pass"),
        Item("rotated a, g and per-sequence G, G² of one layer (fp32)",
             tokens * (d_in + d_out) * FP32 + 2 * w.batch_size * d_out * d_in * FP32,
             "curvature.py _ekfac_pass"),
    ]  # fmt: skip


def _projector(s: ModelShape, w: Workload) -> list[Item]:
    """The projectors of crispedit/projector.py build_projector as the editor holds them: bases
    in the projector's dtype on the model's device, the boolean keep-mask, and the fp32
    eigenbases `LayerCurvature.memo` keeps when the projector's dtype is another."""
    p = FP32 if w.projector_dtype == "float32" else w.e
    items = [
        Item(f"projector bases U_A, U_B ({_dt_bytes(p)})", s.sum_squares * p,
             "projector.py KroneckerProjector"),
        Item("projector keep-masks M (bool)", s.weights * BOOL, "projector.py KroneckerProjector"),
    ]  # fmt: skip
    if w.staircase_mask:
        rows = sum(d_out for d_out, _ in s.layers.values())
        items[1] = Item("projector kept counts k (int64)", rows * 8, "projector.py kfac_threshold")
    if p != FP32 and not w.drop_factors:
        items.append(Item("eigenbases kept by the curvature (fp32)", s.sum_squares * FP32,
                          "curvature.py LayerCurvature.memo"))  # fmt: skip
    return items


def _factors(s: ModelShape, w: Workload, what: str) -> list[Item]:
    """A curvature's factors A, B (and, for EK-FAC, its bases and eigenvalue matrix), fp32."""
    if w.drop_factors:
        return []
    items = [Item(f"{what} A, B (fp32)", s.sum_squares * FP32, "curvature.py LayerCurvature")]
    if w.kind == "ekfac":
        items.append(
            Item(
                f"{what} EK-FAC U_A, U_B and eigenvalues (fp32)",
                s.sum_squares * FP32 + s.weights * FP32,
                "curvature.py LayerCurvature",
            )
        )
    return items  # fmt: skip


def _memo(s: ModelShape, w: Workload) -> list[Item]:
    """The capability's eigenbases, which its `LayerCurvature.memo` keeps after any job on a
    fresh stream, while a later job's projector uses its stream curvature's own."""
    if w.drop_factors:
        return []
    return [Item("capability eigenbases U_A, U_B (fp32)", s.sum_squares * FP32,
                 "curvature.py LayerCurvature.memo")]  # fmt: skip


def steady_editing(s: ModelShape, w: Workload) -> Phase:
    """One job's edit (crispedit/editor.py) on a worker holding its capability curvature."""
    fact_rows = w.facts * (1 + w.anchors)  # the facts and their anchor prompts
    tokens = fact_rows * FACT_TOKENS
    resident = [
        *_common(s, w),
        *_factors(s, w, "capability curvature"),
        *_memo(s, w),
        _state(s, "stream state read from the head (alive through the edit)"),
        *_factors(s, w, "this head's stream curvature"),
        *_projector(s, w),
        *_cached_heads(s, w, w.heads_cached - 1, "other heads'"),
        Item("edit-start copies W_before", 0 if w.host_copies else s.weights * w.e,
             "editor.py edit"),
        Item("fp32 master copies of the edited layers", s.weights * FP32, "editor.py edit"),
        Item("Adam exp_avg, exp_avg_sq (fp32)", 2 * s.weights * FP32, "editor.py edit"),
        Item(f"gradients ({_dt(w.dtype)} on the weights, fp32 on the masters)",
             s.weights * (FP32 if w.free_model_grads else w.e + FP32), "editor.py edit"),
        Item("step copy before the update's projection (fp32)", s.weights * FP32,
             "editor.py _project_updates"),
        Item("cached prefix states of facts and anchors", tokens * s.hidden * w.e,
             "prefix.py FastForward.states_of"),
        Item("anchors' base log-probabilities (fp32)", w.facts * w.anchors * s.vocab * FP32,
             "editor.py _anchor_targets"),
    ]  # fmt: skip
    d_out, d_in = max(s.layers.values(), key=lambda shape: shape[0] * shape[1])
    moments = {
        "backward": [
            Item(f"activations of a batch ({w.facts} facts + anchors)",
                 _backward(s, w, tokens, True), "prefix.py FastForward.hidden"),
            Item("logits at target and anchor positions",
                 _logits(s, w, w.facts * (TARGET_TOKENS + w.anchors)), "prefix.py token_losses"),
        ],
        "projection": [
            Item("gradient in fp32, rotated and projected (one layer)", 3 * d_out * d_in * FP32,
                 "projector.py KroneckerProjector.__call__"),
        ],
    }  # fmt: skip
    return Phase("steady editing", resident, moments)


def _state(s: ModelShape, what: str) -> Item:
    """A stream state: fp64 sums of every layer, on the host (crispedit/sequential.py)."""
    return Item(f"{what}: S_A, S_B (fp64)", s.sum_squares * FP64, "sequential.py StreamState",
                host=True)  # fmt: skip


def _cached_heads(s: ModelShape, w: Workload, heads: int, which: str) -> list[Item]:
    """Stream curvatures `StreamCurvatureCache` keeps on the device: each head's factors and the
    eigenbases its projector built (only the bases, once A and B are dropped)."""
    if heads < 1:
        return []
    if w.drop_factors:  # the bases alone, in the projector's dtype
        p = FP32 if w.projector_dtype == "float32" else w.e
        per_head, what = s.sum_squares * p, f"eigenbases ({_dt_bytes(p)})"
    else:
        per_head, what = s.sum_squares * FP32 * 2, "A, B and eigenbases (fp32)"
    return [Item(f"{which} cached stream curvatures ({heads}): {what}", heads * per_head,
                 "streams.py StreamCurvatureCache")]  # fmt: skip


def _resident(s: ModelShape, w: Workload) -> list[Item]:
    """What a worker holds between jobs: weights, base copies, the capability curvature with
    its eigenbases, and the stream curvature cache."""
    return [*_common(s, w), *_factors(s, w, "capability curvature"), *_memo(s, w),
            *_cached_heads(s, w, w.heads_cached, "the heads'")]  # fmt: skip


def stream_update(s: ModelShape, w: Workload) -> Phase:
    """After an edit (crispedit/streams.py edit_on_stream): the facts' K-FAC sums on the device,
    added to the stream state on the host (three states alive in `StreamState.plus`); then the
    next job's stream curvature, built on the device layer by layer, and its eigh."""
    sums = FP32 if w.fp32_sums else FP64
    eigh = FP32 if w.eigh_fp32 else FP64
    d = _largest_factor(s)
    tokens = w.facts * FACT_TOKENS
    moments = {
        "edit-set factors": [
            Item(f"K-FAC sums of the facts' texts ({_dt_bytes(sums)})", _held_squares(s, w) * sums,
                 "curvature.py collect_curvature"),
            Item("their factors A, B (fp32)", _held_squares(s, w) * FP32,
                 "sequential.py edit_set_factors"),
            Item("captures and activations of the facts' texts",
                 tokens * (sum(a + b for a, b in s.layers.values()) * w.e)
                 + _backward(s, w, tokens, False) + _logits(s, w, tokens),
                 "sequential.py edit_set_factors"),
            _state(s, "stream state read from the head"),
            _state(s, "edit-set sums"),
            _state(s, "the sum StreamState.plus returns"),
        ],
        "stream curvature + eigh": [
            Item("the new head's stream factors A, B (fp32)", _held_squares(s, w) * FP32,
                 "sequential.py stream_curvature"),
            Item(f"A_cap, S_A, β·S_A/n and A of one layer ({_dt_bytes(sums)})", 4 * d * d * sums,
                 "sequential.py _stream_layer"),
            Item(f"eigh of the largest factor: {_dt_bytes(eigh)} input, vectors, workspace",
                 4 * d * d * eigh, "curvature.py eigenbasis"),
            _state(s, "stream state of the new head"),
        ],
    }  # fmt: skip
    return Phase("stream update", _resident(s, w), moments)


def version_write(s: ModelShape, w: Workload) -> Phase:
    """crispedit/streams.py edit_on_stream's end: the state's fp32 copies for the file and the
    delta, all on the host; the device holds what it holds between jobs."""
    moments = {
        "save": [
            _state(s, "stream state"),
            Item(f"edit rows for the file ({_dt(w.dtype)})", version_bytes(s, w)["state"],
                 "sequential.py EditRows.to_tensors", host=True),
            Item("delta and cumulative delta (fp32)", 2 * s.weights * FP32, "delta.py weight_delta",
                 host=True),
        ]
    }  # fmt: skip
    return Phase("version write", _resident(s, w), moments)


def version_bytes(s: ModelShape, w: Workload) -> dict[str, int]:
    """Bytes one version adds to the store: its delta (fp32) and its state, the rows file of its
    own edits (crispedit/sequential.py EditRows: `facts` texts of `FACT_TOKENS`, each token's a and
    g rows of every layer in the model's dtype, and the int64 token count); `state_as_sums` is
    what a version stored before rows, the fp32 sums of every layer."""
    rows = w.facts * FACT_TOKENS * sum(d_in + d_out for d_out, d_in in s.layers.values())
    return {
        "delta": s.weights * FP32,
        "state": rows * w.e + 8,
        "state_as_sums": s.sum_squares * FP32,
    }


PHASES = (curvature_build, steady_editing, stream_update, version_write)


@dataclass
class Plan:
    shape: ModelShape
    workload: Workload
    phases: list[Phase]
    levers: dict[str, list[tuple[str, int]]]  # phase -> (lever, peak after it), cumulative
    version: dict[str, int]

    def to_json(self) -> dict:
        return {
            "model": self.shape.name,
            "architecture": self.shape.architecture,
            "parameters": self.shape.parameters,
            "layers": {n: list(v) for n, v in self.shape.layers.items()},
            "workload": {
                k: (_dt(v) if isinstance(v, torch.dtype) else v)
                for k, v in dataclasses.asdict(self.workload).items()
            },
            "phases": [
                {
                    "phase": p.name,
                    "peak_bytes": p.peak,
                    "target_bytes": _target(p.name),
                    "fits": p.peak <= _target(p.name),
                    "peak_moment": p.peak_moment,
                    "items": [dataclasses.asdict(i) for i in p.items],
                    "levers": [{"lever": n, "peak_bytes": b} for n, b in self.levers[p.name]],
                }
                for p in self.phases
            ],
            "version_bytes": self.version,
        }


def _target(phase: str) -> int:
    return TARGETS.get(phase, WORKER_TARGET)


def plan_memory(shape: ModelShape, workload: Workload = Workload()) -> Plan:
    """Every phase's peak for `shape` under `workload`, and for each phase over its target the
    levers applied one after the other (those that lower its peak), until it fits."""
    if workload.kind not in ("kfac", "ekfac"):
        raise PlanError(f"kind must be kfac or ekfac, not {workload.kind!r}")
    if workload.projector_dtype not in PROJECTOR_DTYPES:
        raise PlanError(f"projector dtype must be one of {PROJECTOR_DTYPES}")
    phases = [build(shape, workload) for build in PHASES]
    levers = {}
    for build, phase in zip(PHASES, phases, strict=True):
        tried, current, peak = [], workload, phase.peak
        for lever, change in LEVERS[phase.name]:
            if peak <= _target(phase.name):
                break
            candidate = dataclasses.replace(current, **change)
            if build(shape, candidate).peak < peak:  # a lever that saves nothing here is left out
                current, peak = candidate, build(shape, candidate).peak
                tried.append((lever, peak))
        levers[phase.name] = tried
    return Plan(shape, workload, phases, levers, version_bytes(shape, workload))


# ---------------------------------------------------------------------------------------------
# Output


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dt_bytes(n: int) -> str:
    return {FP64: "fp64", FP32: "fp32", 2: "16-bit"}[n]


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_plan(plan: Plan) -> str:
    """The plan as a markdown table (phase, item, GiB, file) and a verdict per phase."""
    s, w = plan.shape, plan.workload
    layers = ", ".join(plan.shape.layers)
    lines = [
        f"{s.name} ({s.architecture}): {s.parameters:,} parameters, {_dt(w.dtype)}; "
        f"{len(s.layers)} edited layers: {layers}",
        f"curvature batches {w.batch_size} x {w.seq_len} tokens, kind {w.kind}; edit batches of "
        f"{w.facts} facts x {FACT_TOKENS} tokens, {w.anchors} anchors each; projector "
        f"{w.projector_dtype}",
        "",
        "| phase | item | GiB | held by |",
        "|---|---|---:|---|",
    ]
    for p in plan.phases:
        for i in p.items:
            where = " *(host, not in the peak)*" if i.host else ""
            lines.append(f"| {p.name} | {i.name}{where} | {_gib(i.bytes)} | {i.source} |")
        verdict = "fits" if p.peak <= _target(p.name) else "misses"
        lines.append(
            f"| **{p.name}** | **peak** (at: {p.peak_moment}) | **{_gib(p.peak)}** | "
            f"{verdict} {_target(p.name) // GIB} GiB |"
        )
    lines += ["", "| phase | peak GiB | target GiB | verdict; levers (cumulative), peak after |"]
    lines.append("|---|---:|---:|---|")
    for p in plan.phases:
        target = _target(p.name)
        verdict = "fits" if p.peak <= target else "misses"
        steps = "; ".join(
            f"{lever}: {_gib(b)} ({'fits' if b <= target else 'misses'})"
            for lever, b in plan.levers[p.name]
        )
        lines.append(
            f"| {p.name} | {_gib(p.peak)} | {target // GIB} | {verdict}"
            + (f"; {steps}" if steps else "")
            + " |"
        )
    v = plan.version
    lines += [
        "",
        f"Per version in the store: delta {_gib(v['delta'])} GiB, stream state "
        f"{_gib(v['state'])} GiB (this version's edit rows, {_dt(w.dtype)}); stored as the "
        f"fp32 sums of every layer (versions written before rows) it took "
        f"{_gib(v['state_as_sums'])} GiB.",
    ]
    return "\n".join(lines)
