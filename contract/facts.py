"""
Fact edits: read them from files and turn them into typed `Fact` objects.

A fact edit asks the model to complete `prompt` with `target` instead of what it says today; the
edit text is prompt + " " + target. Three record shapes are accepted, and each record is
recognised by its own keys, so one file may mix them:

- ours:        prompt (or relation + subject), target (or object), subject?, paraphrases?,
               neighbors?, ground_truth?; a relation is a template with `{}` for the subject,
               a phrase that follows the subject, or a Wikidata property id such as "P17"
               (`contract.relations`)
- CounterFact, EasyEdit's flat form (has "target_new"): prompt, target_new, subject,
               ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth
- zsRE, MEND/ROME form (has "src" and "alt"): src, alt, subject, answers, pred, rephrase,
               loc, loc_ans

Files are .json (a list of records, one record, or {"facts": [...]}) or .jsonl (one record per
line). Any problem raises a FactsError that names the file, the record and the field: a bad
record is never skipped, because a silently smaller edit set would skew every metric after it.
Keys we do not know are ignored, since other tools add their own.

This module is the one place that turns records into facts: the engine, its CLI, the API and the
bench all read facts through it, so the same record means the same edit everywhere. It is
standard library only, because the API's request path must not import torch.

Size limits, checked here because this is where a relation template is expanded: a prompt holds at
most MAX_PROMPT_CHARS characters after its subject is filled in (a template of a thousand `{}`
would otherwise multiply a short request a thousandfold), and every sequence the engine builds
from a fact (prompt + " " + target, each paraphrase with the target, each neighbour with its
answer) holds at most MAX_FACT_TOKENS UTF-8 bytes. That byte count bounds the tokens without a
tokenizer: the byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2, Qwen) and the SentencePiece ones
with byte fallback (Llama 2, Mistral, Gemma) emit at most one token per UTF-8 byte, so a sequence
is at most MAX_FACT_TOKENS tokens plus the model's special and chat-template tokens. The API,
which never loads a model, refuses an oversized fact before anything is queued.
"""

import hashlib
import json
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from contract.relations import RELATIONS, is_relation_id


class FactsError(ValueError):
    """A fact file or record is malformed; the message names the file/record index and the field."""


class UnknownRelation(FactsError):
    """A record names a relation id (`P…`) that `contract.relations.RELATIONS` does not know."""


class ControlCharacter(FactsError):
    """A subject, prompt, relation or target holds an invisible control character (CONTROL_RULE)."""


class FactTooLong(FactsError):
    """A fact's prompt (after its subject is filled in) or one of its sequences is over the limit:
    MAX_PROMPT_CHARS characters, MAX_FACT_TOKENS UTF-8 bytes (see the module docstring)."""


MAX_PROMPT_CHARS = 2000  # a prompt, after a relation template is filled with the subject
MAX_FACT_TOKENS = 2048  # per sequence, counted as UTF-8 bytes: at least as many as its tokens
# Unicode categories refused in what defines an edit: controls (Cc: NUL, ESC, DEL, ...), format
# characters (Cf: zero-width space and joiners, bidi overrides and isolates, BOM, soft hyphen)
# and lone surrogates (Cs, which JSON can carry). Such a character is invisible in every listing,
# so an edit holding one cannot be checked by eye, and its target is never what a model
# generates (such edits landed with efficacy 0.0). Tab and newline stay allowed. Neighbours,
# paraphrases and ground truths are not checked: data sets carry BOMs there (zsRE).
CONTROL_CATEGORIES = ("Cc", "Cf", "Cs")
CONTROL_RULE = "control, zero-width and bidi characters are refused (tab and newline are allowed)"


@dataclass(frozen=True)
class Neighbor:
    """An unrelated prompt whose answer (`target`) the edit must leave unchanged."""

    prompt: str
    target: str


@dataclass(frozen=True)
class Fact:
    """One edit: the model should complete `prompt` with `target` (text: prompt + " " + target)."""

    prompt: str
    target: str
    subject: str | None = None
    paraphrases: tuple[str, ...] = ()  # other prompts that should also yield target
    neighbors: tuple[Neighbor, ...] = ()  # unrelated prompts whose answer must not change
    ground_truth: str | None = None  # the old/true object, when the data set knows it


# -----------------------------------------------------------------------------
# checking single values; `where` says which record, e.g. "facts.json: record 3"


def _error(where: str, field: str, problem: str) -> FactsError:
    return FactsError(f"{where}: field '{field}': {problem}")


def _text(value: object, where: str, field: str) -> str:
    if value is None:
        raise _error(where, field, "is missing")
    if not isinstance(value, str):
        raise _error(where, field, f"must be a non-empty string, got {type(value).__name__}")
    if not value.strip():
        raise _error(where, field, "must be a non-empty string")
    return value


def _prompt(value: object, where: str, field: str) -> str:
    # the edit text is prompt + " " + target, so a trailing space would double the separator
    return _text(value, where, field).rstrip()


def _target(value: object, where: str, field: str) -> str:
    # zsRE stores some objects as " Dickens"; the separating space is ours to add
    return _text(value, where, field).strip()


def _plain(value: str | None, where: str, field: str) -> str | None:
    """`value`, unless it holds a character of CONTROL_CATEGORIES (named, with its position)."""
    for i, char in enumerate(value or ""):
        if unicodedata.category(char) in CONTROL_CATEGORIES and char not in "\t\n":
            name = unicodedata.name(char, "a control character")
            problem = f"holds U+{ord(char):04X} ({name}) at position {i}: {CONTROL_RULE}"
            raise ControlCharacter(f"{where}: field '{field}': {problem}")
    return value


def _check_prompt_length(length: int, where: str, field: str) -> None:
    if length > MAX_PROMPT_CHARS:
        problem = f"makes a prompt of {length} characters; the limit is {MAX_PROMPT_CHARS}"
        raise FactTooLong(f"{where}: field '{field}': {problem}")


def _check_sequences(fact: Fact, where: str, fields: tuple[str, str, str, str]) -> Fact:
    """The fact, unless one of the sequences the engine builds from it is over MAX_FACT_TOKENS
    bytes; `fields` spells (prompt, target, paraphrases, neighbours) as the record does."""
    prompt, target, paraphrases, neighbors = fields
    sequences = [(prompt, fact.prompt, fact.target)]
    sequences += [(f"{paraphrases}[{i}]", p, fact.target) for i, p in enumerate(fact.paraphrases)]
    sequences += [(f"{neighbors}[{i}]", n.prompt, n.target) for i, n in enumerate(fact.neighbors)]
    for field, text, answer in sequences:
        size = len(f"{text} {answer}".encode("utf-8", "surrogatepass"))
        if size > MAX_FACT_TOKENS:
            field = target if field == prompt and len(answer) > len(text) else field
            problem = (
                f"makes a sequence of {size} UTF-8 bytes (up to as many tokens) with its "
                f"answer; the limit is {MAX_FACT_TOKENS}"
            )
            raise FactTooLong(f"{where}: field '{field}': {problem}")
    return fact


def _optional(value: object, where: str, field: str) -> str | None:
    # fact_to_record writes null for an unknown subject or ground truth
    return None if value is None else _target(value, where, field)


def _many(
    value: object, where: str, field: str, clean: Callable[[object, str, str], str]
) -> tuple[str, ...]:
    # dumps of the same data set differ: some hold one string, some a list of them
    if value is None:
        return ()
    if isinstance(value, str):
        return (clean(value, where, field),)
    if not isinstance(value, list | tuple):
        kind = type(value).__name__
        raise _error(where, field, f"must be a string or a list of strings, got {kind}")
    return tuple(clean(item, where, f"{field}[{i}]") for i, item in enumerate(value))


def _pairs(record: dict, where: str, prompt_key: str, target_key: str) -> tuple[Neighbor, ...]:
    prompts = _many(record.get(prompt_key), where, prompt_key, _prompt)
    targets = _many(record.get(target_key), where, target_key, _target)
    if len(prompts) != len(targets):
        problem = f"has {len(targets)} answers for the {len(prompts)} prompts in '{prompt_key}'"
        raise _error(where, target_key, problem)
    return tuple(Neighbor(p, t) for p, t in zip(prompts, targets, strict=True))


def _neighbors(value: object, where: str) -> tuple[Neighbor, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise _error(where, "neighbors", f"must be a list, got {type(value).__name__}")
    neighbors = []
    for i, item in enumerate(value):
        field = f"neighbors[{i}]"
        if isinstance(item, dict):
            prompt = _prompt(item.get("prompt"), where, f"{field}.prompt")
            target = _target(item.get("target"), where, f"{field}.target")
        elif isinstance(item, list | tuple) and len(item) == 2:
            prompt = _prompt(item[0], where, f"{field}[0]")
            target = _target(item[1], where, f"{field}[1]")
        else:
            raise _error(where, field, 'must be {"prompt": ..., "target": ...} or [prompt, target]')
        neighbors.append(Neighbor(prompt, target))
    return tuple(neighbors)


def _relation(value: object, where: str) -> str:
    """The relation as a template or phrase: a relation id is replaced by its template."""
    relation = _text(value, where, "relation").strip()
    if not is_relation_id(relation):
        return relation
    if relation not in RELATIONS:
        problem = f"unknown relation id {relation!r} (the known ids: GET /v1/relations)"
        raise UnknownRelation(f"{where}: field 'relation': {problem}")
    return RELATIONS[relation]


# -----------------------------------------------------------------------------
# one record of each format


def _from_ours(record: dict, where: str) -> Fact:
    subject = _plain(_optional(record.get("subject"), where, "subject"), where, "subject")
    has_prompt = record.get("prompt") is not None
    has_relation = record.get("relation") is not None
    if has_prompt and has_relation:
        raise _error(where, "prompt", "give either 'prompt' or 'relation', not both")
    if has_relation:
        relation = _plain(_relation(record["relation"], where), where, "relation")
        if subject is None:
            raise _error(where, "subject", "is required to fill in 'relation'")
        # a template says where the subject goes ("{} is located in"); a plain phrase follows it;
        # the length is checked before the string is built, which may be a thousandfold larger
        holes = relation.count("{}")
        length = (
            len(relation) + holes * (len(subject) - 2)
            if holes
            else len(subject) + 1 + len(relation)
        )
        _check_prompt_length(length, where, "relation")
        prompt = relation.replace("{}", subject) if holes else f"{subject} {relation}"
    elif has_prompt:
        prompt = _plain(_prompt(record["prompt"], where, "prompt"), where, "prompt")
        _check_prompt_length(len(prompt), where, "prompt")
    else:
        raise _error(where, "prompt", "is missing (give 'prompt', or 'relation' with 'subject')")

    if record.get("target") is not None and record.get("object") is not None:
        raise _error(where, "target", "give either 'target' or 'object', not both")
    target_key = "object" if record.get("object") is not None else "target"
    fact = Fact(
        prompt=prompt,
        target=_plain(_target(record.get(target_key), where, target_key), where, target_key),
        subject=subject,
        paraphrases=_many(record.get("paraphrases"), where, "paraphrases", _prompt),
        neighbors=_neighbors(record.get("neighbors"), where),
        ground_truth=_optional(record.get("ground_truth"), where, "ground_truth"),
    )
    prompt_key = "relation" if has_relation else "prompt"
    return _check_sequences(fact, where, (prompt_key, target_key, "paraphrases", "neighbors"))


def _from_counterfact(record: dict, where: str) -> Fact:
    # some EasyEdit dumps keep every known answer, as a list; the first is the canonical one
    ground_truths = _many(record.get("ground_truth"), where, "ground_truth", _target)
    prompt = _plain(_prompt(record.get("prompt"), where, "prompt"), where, "prompt")
    _check_prompt_length(len(prompt), where, "prompt")
    fact = Fact(
        prompt=prompt,
        target=_plain(_target(record["target_new"], where, "target_new"), where, "target_new"),
        subject=_plain(_optional(record.get("subject"), where, "subject"), where, "subject"),
        paraphrases=_many(record.get("rephrase_prompt"), where, "rephrase_prompt", _prompt),
        neighbors=_pairs(record, where, "locality_prompt", "locality_ground_truth"),
        ground_truth=ground_truths[0] if ground_truths else None,
    )
    fields = ("prompt", "target_new", "rephrase_prompt", "locality_prompt")
    return _check_sequences(fact, where, fields)


def _from_zsre(record: dict, where: str) -> Fact:
    # `answers` are the data set's true objects; `pred` is only what some model once answered
    answers = _many(record.get("answers"), where, "answers", _target)
    ground_truth = answers[0] if answers else _optional(record.get("pred"), where, "pred")
    prompt = _plain(_prompt(record.get("src"), where, "src"), where, "src")
    _check_prompt_length(len(prompt), where, "src")
    fact = Fact(
        prompt=prompt,
        target=_plain(_target(record["alt"], where, "alt"), where, "alt"),
        subject=_plain(_optional(record.get("subject"), where, "subject"), where, "subject"),
        paraphrases=_many(record.get("rephrase"), where, "rephrase", _prompt),
        neighbors=_pairs(record, where, "loc", "loc_ans"),
        ground_truth=ground_truth,
    )
    return _check_sequences(fact, where, ("src", "alt", "rephrase", "loc"))


# -----------------------------------------------------------------------------
# public API


def fact_from_record(record: dict, where: str = "record") -> Fact:
    """Turn one record into a Fact, detecting its format from its keys: a record with
    "target_new" is CounterFact (EasyEdit's flat form), one with "src" and "alt" is zsRE
    (MEND/ROME), anything else is our own form (see the module docstring). Prompts lose trailing
    whitespace and targets lose surrounding whitespace, since the edit text is prompt + " " +
    target. `where` prefixes every error message, e.g. "facts.json: record 3", and the message
    then names the offending field as it is spelled in the record. Raises FactsError."""
    if not isinstance(record, dict):
        raise FactsError(f"{where}: must be a JSON object, got {type(record).__name__}")
    if "target_new" in record:
        return _from_counterfact(record, where)
    if "src" in record and "alt" in record:
        return _from_zsre(record, where)
    return _from_ours(record, where)


def parse_facts(records: list, source: str = "<facts>") -> list[Fact]:
    """Turn a list of records into Facts, in order, with fact_from_record. Errors name the
    record by its 0-based position in the list, e.g. "facts.json: record 3: field 'target': ...",
    and the first bad record raises: nothing is skipped. An empty list raises too ("no facts"),
    because an edit run over nothing is always a mistake upstream. Raises FactsError."""
    if not isinstance(records, list | tuple):
        raise FactsError(f"{source}: expected a list of fact records, got {type(records).__name__}")
    if not records:
        raise FactsError(f"{source}: no facts")
    return [fact_from_record(record, f"{source}: record {i}") for i, record in enumerate(records)]


def load_facts(path: str | Path, limit: int | None = None) -> list[Fact]:
    """Read the facts in a .json file (a list of records, a single record, or an object whose
    "facts" key holds the list) or a .jsonl file (one record per non-blank line; errors name the
    1-based line). With `limit`, only the first `limit` records are read and checked, so a file
    may be used up to its first bad record. A missing file, bytes that are not UTF-8, invalid
    JSON, no records or any bad record raise FactsError; a `limit` below 1 raises ValueError."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of facts, got {limit}")
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FactsError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise FactsError(f"not a file: {path}") from None
    try:
        # utf-8-sig also accepts the byte-order mark that some Windows editors write
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FactsError(f"{source}: not UTF-8 text (invalid byte at offset {e.start})") from None
    if not text.strip():
        raise FactsError(f"{source}: no facts (the file is empty)")

    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _load_jsonl(text, source, limit)
    if suffix != ".json":
        raise FactsError(f"{source}: unknown file type {suffix!r}, expected .json or .jsonl")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise FactsError(f"{source}: invalid JSON at {where}: {e.msg}") from None
    if isinstance(data, dict):
        # {"facts": [...]} wraps the list; any other object is a single record
        data = data.get("facts", [data])
    if isinstance(data, list):
        data = data[:limit]
    return parse_facts(data, source)


def _load_jsonl(text: str, source: str, limit: int | None) -> list[Fact]:
    facts = []
    # split on "\n" only: str.splitlines would also break at U+2028, which JSON allows in strings
    for number, line in enumerate(text.split("\n"), start=1):
        if limit is not None and len(facts) == limit:
            break
        if not line.strip():
            continue
        where = f"{source}: line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise FactsError(f"{where}: invalid JSON at column {e.colno}: {e.msg}") from None
        facts.append(fact_from_record(record, where))
    if not facts:
        raise FactsError(f"{source}: no facts")
    return facts


def fact_to_record(fact: Fact) -> dict:
    """Write a Fact in our own JSON form, with every key present (null for an unknown subject or
    ground truth, empty lists for no paraphrases or neighbors) so that the form is canonical.
    fact_from_record reads it back into an equal Fact."""
    return {
        "prompt": fact.prompt,
        "target": fact.target,
        "subject": fact.subject,
        "paraphrases": list(fact.paraphrases),
        "neighbors": [{"prompt": n.prompt, "target": n.target} for n in fact.neighbors],
        "ground_truth": fact.ground_truth,
    }


def facts_digest(facts: Sequence[Fact]) -> str:
    """A sha256 hex digest that identifies a list of facts, e.g. to tie an edited model to the
    exact edits it received. It hashes the UTF-8 bytes of the facts' fact_to_record forms as
    compact JSON with sorted keys, so it is the same across runs, machines and Python versions,
    and it changes when any fact, any field of one, or their order changes."""
    records = [fact_to_record(fact) for fact in facts]
    canonical = json.dumps(records, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
