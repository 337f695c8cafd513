"""Method figures on this machine: curvature collection and a batch edit, per method.

    python bench/methods.py --facts 100 --tokens 20000

Prints a markdown table (and writes it to bench/results/methods.md): curvature time, tokens/s and
peak RSS; then for each method the efficacy, held-out perplexity change, edit time and peak RSS on
the same CounterFact facts and seed. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from measure import peak_rss_gib, reset_peak_rss

from crispedit import CrispEditor, build_curvature, load_facts, load_model
from crispedit.corpus import ASSETS, read_documents
from crispedit.evaluate import perplexity

RESULTS = Path(__file__).parent / "results"
METHODS = "ft,nullspace:0.9,kfac:0.7,kfac:0.8,kfac:0.9"  # method[:γ], comma-separated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--heldout-tokens", type=int, default=4096)
    ap.add_argument("--methods", default=METHODS, help="method[:gamma],... e.g. ft,kfac:0.8")
    ap.add_argument("--out", default=str(RESULTS / "methods.md"))
    args = ap.parse_args()
    methods = []
    for item in args.methods.split(","):
        method, _, gamma = item.partition(":")
        methods.append((method, float(gamma) if gamma else None))
    started = time.perf_counter()

    model, tokenizer = load_model(args.model)
    heldout = read_documents("wikitext-heldout")
    ppl_base = perplexity(model, tokenizer, heldout, args.heldout_tokens)
    reset_peak_rss()
    t = time.perf_counter()
    curvature = build_curvature(model, tokenizer, "wikitext", tokens=args.tokens)
    curv_s = time.perf_counter() - t
    curv_rss = peak_rss_gib()
    facts = load_facts(ASSETS / "counterfact-edit-1k.json", limit=args.facts)

    rows = []
    for method, gamma in methods:
        model, tokenizer = load_model(args.model)
        reset_peak_rss()
        editor = CrispEditor(model, tokenizer, curvature, method=method, gamma=gamma or 0.0)
        delta = editor.edit(facts)
        rss = peak_rss_gib()
        ppl = perplexity(model, tokenizer, heldout, args.heldout_tokens)
        r = delta.report
        rows.append(
            f"| {method} | {'-' if gamma is None else gamma} | {r['efficacy']:.2f} | "
            f"{100 * (ppl / ppl_base - 1):+.2f} % | {r['epochs']} | {r['time_s']['edit']:.0f} s | "
            f"{args.facts / r['time_s']['edit']:.2f} | {rss:.2f} GiB |"
        )
        print(rows[-1], flush=True)

    lines = [
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, CPU fp32. Model: {args.model}.",
        "",
        f"Curvature: {curvature.tokens} WikiText tokens, {len(curvature.layers)} layers, "
        f"{curv_s:.0f} s ({curvature.tokens / curv_s:.0f} tokens/s), peak RSS {curv_rss:.2f} GiB.",
        "",
        f"Edits: {args.facts} CounterFact facts (first of the bundled 1k), one batch edit per "
        f"method, seed 0; held-out WikiText perplexity over {args.heldout_tokens} tokens, base "
        f"{ppl_base:.2f}.",
        "",
        "| method | γ | efficacy | perplexity change | epochs | edit time | facts/s | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Whole run: {time.perf_counter() - started:.0f} s. Command: `python bench/methods.py "
        f"--facts {args.facts} --tokens {args.tokens} --methods {args.methods}`.",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
