"""The publishing policy's one shape: defaults, round trip, every bad field named, the rules."""

from __future__ import annotations

import pytest

from contract.policy import MAX_REGRESSION_PROMPTS, Policy, PolicyError, failures


def test_defaults_and_round_trip():
    policy = Policy.from_dict(
        {"min_efficacy": 0.9, "max_kl": 0.01, "regression": [{"prompt": "2+2="}, {
            "prompt": "The capital of France is", "answer": "Paris"}]}
    )  # fmt: skip
    doc = policy.to_dict()
    assert doc["heldout_tokens"] == 2048 and doc["max_ppl_change_pct"] is None
    assert doc["regression"][0] == {"prompt": "2+2=", "answer": None}
    assert Policy.from_dict(doc) == policy and policy.needs_heldout
    assert not Policy().needs_heldout and Policy().to_dict()["regression"] == []


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"min_efficacy": 1.5}, "min_efficacy"),
        ({"min_efficacy": "high"}, "min_efficacy"),
        ({"max_kl": -0.1}, "max_kl"),
        ({"max_ppl_change_pct": float("inf")}, "max_ppl_change_pct"),
        ({"min_fact_retention": -1}, "min_fact_retention"),
        ({"heldout_tokens": 1}, "heldout_tokens"),
        ({"heldout_tokens": 10**9}, "heldout_tokens"),
        ({"retention_facts": 2.5}, "retention_facts"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"regression": "2+2="}, "regression"),
        ({"regression": [{"prompt": "x"}] * (MAX_REGRESSION_PROMPTS + 1)}, "regression"),
        ({"regression": [{"prompt": "ok"}, {"prompt": "  "}]}, "regression[1].prompt"),
        ({"regression": [{"prompt": "ok", "answer": ""}]}, "regression[0].answer"),
        ({"regression": [{"prompt": "ok", "expected": "x"}]}, "regression[0].expected"),
        ({"regression": [3]}, "regression[0]"),
        ({"min_efficacy": 0.5, "surprise": 1}, "surprise"),
    ],
)
def test_bad_fields_are_named(doc, field):
    with pytest.raises(PolicyError) as err:
        Policy.from_dict(doc)
    assert err.value.field == field and str(err.value).startswith(field)


def test_failures_lists_each_broken_rule():
    policy = Policy(min_efficacy=0.9, max_kl=0.05, min_fact_retention=0.5)
    metrics = {"efficacy": 0.8, "kl": 0.01, "fact_retention": None, "regression": [
        {"prompt": "a", "expected": "x", "answer": "y", "ok": False},
        {"prompt": "b", "expected": "z", "answer": "z", "ok": True}]}  # fmt: skip
    assert failures(policy, metrics) == [
        {"rule": "min_efficacy", "bound": 0.9, "value": 0.8},
        {"rule": "min_fact_retention", "bound": 0.5, "value": None},
        {"rule": "regression", "prompt": "a", "expected": "x", "answer": "y"},
    ]
    assert failures(Policy(max_kl=0.05), {"kl": 0.05}) == []
    assert failures(Policy(), {}) == []
