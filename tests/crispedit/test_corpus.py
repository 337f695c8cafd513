import gzip
import json
import re

import pytest
import torch

from crispedit.corpus import (
    WIKITEXT,
    CorpusError,
    corpus_files,
    iter_documents,
    pad_batches,
    read_documents,
    sequences_digest,
    token_sequences,
)

# ---------------------------------------------------------------------------------------------
# read_documents: builtin WikiText


@pytest.fixture(scope="module")
def wikitext():
    return read_documents("wikitext"), read_documents("wikitext-heldout")


def test_builtin_wikitext_split(wikitext):
    train, heldout = wikitext
    assert train and heldout
    assert not set(train) & set(heldout)
    assert 0.3 < len(heldout) / (len(train) + len(heldout)) < 0.37
    # the curvature part is the beginning of the file, the heldout part follows it to the end
    raw = WIKITEXT.read_text(encoding="utf-8")
    starts = [raw.find(doc) for doc in (train[0], train[-1], heldout[0], heldout[-1])]
    assert 0 <= starts[0] < 100
    assert starts == sorted(starts)
    assert raw.rstrip().endswith(heldout[-1])


def test_builtin_wikitext_drops_headings(wikitext):
    raw = WIKITEXT.read_text(encoding="utf-8")
    assert re.search(r"^ = [^=].* = $", raw, re.MULTILINE)  # the file has headings...
    heading = re.compile(r"^(= )+.*( =)+$")
    for doc in wikitext[0] + wikitext[1]:  # ...the documents have none
        assert not heading.match(doc), doc
        assert doc == " ".join(doc.split())


# ---------------------------------------------------------------------------------------------
# read_documents: files


def test_text_file_one_document_per_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(
        b"First document.\r\n\r\n  Second   document,\ttabs.  \r\n = Heading = \r\n"
        b"\n = = Sub heading = = \nThird \xc3\xa9t\xc3\xa9.\n\n"
    )
    assert read_documents(path) == ["First document.", "Second document, tabs.", "Third été."]
    assert read_documents(str(path)) == read_documents(path)


def test_jsonl_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    records = [{"text": "alpha beta", "id": 1}, {"text": "   "}, {"text": "= not a heading ="}]
    lines = [json.dumps(r) for r in records]
    lines.insert(1, "")
    path.write_text("\r\n".join([*lines, json.dumps({"text": "multi\nline"})]) + "\n")
    assert read_documents(path) == ["alpha beta", "= not a heading =", "multi\nline"]


@pytest.mark.parametrize("sep", ["\u2028", "\u0085"])
def test_jsonl_unicode_line_separator_inside_text(tmp_path, sep):
    path = tmp_path / "corpus.jsonl"
    text = f"before{sep}after"
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_documents(path) == [text]


@pytest.mark.parametrize(
    ("lines", "lineno", "why"),
    [
        (['{"text": "ok"}', "", '{"text": "broken"'], 3, "invalid JSON"),
        (['{"text": "ok"}', '{"body": "no text"}'], 2, "expected"),
        (['{"text": 5}'], 1, "expected"),
        (['"just a string"'], 1, "expected"),
        (['{"text": "ok"}', "plain text line"], 2, "invalid JSON"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, lines, lineno, why):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=why) as err:
        read_documents(path)
    assert str(path) in str(err.value)
    assert f"line {lineno}:" in str(err.value)


@pytest.mark.parametrize(
    ("name", "data", "why"),
    [
        ("latin1.txt", "café au lait\n".encode("latin-1"), r"not UTF-8 text \(byte 3\)"),
        ("latin1.jsonl", '{"text": "café"}\n'.encode("latin-1"), "not UTF-8"),
        ("blob.txt", b"abc\x00\x00\x01def\n", "binary"),
        ("empty.txt", b"", "no text"),
        ("empty.jsonl", b"\n\n", "no text"),
        ("headings.txt", b" = Title = \n\n = = Section = = \n", "no text"),
        ("blank.jsonl", b'{"text": ""}\n{"text": " "}\n', "no text"),
    ],
)
def test_unreadable_files(tmp_path, name, data, why):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(CorpusError, match=why) as err:
        read_documents(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match="corpus not found") as err:
        read_documents(path)
    assert str(path) in str(err.value)
    with pytest.raises(CorpusError, match="holds no text or JSONL file"):
        read_documents(tmp_path)  # a folder of no corpus file
    with pytest.raises(CorpusError, match="corpus not found"):
        read_documents("wikitext-2")
    with pytest.raises(CorpusError, match="matches no text or JSONL file"):
        read_documents(tmp_path / "*.jsonl")


# ---------------------------------------------------------------------------------------------
# corpora of real size: folders, patterns, gzip, Hugging Face datasets folders, streaming


def write_corpus(root, docs_per_file=3):
    """A folder of two text files, a JSONL file, a gzipped JSONL file in a subfolder, and a
    README that is not corpus text; returns the documents in path order."""
    (root / "sub").mkdir(parents=True)
    (root / "README.md").write_text("not corpus text\n")
    expected = []
    for name in ("a.txt", "b.txt"):
        docs = [f"{name} document {i}" for i in range(docs_per_file)]
        (root / name).write_text("\n".join(docs) + "\n")
        expected += docs
    docs = [f"jsonl document {i}" for i in range(docs_per_file)]
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    expected += docs
    docs = [f"gzipped document {i}" for i in range(docs_per_file)]
    with gzip.open(root / "sub" / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    expected += docs
    return expected


def test_folder_reads_every_corpus_file_in_path_order(tmp_path):
    expected = write_corpus(tmp_path / "corpus")
    assert read_documents(tmp_path / "corpus") == expected
    assert [p.name for p in corpus_files(tmp_path / "corpus")] == [
        "a.txt", "b.txt", "c.jsonl", "d.jsonl.gz"
    ]  # fmt: skip


def test_glob_pattern(tmp_path):
    expected = write_corpus(tmp_path / "corpus")
    assert read_documents(tmp_path / "corpus" / "*.txt") == expected[:6]
    assert read_documents(f"{tmp_path}/corpus/**/*.jsonl*") == expected[6:]


def test_gzip_errors_name_the_file(tmp_path):
    path = tmp_path / "broken.txt.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(CorpusError, match="cannot be read") as err:
        read_documents(path)
    assert str(path) in str(err.value)


def test_utf8_error_offset_counts_from_the_file_start(tmp_path):
    path = tmp_path / "late.txt"
    path.write_bytes("ok line\ncafé\n".encode() + "café\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"byte 17\)"):  # 8 + 6 bytes, then "caf"
        read_documents(path)


def test_hugging_face_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [f"row {i} of a saved dataset" for i in range(600)] + ["  "]
    datasets.Dataset.from_dict({"text": texts, "id": list(range(601))}).save_to_disk(
        tmp_path / "ds"
    )
    assert read_documents(tmp_path / "ds") == texts[:600]  # the blank row is no document
    split = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:5]})})
    split.save_to_disk(tmp_path / "dict")
    assert read_documents(tmp_path / "dict") == texts[:5]


def test_hugging_face_datasets_folder_errors(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(CorpusError, match="no 'text' column \\(it has body\\)"):
        read_documents(tmp_path / "ds")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(
        tmp_path / "dict"
    )
    with pytest.raises(CorpusError, match="no train split \\(it has test\\)"):
        read_documents(tmp_path / "dict")


def test_a_corpus_is_read_only_up_to_the_token_budget(tmp_path, tiny_tokenizer):
    """A corpus far larger than the budget: tokenizing the budget reads one file, and a file
    that is never reached may even be broken."""
    root = tmp_path / "big"
    expected = write_corpus(root, docs_per_file=400)
    (root / "z.txt").write_bytes(b"\x00 never read")
    documents = iter_documents(root)
    sequences = token_sequences(tiny_tokenizer, documents, max_tokens=200)
    assert sum(len(s) for s in sequences) == 200
    assert next(documents) in expected[:400]  # still inside the first file


# ---------------------------------------------------------------------------------------------
# sequences_digest


def test_sequences_digest():
    seqs = [[1, 2, 3], [4, 5]]
    digest = sequences_digest(seqs)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert sequences_digest([list(s) for s in seqs]) == digest
    assert sequences_digest(seqs[::-1]) != digest
    assert sequences_digest([[1, 2, 3], [4, 6]]) != digest
    # sequence boundaries count: the same tokens cut differently are another input
    assert sequences_digest([[1, 2], [3, 4, 5]]) != digest
    assert sequences_digest([[1, 2, 3, 4, 5]]) != digest


# ---------------------------------------------------------------------------------------------
# token_sequences


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def test_token_sequences_budget_and_lengths(tiny_tokenizer, wikitext):
    seqs = token_sequences(tiny_tokenizer, wikitext[0], max_tokens=1000, seq_len=64)
    assert sum(map(len, seqs)) == 1000
    assert all(2 <= len(s) <= 64 for s in seqs)
    assert max(map(len, seqs)) == 64
    default = token_sequences(tiny_tokenizer, wikitext[0], max_tokens=600)
    assert sum(map(len, default)) == 600
    assert all(2 <= len(s) <= 256 for s in default)


def test_token_sequences_split_long_document(tiny_tokenizer, wikitext):
    doc = max(wikitext[0], key=len)
    ids = _ids(tiny_tokenizer, doc)
    assert len(ids) > 3 * 50
    seqs = token_sequences(tiny_tokenizer, [doc], max_tokens=10**9, seq_len=50)
    assert [len(s) for s in seqs[:-1]] == [50] * (len(seqs) - 1)
    if len(ids) % 50 != 1:  # a trailing single token has no label and is dropped
        assert [t for s in seqs for t in s] == ids
    else:
        assert [t for s in seqs for t in s] == ids[:-1]


def test_token_sequences_skips_one_token_documents(tiny_tokenizer):
    long_ids = _ids(tiny_tokenizer, "The quick brown fox jumps over the lazy dog.")
    single = next(w for w in ("a", "the", ",") if len(_ids(tiny_tokenizer, w)) == 1)
    docs = [single, "The quick brown fox jumps over the lazy dog.", single]
    seqs = token_sequences(tiny_tokenizer, docs, max_tokens=10**6, seq_len=256)
    assert seqs == [long_ids]  # one-token documents have no next-token label
    assert token_sequences(tiny_tokenizer, [], max_tokens=10) == []


def test_token_sequences_truncates_last_sequence(tiny_tokenizer):
    docs = ["The quick brown fox jumps over the lazy dog."] * 5
    ids = _ids(tiny_tokenizer, docs[0])
    budget = len(ids) + 3
    seqs = token_sequences(tiny_tokenizer, docs, max_tokens=budget)
    assert seqs == [ids, ids[:3]]


def test_token_sequences_stops_when_one_token_of_budget_is_left(tiny_tokenizer, wikitext):
    """One token cannot form a sequence: stop there, without tokenizing the rest of the corpus."""
    seen = []

    class Docs(list):
        def __iter__(self):
            for doc in super().__iter__():
                seen.append(doc)
                yield doc

    docs = Docs(wikitext[0])
    seqs = token_sequences(tiny_tokenizer, docs, max_tokens=65, seq_len=64)
    assert sum(map(len, seqs)) == 64
    assert all(len(s) >= 2 for s in seqs)
    assert len(seen) < len(docs)


# ---------------------------------------------------------------------------------------------
# pad_batches


def test_pad_batches_right_padding():
    seqs = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15], [16, 17, 18]]
    batches = list(pad_batches(seqs, pad_id=99, batch_size=2))
    assert [b["input_ids"].shape for b in batches] == [(2, 3), (2, 4), (1, 3)]
    first = batches[0]
    assert first["input_ids"].tolist() == [[5, 6, 7], [8, 9, 99]]
    assert first["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batches[1]["input_ids"].tolist() == [[10, 11, 12, 13], [14, 15, 99, 99]]
    assert batches[2]["attention_mask"].tolist() == [[1, 1, 1]]
    for b in batches:
        assert b["input_ids"].dtype == b["attention_mask"].dtype == torch.long
    unpadded = [
        row[mask.bool()].tolist()
        for b in batches
        for row, mask in zip(b["input_ids"], b["attention_mask"], strict=True)
    ]
    assert unpadded == seqs


def test_pad_batches_pad_id_and_default_batch_size(tiny_tokenizer):
    seqs = [[3] * n for n in range(2, 20)]
    batches = list(pad_batches(seqs, pad_id=tiny_tokenizer.pad_token_id))
    assert [len(b["input_ids"]) for b in batches] == [8, 8, 2]
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    assert ids[0, 2:].eq(tiny_tokenizer.pad_token_id).all()
    assert mask.sum(dim=1).tolist() == list(range(2, 10))
    assert list(pad_batches([], pad_id=0)) == []
