"""`crispedit demo`: edit SmolLM2 on three facts and show what it answers before and after.

Builds the curvature on a slice of WikiText, applies the facts of `assets/demo_facts.json` with the
default method, prints greedy completions of the edited prompts, their paraphrases and unrelated
neighbour prompts, then checks that the saved delta reproduces the edited model on a fresh copy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from contract.facts import load_facts
from crispedit.corpus import read_documents
from crispedit.curvature import build_curvature
from crispedit.delta import Delta, apply_delta
from crispedit.editor import CrispEditor
from crispedit.evaluate import perplexity
from crispedit.models import load_model, parse_layers

DEMO_FACTS = Path(__file__).parent / "assets" / "demo_facts.json"
NEW_TOKENS = 6


@torch.no_grad()
def complete(model, tokenizer, prompt: str) -> str:
    """The model's greedy continuation of `prompt` (a few tokens, first line only)."""
    ids = tokenizer(prompt, return_tensors="pt").to(model.device)
    out = model.generate(
        **ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    new = out[0, ids["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True).split("\n")[0].strip()


def run_demo(
    model: str = "smollm2",
    out: str | Path = "runs/demo",
    tokens: int = 8192,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> None:
    """Run the demo end to end, printing a before/after table; writes the delta to `out`.

    The model loads on `device` in `dtype` (None: `default_dtype(device)`), the fresh copy that
    checks the delta too, so the check compares like with like.
    """
    facts = load_facts(DEMO_FACTS)
    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    layers = parse_layers(lm, None)
    prompts = [("edit", f.prompt, f.target) for f in facts]
    prompts += [("paraphrase", p, f.target) for f in facts for p in f.paraphrases]
    prompts += [("neighbour", n.prompt, n.target) for f in facts for n in f.neighbors]
    before = [complete(lm, tokenizer, p) for _, p, _ in prompts]
    heldout = read_documents("wikitext-heldout")
    ppl_before = perplexity(lm, tokenizer, heldout, max_tokens=2048)

    print(f"curvature of {len(layers)} layers ({layers[0]} ...) from {tokens} WikiText tokens")
    curvature = build_curvature(lm, tokenizer, "wikitext", tokens=tokens, layers=layers)
    delta = CrispEditor(lm, tokenizer, curvature).edit(facts)
    path = delta.save(Path(out))
    after = [complete(lm, tokenizer, p) for _, p, _ in prompts]
    ppl_after = perplexity(lm, tokenizer, heldout, max_tokens=2048)

    print(f"\n{'kind':<11} {'prompt':<50} {'wanted':<18} {'before':<24} after")
    for (kind, prompt, wanted), b, a in zip(prompts, before, after, strict=True):
        print(f"{kind:<11} {prompt[:50]:<50} {wanted[:18]:<18} {b[:24]:<24} {a}")
    report = delta.report
    print(
        f"\nefficacy (teacher-forced) {report['efficacy_before']:.2f} -> {report['efficacy']:.2f}"
        f" in {report['epochs']} epochs ({report['time_s']['edit']:.0f} s); held-out perplexity"
        f" {ppl_before:.2f} -> {ppl_after:.2f} ({100 * (ppl_after / ppl_before - 1):+.2f} %)"
    )

    fresh, _ = load_model(model, dtype=dtype, device=device)
    apply_delta(fresh, Delta.load(path))
    same = all(
        torch.equal(a.weight, b.weight)
        for a, b in zip(
            [dict(fresh.named_modules())[n] for n in layers],
            [dict(lm.named_modules())[n] for n in layers],
            strict=True,
        )
    )
    print(f"delta written to {path}; applied to a fresh copy it gives the same weights: {same}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--tokens", type=int, default=8192)
    run_demo(**vars(ap.parse_args()))
