"""Guarded publishing: a new version measured against its stream's policy before the head moves.

A stream with a policy (`contract.policy.Policy`) is guarded: `streams.edit_on_stream` calls
`judge` on the edited model, and a version that breaks a rule is kept but not published. Only
what the policy bounds is measured, at the policy's sample sizes, so the cost is the policy's:

- efficacy: the editor's own teacher-forced efficacy on the job's facts (free);
- `max_ppl_change_pct`, `max_kl`: held-out perplexity and KL(base || version) over
  `heldout_tokens` tokens of `wikitext-heldout` (two forward passes over them);
- `min_fact_retention`: `retention_facts` non-edited CounterFact records at the version;
- `regression`: each prompt's greedy answer (`max_new_tokens`) at the version, and at the
  parent for the prompts whose answer must not change.

The model is left at the version's weights (`sequential.weights_at` restores them bitwise).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from contract.facts import Fact
from contract.policy import Policy, failures
from crispedit.corpus import read_documents
from crispedit.evaluate import (
    HELDOUT,
    fact_retention,
    generate_answers,
    heldout_drift,
    normalize_answer,
    retention_triples,
    swapped_weights,
)
from crispedit.models import get_layers
from crispedit.sequential import weights_at


def judge(
    model: nn.Module,
    tokenizer,
    base: dict[str, torch.Tensor],
    parent: dict[str, torch.Tensor],
    facts: Sequence[Fact],
    policy: Policy,
    efficacy: float | None,
    chat: bool = False,
) -> dict:
    """Measure the version the model holds now against `policy` (module doc).

    `base` holds the base weights of the edited layers (`streams.base_weights`), `parent` the
    parent's cumulative delta, `efficacy` the edit's own; `chat`: prompts wrapped in the chat
    template as the edit wrapped them. Returns `{passed, failed, metrics, policy, seconds}`,
    `failed` as `contract.policy.failures` lists the broken rules."""
    started = time.perf_counter()
    metrics: dict = {"efficacy": efficacy}
    if policy.needs_heldout:
        layers = get_layers(model, list(base))
        version = {f"{n}.weight": m.weight.detach().clone() for n, m in layers.items()}
        with swapped_weights(model, {f"{n}.weight": w for n, w in base.items()}):
            drift = heldout_drift(
                model, tokenizer, version, read_documents(HELDOUT), policy.heldout_tokens
            )
        metrics.update({k: drift[k] for k in ("ppl_change_pct", "kl", "n_tokens")})
    if policy.min_fact_retention is not None:
        triples = retention_triples(facts, policy.retention_facts)
        share = fact_retention(model, tokenizer, triples, chat=chat)
        metrics["fact_retention"] = share if triples else None  # NaN over no facts: unmeasured
        metrics["retention_facts"] = len(triples)
    if policy.regression:
        metrics["regression"] = _regression(model, tokenizer, base, parent, policy, chat)
    failed = failures(policy, metrics)
    return {
        "passed": not failed,
        "failed": failed,
        "metrics": metrics,
        "policy": policy.to_dict(),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _regression(
    model: nn.Module,
    tokenizer,
    base: dict[str, torch.Tensor],
    parent: dict[str, torch.Tensor],
    policy: Policy,
    chat: bool,
) -> list[dict]:
    """Each regression prompt's check: `{prompt, expected, answer, ok}`. A given answer matches
    after SQuAD normalisation; a kept one must be the parent's answer exactly."""
    prompts = [r.prompt for r in policy.regression]
    answers = generate_answers(model, tokenizer, prompts, policy.max_new_tokens, chat=chat)
    kept = [r.prompt for r in policy.regression if r.answer is None]
    before: dict[str, str] = {}
    if kept:
        with weights_at(model, base, parent):
            found = generate_answers(model, tokenizer, kept, policy.max_new_tokens, chat=chat)
        before = dict(zip(kept, found, strict=True))
    checks = []
    for rule, answer in zip(policy.regression, answers, strict=True):
        if rule.answer is None:
            expected, ok = before[rule.prompt], answer == before[rule.prompt]
        else:
            expected = rule.answer
            ok = normalize_answer(answer) == normalize_answer(expected)
        checks.append({"prompt": rule.prompt, "expected": expected, "answer": answer, "ok": ok})
    return checks
