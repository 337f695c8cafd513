"""`crispedit eval`: the metrics of an edit (or of the model alone), base against edited.

    crispedit eval --model smollm2 --delta runs/e1 --facts facts.json --json runs/e1/eval.json

Every input is read before the model loads, so bad input fails fast and writes nothing; the JSON
file records the device and dtype the model was evaluated in.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from contract.settings import CHAT_TEMPLATE_CHOICES, DEFAULTS
from crispedit.evaluate import EVAL_TOKENS, RETENTION
from crispedit_cli.common import CLIError, add_placement_args, load_model_of, placement_record


def eval_table(result: dict) -> str:
    """The metrics of `evaluate_edit` as a table: metric | base | edited | n; the CounterFact
    scores (ES, PS, NS: `crispedit.evaluate.counterfact_scores`) beside ours."""
    rows = []  # (label, base, edited, n, format)
    for group in ("efficacy", "generalization"):
        g = result[group]
        for key, label in (
            ("teacher_forced", "teacher-forced"),
            ("generation", "generated"),
            ("generation_qa", "generated, QA"),
        ):
            rows.append((f"{group} ({label})", g["base"][key], g["edited"][key], g["n"], ".3f"))
    loc, cap = result["locality"], result["capability"]
    rows += [
        ("locality (token agreement)", None, loc["token_agreement"], loc["n"], ".3f"),
        ("locality (neighbours unchanged)", None, loc["unchanged"], loc["n"], ".3f"),
    ]
    for key, label in (
        ("efficacy", "ES: P(new) > P(true), prompts"),
        ("paraphrase", "PS: P(new) > P(true), paraphrases"),
        ("neighborhood", "NS: P(true) > P(new), neighbours"),
    ):
        score = result["scores"][key]
        rows.append((label, score["base"], score["edited"], score["n"], ".3f"))
    rows += [
        ("held-out perplexity", cap["ppl_base"], cap["ppl_edited"], cap["n_tokens"], ".4g"),
        ("held-out perplexity change %", None, cap["ppl_change_pct"], cap["n_tokens"], "+.3f"),
        ("held-out KL(base‖edited)/token", None, cap["kl"], cap["n_tokens"], ".3g"),
    ]
    for key, label in (("fact_retention", "known-fact retention"), ("mmlu", "MMLU 5-shot")):
        rows.append((label, cap[key]["base"], cap[key]["edited"], cap[key]["n"], ".3f"))

    def cell(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [f"{'metric':<34} {'base':>9} {'edited':>9} {'n':>6}"]
    for label, base, edited, n, fmt in rows:
        lines.append(f"{label:<34} {cell(base, fmt):>9} {cell(edited, fmt):>9} {n:>6}")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> None:
    """`crispedit eval`: `evaluate_edit` on the facts, printed as a table and written as JSON."""
    from contract.facts import load_facts
    from crispedit.delta import Delta, check_base
    from crispedit.evaluate import evaluate_edit, retention_triples
    from crispedit.targets import resolve_chat_template
    from curvature_store import atomic_write_bytes

    out = Path(args.json)
    if out.is_dir():
        raise CLIError(f"--json {out} is a folder, not a file")
    # every input is read before the model loads: bad input fails fast and writes nothing
    facts = load_facts(args.facts, limit=args.limit)
    delta = Delta.load(args.delta) if args.delta else None
    triples = None
    if args.retention_facts:
        triples = retention_triples(facts, args.retention, load_facts(args.retention_facts))
    # the prompts are measured as the edit trained them: the delta records its resolved choice
    chat_template = args.chat_template or (delta.meta.get("chat_template") if delta else None)
    chat_template = chat_template or DEFAULTS.chat_template
    model, tokenizer = load_model_of(args)
    if delta is not None:
        check_base(model, delta, "evaluate")
    chat = resolve_chat_template(tokenizer, chat_template)
    started = time.perf_counter()
    result = evaluate_edit(
        model, tokenizer, facts, delta.tensors if delta else None, tokens=args.eval_tokens,
        retention=args.retention, triples=triples, mmlu=args.mmlu,
        generation=not args.no_generation, chat_template="on" if chat else "off", progress=True,
    )  # fmt: skip
    result = {**result, "chat_template": "on" if chat else "off", **placement_record(args)}
    atomic_write_bytes(out, (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
    print(eval_table(result))
    print(f"{len(facts)} facts evaluated in {time.perf_counter() - started:.1f} s; wrote {out}")


def add_eval(sub: argparse._SubParsersAction) -> None:
    """`crispedit eval`."""
    ev = sub.add_parser("eval", help="metrics of an edit (or of the model): base vs edited")
    ev.add_argument("--model", required=True, help="the base model the delta was made for")
    ev.add_argument("--delta", help="a delta file of `crispedit edit` (default: no edit)")
    ev.add_argument("--facts", required=True, help="the edited facts (our JSON/JSONL, CF, zsRE)")
    ev.add_argument("--limit", type=int, help="use only the first N facts")
    ev.add_argument("--json", required=True, help="write the metrics to this JSON file")
    ev.add_argument(
        "--tokens", dest="eval_tokens", metavar="N", type=int, default=EVAL_TOKENS,
        help="held-out tokens for perplexity and KL (0: skip)",
    )  # fmt: skip
    ev.add_argument(
        "--retention", type=int, default=RETENTION,
        help="non-edited facts for known-fact retention (0: skip)",
    )  # fmt: skip
    ev.add_argument(
        "--retention-facts", help="facts with ground_truth for retention (default: CounterFact)"
    )
    ev.add_argument("--mmlu", type=int, help="MMLU questions (default: the bundled 200; 0: skip)")
    ev.add_argument("--no-generation", action="store_true", help="skip the generated answers")
    ev.add_argument(
        "--chat-template", choices=CHAT_TEMPLATE_CHOICES,
        help="wrap the prompts in the chat template (default: the delta's recorded choice)",
    )  # fmt: skip
    add_placement_args(ev)
    ev.set_defaults(func=cmd_eval)
