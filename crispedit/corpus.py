"""Text corpora: read documents, and cut them into padded token batches.

The capability corpus (what the curvature protects) is plain text or JSONL. The bundled default is
WikiText-2 (`crispedit/assets/wiki.test.raw`): its first two thirds are the curvature corpus
(`wikitext`), its last third is held out for perplexity (`wikitext-heldout`), so an evaluation never
reuses text the projector was built from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
WIKITEXT = ASSETS / "wiki.test.raw"
BUILTIN = {"wikitext": (0.0, 2 / 3), "wikitext-heldout": (2 / 3, 1.0)}
SEQ_LEN = 256  # tokens per sequence; longer documents are cut into several
BATCH_SIZE = 8


class CorpusError(ValueError):
    """A corpus file that cannot be read as text documents; the message names file and line."""


def read_documents(source: str | Path) -> list[str]:
    """Read a corpus as a list of documents.

    `source` is a builtin name (`wikitext`, `wikitext-heldout`), a `.jsonl` file whose lines are
    objects with a `text` string, or a plain UTF-8 text file with one document per line (as
    WikiText and most corpus dumps). WikiText headings (`= Title =`) are dropped: not prose.
    """
    if str(source) in BUILTIN:
        docs = _text_documents(WIKITEXT)
        lo, hi = BUILTIN[str(source)]
        return docs[round(lo * len(docs)) : round(hi * len(docs))]
    path = Path(source)
    if not path.is_file():
        raise CorpusError(f"corpus not found: {source} (a file, or one of {', '.join(BUILTIN)})")
    docs = _jsonl_documents(path) if path.suffix == ".jsonl" else _text_documents(path)
    if not docs:
        raise CorpusError(f"corpus {path} holds no text")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM is not text
    except UnicodeDecodeError as err:
        raise CorpusError(f"corpus {path} is not UTF-8 text (byte {err.start})") from err


def _text_documents(path: Path) -> list[str]:
    text = _read_text(path)
    if "\x00" in text:
        raise CorpusError(f"corpus {path} is binary, not text")
    # split on "\n" only: str.splitlines also breaks at U+2028 and U+0085, which are prose
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return [s for s in lines if s and not (s.startswith("= ") and s.endswith(" ="))]


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"corpus {path}: line {lineno}: invalid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f'corpus {path}: line {lineno}: expected {{"text": "..."}}')
        if record["text"].strip():
            docs.append(record["text"])
    return docs


def sequences_digest(sequences: list[list[int]]) -> str:
    """sha256 of token sequences: the exact input of a curvature (text, tokenizer, budget and
    sequence length at once), the corpus part of its key in the store."""
    h = hashlib.sha256()
    for seq in sequences:
        h.update(json.dumps(seq, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def token_sequences(tokenizer, documents: list[str], max_tokens: int, seq_len: int = SEQ_LEN):
    """Tokenize documents into sequences of at most `seq_len` tokens, `max_tokens` in total.

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
