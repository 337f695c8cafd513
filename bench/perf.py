"""Speed and memory of the editing pipeline (issue 6): one table per part, on this machine.

    python bench/perf.py                                  # every part: ~15 min on 2 CPU cores
    python bench/perf.py --parts projector,threshold      # some of them
    python bench/perf.py --device cuda                    # a GPU: bf16 model, fp32 factors

Parts: `curvature` (collection against a plain forward+backward, stopped vs full backward),
`projector` (matrix-free against the explicit dense projector, share of an edit step on the
model and at Llama-3-8B shapes), `threshold` (λ_γ at Llama-3-8B shapes against a full sort),
`throughput` (facts/s batch and sequential, scaling in facts and layers, the paper's anchor as a
FLOP estimate), `start` (worker job pickup → first optimizer step, warm / from the store /
rebuilt), `memory` (peak RSS, and GPU peak allocation, of every phase measured).

Prints a markdown table per part and writes them, with the machine and the command, to
bench/results/perf.md. Llama-3-8B shapes use synthetic factors (the model's spectra resampled to
14336 and 4096 eigenvalues, random orthogonal eigenbases) through the production code. Not a
test: the figures depend on the machine and on whatever else runs on it (load is recorded).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from measure import machine, peak_rss_gib, reset_peak_rss, rss_gib, trim_heap

from crispedit.corpus import ASSETS, pad_batches, read_documents, token_sequences
from crispedit.curvature import Curvature, _batch_pass, collect_curvature, plan_curvature
from crispedit.editor import BATCH_SIZE, CrispEditor
from crispedit.facts import fact_to_record, load_facts
from crispedit.models import get_layers, load_model, parse_layers, trainable_only
from crispedit.projector import (
    GAMMA,
    KroneckerProjector,
    build_projector,
    energy_threshold,
    kfac_threshold,
)
from crispedit.sequential import set_weights
from crispedit.streams import base_weights, cached_curvature, edit_on_stream
from crispedit.targets import IGNORE, target_batches

RESULTS = Path(__file__).parent / "results"
PARTS = ("curvature", "projector", "threshold", "throughput", "start", "memory")
MODEL = "smollm2"
FACTS = ASSETS / "counterfact-edit-1k.json"
CURVATURE_TOKENS = 20_000  # the capability curvature edits use (the worker's default)
PASS_TOKENS = 2048  # WikiText tokens per timed pass of the curvature part (8 sequences of 256)
START_TOKENS = 4096  # the curvature a worker rebuilds in the start part
STORE = RESULTS / "tmp" / "store"  # caches the capability curvature between runs (git-ignored)
REPEATS = 2  # timed passes per curvature variant; the fastest counts (the machine is shared)
STEP_EPOCHS = 6  # epochs of a 32-fact edit timed per step (the first one is not counted)
SIZES = "10,100,1000"  # batch edits of the throughput part
EPOCHS = 25  # up to this many epochs per batch edit (the loop stops early below loss 0.01)...
LARGE_EPOCHS = 5  # ...except for batches above LARGE facts: a 1,000-fact edit at 25 is 8+ min here
LARGE = 500
SEQ_CHUNKS, SEQ_CHUNK = 5, 10  # sequential mode: chunks of facts on one stream
LAYER_SPANS = (1, 3, 5, 10)  # edited layers of the scaling table, from the default first one
START_FACTS = 10  # facts of a worker job in the start part (one epoch)
DENSE_SHAPES = ((16, 32), (32, 64), (64, 128))  # (d_out, d_in) where (d_in·d_out)² floats fit
GAMMAS = (0.8, 0.9, 0.99)  # per-layer projector timings on the model
SHARE_GAMMAS = (0.5, 0.7, 0.9, 0.99)  # the projector's share of a step at other γ
# Llama-3-8B: the MLP down projection (d_in 14336 → d_out 4096) of layers 19-23 (DESIGN §2.8).
LLAMA = {
    "hidden": 4096,
    "intermediate": 14336,
    "layers": 32,
    "heads": 32,
    "kv_heads": 8,
    "vocab": 128256,
    "start": 19,
    "edited": 5,
}
# The paper's anchor: 3,000 edits in about 4-6 minutes for an 8B model on one A40.
ANCHOR_EDITS = 3000
A40_TFLOPS = {"bf16": 149.7, "fp32": 37.4}  # dense peak (NVIDIA datasheet); fp32 without TF32
UTILISATION = 0.5  # assumed share of peak that large matmuls reach


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Context:
    """What the parts share: arguments, the model and its curvature (built once, lazily)."""

    args: argparse.Namespace
    device: str
    phases: list[tuple[str, dict]] = field(default_factory=list)  # for the memory part
    llama: dict = field(default_factory=dict)  # the projector part's figures at 8B shapes
    _model: tuple | None = None
    _curvature: Curvature | None = None
    _base: dict | None = None

    @property
    def model(self):
        if self._model is None:
            with phase(self, "load model") as m:
                self._model = load_model(self.args.model, device=self.device)
            log(f"model {self.args.model} loaded in {m['seconds']:.1f} s")
            # the weights every edit here starts from (`restore`)
            self._base = base_weights(self._model[0], self.layers(max(LAYER_SPANS)))
        return self._model

    def layers(self, n: int | None = None) -> list[str]:
        """The default edited layers, or `n` contiguous ones from the default first block."""
        model, _ = self.model
        default = parse_layers(model, None)
        if n is None:
            return default
        first = int(default[0].split(".")[-3])  # ...layers.<i>.mlp.down_proj
        last = min(first + n, model.config.num_hidden_layers) - 1
        return parse_layers(model, f"{first}-{last}")

    def curvature(self, layers: list[str] | None = None) -> Curvature:
        """Capability curvature of the widest layer span used here; a subset on request."""
        if self._curvature is None:
            from curvature_store import Store

            model, tokenizer = self.model
            wide = self.layers(max(LAYER_SPANS))
            log(f"curvature: {len(wide)} layers, {self.args.tokens} tokens (cached in {STORE})")
            recipe = plan_curvature(model, tokenizer, "wikitext", self.args.tokens, wide)
            with phase(self, None) as m:
                self._curvature, manifest = cached_curvature(
                    Store(STORE), model, tokenizer, recipe, progress=False
                )
            how = "loaded from the store" if manifest["cache_hit"] else "collected"
            name = f"curvature, {self.args.tokens} tokens, {len(wide)} layers ({how})"
            self.phases.append((name, m))
        c = self._curvature
        names = layers or self.layers()
        return Curvature(layers={n: c.layers[n] for n in names}, tokens=c.tokens, meta=c.meta)

    def restore(self) -> None:
        """Put the model's edited layers back to the base weights."""
        model, _ = self.model
        set_weights(model, self._base, {})


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def phase(ctx: Context, name: str | None) -> Iterator[dict]:
    """Time a block and record its peak memory: seconds, peak RSS (and its rise over the RSS at
    the start), and the GPU's peak allocation; `name` also lists it in the memory part."""
    cuda = torch.device(ctx.device).type == "cuda"
    sync(ctx.device)
    trim_heap()
    reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    out = {"rss_start": rss_gib()}
    started = time.perf_counter()
    yield out
    sync(ctx.device)
    out["seconds"] = time.perf_counter() - started
    out["peak_rss"] = peak_rss_gib()
    out["rss_rise"] = max(0.0, out["peak_rss"] - out["rss_start"])
    out["cuda_peak"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if cuda else None
    if name is not None:
        ctx.phases.append((name, out))


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def gib(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} GiB"


def mem(m: dict) -> str:
    """Peak RSS (rise over the start) and, on a GPU, the peak allocation."""
    text = f"{m['peak_rss']:.2f} GiB (+{m['rss_rise']:.2f})"
    return text if m["cuda_peak"] is None else f"{text}; GPU {m['cuda_peak']:.2f} GiB"


def best_of(ctx: Context, repeats: int, fn: Callable[[], object], name: str) -> dict:
    """The fastest of `repeats` timed runs of `fn` (with the highest peak memory seen)."""
    runs = []
    for i in range(repeats):
        log(f"  {name} ({i + 1}/{repeats})")
        with phase(ctx, None) as m:
            fn()
        runs.append(m)
    best = min(runs, key=lambda m: m["seconds"])
    best["peak_rss"] = max(m["peak_rss"] for m in runs)
    best["rss_rise"] = max(m["rss_rise"] for m in runs)
    ctx.phases.append((name, best))
    return best


# ---------------------------------------------------------------------------------------------
# Synthetic Llama-3-8B factors and the FLOP model of an edit step


def resampled(s: torch.Tensor, n: int) -> torch.Tensor:
    """An ascending spectrum of n values shaped like `s` (log-linear in the relative rank)."""
    s = s.double().clamp_min(s[s > 0].min().item()).log()
    x = torch.linspace(0, 1, len(s), dtype=torch.float64)
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    i = torch.searchsorted(x, t).clamp(1, len(s) - 1)
    w = (t - x[i - 1]) / (x[i] - x[i - 1])
    return (s[i - 1] + w * (s[i] - s[i - 1])).exp().float().sort().values


def random_orthogonal(
    n: int, device: str, dtype: torch.dtype, reflections: int = 8
) -> torch.Tensor:
    """A dense random orthogonal matrix: a product of Householder reflections, O(n²) per
    reflection (a QR of a 14336² matrix would take minutes here; matmul time ignores values)."""
    g = torch.Generator().manual_seed(n)
    U = torch.eye(n, dtype=torch.float32, device=device)
    for _ in range(reflections):
        v = torch.randn(n, 1, generator=g).to(device)
        v /= v.norm()
        U -= 2.0 * (U @ v) @ v.T
    return U.to(dtype)


def llama_spectra(ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """s_A (14336) and s_B (4096): the first edited layer's spectra resampled to Llama shapes."""
    from crispedit.curvature import eigenbasis

    c = ctx.curvature().layers[ctx.layers()[0]]
    return resampled(eigenbasis(c.A)[0], LLAMA["intermediate"]), resampled(
        eigenbasis(c.B)[0], LLAMA["hidden"]
    )


def block_macs(cfg: dict) -> tuple[int, int]:
    """Multiply-adds per token of one transformer block, and of its MLP down projection."""
    h, f = cfg["hidden"], cfg["intermediate"]
    kv = h * cfg["kv_heads"] // cfg["heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * f, h * f


def step_flops(cfg: dict, tokens: int, targets: int) -> float:
    """FLOPs of one edit step without the projector: the blocks from the lowest edited one up,
    forward and backward to their inputs, weight gradients of the edited layers only, and the
    output head at the target positions (attention scores, ~15 tokens a fact, are left out)."""
    block, down = block_macs(cfg)
    blocks = cfg["layers"] - cfg["start"]
    macs = 2 * tokens * block * blocks + tokens * down * cfg["edited"]
    macs += 2 * targets * cfg["hidden"] * cfg["vocab"]
    return 2.0 * macs


def projector_flops(d_out: int, d_in: int, cost: float) -> float:
    """FLOPs of one projection: the dense four-matmul form, times the cover's share."""
    return 2.0 * 2 * d_out * d_in * (d_in + d_out) * cost


def model_cfg(model) -> dict:
    c = model.config
    return {
        "hidden": c.hidden_size,
        "intermediate": c.intermediate_size,
        "layers": c.num_hidden_layers,
        "heads": c.num_attention_heads,
        "kv_heads": getattr(c, "num_key_value_heads", c.num_attention_heads),
        "vocab": c.vocab_size,
    }


def batch_tokens(tokenizer, facts) -> tuple[int, int]:
    """Real tokens and target tokens of the facts' edit batches."""
    pairs = [(f.prompt, f.target) for f in facts]
    tokens = targets = 0
    for batch in target_batches(tokenizer, pairs, BATCH_SIZE):
        tokens += int(batch["attention_mask"].sum())
        targets += int((batch["labels"] != IGNORE).sum())
    return tokens, targets


# ---------------------------------------------------------------------------------------------
# 1. Curvature collection


def part_curvature(ctx: Context) -> str:
    model, tokenizer = ctx.model
    layers = ctx.layers()
    seqs = token_sequences(tokenizer, read_documents("wikitext"), ctx.args.pass_tokens)
    batches = list(pad_batches(seqs, tokenizer.pad_token_id))
    n = sum(len(s) for s in seqs)
    lowest = get_layers(model, layers)[layers[0]]
    everything = list(model.parameters())

    def forward_only():
        with torch.no_grad():
            for b in batches:
                model(**{k: v.to(ctx.device) for k, v in b.items()}, use_cache=False)

    def fwd_bwd(params: list, stop: bool):
        """The loss collect_curvature differentiates, without its hooks: every parameter (a
        training step's backward) or none and the graph cut at the lowest edited layer."""
        cut = lambda module, args, out: out.detach().requires_grad_(True)  # noqa: E731
        handle = lowest.register_forward_hook(cut) if stop else None
        try:
            with trainable_only(model, params):
                g = torch.Generator().manual_seed(0)
                for b in batches:
                    _batch_pass(model, b, None, "empirical", g)
        finally:
            if handle is not None:
                handle.remove()
            for p in params:
                p.grad = None

    def collect(stop: bool):
        collect_curvature(model, layers, batches, progress=False, stop_backward=stop)

    variants = [
        ("forward only (no grad)", forward_only),
        ("forward + backward, every parameter (training step)", lambda: fwd_bwd(everything, False)),
        ("forward + backward stopped at the lowest edited layer", lambda: fwd_bwd([], True)),
        ("K-FAC collection, full backward", lambda: collect(False)),
        ("K-FAC collection, backward stopped (production)", lambda: collect(True)),
    ]
    log(f"[curvature] {n} tokens, layers {layers[0]}..{layers[-1]}, best of {REPEATS}")
    results = [(name, best_of(ctx, REPEATS, fn, f"curvature: {name}")) for name, fn in variants]
    plain = results[1][1]["seconds"]
    rows = [
        [
            name,
            f"{m['seconds']:.2f} s",
            f"{n / m['seconds']:.0f}",
            f"{m['seconds'] / plain:.2f}×",
            mem(m),
        ]
        for name, m in results
    ]
    full, stopped = results[3][1]["seconds"], results[4][1]["seconds"]
    notes = (
        f"{n} WikiText tokens ({len(batches)} batches of {batches[0]['input_ids'].shape[0]} × "
        f"≤256), {len(layers)} edited layers ({layers[0]} … {layers[-1]}); best of {REPEATS}. "
        f"Target: collection ≤ 1.3× a plain forward+backward → **{stopped / plain:.2f}×** "
        f"({'met' if stopped / plain <= 1.3 else 'missed'}). Stopping the backward at the lowest "
        f"edited layer saves {100 * (1 - stopped / full):.0f} % of the collection time against "
        "the full backward (same factors: tests/crispedit/test_curvature.py)."
    )
    return section(
        "1. Curvature collection",
        notes,
        table(["pass over the same tokens", "time", "tokens/s", "vs fwd+bwd", "peak RSS"], rows),
    )


def section(title: str, notes: str, *tables: str) -> str:
    return "\n\n".join([f"## {title}", notes, *tables])


# ---------------------------------------------------------------------------------------------
# 2. Projector


def time_call(ctx: Context, fn: Callable[[], object], repeats: int = 3) -> float:
    """Fastest of `repeats` calls, after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        sync(ctx.device)
        t = time.perf_counter()
        fn()
        sync(ctx.device)
        best = min(best, time.perf_counter() - t)
    return best


def dense_projector(P: KroneckerProjector) -> torch.Tensor:
    """The explicit (d_out·d_in)² matrix (U_B ⊗ U_A) diag(vec M) (U_B ⊗ U_A)ᵀ."""
    K = torch.kron(P.U_B.contiguous(), P.U_A.contiguous())
    return (K * P.M.reshape(-1).to(K.dtype)) @ K.T


def spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * d, d, generator=g) * torch.linspace(0.05, 3, d) ** 2
    return X.T @ X / len(X)


def edit_steps(
    ctx: Context,
    layers: list[str],
    cover: bool = True,
    facts: int = BATCH_SIZE,
    gamma: float = GAMMA,
) -> dict:
    """Time the steps of a `facts`-fact edit (one batch) over STEP_EPOCHS epochs: wall time per
    step (forward, backward, projection, Adam) from the second epoch on, and the projector's."""
    model, tokenizer = ctx.model
    stamps, proj = [], []
    editor = CrispEditor(
        model,
        tokenizer,
        ctx.curvature(layers),
        gamma=gamma,
        layers=layers,
        epochs=STEP_EPOCHS,
        progress=False,
        on_epoch=lambda info: stamps.append(time.perf_counter()),
    )
    if not cover:
        editor.projectors = {
            n: KroneckerProjector(P.U_A, P.U_B, P.M, cover=False)
            for n, P in editor.projectors.items()
        }
    project, calls = editor._project, itertools.count()
    # a step projects each layer's gradient, then (project="update") its step: only the
    # gradients' count as the projection, the steps' stay in the rest of the step
    per_layer = 2 if editor.project == "update" else 1

    def timed_projection(name, tensor):
        sync(ctx.device)
        t = time.perf_counter()
        out = project(name, tensor)
        sync(ctx.device)
        if next(calls) % per_layer == 0:
            proj.append(time.perf_counter() - t)
        return out

    editor._project = timed_projection
    chosen = load_facts(FACTS, limit=facts)
    editor.edit(chosen)
    ctx.restore()
    steps_per_epoch = math.ceil(facts / BATCH_SIZE)
    # medians: a burst of load from another process moves a mean, hardly a median
    step = statistics.median(b - a for a, b in itertools.pairwise(stamps)) / steps_per_epoch
    n = len(layers)  # one gradient projection per layer and step
    per_step = [sum(proj[i : i + n]) for i in range(0, len(proj), n)]
    projection = statistics.median(per_step[steps_per_epoch:])
    costs = [P.cost for P in editor.projectors.values()]
    return {
        "step": step,
        "projection": projection,
        "share": projection / step,
        "cost": sum(costs) / len(costs),
        "facts": chosen,
    }


def part_projector(ctx: Context) -> str:
    model, tokenizer = ctx.model
    dtype = torch.float32
    out = []
    # (a) against the explicit projector where it fits
    log("[projector] explicit dense projector on small layers")
    rows = []
    for d_out, d_in in DENSE_SHAPES:
        from crispedit.curvature import LayerCurvature

        c = LayerCurvature(A=spd(d_in, 1), B=spd(d_out, 2))
        P = build_projector(c, "kfac", GAMMA, device=ctx.device)
        G = torch.randn(d_out, d_in, device=ctx.device)
        with phase(ctx, f"projector: explicit {d_in * d_out}² matrix") as m_dense:
            D = dense_projector(P)
        t_dense = time_call(ctx, lambda D=D, G=G: D @ G.reshape(-1))
        t_free = time_call(ctx, lambda P=P, G=G: P(G))
        err = float((P(G).reshape(-1) - D @ G.reshape(-1)).abs().max())
        free_bytes = (d_in**2 + d_out**2) * 4 + d_in * d_out
        rows.append(
            [
                f"{d_out} × {d_in}",
                f"{t_dense * 1e3:.2f} ms",
                f"{t_free * 1e3:.3f} ms",
                f"{D.numel() * 4 / 2**20:.1f} MiB",
                f"{free_bytes / 2**20:.3f} MiB",
                f"{m_dense['seconds']:.2f} s",
                f"{err:.1e}",
            ]
        )
        del D
    h, f = model.config.hidden_size, model.config.intermediate_size
    out.append(
        "Explicit projector against the matrix-free one (γ = "
        f"{GAMMA}, random factors). At {ctx.args.model}'s layer ({h} × {f}) the explicit matrix "
        f"would take {(h * f) ** 2 * 4 / 2**40:.1f} TiB; at Llama-3-8B's (4096 × 14336) "
        f"{(4096 * 14336) ** 2 * 4 / 2**50:.1f} PiB.\n\n"
        + table(
            [
                "d_out × d_in",
                "explicit, per projection",
                "matrix-free",
                "explicit memory",
                "matrix-free memory",
                "building the explicit one",
                "max difference",
            ],
            rows,
        )
    )
    # (b) per layer on the model, the dense four-matmul form against the rectangle cover
    log("[projector] per layer on the model")
    rows = []
    layer = ctx.layers()[0]
    c = ctx.curvature().layers[layer]
    G = torch.randn(h, f, device=ctx.device)
    for gamma in GAMMAS:
        P = build_projector(c, "kfac", gamma, device=ctx.device, dtype=dtype)
        D = KroneckerProjector(P.U_A, P.U_B, P.M, cover=False)
        t_dense, t_cover = time_call(ctx, lambda D=D: D(G)), time_call(ctx, lambda P=P: P(G))
        rows.append(
            [
                gamma,
                f"{P.kept_fraction:.3f}",
                f"{P.form}, {len(P.blocks)} rectangles",
                f"{P.cost:.2f}",
                f"{t_dense * 1e3:.1f} ms",
                f"{t_cover * 1e3:.1f} ms",
                f"{t_dense / t_cover:.1f}×",
            ]
        )
    out.append(
        f"One projection of layer {layer} ({h} × {f}, fp32): the dense four-matmul form "
        "U_B((U_Bᵀ G U_A) ⊙ M)U_Aᵀ (the code before this issue) against the staircase cover "
        "(production).\n\n"
        + table(
            ["γ", "kept", "cover", "multiply-adds vs dense", "dense form", "cover", "speed-up"],
            rows,
        )
    )
    # (c) share of an edit step on the model
    log("[projector] share of an edit step")
    rows = []
    layers = ctx.layers()
    for label, cover in (("dense form (before)", False), ("staircase cover (production)", True)):
        with phase(ctx, f"edit step, {label}") as m:
            r = edit_steps(ctx, layers, cover=cover)
        rows.append(
            [
                label,
                f"{r['step'] * 1e3:.0f} ms",
                f"{r['projection'] * 1e3:.0f} ms",
                f"**{100 * r['share']:.1f} %**",
                mem(m),
            ]
        )
    share = r["share"]
    tokens, targets = batch_tokens(tokenizer, r["facts"])
    # the cover's cost depends on how concentrated the blocked energy is: γ
    sweep = []
    for gamma in SHARE_GAMMAS:
        log(f"  γ {gamma}")
        g = edit_steps(ctx, layers, gamma=gamma)
        sweep.append(
            [
                gamma,
                f"{g['cost']:.2f}",
                f"{g['step'] * 1e3:.0f} ms",
                f"{g['projection'] * 1e3:.0f} ms",
                f"{100 * g['share']:.1f} %",
            ]
        )
    out.append(
        f"Share of an edit step (batch of {BATCH_SIZE} CounterFact facts, {tokens} tokens, "
        f"{len(layers)} layers, γ {GAMMA}, curvature over {ctx.args.tokens} tokens, median over "
        f"epochs 2-{STEP_EPOCHS}). Target ≤ 10 % on {ctx.args.model}: {100 * share:.1f} % "
        f"({'met' if share <= 0.10 else 'missed'}).\n\n"
        + table(["projector", "edit step", "projection (all layers)", "share", "peak RSS"], rows)
        + "\n\nThe same with the cover at other γ (its multiply-adds against the dense form, "
        "mean over the layers):\n\n"
        + table(["γ", "multiply-adds vs dense", "edit step", "projection", "share"], sweep)
    )
    # (d) Llama-3-8B shapes: synthetic factors, the same code
    log("[projector] Llama-3-8B shapes (synthetic factors)")
    s_A, s_B = llama_spectra(ctx)
    d_in, d_out = len(s_A), len(s_B)
    rows = []
    with phase(ctx, "projector at Llama-3-8B shapes: build") as m_build:
        _, k = kfac_threshold(s_A, s_B, GAMMA)
        M = torch.arange(d_in)[None, :] < k[:, None]
        U_A = random_orthogonal(d_in, ctx.device, dtype)
        U_B = random_orthogonal(d_out, ctx.device, dtype)
        P = KroneckerProjector(U_A, U_B, M)
    G = torch.randn(d_out, d_in, device=ctx.device, dtype=dtype)
    timings = {}
    for label, proj in (
        ("dense form", KroneckerProjector(U_A, U_B, M, cover=False)),
        ("staircase cover (production)", P),
    ):
        log(f"  {label}")
        with phase(ctx, f"projection at Llama-3-8B shapes, {label}") as m:
            proj(G)
        timings[label] = m["seconds"]
        rows.append(
            [
                label,
                f"{proj.cost:.2f}",
                f"{m['seconds']:.2f} s",
                f"{projector_flops(d_out, d_in, proj.cost) / m['seconds'] / 1e9:.0f}",
                mem(m),
            ]
        )
    ours = model_cfg(model)
    ours.update(start=int(layers[0].split(".")[-3]), edited=len(layers))
    smol_flops = step_flops(ours, tokens, targets)
    rest = r["step"] - r["projection"]  # the step without projection, measured above
    llama_rest = rest * step_flops(LLAMA, tokens, targets) / smol_flops
    llama_proj = LLAMA["edited"] * timings["staircase cover (production)"]
    llama_share = llama_proj / (llama_proj + llama_rest)
    dense_proj = LLAMA["edited"] * timings["dense form"]
    dense_share = dense_proj / (dense_proj + llama_rest)
    ctx.llama = {"cost": P.cost, "projection_s": llama_proj, "rest_s": llama_rest}
    out.append(
        f"Llama-3-8B shapes (d_in {d_in} × d_out {d_out}, γ {GAMMA}): synthetic factors "
        f"(the spectra of {layers[0]} resampled, random orthogonal bases), the production code, "
        f"one projection each, fp32; the bases take {(d_in**2 + d_out**2) * 4 / 2**30:.2f} GiB, "
        f"the mask {d_in * d_out / 2**20:.0f} MiB (bool), built in {m_build['seconds']:.1f} s "
        f"(threshold, mask, bases), peak RSS {m_build['peak_rss']:.2f} GiB.\n\n"
        + table(
            [
                "projector",
                "multiply-adds vs dense",
                "one projection",
                "GFLOP/s (dense-equivalent)",
                "peak memory",
            ],
            rows,
        )
        + f"\n\nShare of an edit step at these shapes (estimate): {LLAMA['edited']} projections "
        f"take {llama_proj:.1f} s here; the rest of the step, scaled from the measured "
        f"{ctx.args.model} step by FLOPs ({smol_flops / 1e9:.0f} → "
        f"{step_flops(LLAMA, tokens, targets) / 1e9:.0f} GFLOP for the same {tokens} tokens), "
        f"{llama_rest:.1f} s: **{100 * llama_share:.0f} %** (dense form: "
        f"{100 * dense_share:.0f} %). A projection grows with d_in·d_out·(d_in + d_out), the "
        "step with the tokens times the parameters above the lowest edited layer: with ~10 "
        "tokens a fact the projections weigh more at 8B than at 135M."
    )
    return section("2. Projector", "Matrix-free projection G ↦ U_B((U_Bᵀ G U_A) ⊙ M)U_Aᵀ.", *out)


# ---------------------------------------------------------------------------------------------
# 3. γ threshold search


def part_threshold(ctx: Context) -> str:
    s_A, s_B = llama_spectra(ctx)
    n = len(s_A) * len(s_B)
    log(f"[threshold] λ_γ over {n / 1e6:.1f} M products (Llama-3-8B shapes)")
    # the EK-FAC path's input: a float32 eigenvalue matrix, as the curvature file holds one
    lam32 = (s_B[:, None] * s_A[None, :]).float()

    def full_sort(gamma: float) -> float:
        lam = (s_B.double()[:, None] * s_A.double()[None, :]).reshape(-1)
        desc = lam.sort(descending=True).values
        del lam
        cum = desc.cumsum(0)
        return float(desc[int(torch.searchsorted(cum, gamma * cum[-1]))])

    searches = [
        ("separable bisection (K-FAC, production)", "no product matrix",
         lambda gamma: kfac_threshold(s_A, s_B, gamma)[0]),
        ("radix select over a float32 matrix (EK-FAC path)", "8 MiB chunks of the input",
         lambda gamma: energy_threshold(lambda i, j: lam32[i:j], len(s_B), gamma)),
        ("full torch.sort of the float64 products", "products, sorted values and indices",
         full_sort),
    ]  # fmt: skip
    rows = []
    for gamma in (GAMMA, 0.99):
        taus = []
        for label, holds, search in searches:
            found = []
            run = lambda search=search, found=found, gamma=gamma: found.append(search(gamma))  # noqa: E731
            m = best_of(ctx, 3, run, f"threshold γ {gamma}: {label}")
            taus.append(found[0])
            time_text = (
                f"{m['seconds'] * 1e3:.1f} ms" if m["seconds"] < 0.1 else f"{m['seconds']:.2f} s"
            )
            rows.append([gamma, label, time_text, gib(m["rss_rise"]), holds])
        # the radix select reads float32 products: equal to float32 precision; the other two
        # search the exact float64 products
        agree = taus[0] == taus[2] and abs(taus[1] / taus[2] - 1) < 1e-6
        log(f"  γ {gamma}: λ_γ {taus} {'agree' if agree else 'DIFFER'}")
        rows[-1][-1] += f"; λ_γ {'the same' if agree else 'DIFFERENT'} in all three"
    return section(
        "3. γ threshold search",
        f"λ_γ at Llama-3-8B shapes: {len(s_A)} × {len(s_B)} = {n / 1e6:.1f} M eigenvalue "
        "products (synthetic spectra, as in part 2), fastest of 3. Memory: the rise of the peak "
        "RSS over the RSS before the search; the radix select's input (the float32 matrix, "
        f"{n * 4 / 2**30:.2f} GiB) exists before it, as an EK-FAC matrix does; the λ_γ of the "
        "radix select equals the others to float32 precision (its input is rounded). Target: no "
        "allocation of the full product matrix beyond one float32 copy, faster than a full sort.",
        table(["γ", "search", "time", "peak RSS rise", "allocates"], rows),
    )


# ---------------------------------------------------------------------------------------------
# 4. Edit throughput


def part_throughput(ctx: Context) -> str:
    model, tokenizer = ctx.model
    layers = ctx.layers()
    out = []
    rows = []
    for size in [int(s) for s in ctx.args.sizes.split(",")]:
        epochs = EPOCHS if size <= LARGE else ctx.args.large_epochs
        log(f"[throughput] batch edit of {size} facts (≤ {epochs} epochs)")
        facts = load_facts(FACTS, limit=size)
        stamps = []
        editor = CrispEditor(
            model, tokenizer, ctx.curvature(), epochs=epochs, progress=False,
            on_epoch=lambda info, stamps=stamps: stamps.append(time.perf_counter()),
        )  # fmt: skip
        with phase(ctx, f"batch edit, {size} facts") as m:
            delta = editor.edit(facts)
        ctx.restore()
        r = delta.report
        # steady state: the epochs after the first; the rest (efficacy before and after, the
        # prefix cache, the delta) is a fixed cost per edit
        per_epoch = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else math.nan
        fixed = m["seconds"] - per_epoch * r["epochs"]
        at_cap = size / (fixed + per_epoch * EPOCHS)
        rows.append([
            size, f"{r['epochs']}/{epochs}", f"{m['seconds']:.1f} s", f"{size / m['seconds']:.2f}",
            f"{per_epoch:.2f} s", f"{per_epoch / math.ceil(size / BATCH_SIZE):.2f} s",
            f"{fixed:.1f} s", f"{at_cap:.2f}" + ("" if epochs == EPOCHS else " (extrapolated)"),
            f"{r['efficacy']:.2f}", mem(m),
        ])  # fmt: skip
    out.append(
        f"Batch edits on {ctx.args.model} (CounterFact facts, γ {GAMMA}, {len(layers)} layers, "
        f"batch {BATCH_SIZE}; up to {EPOCHS} epochs, stopping below loss 0.01; batches over "
        f"{LARGE} facts capped at {ctx.args.large_epochs} epochs to fit the run, their facts/s "
        f"at {EPOCHS} epochs extrapolated from the measured epochs). Edit time includes the "
        "fixed part: efficacy before and after, the prefix cache, the delta.\n\n"
        + table(["facts", "epochs", "edit time", "facts/s", "per epoch", "per step",
                 "fixed part", f"facts/s at {EPOCHS} epochs", "efficacy", "peak RSS"], rows)
    )  # fmt: skip
    # sequential: chunks on one stream, through the store
    log(f"[throughput] sequential: {SEQ_CHUNKS} chunks of {SEQ_CHUNK} facts on one stream")
    from curvature_store import Store

    rows = []
    facts = load_facts(FACTS, limit=SEQ_CHUNKS * SEQ_CHUNK)
    base = {n: ctx._base[n] for n in layers}
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        for i in range(SEQ_CHUNKS):
            chunk = facts[i * SEQ_CHUNK : (i + 1) * SEQ_CHUNK]
            with phase(ctx, f"sequential chunk {i + 1}") as m:
                manifest, _ = edit_on_stream(
                    store,
                    ctx.args.model,
                    "perf",
                    model,
                    tokenizer,
                    base,
                    ctx.curvature(),
                    chunk,
                    progress=False,
                )
            metrics = manifest["metrics"]
            rows.append(
                [
                    i + 1,
                    len(chunk),
                    metrics["epochs"],
                    f"{m['seconds']:.1f} s",
                    f"{metrics['time_s']['edit']:.1f} s",
                    f"{len(chunk) / m['seconds']:.2f}",
                    f"{metrics['efficacy']:.2f}",
                    manifest["edit_tokens"],
                ]
            )
    ctx.restore()
    out.append(
        f"Sequential mode: {SEQ_CHUNKS} chunks of {SEQ_CHUNK} facts on one stream (a fresh "
        "store): each chunk reads the head, builds the projector from capability + earlier "
        "edits (new eigendecompositions), edits, measures the edit-set factors and publishes a "
        "version.\n\n"
        + table(
            [
                "chunk",
                "facts",
                "epochs",
                "chunk time",
                "of which edit",
                "facts/s",
                "efficacy",
                "edit tokens on the stream",
            ],
            rows,
        )
    )
    # scaling with the number of layers
    log("[throughput] scaling with the edited layers")
    rows = []
    for n in LAYER_SPANS:
        span = ctx.layers(n)
        r = edit_steps(ctx, span)
        rows.append(
            [
                n,
                f"{span[0].split('.')[-3]}-{span[-1].split('.')[-3]}",
                f"{r['step'] * 1e3:.0f} ms",
                f"{r['projection'] * 1e3:.0f} ms",
                f"{100 * r['share']:.1f} %",
            ]
        )
    out.append(
        f"Edit step against the number of edited layers (one batch of {BATCH_SIZE} facts, "
        f"median of epochs 2-{STEP_EPOCHS}, γ {GAMMA}); a step runs the blocks from the lowest "
        "edited one up: layers above it add their projection and weight gradients only.\n\n"
        + table(["layers", "blocks", "edit step", "projection", "projector share"], rows)
    )
    out.append(anchor_estimate(ctx))
    return section("4. Edit throughput", f"{ctx.args.model}, {ctx.device}.", *out)


def anchor_estimate(ctx: Context) -> str:
    """FLOP arithmetic for the paper's anchor (3,000 edits, 8B, one A40) with this code."""
    _, tokenizer = ctx.model
    facts = load_facts(FACTS)  # the bundled 1,000: tokens per fact, as this tokenizer counts
    tokens, targets = batch_tokens(tokenizer, facts)
    tokens, targets = tokens * BATCH_SIZE / len(facts), targets * BATCH_SIZE / len(facts)
    steps_per_epoch = math.ceil(ANCHOR_EDITS / BATCH_SIZE)
    model_flops = step_flops(LLAMA, tokens, targets)
    cost = ctx.llama.get("cost")
    if cost is None:  # the projector part did not run: the cover's share from the model
        cost = sum(
            P.cost
            for P in (build_projector(c, "kfac", GAMMA) for c in ctx.curvature().layers.values())
        ) / len(ctx.layers())
    proj = LLAMA["edited"] * projector_flops(LLAMA["hidden"], LLAMA["intermediate"], cost)
    rows = []
    for epochs in (5, 10, EPOCHS):
        steps = steps_per_epoch * epochs
        for label, proj_rate in (("fp32 (default)", "fp32"), ("bf16 (`model`)", "bf16")):
            seconds = steps * (
                model_flops / (A40_TFLOPS["bf16"] * 1e12 * UTILISATION)
                + proj / (A40_TFLOPS[proj_rate] * 1e12 * UTILISATION)
            )
            rows.append([epochs, steps, label, f"{seconds / 60:.1f} min"])
    return (
        f"**Estimate, not a measurement.** The paper's anchor: {ANCHOR_EDITS} edits in about "
        "4-6 min for an 8B model on one A40. The same code at Llama-3-8B shapes: "
        f"{steps_per_epoch} steps an epoch ({tokens:.0f} tokens each, from the "
        f"bundled CounterFact facts as {ctx.args.model} tokenizes them); a step's model part "
        f"{model_flops / 1e12:.2f} TFLOP (bf16), its projections {proj / 1e12:.1f} TFLOP "
        f"({LLAMA['edited']} layers, cover at {cost:.2f} of the dense form); A40 peak "
        f"{A40_TFLOPS['bf16']} TFLOP/s bf16, {A40_TFLOPS['fp32']} fp32, assumed "
        f"{UTILISATION:.0%} of peak; curvature and evaluation not included.\n\n"
        + table(["epochs", "steps", "projector dtype", "estimated time"], rows)
    )


# ---------------------------------------------------------------------------------------------
# 5. Worker job start


@contextmanager
def first_step_clock() -> Iterator[list[float]]:
    """Inside: the time of the first Adam step taken lands in the yielded list."""
    stamps: list[float] = []
    original = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        if not stamps:
            stamps.append(time.perf_counter())
        return original(self, *args, **kwargs)

    torch.optim.Adam.step = step
    try:
        yield stamps
    finally:
        torch.optim.Adam.step = original


def part_start(ctx: Context) -> str:
    from workers.engine import Engine

    records = [fact_to_record(f) for f in load_facts(FACTS, limit=START_FACTS)]
    rows = []

    def job(engine: Engine, label: str, stream: str) -> None:
        request = {
            "model": ctx.args.model,
            "stream": stream,
            "facts": records,
            "options": {"epochs": 1},
        }
        log(f"[start] {label}")
        with phase(ctx, f"worker job, {label}") as m, first_step_clock() as first:
            started = time.perf_counter()
            engine.apply(request)
        to_step = f"**{first[0] - started:.2f} s**" if first else "no step"
        rows.append([label, to_step, f"{m['seconds']:.2f} s", mem(m)])

    with tempfile.TemporaryDirectory() as store:
        make = lambda: Engine(  # noqa: E731
            ctx.args.model, store, tokens=ctx.args.start_tokens, device=ctx.device
        )
        with phase(ctx, "worker start (model load)") as m:
            engine = make()
        rows.append(
            ["worker start: model load, base weights", "-", f"{m['seconds']:.2f} s", mem(m)]
        )
        job(engine, "curvature rebuilt (empty store)", "rebuilt")
        job(engine, "warm: model, curvature and bases resident", "warm")
        for curvature, _ in engine._curvature.values():  # forget the eigenbases: as before
            for c in curvature.layers.values():
                c._memo.clear()
        job(engine, "warm, bases recomputed (before this issue)", "warm-before")
        del engine
        engine = make()  # a fresh worker on the same store
        job(engine, "curvature loaded from the store", "store")
        del engine
    return section(
        "5. Worker job start",
        f"workers.engine.Engine on {ctx.args.model}: a job of {START_FACTS} facts (1 epoch) "
        "on a new stream, from `Engine.apply` (job pickup) to the first optimizer step, and "
        f"the whole job; the worker's curvature over {ctx.args.start_tokens} tokens (its "
        f"default is {CURVATURE_TOKENS}: a rebuild then takes "
        f"~{CURVATURE_TOKENS / ctx.args.start_tokens:.0f}× longer).",
        table(["job start", "pickup → first step", "whole job", "peak RSS"], rows),
    )


# ---------------------------------------------------------------------------------------------
# 6. Memory


def part_memory(ctx: Context) -> str:
    if not ctx.phases:  # run alone: a short pipeline of its own
        log("[memory] model, curvature, projectors, one edit")
        curvature = ctx.curvature()
        with phase(ctx, "projectors (5 layers)"):
            for c in curvature.layers.values():
                build_projector(c, "kfac", GAMMA, device=ctx.device)
        edit_steps(ctx, ctx.layers())
    rows = [
        [
            name,
            f"{m['seconds']:.2f} s",
            gib(m["peak_rss"]),
            f"+{m['rss_rise']:.2f} GiB",
            gib(m["cuda_peak"]),
        ]
        for name, m in ctx.phases
    ]
    return section(
        "6. Peak memory per phase",
        "Peak RSS of the process during each phase (VmHWM, reset before it) and its rise over "
        "the RSS at the phase's start; torch.cuda.max_memory_allocated on a GPU.",
        table(["phase", "time", "peak RSS", "rise", "GPU peak"], rows),
    )


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    ap.add_argument("--tokens", type=int, default=CURVATURE_TOKENS, help="curvature to edit with")
    ap.add_argument("--pass-tokens", type=int, default=PASS_TOKENS, help="curvature part's passes")
    ap.add_argument("--start-tokens", type=int, default=START_TOKENS, help="worker's curvature")
    ap.add_argument("--sizes", default=SIZES, help="facts per batch edit, comma-separated")
    ap.add_argument("--large-epochs", type=int, default=LARGE_EPOCHS)
    ap.add_argument("--out", default=str(RESULTS / "perf.md"))
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s) {', '.join(sorted(unknown))}: choose from {', '.join(PARTS)}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    ctx = Context(args=args, device=device)
    started, load = time.perf_counter(), os.getloadavg()
    sections = []
    for name in PARTS:  # in this order, whatever the order asked
        if name in parts:
            sections.append(globals()[f"part_{name}"](ctx))
            print(sections[-1] + "\n", flush=True)
    model, _ = ctx.model
    header = [
        "# Performance of the editing pipeline",
        "",
        f"Machine: {machine(device, next(model.parameters()).dtype)}; curvature factors fp32, "
        "projectors fp32.",
        f"Load average (1 min) at start / end: {load[0]:.1f} / {os.getloadavg()[0]:.1f} "
        "(other processes share the cores: figures above ~the core count are contended).",
        f"Command: `{' '.join(['python bench/perf.py', *sys.argv[1:]])}` — "
        f"{time.perf_counter() - started:.0f} s.",
    ]
    text = "\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    log(f"written to {args.out}")


if __name__ == "__main__":
    main()
