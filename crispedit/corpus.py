"""Text corpora: read documents, and cut them into padded token batches.

The capability corpus (what the curvature protects) is plain text or JSONL files, a folder or glob
of them, or a local Hugging Face `datasets` folder, streamed a document at a time and tokenized
only up to the token budget, so a corpus of any size costs the budget's memory. The bundled
default is WikiText-2 (`crispedit/assets/wiki.test.raw`): its first two thirds are the curvature
corpus (`wikitext`), its last third is held out for perplexity (`wikitext-heldout`), so an
evaluation never reuses text the projector was built from.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
WIKITEXT = ASSETS / "wiki.test.raw"
BUILTIN = {"wikitext": (0.0, 2 / 3), "wikitext-heldout": (2 / 3, 1.0)}
SEQ_LEN = 256  # tokens per sequence; longer documents are cut into several
BATCH_SIZE = 8


TEXT_FIELD = "text"  # the field of a JSONL record or a dataset row that holds a document
# Files a corpus folder or glob contributes: plain text (one document per line) and JSONL, either
# of them gzip-compressed; anything else in a folder (READMEs, licences, configs) is skipped.
TEXT_SUFFIXES = (".txt", ".raw", ".text")
JSONL_SUFFIXES = (".jsonl",)
GLOB_CHARS = "*?["
BOM = b"\xef\xbb\xbf"


class CorpusError(ValueError):
    """A corpus that cannot be read as text documents; the message names file and line."""


def read_documents(source: str | Path) -> list[str]:
    """Every document of a corpus, as a list (for the small corpora evaluation reads whole); a
    capability corpus of real size is streamed with `iter_documents` instead."""
    return list(iter_documents(source))


def iter_documents(source: str | Path, text_field: str = TEXT_FIELD) -> Iterator[str]:
    """Yield a corpus's documents one at a time, never holding the corpus in memory.

    `source` is a builtin name (`wikitext`, `wikitext-heldout`); a plain UTF-8 text file with one
    document per line (as WikiText and most corpus dumps; WikiText headings `= Title =` are
    dropped: not prose); a `.jsonl` file whose lines are objects with a `text` string; either of
    them gzip-compressed (`.gz`); a folder, read as every such file under it in path order; a glob
    pattern (`data/*.jsonl`, `**` recursive) matching such files; or a local Hugging Face
    `datasets` folder (written by `save_to_disk`; its `train` split for a DatasetDict), read row
    by row from its memory-mapped Arrow files. Refuses, naming the file (and line), a path that
    does not exist, a file that is not UTF-8 text, a bad JSONL record, and a corpus with no text.
    """
    if str(source) in BUILTIN:
        docs = list(_text_documents(WIKITEXT))
        lo, hi = BUILTIN[str(source)]
        yield from docs[round(lo * len(docs)) : round(hi * len(docs))]
        return
    path = Path(source)
    if _is_hf_dataset(path):
        documents = _dataset_documents(path, text_field)
    else:
        files = corpus_files(source)
        documents = (doc for file in files for doc in _file_documents(file, text_field))
    empty = True
    for doc in documents:
        empty = False
        yield doc
    if empty:
        raise CorpusError(f"corpus {source} holds no text")


def corpus_files(source: str | Path) -> list[Path]:
    """The files a corpus path names: the file itself, the text and JSONL files under a folder,
    or those a glob pattern matches, in path order."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and _kind(f) is not None)
        if not files:
            raise CorpusError(f"corpus folder {path} holds no text or JSONL file ({_suffixes()})")
        return files
    if any(c in str(source) for c in GLOB_CHARS):
        matches = sorted(Path(m) for m in glob.glob(str(source), recursive=True))
        files = [f for f in matches if f.is_file() and _kind(f) is not None]
        if not files:
            raise CorpusError(f"corpus pattern {source} matches no text or JSONL file")
        return files
    raise CorpusError(
        f"corpus not found: {source} (a file, a folder, a glob pattern, "
        f"a Hugging Face datasets folder, or one of {', '.join(BUILTIN)})"
    )


def _suffixes() -> str:
    return ", ".join(s + gz for s in (*TEXT_SUFFIXES, *JSONL_SUFFIXES) for gz in ("", ".gz"))


def _kind(path: Path) -> str | None:
    """`jsonl` or `text` for a file a folder or pattern contributes, None for any other."""
    name = path.name.removesuffix(".gz")
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text" if name.endswith(TEXT_SUFFIXES) else None


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    """A file named directly is JSONL when it says so, else text, whatever its suffix."""
    if _kind(path) == "jsonl":
        return _jsonl_documents(path, text_field)
    return _text_documents(path)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file, gzip-compressed or not, split on "\n" only (
    str.splitlines also breaks at U+2028 and U+0085, which are prose), read a line at a time."""
    opener = gzip.open if path.suffix == ".gz" else open
    offset = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                data = raw[len(BOM) :] if lineno == 1 and raw.startswith(BOM) else raw  # not text
                try:
                    line = data.decode("utf-8")
                except UnicodeDecodeError as err:
                    where = offset + len(raw) - len(data) + err.start
                    raise CorpusError(f"corpus {path} is not UTF-8 text (byte {where})") from err
                if "\x00" in line:
                    raise CorpusError(f"corpus {path} is binary, not text")
                offset += len(raw)
                yield lineno, line.removesuffix("\n")
    except (OSError, EOFError) as err:  # a truncated or non-gzip .gz file
        raise CorpusError(f"corpus {path} cannot be read: {err}") from err


def _text_documents(path: Path) -> Iterator[str]:
    for _, line in _lines(path):
        s = " ".join(line.split())
        if s and not (s.startswith("= ") and s.endswith(" =")):
            yield s


def _jsonl_documents(path: Path, text_field: str = TEXT_FIELD) -> Iterator[str]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"corpus {path}: line {lineno}: invalid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise CorpusError(f'corpus {path}: line {lineno}: expected {{"{text_field}": "..."}}')
        if record[text_field].strip():
            yield record[text_field]


def _is_hf_dataset(path: Path) -> bool:
    """A folder written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    return path.is_dir() and any(
        (path / name).is_file() for name in ("state.json", "dataset_dict.json")
    )


def _dataset_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:
        raise CorpusError(
            f"corpus {path} is a Hugging Face datasets folder: pip install datasets "
            "(or crispedit-service[corpus])"
        ) from err
    dataset = datasets.load_from_disk(str(path))  # memory-mapped: rows are read as iterated
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            splits = ", ".join(dataset)
            raise CorpusError(f"corpus {path} has no train split (it has {splits})")
        dataset = dataset["train"]
    if text_field not in dataset.column_names:
        columns = ", ".join(dataset.column_names)
        raise CorpusError(f"corpus {path} has no {text_field!r} column (it has {columns})")
    for batch in dataset.iter(batch_size=256):
        for text in batch[text_field]:
            if isinstance(text, str) and text.strip():
                yield text


def sequences_digest(sequences: list[list[int]]) -> str:
    """sha256 of token sequences: the exact input of a curvature (text, tokenizer, budget and
    sequence length at once), the corpus part of its key in the store."""
    h = hashlib.sha256()
    for seq in sequences:
        h.update(json.dumps(seq, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def token_sequences(
    tokenizer, documents: Iterable[str], max_tokens: int, seq_len: int = SEQ_LEN
) -> list[list[int]]:
    """Tokenize documents into sequences of at most `seq_len` tokens, `max_tokens` in total.

    `documents` may be a stream (`iter_documents`): it is read only until the budget is spent.

    Sequences shorter than 2 tokens carry no next-token label and are skipped. The last sequence is
    truncated so the total is `max_tokens` when the corpus is large enough (or one less, when a
    single token of budget is left: it could not form a sequence).
    """
    sequences, total = [], 0
    for doc in documents:
        if max_tokens - total < 2:
            break
        ids = tokenizer(doc, add_special_tokens=True)["input_ids"]
        for start in range(0, len(ids), seq_len):
            chunk = ids[start : start + seq_len][: max_tokens - total]
            if len(chunk) < 2:
                continue
            sequences.append(chunk)
            total += len(chunk)
            if total >= max_tokens:
                return sequences
    return sequences


def pad_batches(
    sequences: list[list[int]], pad_id: int, batch_size: int = BATCH_SIZE
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield right-padded batches `{input_ids, attention_mask}` of the given sequences."""
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        yield {"input_ids": ids, "attention_mask": mask}
