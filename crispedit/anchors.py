"""Subject anchors: keep what the model says about other subjects asked the same question.

An edit "David Robinson professionally plays the sport → baseball" learned on the upper layers
tends to become "… professionally plays the sport → baseball" for every subject: the neighbours
(CounterFact's "Shaquille O'Neal plays → basketball") flip with it. The K-FAC projector cannot
stop this, because its curvature comes from generic text, not from this question. So each fact
also gets `ANCHORS` anchor prompts: its own prompt with the subject swapped for another well-known
subject from `SUBJECTS`, and each edit step adds γ_anchor · KL(base ‖ edited) of the next-token
distribution at the end of those prompts (the base distribution computed once, before the edit).
The edit must then tell its subject apart from the others.

Only the fact itself is needed (its prompt and subject): a fact without a subject, or whose subject
is not in its prompt, simply gets no anchors. Nor, by default, does a question (a prompt ending in
"?", as zsRE's): what follows a question is the answer's phrasing as much as its content, so holding
it there constrains the edit without protecting the neighbours (see ANCHOR_QUESTIONS). The pool is
fixed and general (people, places, organisations, works, things), chosen by hand and not taken from
any evaluation data; a pool subject that is also the subject of a fact in the edit is never used as
an anchor.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from contract.facts import Fact
from contract.settings import DEFAULTS

# the defaults and why they were chosen: contract.settings
ANCHORS, ANCHOR_WEIGHT = DEFAULTS.anchors, DEFAULTS.anchor_weight
ANCHOR_QUESTIONS = DEFAULTS.anchor_questions

SUBJECTS = (
    "Albert Einstein", "Marie Curie", "William Shakespeare", "Leonardo da Vinci",
    "Napoleon Bonaparte", "Queen Victoria", "Nelson Mandela", "Frida Kahlo", "Ludwig van Beethoven",
    "Jane Austen", "Pablo Picasso", "Mahatma Gandhi", "Abraham Lincoln", "Cleopatra",
    "Isaac Newton", "Charles Darwin", "Wolfgang Amadeus Mozart", "Vincent van Gogh",
    "Paris", "Tokyo", "Buenos Aires", "Cairo", "Toronto", "Mumbai", "Sydney", "Moscow",
    "Germany", "Brazil", "Japan", "Nigeria", "Australia", "Mexico", "Sweden", "India",
    "Microsoft", "Toyota", "Nokia", "Siemens", "the BBC", "the United Nations", "IBM", "Airbus",
    "Harvard University", "the Louvre", "the Nile", "Mount Everest", "the Eiffel Tower",
    "Hamlet", "The Beatles", "Star Wars", "Don Quixote", "the Mona Lisa", "FC Barcelona",
    "the Olympic Games", "the Roman Empire", "the Amazon rainforest", "Mercury", "Antarctica",
)  # fmt: skip


def is_question(prompt: str) -> bool:
    """Whether a prompt is a question (ends in "?", trailing spaces aside)."""
    return prompt.rstrip().endswith("?")


def anchor_prompts(
    facts: Sequence[Fact], k: int = ANCHORS, seed: int = 0, questions: bool = ANCHOR_QUESTIONS
) -> list[list[str]]:
    """Per fact, `k` prompts that ask its question about other subjects (none for a fact without
    a subject in its prompt, nor for a question unless `questions`). Deterministic for a given
    `seed` and fact list."""
    if k <= 0:
        return [[] for _ in facts]
    edited = {f.subject.casefold() for f in facts if f.subject}
    pool = [s for s in SUBJECTS if s.casefold() not in edited]
    rng = random.Random(seed)
    anchors = []
    for fact in facts:
        skipped = not questions and is_question(fact.prompt)
        if skipped or not fact.subject or fact.subject not in fact.prompt:
            anchors.append([])
            continue
        others = rng.sample(pool, min(k, len(pool)))
        anchors.append([fact.prompt.replace(fact.subject, other, 1) for other in others])
    return anchors
