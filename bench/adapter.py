"""Adapter rank against edit quality: how much of an edit a LoRA adapter of rank r keeps.

    python bench/adapter.py                      # 100 CounterFact edits (records 100-199)
    python bench/adapter.py --n 1000 --start 0   # every record (> 2 h for the edit on 2 cores)
    python bench/adapter.py --n 1000 --start 0 --run "kfac:0.9,epochs=50,project=update"
                                                 # a cheaper edit of them (41-82 min on 2 cores)

One batch edit of SmolLM2-135M-Instruct with the editor's default settings (curvature from the
bench store, ~/.cache/crispedit/bench-store, built there first when missing: ~5 min), then for
each rank (and energy) the delta is exported as a PEFT adapter (`crispedit.adapter`), loaded with
the real `peft` (`PeftModel.from_pretrained`), merged, and evaluated against the base model like
the full delta (`crispedit.evaluate.evaluate_edit`: teacher-forced efficacy, paraphrases,
neighbours, held-out perplexity change and KL; no generation, no probability scores, no
MMLU). Writes bench/results/adapter.md. Not a test: figures depend on the machine; the seed
makes them repeatable on one machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from quality import MODEL, RESULTS, STORE, log, parse_run

from contract.facts import fact_from_record
from contract.jobs import curvature_kind
from contract.settings import DEFAULTS
from crispedit.adapter import save_adapter
from crispedit.corpus import ASSETS
from crispedit.curvature import plan_curvature
from crispedit.delta import Delta
from crispedit.editor import CrispEditor
from crispedit.evaluate import evaluate_edit
from crispedit.models import load_model, parse_layers
from crispedit.sequential import set_weights
from crispedit.streams import base_weights, cached_curvature
from curvature_store import Store

RANKS = "1,4,16,64,full"
ENERGIES = "0.9,0.99"
HELDOUT_TOKENS = 2048


def measure(model, tokenizer, facts, base, edited, tokens: int, chat_template: str) -> dict:
    """The edit's figures for the edited layers' weights `edited` (the model holds the base)."""
    m = evaluate_edit(
        model, tokenizer, facts, edited=edited, tokens=tokens, retention=0, mmlu=0,
        generation=False, scores=False, chat_template=chat_template,
    )  # fmt: skip
    return {
        "efficacy": m["efficacy"]["edited"]["teacher_forced"],
        "generalization": m["generalization"]["edited"]["teacher_forced"],
        "locality": m["locality"]["token_agreement"],
        "ppl_change_pct": m["capability"]["ppl_change_pct"],
        "kl": m["capability"]["kl"],
    }


def adapter_weights(model, base, layers, deltas, manifest, rank, energy, folder: Path):
    """Export the adapter, load it with peft onto the model (holding the base), merge it, and
    return the edited layers' merged weights (the model is set back to the base)."""
    from peft import PeftModel

    report = save_adapter(folder, deltas, manifest, rank=rank, energy=energy)
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    weights = {f"{n}.weight": w for n, w in base_weights(merged, layers).items()}
    set_weights(merged, base, {})
    return merged, weights, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", type=int, default=100)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--ranks", default=RANKS)
    ap.add_argument("--energies", default=ENERGIES)
    ap.add_argument("--tokens", type=int, default=HELDOUT_TOKENS, help="held-out tokens")
    ap.add_argument("--out", default=str(RESULTS / "adapter.md"))
    ap.add_argument("--delta", help="keep the edit's delta here and reuse it when present")
    ap.add_argument(
        "--no-locality",
        action="store_true",
        help="skip the neighbours (ten prompts a fact: most of an evaluation's time at 1,000 "
        "edits, where the full delta keeps only 0.08 of their tokens anyway)",
    )
    # off, as the quality bench's runs: the template triples the edit's time on this machine
    ap.add_argument("--chat-template", default="off", choices=["auto", "on", "off"])
    ap.add_argument(
        "--run",
        help="edit with these settings instead of the defaults, written as bench/quality.py's "
        "--runs writes a run (method[:gamma][,field=value...]; its layers are the default ones)",
    )
    args = ap.parse_args()
    if args.run:
        settings = parse_run(f"{args.run},chat_template={args.chat_template}").settings()
    else:
        settings = DEFAULTS.override(chat_template=args.chat_template)

    rows = json.loads((ASSETS / "counterfact-edit-1k.json").read_text())
    facts = [
        fact_from_record(r, f"counterfact record {args.start + i}")
        for i, r in enumerate(rows[args.start : args.start + args.n])
    ]
    model, tokenizer = load_model(MODEL)
    layers = parse_layers(model, None)
    base = base_weights(model, layers)
    recipe = plan_curvature(
        model, tokenizer, "wikitext", 20_000, layers, kind=curvature_kind(settings.method)
    )
    curvature, _ = cached_curvature(Store(STORE, create=True), model, tokenizer, recipe)
    # the edit sees every fact whole; only the evaluation drops the neighbours when asked
    measured = [replace(f, neighbors=()) for f in facts] if args.no_locality else facts
    saved = Path(args.delta) if args.delta else None
    if saved is not None and saved.is_file():  # an earlier run's edit of the same facts
        delta, edit_s = Delta.load(saved), float("nan")
    else:
        started = time.perf_counter()
        editor = CrispEditor(model, tokenizer, curvature, layers=layers, settings=settings)
        delta = editor.edit(facts)
        edit_s = time.perf_counter() - started
        log(f"edit of {len(facts)} facts: {edit_s:.0f} s, efficacy {delta.report['efficacy']}")
        if saved is not None:
            delta.save(saved)
    set_weights(model, base, {})
    full_weights = {f"{n}.weight": base[n] + delta.tensors[f"{n}.weight"] for n in layers}

    results = [
        (
            "full delta",
            None,
            measure(
                model, tokenizer, measured, base, full_weights, args.tokens, args.chat_template
            ),
        )
    ]
    log(f"full delta: {results[0][2]}")
    write(Path(args.out), args, settings, results, edit_s, len(facts))
    manifest = {"id": None, "model": MODEL, "transposed_layers": []}
    full_rank = min(min(d.shape) for d in delta.tensors.values())
    choices = [("rank", full_rank if r == "full" else int(r)) for r in args.ranks.split(",") if r]
    choices += [("energy", float(e)) for e in args.energies.split(",") if e]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (kind, value) in enumerate(choices):
            rank, energy = (value, None) if kind == "rank" else (None, value)
            model, weights, report = adapter_weights(
                model, base, layers, delta.tensors, manifest, rank, energy, Path(tmp) / str(i)
            )
            row = measure(
                model, tokenizer, measured, base, weights, args.tokens, args.chat_template
            )
            row["ranks"] = [info["rank"] for info in report["layers"].values()]
            row["error"] = max(info["relative_error"] for info in report["layers"].values())
            results.append((f"{kind} {value:g}", report["r"], row))
            log(f"{kind} {value}: {row}")
            write(
                Path(args.out), args, settings, results, edit_s, len(facts)
            )  # what is done so far


def write(out: Path, args, settings, results, edit_s: float, n: int) -> None:
    full = results[0][2]
    lines = [
        f"# Adapter rank against edit quality ({n} CounterFact edits, SmolLM2-135M-Instruct)",
        "",
        f"Records {args.start}-{args.start + n - 1}, one batch edit with "
        + (f"`--run {args.run}`" if args.run else "the editor's defaults")
        + f" ({settings.method} γ{settings.gamma}, {settings.epochs} epochs, layers 20-24, "
        f"chat template {args.chat_template}, "
        f"{edit_s:.0f} s), exported by "
        "`crispedit.adapter`, loaded and merged with `peft` "
        f"{_version('peft')}; teacher-forced scores, held-out perplexity and KL over "
        f"{args.tokens} WikiText tokens"
        + ("; neighbours not measured (`--no-locality`)" if args.no_locality else "")
        + f". {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. `python bench/adapter.py`.",
        "",
        "| adapter | r | per-layer rank | max rel. error | efficacy | of full | paraphrases | "
        "neighbour agreement | ppl change | KL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r, row in results:
        share = row["efficacy"] / full["efficacy"] if full["efficacy"] else float("nan")
        lines.append(
            f"| {label} | {r or '-'} | {','.join(map(str, row.get('ranks', []))) or '-'} | "
            f"{row['error']:.3f} | "
            if "error" in row
            else f"| {label} | - | - | - | "
        )
        lines[-1] += (
            f"{row['efficacy']:.2f} | {share:.3f} | {row['generalization']:.2f} | "
            f"{_figure(row['locality'], '.3f')} | {row['ppl_change_pct']:+.2f} % | "
            f"{row['kl']:.4f} |"
        )
    out.write_text("\n".join(lines) + "\n")
    log(f"wrote {out}")


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
