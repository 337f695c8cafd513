"""Capability curvature: K-FAC factors A, B (and optionally EK-FAC eigenvalues) of edited layers.

For a layer y = W x, the Gauss–Newton curvature of the capability loss w.r.t. vec(W) is
approximated by the Kronecker product of two small factors (DESIGN §2.1):

    A = E[a aᵀ]   (d_in × d_in),  a = the layer input at one token
    B = E[g gᵀ]   (d_out × d_out), g = gradient of the *summed* token cross-entropy w.r.t. y

averaged over the valid tokens of a text corpus (tokens that have a next-token label; padding
contributes nothing). Labels are the observed next tokens (`empirical`, as the reference code) or
tokens sampled from the model's own distribution (`sampled`: the true Fisher, which equals the
Gauss–Newton matrix for softmax cross-entropy).

The backward pass starts at the lowest edited layer: its output is re-entered as a leaf that needs
a gradient and no parameter needs one, so nothing below it is ever differentiated.

EK-FAC (George et al. 2018) keeps the K-FAC eigenbases U_A, U_B but replaces the eigenvalue products
s_B[i]·s_A[j] by E_n[(U_Bᵀ G_n U_A)²], G_n = Σ_t g_t a_tᵀ being one sequence's weight gradient, in a
second pass over the same batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from contract.names import CURVATURE_FILE
from crispedit.artifacts import ArtifactError, artifact_path, load_tensors, save_tensors
from crispedit.corpus import (
    BATCH_SIZE,
    SEQ_LEN,
    CorpusError,
    iter_documents,
    pad_batches,
    sequences_digest,
    token_sequences,
)
from crispedit.models import get_layers, model_fingerprint, parse_layers, trainable_only

LABELS = ("empirical", "sampled")
KINDS = ("kfac", "ekfac")
FORMAT_VERSION = 1


@dataclass
class LayerCurvature:
    """The curvature of one layer: K-FAC factors, and EK-FAC eigenvalues in their eigenbases."""

    A: torch.Tensor  # (d_in, d_in) fp32
    B: torch.Tensor  # (d_out, d_out) fp32
    U_A: torch.Tensor | None = None  # eigenbases the EK-FAC eigenvalues are expressed in
    U_B: torch.Tensor | None = None
    ekfac: torch.Tensor | None = None  # (d_out, d_in) corrected eigenvalues
    # derived tensors (eigenbases, their copies on a device), see `memo`
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def memo(self, key: tuple, source: torch.Tensor, compute: Callable[[], object]) -> object:
        """`compute()`, remembered under `key` for as long as `source` (one of this layer's
        tensors) is the same tensor with the same contents.

        A worker keeps its capability curvature resident and builds a projector for every job:
        the float64 eigendecompositions and the copies on its GPU are then made once, not per job.
        An in-place change of `source` (its version counter moves) or a new tensor recomputes.
        """
        hit = self._memo.get(key)
        if hit is not None and hit[0] is source and hit[1] == source._version:
            return hit[2]
        value = compute()
        self._memo[key] = (source, source._version, value)
        return value


@dataclass
class Curvature:
    """K-FAC (and EK-FAC) curvature of a set of layers, with what it was computed from."""

    layers: dict[str, LayerCurvature]
    tokens: int
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "ekfac" if all(c.ekfac is not None for c in self.layers.values()) else "kfac"

    def save(self, path: str | Path) -> Path:
        """Write all factors to one safetensors file (`DIR/curvature.safetensors` for a folder)."""
        path = artifact_path(path, CURVATURE_FILE)
        tensors = {}
        for name, c in self.layers.items():
            for key in ("A", "B", "U_A", "U_B", "ekfac"):
                if getattr(c, key) is not None:
                    tensors[f"{name}/{key}"] = getattr(c, key)
        meta = {**self.meta, "tokens": self.tokens, "layers": list(self.layers), "kind": self.kind}
        save_tensors(path, tensors, {**meta, "format_version": FORMAT_VERSION})
        return path

    @classmethod
    def load(cls, path: str | Path) -> Curvature:
        """Read a file (or folder) written by `save`, failing clearly on anything else."""
        path = artifact_path(path, CURVATURE_FILE)
        tensors, meta = load_tensors(path, "curvature")
        if meta.get("format_version") != FORMAT_VERSION or "layers" not in meta:
            raise ArtifactError(f"{path} is not a curvature file of format {FORMAT_VERSION}")
        layers = {}
        for name in meta["layers"]:
            parts = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "/")}
            if "A" not in parts or "B" not in parts:
                raise ArtifactError(f"curvature file {path} lacks the factors of layer {name}")
            layers[name] = LayerCurvature(**parts)
        return cls(layers=layers, tokens=int(meta["tokens"]), meta=meta)


def eigenbasis(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending, tiny negatives clamped to 0) and eigenvectors of a symmetric factor,
    on its device and in its dtype.

    Computed in float64, where `eigh` is accurate for the near-singular factors text produces, on
    the factor's device: move a factor to the GPU first, where a large `eigh` is many times faster.
    """
    # MPS has no float64 at all: there float32 is the best it can do (its small eigenvalues are
    # less exact, but they are the ones every mask keeps)
    work = torch.float32 if M.device.type == "mps" else torch.float64
    s, U = torch.linalg.eigh(M.to(work))
    return s.clamp_min(0).to(M.dtype), U.to(M.dtype)


def valid_label_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions t whose next token t+1 is real: the tokens that carry a loss (right padding)."""
    mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    mask[:, :-1] = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    return mask


def sample_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one token per position from the model's own predictive distribution."""
    probs = torch.softmax(logits.detach().float(), dim=-1).flatten(0, -2)
    draws = torch.multinomial(probs.cpu(), 1, generator=generator)
    return draws.view(logits.shape[:-1]).to(logits.device)


def next_token_labels(
    batch: dict, logits: torch.Tensor, labels: str, generator: torch.Generator
) -> torch.Tensor:
    """Labels for position t (the token after t), either observed or sampled from the model."""
    if labels == "sampled":
        return sample_labels(logits, generator)
    out = torch.zeros_like(batch["input_ids"])
    out[:, :-1] = batch["input_ids"][:, 1:]
    return out


class _Capture:
    """Forward hooks that record each layer's input a and the gradient g at its output.

    With `stop_backward`, the lowest layer's output is re-created as a leaf requiring grad: the
    backward graph begins there. Hooks only keep the tensors of the current batch.
    """

    def __init__(self, layers: dict[str, nn.Module], stop_backward: bool = True):
        self.a: dict[str, torch.Tensor] = {}
        self.g: dict[str, torch.Tensor] = {}
        self.handles = []
        self.grid: tuple[int, ...] = ()  # (batch, T) of the batch in flight, set before its forward
        lowest = next(iter(layers)) if stop_backward else None
        for name, module in layers.items():
            self.handles.append(module.register_forward_hook(self._hook(name, name == lowest)))

    def _hook(self, name: str, is_lowest: bool) -> Callable:
        def hook(module, inputs, output):
            # kept as (batch, T, d) even where a block runs its MLP on flattened rows (OPT)
            self.a[name] = inputs[0].detach().reshape(*self.grid, -1)
            if is_lowest:
                output = output.detach().requires_grad_(True)
            if output.requires_grad:
                output.register_hook(
                    lambda g: self.g.__setitem__(name, g.detach().reshape(*self.grid, -1))
                )
            return output

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def batch_pass(model, batch, capture, labels: str, generator) -> torch.Tensor:
    """One forward and backward of the loss `collect_curvature` differentiates (`capture`, a
    `_Capture` or None, records the factors' inputs and gradients); returns the mask of the tokens
    that count. Public so that bench/perf.py can time the pass without the collection."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    capture.grid = tuple(batch["input_ids"].shape)
    logits = model(**batch, use_cache=False).logits
    mask = valid_label_mask(batch["attention_mask"])
    y = next_token_labels(batch, logits, labels, generator)
    loss = F.cross_entropy(logits[mask].float(), y[mask], reduction="sum")
    loss.backward()
    return mask


def collect_curvature(
    model: nn.Module,
    layer_names: list[str],
    batches: Iterable[dict],
    labels: str = "empirical",
    kind: str = "kfac",
    seed: int = 0,
    total_tokens: int | None = None,
    progress: bool = True,
    stop_backward: bool = True,
) -> Curvature:
    """Compute K-FAC factors (and EK-FAC eigenvalues when `kind="ekfac"`) over token batches.

    `batches` are right-padded `{input_ids, attention_mask}` dicts (see `corpus.pad_batches`); it is
    iterated twice for EK-FAC. `layer_names` must be sorted by depth (as `models.parse_layers`
    returns them). Sums are accumulated in float64 and divided by the number of valid tokens.
    `stop_backward=False` runs the full backward of a training step instead (every parameter
    gets a gradient, discarded afterwards): the same factors at a higher cost, kept to measure
    what stopping at the lowest edited layer saves (bench/perf.py).
    """
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, not {labels!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    batches = list(batches)
    layers = get_layers(model, layer_names)
    sums = {n: [0.0, 0.0] for n in layers}
    started = time.perf_counter()

    def each_batch(desc: str):
        """Run every batch through the model, yielding (mask, capture) with a, g recorded."""
        generator = torch.Generator().manual_seed(seed)  # same draws in both EK-FAC passes
        capture = _Capture(layers, stop_backward)
        bar = tqdm(total=total_tokens, desc=desc, unit="tok", disable=not progress)
        try:
            for batch in batches:
                mask = batch_pass(model, batch, capture, labels, generator)
                yield mask, capture
                bar.update(int(batch["attention_mask"].sum()))
        finally:
            bar.close()
            capture.close()

    n_tokens = 0
    # a full backward (measurement only) differentiates every parameter; their .grad is restored
    differentiated = [] if stop_backward else list(model.parameters())
    saved_grads = [p.grad for p in differentiated]
    try:
        with trainable_only(model, differentiated):
            for mask, capture in each_batch("curvature (K-FAC)"):
                n_tokens += int(mask.sum())
                for name in layers:
                    a, g = _rows(capture, name, mask)
                    sums[name][0] += (a.T @ a).double()
                    sums[name][1] += (g.T @ g).double()
            if n_tokens == 0:
                raise ValueError("the corpus produced no token with a next-token label")
            result = {
                name: LayerCurvature(A=(sA / n_tokens).float(), B=(sB / n_tokens).float())
                for name, (sA, sB) in sums.items()
            }
            if kind == "ekfac":
                _ekfac_pass(result, layers, each_batch("curvature (EK-FAC)"), n_tokens)
    finally:
        for p, grad in zip(differentiated, saved_grads, strict=True):
            p.grad = grad
    meta = {
        "labels": labels,
        "seed": seed,
        "collect_seconds": round(time.perf_counter() - started, 3),
    }
    return Curvature(layers=result, tokens=n_tokens, meta=meta)


def _rows(capture: _Capture, name: str, mask: torch.Tensor):
    """The valid tokens' inputs a (n, d_in) and output gradients g (n, d_out), in fp32.

    GPT-2's Conv1D computes x @ W + b: its a and g are the same as a Linear's; only the storage of
    W is transposed, which `models.weight_matrix` handles.
    """
    return capture.a[name][mask].float(), capture.g[name][mask].float()


def collect_rows(
    model: nn.Module, layer_names: list[str], batches: Iterable[dict]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's rows a (n, d_in) and g (n, d_out) over all `batches`, on the CPU, in the dtype
    the model computed them in: the captured values exactly (a bf16 model's in half fp32's bytes).

    The same forward, backward and valid tokens as `collect_curvature` with observed labels, whose
    factor sums are n·A = aᵀa and n·B = gᵀg of these rows; meant for a few texts (a stream's edit
    set), whose rows take less memory than their sums. `layer_names` sorted by depth.
    """
    layers = get_layers(model, layer_names)
    generator = torch.Generator().manual_seed(0)  # observed labels draw nothing from it
    capture = _Capture(layers)
    rows: dict[str, tuple[list, list]] = {name: ([], []) for name in layers}
    try:
        with trainable_only(model, []):
            for batch in batches:
                mask = batch_pass(model, batch, capture, "empirical", generator)
                for name in layers:
                    a, g = _rows(capture, name, mask)  # fp32 copies: cast back without loss
                    rows[name][0].append(a.to("cpu", capture.a[name].dtype))
                    rows[name][1].append(g.to("cpu", capture.g[name].dtype))
    finally:
        capture.close()
    return {name: (torch.cat(a), torch.cat(g)) for name, (a, g) in rows.items()}


def _ekfac_pass(result: dict[str, LayerCurvature], layers, passes, n_tokens: int) -> None:
    for c in result.values():
        _, c.U_A = eigenbasis(c.A)
        _, c.U_B = eigenbasis(c.B)
        # on the device of the factors, which is the model's: the batches' terms are added there
        c.ekfac = torch.zeros(c.B.shape[0], c.A.shape[0], dtype=torch.float64, device=c.A.device)
    for mask, capture in passes:
        m = mask.unsqueeze(-1).float()
        for name, c in result.items():
            a_rot = (capture.a[name].float() * m) @ c.U_A  # (batch, T, d_in) in A's eigenbasis
            g_rot = (capture.g[name].float() * m) @ c.U_B
            G = g_rot.transpose(1, 2) @ a_rot  # per-sequence gradient Uᵦᵀ G_n U_A
            c.ekfac += (G**2).sum(0).double()
    for c in result.values():
        c.ekfac = (c.ekfac / n_tokens).float()


@dataclass
class CurvatureRecipe:
    """Exactly what a curvature is computed from; `key_fields` address it in the store.

    The corpus digest is taken over the token sequences themselves, so it covers the text, the
    tokenizer, the token budget and the sequence length at once.
    """

    model_fingerprint: str
    layers: list[str]
    corpus: str
    sequences: list[list[int]]
    labels: str
    kind: str
    seed: int
    seq_len: int

    @property
    def key_fields(self) -> dict:
        return {
            "model_fingerprint": self.model_fingerprint,
            "layers": self.layers,
            "corpus_digest": sequences_digest(self.sequences),
            "tokens": sum(len(s) for s in self.sequences),
            # sampled labels depend on the seed; observed ones do not
            "labels": self.labels if self.labels == "empirical" else f"{self.labels}:{self.seed}",
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
        }


def plan_curvature(
    model: nn.Module,
    tokenizer,
    corpus: str | Path = "wikitext",
    tokens: int = 20_000,
    layers: list[str] | str | None = None,
    labels: str = "empirical",
    kind: str = "kfac",
    seed: int = 0,
    seq_len: int = SEQ_LEN,
) -> CurvatureRecipe:
    """Read and tokenize the corpus and fix every input of the curvature, computing nothing yet."""
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, not {labels!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    layers = parse_layers(model, layers)
    sequences = token_sequences(tokenizer, iter_documents(corpus), tokens, seq_len)
    if not sequences:
        raise CorpusError(f"corpus {corpus} yields no sequence of 2 or more tokens")
    return CurvatureRecipe(
        model_fingerprint=model_fingerprint(model, layers),
        layers=layers,
        corpus=str(corpus),
        sequences=sequences,
        labels=labels,
        kind=kind,
        seed=seed,
        seq_len=seq_len,
    )


def run_recipe(
    model: nn.Module,
    tokenizer,
    recipe: CurvatureRecipe,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
) -> Curvature:
    """Collect the curvature a recipe describes; its `meta` records the recipe's key."""
    curvature = collect_curvature(
        model,
        recipe.layers,
        pad_batches(recipe.sequences, tokenizer.pad_token_id, batch_size),
        labels=recipe.labels,
        kind=recipe.kind,
        seed=recipe.seed,
        total_tokens=sum(len(s) for s in recipe.sequences),
        progress=progress,
    )
    key = recipe.key_fields
    curvature.meta.update(
        key=key,  # the store's address of this artifact
        model_fingerprint=key["model_fingerprint"],
        corpus_digest=key["corpus_digest"],
        model=getattr(model, "name_or_path", None),
        corpus=recipe.corpus,
        seq_len=recipe.seq_len,
    )
    return curvature


def build_curvature(
    model: nn.Module,
    tokenizer,
    corpus: str | Path = "wikitext",
    tokens: int = 20_000,
    layers: list[str] | str | None = None,
    labels: str = "empirical",
    kind: str = "kfac",
    seed: int = 0,
    seq_len: int = SEQ_LEN,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
) -> Curvature:
    """Read `corpus`, cut `tokens` tokens into padded batches, and collect the curvature.

    The result's `meta` records what it was built from (model fingerprint, layers, corpus digest,
    token count, label mode, kind): the key under which the store caches it.
    """
    recipe = plan_curvature(model, tokenizer, corpus, tokens, layers, labels, kind, seed, seq_len)
    return run_recipe(model, tokenizer, recipe, batch_size, progress)
