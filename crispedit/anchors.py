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

By default (`anchor_choice="random"`) a fact's anchor subjects are drawn by the seed from that
pool. CounterFact's neighbours, though, are subjects like the edited one (other French actors for
a French actor), which a draw from a diverse pool rarely resembles. With `anchor_choice="similar"`
a fact gets instead the `k` subjects of the larger pool `SIMILAR_SUBJECTS` (the same kinds, about
300) nearest to its own: nearest by the cosine of their representations, each the model's hidden
state entering the lowest edited block at the subject's last token (`subject_states`), the state
the edited layers read the subject from. The pool's and the edit's subjects are represented once
per edit, in a batched forward that stops at that block.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence

import torch
from torch import nn

from contract.facts import Fact
from contract.settings import ANCHOR_CHOICES, DEFAULTS
from crispedit.corpus import pad_batches
from crispedit.models import containing_block, transformer_blocks

# the defaults and why they were chosen: contract.settings
ANCHORS, ANCHOR_WEIGHT = DEFAULTS.anchors, DEFAULTS.anchor_weight
ANCHOR_QUESTIONS, ANCHOR_CHOICE = DEFAULTS.anchor_questions, DEFAULTS.anchor_choice

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


# anchor_choice "similar": the pool the nearest subjects are taken from. The random pool above
# (kept as it is, so that a seed draws the anchors it always drew), then more of the same kinds,
# so that most subjects have a few of their own kind in it (an actor other actors, a city other
# cities); written by hand, general and well known, none taken from evaluation data
SIMILAR_SUBJECTS = (
    *SUBJECTS,
    # actors and film makers
    "Catherine Deneuve", "Alain Delon", "Brigitte Bardot", "Sophia Loren", "Toshiro Mifune",
    "Amitabh Bachchan", "Shah Rukh Khan", "Jackie Chan", "Penélope Cruz", "Antonio Banderas",
    "Marlene Dietrich", "Charlie Chaplin", "Marilyn Monroe", "Tom Hanks", "Audrey Hepburn",
    "Alfred Hitchcock", "Akira Kurosawa", "Steven Spielberg", "Pedro Almodóvar",
    # writers and thinkers
    "Victor Hugo", "Leo Tolstoy", "Fyodor Dostoevsky", "Gabriel García Márquez",
    "Johann Wolfgang von Goethe", "Dante Alighieri", "Miguel de Cervantes", "Charles Dickens",
    "Franz Kafka", "Haruki Murakami", "Rabindranath Tagore", "Ernest Hemingway", "Agatha Christie",
    "Homer", "Aristotle", "Immanuel Kant", "Karl Marx",
    # composers, musicians and bands
    "Johann Sebastian Bach", "Frédéric Chopin", "Pyotr Ilyich Tchaikovsky", "Elvis Presley",
    "Bob Dylan", "Madonna", "Michael Jackson", "Édith Piaf", "Jimi Hendrix", "Louis Armstrong",
    "Luciano Pavarotti", "Bob Marley", "Freddie Mercury", "The Rolling Stones", "Pink Floyd",
    "Led Zeppelin", "Metallica", "U2",
    # athletes
    "Pelé", "Diego Maradona", "Lionel Messi", "Cristiano Ronaldo", "Zinedine Zidane",
    "David Beckham", "Michael Jordan", "LeBron James", "Babe Ruth", "Ichiro Suzuki",
    "Roger Federer", "Serena Williams", "Rafael Nadal", "Usain Bolt", "Muhammad Ali",
    "Wayne Gretzky", "Ayrton Senna", "Michael Schumacher", "Sachin Tendulkar", "Tom Brady",
    # rulers and politicians
    "Winston Churchill", "Charles de Gaulle", "Franklin D. Roosevelt", "John F. Kennedy",
    "Barack Obama", "Angela Merkel", "Otto von Bismarck", "Julius Caesar", "Alexander the Great",
    "Genghis Khan", "Vladimir Lenin", "George Washington", "Charlemagne",
    # scientists, inventors, artists, founders
    "Galileo Galilei", "Nikola Tesla", "Alan Turing", "Niels Bohr", "Stephen Hawking",
    "Louis Pasteur", "Dmitri Mendeleev", "Rembrandt", "Claude Monet", "Salvador Dalí",
    "Michelangelo", "Katsushika Hokusai", "Bill Gates", "Steve Jobs", "Walt Disney",
    # cities
    "London", "New York City", "Los Angeles", "Chicago", "Berlin", "Rome", "Madrid", "Amsterdam",
    "Vienna", "Warsaw", "Stockholm", "Athens", "Istanbul", "Dubai", "Beijing", "Shanghai",
    "Hong Kong", "Seoul", "Bangkok", "Singapore", "Delhi", "Lagos", "Nairobi", "Johannesburg",
    "Rio de Janeiro", "São Paulo", "Mexico City", "Melbourne", "Kyoto", "Saint Petersburg",
    "Venice",
    # countries and regions
    "France", "Italy", "Spain", "the Netherlands", "Switzerland", "Greece", "Turkey", "Russia",
    "Norway", "Ireland", "Canada", "the United States", "Argentina", "Colombia", "China",
    "South Korea", "Indonesia", "Iran", "Israel", "Egypt", "Kenya", "South Africa", "New Zealand",
    "Greenland", "Sicily",
    # languages
    "English", "French", "Spanish", "German", "Italian", "Portuguese", "Russian", "Mandarin",
    "Arabic", "Hindi", "Greek", "Latin",
    # companies, broadcasters and organisations
    "Apple", "Google", "Amazon", "Samsung", "Sony", "Nintendo", "Intel", "Volkswagen", "BMW",
    "Ferrari", "Renault", "Ford", "Boeing", "Coca-Cola", "McDonald's", "IKEA", "Adidas", "Ericsson",
    "Huawei", "Netflix", "Spotify", "CNN", "HBO", "Al Jazeera", "The New York Times", "NASA",
    "the European Union", "NATO", "the Vatican", "FIFA", "the University of Oxford",
    "Stanford University",
    # sports clubs
    "Real Madrid", "Manchester United", "Liverpool FC", "Juventus", "AC Milan", "Bayern Munich",
    "Paris Saint-Germain", "the New York Yankees", "the Los Angeles Lakers", "the Chicago Bulls",
    "the All Blacks",
    # works
    "The Odyssey", "War and Peace", "Pride and Prejudice", "Les Misérables", "The Divine Comedy",
    "Harry Potter", "The Lord of the Rings", "The Godfather", "The Simpsons", "Doctor Who",
    "Game of Thrones", "Sherlock Holmes", "The Starry Night", "Swan Lake",
    # products and software
    "the iPhone", "Windows", "Android", "the PlayStation", "the Toyota Corolla",
    "the Volkswagen Beetle", "the Ford Mustang", "Wikipedia", "Python", "Minecraft", "Pokémon",
    # places and things
    "the Colosseum", "the Great Wall of China", "the Taj Mahal", "Machu Picchu", "the Alps",
    "the Sahara", "the Pacific Ocean", "the Moon", "Buddhism",
)  # fmt: skip
# the text a subject is represented in: a neutral lead-in, then the subject, whose last token is
# the text's. Not the bare subject: a tokenizer without a BOS (SmolLM2's) puts its first token at
# position 0, the attention sink, whose state is much the same whatever the token, so one-token
# subjects look alike (on SmolLM2 at block 20, bare, "Lyon" came nearest "Kenya" and "Berlin",
# "Danish" nearest "Istanbul" and "Amsterdam"; after this lead-in, "Madrid" and "Moscow", "German"
# and "French"); and in most prompts the subject follows other words anyway. What comes after the
# subject could not change its state (causal attention)
SUBJECT_TEMPLATE = "The subject is {}"
REPRESENT_BATCH = 64  # subjects per forward of `subject_states`: short texts, so many at once


class _Stop(Exception):
    """Raised by the hook of `subject_states` once it holds the states it needs."""


def is_question(prompt: str) -> bool:
    """Whether a prompt is a question (ends in "?", trailing spaces aside)."""
    return prompt.rstrip().endswith("?")


def lowest_block(model: nn.Module, layers: Sequence[str]) -> int:
    """Index of the lowest transformer block holding one of `layers` (the last block when none
    lies in a block: a layer of the head, say)."""
    indices = [i for i in (containing_block(model, name) for name in layers) if i is not None]
    return min(indices, default=len(transformer_blocks(model)[1]) - 1)


@torch.no_grad()
def subject_states(
    model: nn.Module, tokenizer, subjects: Sequence[str], block: int
) -> torch.Tensor:
    """(len(subjects), d_model) float32: each subject's representation, the hidden state entering
    transformer block `block` at the last token of `SUBJECT_TEMPLATE` filled with it (the
    subject's last token). Batched (`REPRESENT_BATCH`, right-padded), on the model's device, with
    no grad; each forward stops at that block. A bf16 model's states are cast to float32 for the
    cosines, whose differences between near subjects bf16 would round away."""
    if not subjects:
        return torch.empty(0, 0)
    blocks = transformer_blocks(model)[1]
    device = next(model.parameters()).device
    ids = [tokenizer(SUBJECT_TEMPLATE.format(s))["input_ids"] for s in subjects]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked anyway
    captured, states = [], []

    def stop(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    handle = blocks[block].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for batch in pad_batches(ids, pad, REPRESENT_BATCH):
            captured.clear()
            mask = batch["attention_mask"].to(device)
            with contextlib.suppress(_Stop):
                model(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
            (hidden,) = captured
            last = mask.sum(-1) - 1
            states.append(hidden[torch.arange(len(last), device=device), last].float())
    finally:
        handle.remove()
    return torch.cat(states)


def anchor_prompts(
    facts: Sequence[Fact],
    k: int = ANCHORS,
    seed: int = 0,
    questions: bool = ANCHOR_QUESTIONS,
    choice: str = ANCHOR_CHOICE,
    represent: Callable[[list[str]], torch.Tensor] | None = None,
) -> list[list[str]]:
    """Per fact, `k` prompts that ask its question about other subjects (none for a fact without
    a subject in its prompt, nor for a question unless `questions`). `choice` "random" draws the
    subjects from `SUBJECTS` by `seed`; "similar" takes the `k` of `SIMILAR_SUBJECTS` nearest to
    the fact's subject by the cosine of `represent(subjects)` (a row per subject: in the editor,
    `subject_states`), the seed unused. A subject of the edit is never an anchor. Deterministic
    for a given `seed` and fact list (and, for "similar", representation)."""
    if choice not in ANCHOR_CHOICES:
        raise ValueError(
            f"anchor choice must be one of {', '.join(ANCHOR_CHOICES)}, not {choice!r}"
        )
    if k <= 0:
        return [[] for _ in facts]
    edited = {f.subject.casefold() for f in facts if f.subject}
    if choice == "similar":
        if represent is None:
            raise ValueError("similar anchors need a subject representation (`represent`)")
        return _similar_prompts(facts, k, questions, edited, represent)
    pool = [s for s in SUBJECTS if s.casefold() not in edited]
    rng = random.Random(seed)
    anchors = []
    for fact in facts:
        if not _anchored(fact, questions):
            anchors.append([])
            continue
        others = rng.sample(pool, min(k, len(pool)))
        anchors.append([fact.prompt.replace(fact.subject, other, 1) for other in others])
    return anchors


def _anchored(fact: Fact, questions: bool) -> bool:
    """Whether `fact` gets anchors: a subject in its prompt, and a statement unless `questions`."""
    skipped = not questions and is_question(fact.prompt)
    return not skipped and bool(fact.subject) and fact.subject in fact.prompt


def _similar_prompts(
    facts: Sequence[Fact],
    k: int,
    questions: bool,
    edited: set[str],
    represent: Callable[[list[str]], torch.Tensor],
) -> list[list[str]]:
    """`anchor_prompts` for choice "similar": the pool and the edit's subjects represented in one
    call, each subject's pool neighbours ranked by cosine (ties by their order in the pool)."""
    pool = [s for s in SIMILAR_SUBJECTS if s.casefold() not in edited]
    subjects = list(dict.fromkeys(f.subject for f in facts if _anchored(f, questions)))
    if not subjects or not pool:
        return [[] for _ in facts]
    unit = torch.nn.functional.normalize(represent(pool + subjects).float(), dim=-1)
    cosine = unit[len(pool) :] @ unit[: len(pool)].T  # (subjects, pool)
    ranked = torch.sort(cosine, dim=1, descending=True, stable=True).indices[:, :k].tolist()
    nearest = {s: [pool[j] for j in row] for s, row in zip(subjects, ranked, strict=True)}
    return [
        [f.prompt.replace(f.subject, other, 1) for other in nearest[f.subject]]
        if _anchored(f, questions)
        else []
        for f in facts
    ]
