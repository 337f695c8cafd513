"""Store figures: artifact sizes, curvature cache hit vs rebuild, composing a long version chain.

    python bench/store.py --tokens 8192 --chain 100

Measured on SmolLM2-135M (layers 20-24) on this machine, plus the sizes the same layout gives for
Llama-3-8B (5 layers, d_in 14336, d_out 4096) by arithmetic. Writes bench/results/store.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from contract.names import ROWS_FILE
from crispedit import load_facts, load_model, parse_layers
from crispedit.corpus import ASSETS
from crispedit.curvature import plan_curvature
from crispedit.plan import FACT_TOKENS
from crispedit.streams import base_weights, cached_curvature, edit_on_stream
from curvature_store import Store

RESULTS = Path(__file__).parent / "results"
LLAMA3_8B = {"layers": 5, "d_in": 14336, "d_out": 4096}


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def llama_sizes(facts: int) -> dict[str, int]:
    """The same artifacts for Llama-3-8B; a version's rows for `facts` texts of FACT_TOKENS."""
    n, d_in, d_out = LLAMA3_8B["layers"], LLAMA3_8B["d_in"], LLAMA3_8B["d_out"]
    factors = n * (d_in**2 + d_out**2) * 4
    rows = facts * FACT_TOKENS * n * (d_in + d_out)  # elements of a version's edit rows
    return {
        "curvature (kfac: A, B fp32)": factors,
        "curvature (ekfac: + U_A, U_B, Λ)": 2 * factors + n * d_in * d_out * 4,
        "delta per version (fp32)": n * d_in * d_out * 4,
        "stream state per version (its edit rows a, g; Llama in bf16)": rows * 2,
    }


def compose_chain(root: Path, length: int, shapes: dict[str, tuple[int, int]]) -> dict:
    """Create `length` versions with random fp32 deltas; time the cumulative delta of the last."""
    store = Store(root)
    rng = np.random.default_rng(0)
    head = None
    for _ in range(length):
        stage = store.staging_dir()
        tensors = {
            f"{k}.weight": rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()
        }
        save_file(tensors, stage / "delta.safetensors")
        head = store.create_version(
            "bench", "chain", head, {"delta.safetensors": stage / "delta.safetensors"}, {}
        )["id"]
    timings = {}
    for label, fresh in (("cold (every file hashed)", True), ("warm (hashes remembered)", False)):
        reader = Store(root) if fresh else store
        t = time.perf_counter()
        reader.cumulative_delta(head)
        timings[label] = time.perf_counter() - t
    return timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chain", type=int, default=100)
    ap.add_argument("--facts", type=int, default=10)
    args = ap.parse_args()
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="crispedit-bench-store-"))
    store = Store(root / "store")

    model, tokenizer = load_model("smollm2")
    layers = parse_layers(model, None)
    recipe = plan_curvature(model, tokenizer, "wikitext", args.tokens, layers)
    t = time.perf_counter()
    curvature, manifest = cached_curvature(store, model, tokenizer, recipe, progress=False)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    _, hit = cached_curvature(Store(root / "store"), model, tokenizer, recipe, progress=False)
    hit_s = time.perf_counter() - t
    assert hit["cache_hit"] and not manifest["cache_hit"]

    base = base_weights(model, layers)
    facts = load_facts(ASSETS / "counterfact-edit-1k.json", limit=args.facts)
    version, _ = edit_on_stream(
        store, "smollm2", "bench", model, tokenizer, base, curvature, facts, progress=False
    )
    files = version["files"]

    shapes = {name: tuple(base[name].shape) for name in layers}
    timings = compose_chain(root / "chain", args.chain, shapes)

    lines = [
        f"SmolLM2-135M, layers {layers[0]} … {layers[-1]} ({len(layers)}), CPU, this machine.",
        "",
        "| artifact | SmolLM2 (measured) | Llama-3-8B, 5 layers (arithmetic) |",
        "|---|---|---|",
    ]
    llama = llama_sizes(args.facts)
    measured = [
        manifest["bytes"],
        None,
        files["delta.safetensors"]["bytes"],
        files[ROWS_FILE]["bytes"],
    ]
    for (label, size), mine in zip(llama.items(), measured, strict=True):
        lines.append(f"| {label} | {mib(mine) if mine else '-'} | {mib(size)} |")
    lines += [
        "",
        f"Curvature of {curvature.tokens} tokens: built and stored in {build_s:.1f} s; "
        f"a cache hit (new Store, key lookup, sha256 check, load) in {hit_s:.2f} s "
        f"({build_s / hit_s:.0f}× faster).",
        "",
        f"Cumulative delta of a {args.chain}-version chain (SmolLM2 shapes, "
        f"{mib(files['delta.safetensors']['bytes'])} per delta): "
        + "; ".join(f"{k} {v:.2f} s" for k, v in timings.items())
        + ".",
        "",
        f"Whole run {time.perf_counter() - started:.0f} s. Command: `python bench/store.py "
        f"--tokens {args.tokens} --chain {args.chain} --facts {args.facts}`.",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "store.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
