"""What guarded publishing adds to an edit job (issue 26): `crispedit.guard.judge` on SmolLM2.

    python bench/guard_cost.py                       # the default sample sizes
    python bench/guard_cost.py --device cuda

The judge's cost depends on the policy's sample sizes, not on the edit, so the version measured
is the base model plus a small random delta on the worker's default layers (20-24). Each row
times `judge` with one kind of rule (and then all of them) at the default sample sizes of
`contract.policy`, `--repeats` times (default once), and reports the median wall and CPU
seconds. Writes bench/results/guard-cost.md with the machine and its load, row by row. Not a
test: the wall figures depend on whatever else runs here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from measure import machine

from contract.facts import load_facts
from contract.policy import Policy, RegressionPrompt
from crispedit.corpus import ASSETS
from crispedit.guard import judge
from crispedit.models import load_model, parse_layers
from crispedit.sequential import set_weights
from crispedit.streams import base_weights

RESULTS = Path(__file__).parent / "results"
PROMPTS = (  # regression prompts whose answers must not change (each generated twice)
    "The capital of France is",
    "Water boils at a temperature of",
    "The author of Hamlet is",
    "The largest planet in the solar system is",
    "The chemical symbol for gold is",
)


def policies() -> dict[str, Policy]:
    """One policy per kind of rule, at the default sample sizes, and all of them at once."""
    regression = tuple(RegressionPrompt(p) for p in PROMPTS)
    return {
        "efficacy only (free)": Policy(min_efficacy=0.9),
        "perplexity and KL (2,048 held-out tokens)": Policy(max_ppl_change_pct=5.0, max_kl=0.05),
        "known-fact retention (100 facts)": Policy(min_fact_retention=0.5),
        f"regression ({len(PROMPTS)} kept prompts, 16 tokens)": Policy(regression=regression),
        "all rules": Policy(
            min_efficacy=0.9,
            max_ppl_change_pct=5.0,
            max_kl=0.05,
            min_fact_retention=0.5,
            regression=regression,
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "guard-cost.md"))
    args = ap.parse_args()

    model, tokenizer = load_model(args.model, device=args.device)
    layers = parse_layers(model, None)
    base = base_weights(model, layers)
    generator = torch.Generator().manual_seed(0)
    cumulative = {
        f"{name}.weight": 1e-3 * w.std() * torch.randn(w.shape, generator=generator)
        for name, w in base.items()
    }
    set_weights(model, base, cumulative)
    facts = load_facts(ASSETS / "demo_facts.json")
    rows = []
    for name, policy in policies().items():
        wall, cpu = [], []
        for _ in range(args.repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            judge(model, tokenizer, base, {}, facts, policy, efficacy=1.0)
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        rows.append((name, statistics.median(wall), statistics.median(cpu), os.getloadavg()[0]))
        print(f"{name}: wall {rows[-1][1]:.2f} s, cpu {rows[-1][2]:.2f} s", flush=True)
        write(args, model, rows)  # row by row: a slow machine still leaves what it measured


def write(args: argparse.Namespace, model, rows: list[tuple]) -> None:
    """The results table, with the machine and the load each row ran under."""
    lines = [
        "# Guarded publishing: what the policy check adds to an edit job",
        "",
        f"`python bench/guard_cost.py --model {args.model} --device {args.device} --repeats "
        f"{args.repeats}` (median of the runs): `crispedit.guard.judge` at the default sample "
        "sizes of `contract.policy`. Wall seconds depend on what else runs; CPU seconds (all "
        "threads of the process) much less.",
        "",
        f"Machine: {machine(args.device, next(model.parameters()).dtype)}.",
        "",
        "| policy | wall s | CPU s | load average |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {w:.1f} | {c:.1f} | {load:.1f} |" for name, w, c, load in rows),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
