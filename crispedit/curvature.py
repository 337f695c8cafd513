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

A long build is resumable: given a `Checkpointing`, `collect_curvature` saves its partial sums as
it goes and a build started again on the same batches continues from them, bitwise.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from contract.jobs import CURVATURE_KINDS
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
KINDS = CURVATURE_KINDS  # the job contract names them too
FORMAT_VERSION = 1
CHECKPOINT_FORMAT = 1
# A checkpoint costs a host copy of every float64 sum (gigabytes at 8B): often enough that a
# killed build loses minutes, not hours, and rarely enough to stay a small share of the build.
CHECKPOINT_BATCHES = 100
CHECKPOINT_S = 600.0
log = logging.getLogger(__name__)


@dataclass
class LayerCurvature:
    """The curvature of one layer: K-FAC factors, and EK-FAC eigenvalues in their eigenbases.

    A projector needs the eigenbases, not the factors. `eigen` computes a factor's on the device
    asked for and keeps them on the host; `to_host` moves everything else there once a projector
    holds its own copies on the device (`projector.build_projector`). Between jobs, a worker's GPU
    then holds no curvature at all. A stream curvature keeps its eigenbases alone: A and B are
    None there (`sequential.stream_curvature`).
    """

    A: torch.Tensor | None  # (d_in, d_in) fp32; None where only its eigenbasis is kept
    B: torch.Tensor | None  # (d_out, d_out) fp32
    U_A: torch.Tensor | None = None  # eigenbases the EK-FAC eigenvalues are expressed in
    U_B: torch.Tensor | None = None
    ekfac: torch.Tensor | None = None  # (d_out, d_in) corrected eigenvalues
    # "A" / "B" -> (the factor it was computed from, its version, (eigenvalues, eigenbasis))
    _eigen: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def eigen(
        self, which: str, device: torch.device | str, to: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending) and eigenbasis of factor `which` ("A" or "B") on `device`
        (on `to` instead, when given: computed on `device` if need be, returned there).

        Computed once per factor value, on `device` (the model's, where the float64 `eigh` is
        fastest), and kept on the host: a worker builds a projector per job from the same
        curvature, and the copy on its GPU is then the projector's own, freed with it. An
        in-place change of the factor (its version counter moves) or a new tensor recomputes;
        a factor set to None (dropped) keeps the eigenbasis it last had.
        """
        to = device if to is None else to
        kept = self._kept_eigen(which)
        if kept is not None:
            return kept[0].to(to), kept[1].to(to)
        factor = getattr(self, which)
        if factor is None:
            raise ValueError(f"factor {which} was dropped before its eigenbasis was computed")
        s, U = eigenbasis(factor.to(device))
        self.keep_eigen(which, s, U)
        return s.to(to), U.to(to)

    def _kept_eigen(self, which: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The kept eigendecomposition of factor `which`, if it is that of its value now."""
        factor, hit = getattr(self, which), self._eigen.get(which)
        if hit is None:
            return None
        if factor is not None and (hit[0] is not factor or hit[1] != factor._version):
            return None  # the factor changed since
        return hit[2]

    def keep_eigen(self, which: str, s: torch.Tensor, U: torch.Tensor) -> None:
        """Remember (s, U), on the host, as the eigendecomposition of factor `which` as it is now
        (or of the factor this layer does not keep, when it is None)."""
        factor = getattr(self, which)
        version = None if factor is None else factor._version
        self._eigen[which] = (factor, version, (to_host(s), to_host(U)))

    def to_host(self) -> None:
        """Move every tensor of this layer to the host (pinned with CUDA); the eigenbases stay
        valid for the moved factors, which hold the same values."""
        for which in ("A", "B"):
            kept = self._kept_eigen(which)
            setattr(self, which, to_host(getattr(self, which)))
            if kept is not None:
                self.keep_eigen(which, *kept)
        self.U_A, self.U_B, self.ekfac = map(to_host, (self.U_A, self.U_B, self.ekfac))


def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` in host memory: `t` itself when it is there, else a copy, in page-locked memory when
    CUDA is present (the copy back to the GPU then runs at the bus's full speed)."""
    if t is None or t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
    return host.copy_(t)


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


@dataclass(frozen=True)
class Checkpointing:
    """Where `collect_curvature` keeps its partial sums while it runs, and how often it writes them.

    The file holds the float64 sums of the pass in progress, the number of batches it has done,
    the label sampler's state and, in the EK-FAC pass, the eigenbases: exactly what the rest of
    the build needs, so a build resumed from it gives bitwise the factors of an uninterrupted one
    (the same additions in the same order). It is written atomically every `every_batches`
    batches or `every_s` seconds, whichever comes first, and at the end of each pass. A file
    there that was written for anything but the same `identity` (what the sums are sums of: the
    recipe's key fields and the batch size, see `run_recipe`) and the same batches is ignored
    and overwritten. The caller deletes it once the result is kept.
    """

    path: Path
    identity: dict = field(default_factory=dict)
    every_batches: int = CHECKPOINT_BATCHES
    every_s: float = CHECKPOINT_S

    def __post_init__(self):
        if self.every_batches < 1 or self.every_s <= 0:
            raise ValueError("a checkpoint is written every 1 or more batches and > 0 seconds")


def collect_curvature(
    model: nn.Module,
    layer_names: list[str],
    batches: Iterable[dict],
    labels: str = "empirical",
    kind: str = "kfac",
    seed: int = 0,
    progress: bool = True,
    stop_backward: bool = True,
    checkpoint: Checkpointing | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> Curvature:
    """Compute K-FAC factors (and EK-FAC eigenvalues when `kind="ekfac"`) over token batches.

    `batches` are right-padded `{input_ids, attention_mask}` dicts (see `corpus.pad_batches`); it is
    iterated twice for EK-FAC. `layer_names` must be sorted by depth (as `models.parse_layers`
    returns them). Sums are accumulated in float64 and divided by the number of valid tokens.
    `stop_backward=False` runs the full backward of a training step instead (every parameter
    gets a gradient, discarded afterwards): the same factors at a higher cost, kept to measure
    what stopping at the lowest edited layer saves (bench/perf.py).

    With `checkpoint`, the build saves its partial sums as it goes and starts from them when it
    finds them (see `Checkpointing`). `on_progress(info)` is called after every batch, once the
    checkpoint is written, with `{"pass", "tokens_done", "tokens_total"}` (tokens of both passes
    for EK-FAC); an exception it raises stops the build and leaves the checkpoint.
    """
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, not {labels!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    build = _Build(model, get_layers(model, layer_names), list(batches), labels, kind, seed)
    build.resume(checkpoint)
    started = time.perf_counter()
    # a full backward (measurement only) differentiates every parameter; their .grad is restored
    differentiated = [] if stop_backward else list(model.parameters())
    saved_grads = [p.grad for p in differentiated]
    try:
        with trainable_only(model, differentiated):
            result, n_tokens = build.run(stop_backward, progress, on_progress)
    finally:
        for p, grad in zip(differentiated, saved_grads, strict=True):
            p.grad = grad
    meta = {
        "labels": labels,
        "seed": seed,
        "collect_seconds": round(time.perf_counter() - started, 3),
    }
    if build.resumed_from is not None:
        meta["resumed_from"] = build.resumed_from
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


PASS_NAMES = {"kfac": "K-FAC", "ekfac": "EK-FAC"}


class _Build:
    """One curvature collection: a K-FAC pass over the batches, then for EK-FAC a second pass in
    the K-FAC eigenbases, each resumable from a `Checkpointing` file.

    State, all of it written to a checkpoint: the pass in progress (`phase`), the batches of it
    done, the valid tokens counted by the K-FAC pass, the float64 sums of each layer (on the
    device of its inputs, where they are added), the EK-FAC eigenbases, and the label sampler's
    state, so that sampled labels continue the same draws.
    """

    def __init__(
        self, model, layers: dict[str, nn.Module], batches: list[dict], labels, kind, seed
    ):
        self.model, self.layers, self.batches = model, layers, batches
        self.labels, self.kind, self.seed = labels, kind, seed
        self.batch_tokens = [int(b["attention_mask"].sum()) for b in batches]
        self.checkpoint: Checkpointing | None = None
        self.resumed_from: dict | None = None
        self.phase, self.done, self.tokens = "kfac", 0, 0
        self.sums: dict[str, list] = {name: [0.0, 0.0] for name in layers}  # Σ a aᵀ, Σ g gᵀ
        self.ekfac: dict[str, torch.Tensor] = {}  # Σ_n (U_Bᵀ G_n U_A)²
        self.bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # U_A, U_B
        self.generator = self._fresh_generator()

    def _fresh_generator(self) -> torch.Tensor:
        return torch.Generator().manual_seed(self.seed).get_state()  # same draws in both passes

    def _identity(self) -> dict:
        """What a checkpoint must have been written for to be resumed by this build."""
        return {
            **(self.checkpoint.identity if self.checkpoint else {}),
            "layers": list(self.layers),
            "labels": self.labels,
            "kind": self.kind,
            "seed": self.seed,
            "batch_tokens": self.batch_tokens,
        }

    # --- the passes ---

    def run(self, stop_backward: bool, progress: bool, on_progress) -> tuple[dict, int]:
        """Finish the build from where it stands; (each layer's LayerCurvature, valid tokens)."""
        if self.phase == "kfac":
            for mask, capture in self._pass(stop_backward, progress, on_progress):
                self.tokens += int(mask.sum())
                for name in self.layers:
                    a, g = _rows(capture, name, mask)
                    self.sums[name][0] += (a.T @ a).double()
                    self.sums[name][1] += (g.T @ g).double()
        if self.tokens == 0:
            raise ValueError("the corpus produced no token with a next-token label")
        result = {
            name: LayerCurvature(A=(sA / self.tokens).float(), B=(sB / self.tokens).float())
            for name, (sA, sB) in self.sums.items()
        }
        if self.kind == "ekfac":
            if self.phase == "kfac":
                self._start_ekfac(result)
            for mask, capture in self._pass(stop_backward, progress, on_progress):
                m = mask.unsqueeze(-1).float()
                for name, (U_A, U_B) in self.bases.items():
                    a_rot = (capture.a[name].float() * m) @ U_A  # (batch, T, d_in), A's eigenbasis
                    g_rot = (capture.g[name].float() * m) @ U_B
                    G = g_rot.transpose(1, 2) @ a_rot  # per-sequence gradient Uᵦᵀ G_n U_A
                    self.ekfac[name] += (G**2).sum(0).double()
            for name, c in result.items():
                c.U_A, c.U_B = self.bases[name]
                c.ekfac = (self.ekfac[name] / self.tokens).float()
        return result, self.tokens

    def _start_ekfac(self, result: dict[str, LayerCurvature]) -> None:
        """Turn to the EK-FAC pass: the K-FAC eigenbases, zero sums, the sampler from its seed."""
        for name, c in result.items():
            self.bases[name] = (eigenbasis(c.A)[1], eigenbasis(c.B)[1])
            # on the device of the factors, which is the layer's: the batches' terms are added there
            shape = (c.B.shape[0], c.A.shape[0])
            self.ekfac[name] = torch.zeros(shape, dtype=torch.float64, device=c.A.device)
        self.phase, self.done, self.generator = "ekfac", 0, self._fresh_generator()
        self._save()  # the eigenbases are costly at scale: a resumed build reuses them

    def _pass(self, stop_backward: bool, progress: bool, on_progress) -> Iterator:
        """The batches of the pass in progress not yet done, yielding (mask, capture) with a, g
        recorded; after each one the caller has summed, save when due and report."""
        per_pass = sum(self.batch_tokens)
        passes = list(PASS_NAMES)[: 2 if self.kind == "ekfac" else 1]
        earlier = passes.index(self.phase) * per_pass
        generator = torch.Generator()
        generator.set_state(self.generator)
        capture = _Capture(self.layers, stop_backward)
        name = PASS_NAMES[self.phase]
        done_tokens = sum(self.batch_tokens[: self.done])
        bar = tqdm(
            total=per_pass, initial=done_tokens, desc=f"curvature ({name})", unit="tok",
            disable=not progress,
        )  # fmt: skip
        last_save = time.monotonic()
        try:
            for index in range(self.done, len(self.batches)):
                mask = batch_pass(self.model, self.batches[index], capture, self.labels, generator)
                yield mask, capture
                self.done, self.generator = index + 1, generator.get_state()
                done_tokens += self.batch_tokens[index]
                bar.update(self.batch_tokens[index])
                if self.checkpoint is not None and (
                    self.done % self.checkpoint.every_batches == 0
                    or time.monotonic() - last_save >= self.checkpoint.every_s
                    or self.done == len(self.batches)
                ):
                    self._save()
                    last_save = time.monotonic()
                if on_progress is not None:
                    total = per_pass * len(passes)
                    on_progress(
                        {"pass": name, "tokens_done": earlier + done_tokens, "tokens_total": total}
                    )
        finally:
            bar.close()
            capture.close()

    # --- the checkpoint ---

    def _save(self) -> None:
        if self.checkpoint is None:
            return
        tensors = {"generator": self.generator}
        for name, (sA, sB) in self.sums.items():
            if isinstance(sA, torch.Tensor):  # not before the first batch
                tensors[f"{name}/A_sum"], tensors[f"{name}/B_sum"] = sA, sB
        for name, (U_A, U_B) in self.bases.items():
            tensors[f"{name}/U_A"], tensors[f"{name}/U_B"] = U_A, U_B
            tensors[f"{name}/ekfac_sum"] = self.ekfac[name]
        meta = {
            "checkpoint_format": CHECKPOINT_FORMAT,
            "identity": self._identity(),
            "phase": self.phase,
            "batches_done": self.done,
            "tokens": self.tokens,
        }
        save_tensors(self.checkpoint.path, tensors, meta)

    def resume(self, checkpoint: Checkpointing | None) -> None:
        """Adopt `checkpoint` and, when its file was written by this same build, its state."""
        self.checkpoint = checkpoint
        if checkpoint is None or not Path(checkpoint.path).is_file():
            return
        try:
            tensors, meta = load_tensors(checkpoint.path, "curvature checkpoint")
        except ArtifactError as err:
            log.warning("starting the curvature afresh: %s", err)
            return
        ours = json.loads(json.dumps(self._identity()))  # as the file's JSON header reads back
        if meta.get("checkpoint_format") != CHECKPOINT_FORMAT or meta.get("identity") != ours:
            log.warning("starting the curvature afresh: %s is another build's", checkpoint.path)
            return
        for name, module in self.layers.items():
            device = next(module.parameters()).device  # where this layer's terms are added
            if f"{name}/A_sum" in tensors:
                self.sums[name] = [tensors[f"{name}/{f}_sum"].to(device) for f in ("A", "B")]
            if f"{name}/U_A" in tensors:
                self.bases[name] = (
                    tensors[f"{name}/U_A"].to(device),
                    tensors[f"{name}/U_B"].to(device),
                )
                self.ekfac[name] = tensors[f"{name}/ekfac_sum"].to(device)
        self.phase, self.done, self.tokens = meta["phase"], meta["batches_done"], meta["tokens"]
        self.generator = tensors["generator"]
        self.resumed_from = {"pass": PASS_NAMES[self.phase], "batches_done": self.done}
        log.info("curvature resumed from %s: %s", checkpoint.path, self.resumed_from)


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
    checkpoint: Checkpointing | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> Curvature:
    """Collect the curvature a recipe describes; its `meta` records the recipe's key.

    `checkpoint` (its `identity` is set here: the recipe's key fields and the batch size) makes
    the build resumable, `on_progress` follows it (see `collect_curvature`).
    """
    if checkpoint is not None:
        checkpoint = replace(checkpoint, identity={**recipe.key_fields, "batch_size": batch_size})
    curvature = collect_curvature(
        model,
        recipe.layers,
        pad_batches(recipe.sequences, tokenizer.pad_token_id, batch_size),
        labels=recipe.labels,
        kind=recipe.kind,
        seed=recipe.seed,
        progress=progress,
        checkpoint=checkpoint,
        on_progress=on_progress,
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
