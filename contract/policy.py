"""A stream's publishing policy: the bounds a version must meet before it becomes the head.

A stream with a policy is guarded: every edit job on it measures its new version (the model at
the version against the base model, and its regression prompts at the version and at its
parent) before the head moves. A version outside the policy is kept but not published; the job
ends `rejected` with the metrics and the failed rules (`failures`), and the head stays. The
sample sizes (`heldout_tokens`, `retention_facts`, `max_new_tokens` and the number of regression
prompts) bound what the evaluation costs; a rule left unset (None) is not measured at all.

The policy is stored with its stream (`curvature_store.Store.set_policy`) as `Policy.to_dict()`;
`Policy.from_dict` reads a document back, validating every field (PolicyError naming it), so
the API, the store and the worker read one shape. Standard library only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_REGRESSION_PROMPTS = 20
MAX_PROMPT_CHARS = 2000
HELDOUT_TOKENS = 2048  # the largest part of a full check: ~85 CPU-s on SmolLM2 (bench/README.md)
MAX_HELDOUT_TOKENS = 16384
RETENTION_FACTS = 100
MAX_RETENTION_FACTS = 1000  # the bundled CounterFact file holds 1,000 records
ANSWER_TOKENS = 16  # greedy tokens of a regression answer (cut at the first "." or newline)
MAX_ANSWER_TOKENS = 64


class PolicyError(ValueError):
    """A policy field is unknown, of the wrong type or out of bounds; `field` names it as the
    request spells it (`regression[2].prompt`), and the message starts with it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field


@dataclass(frozen=True)
class RegressionPrompt:
    """A prompt whose greedy answer must not change from the parent's (`answer` None), or must
    equal `answer` (after SQuAD normalisation: case, punctuation and articles ignored)."""

    prompt: str
    answer: str | None = None


def _rule(default: Any, doc: str, **bounds: Any) -> Any:
    return dataclasses.field(default=default, metadata={"doc": doc, **bounds})


@dataclass(frozen=True)
class Policy:
    """The bounds of a guarded stream and the sample sizes of their measurement (module doc).

    Construction validates every field (PolicyError naming the first bad one)."""

    min_efficacy: float | None = _rule(
        None, "lowest teacher-forced efficacy of the job's own facts at the version, 0-1",
        ge=0.0, le=1.0,
    )  # fmt: skip
    max_ppl_change_pct: float | None = _rule(
        None, "largest held-out perplexity change of the version against the base model, in "
        "percent", ge=0.0,
    )  # fmt: skip
    max_kl: float | None = _rule(
        None, "largest mean per-token KL(base || version) on the held-out text, in nats", ge=0.0
    )
    min_fact_retention: float | None = _rule(
        None, "lowest share of known (non-edited CounterFact) facts the version still ranks "
        "true over false, 0-1", ge=0.0, le=1.0,
    )  # fmt: skip
    regression: tuple[RegressionPrompt, ...] = _rule(
        (), f"up to {MAX_REGRESSION_PROMPTS} prompts: {{prompt}} keeps the parent's greedy "
        "answer, {prompt, answer} must answer `answer`",
    )  # fmt: skip
    heldout_tokens: int = _rule(
        HELDOUT_TOKENS, "held-out tokens for the perplexity and KL rules", ge=2,
        le=MAX_HELDOUT_TOKENS,
    )  # fmt: skip
    retention_facts: int = _rule(
        RETENTION_FACTS, "known facts for the retention rule", ge=1, le=MAX_RETENTION_FACTS
    )
    max_new_tokens: int = _rule(
        ANSWER_TOKENS, "greedy tokens of a regression answer", ge=1, le=MAX_ANSWER_TOKENS
    )

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if spec.name == "regression":
                _check_regression(value)
            elif spec.type == "int":
                _check_number(spec.name, value, spec.metadata, integer=True)
            elif value is not None:
                _check_number(spec.name, value, spec.metadata, integer=False)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Policy:
        """A policy from its JSON form (`to_dict`; missing fields take their defaults).
        PolicyError names an unknown field or a bad value."""
        if not isinstance(doc, Mapping):
            raise PolicyError("policy", "must be a JSON object")
        known = {spec.name for spec in dataclasses.fields(cls)}
        for name in doc:
            if name not in known:
                raise PolicyError(str(name), f"is not a policy field (one of {sorted(known)})")
        fields = dict(doc)
        if "regression" in fields:
            fields["regression"] = _read_regression(fields["regression"])
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """The policy as JSON, every field present (regression prompts as {prompt, answer})."""
        out = dataclasses.asdict(self)
        out["regression"] = [dataclasses.asdict(r) for r in self.regression]
        return out

    @property
    def needs_heldout(self) -> bool:
        """Whether a rule reads the held-out text (else it is not measured)."""
        return self.max_ppl_change_pct is not None or self.max_kl is not None


def policy_fields() -> dict[str, str]:
    """Each policy field's one-line description (for the API's schema and the docs)."""
    return {spec.name: spec.metadata["doc"] for spec in dataclasses.fields(Policy)}


def _check_number(name: str, value: Any, rules: Mapping[str, Any], integer: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise PolicyError(name, f"must be {'an integer' if integer else 'a number'}, not {value!r}")
    if not math.isfinite(value):
        raise PolicyError(name, f"must be finite, not {value}")
    if "ge" in rules and value < rules["ge"]:
        raise PolicyError(name, f"must be at least {rules['ge']}, not {value}")
    if "le" in rules and value > rules["le"]:
        raise PolicyError(name, f"must be at most {rules['le']}, not {value}")


def _read_regression(items: Any) -> tuple[RegressionPrompt, ...]:
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise PolicyError("regression", "must be a list of {prompt, answer?} objects")
    prompts = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise PolicyError(f"regression[{i}]", "must be an object {prompt, answer?}")
        extra = sorted(set(item) - {"prompt", "answer"})
        if extra:
            raise PolicyError(f"regression[{i}].{extra[0]}", "is not a field (prompt, answer)")
        prompts.append(RegressionPrompt(item.get("prompt"), item.get("answer")))  # type: ignore[arg-type]
    return tuple(prompts)


def _check_regression(prompts: Any) -> None:
    if not isinstance(prompts, tuple):
        raise PolicyError("regression", "must be a tuple of RegressionPrompt")
    if len(prompts) > MAX_REGRESSION_PROMPTS:
        raise PolicyError(
            "regression", f"holds {len(prompts)} prompts; at most {MAX_REGRESSION_PROMPTS}"
        )
    for i, item in enumerate(prompts):
        for name in ("prompt", "answer"):
            text = getattr(item, name)
            if name == "answer" and text is None:
                continue
            if not isinstance(text, str) or not text.strip():
                raise PolicyError(f"regression[{i}].{name}", "must be a non-empty string")
            if len(text) > MAX_PROMPT_CHARS:
                raise PolicyError(
                    f"regression[{i}].{name}", f"is longer than {MAX_PROMPT_CHARS} characters"
                )


def failures(policy: Policy, metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rules of `policy` that `metrics` break, each `{rule, bound, value}` (a regression
    prompt: `{rule: "regression", prompt, expected, answer}`); [] when the version passes.

    `metrics` holds what the worker measured (`efficacy`, `ppl_change_pct`, `kl`,
    `fact_retention`, and `regression`: [{prompt, expected, answer, ok}]); a bounded metric that
    could not be measured (None) fails its rule."""
    failed: list[dict[str, Any]] = []
    for rule, metric, low in (
        ("min_efficacy", "efficacy", True),
        ("max_ppl_change_pct", "ppl_change_pct", False),
        ("max_kl", "kl", False),
        ("min_fact_retention", "fact_retention", True),
    ):
        bound, value = getattr(policy, rule), metrics.get(metric)
        if bound is None:
            continue
        if value is None or (value < bound if low else value > bound):
            failed.append({"rule": rule, "bound": bound, "value": value})
    for check in metrics.get("regression") or []:
        if not check["ok"]:
            failed.append({"rule": "regression", **{k: v for k, v in check.items() if k != "ok"}})
    return failed
