"""`crispedit corpus generate` on the tiny Llama folder of the conftest: the JSONL corpus it writes,
read back by `curvature build --corpus`, and the inputs it refuses before loading the model."""

from __future__ import annotations

import functools

import pytest
from cli_helpers import BUDGET

import crispedit.generated
import crispedit_cli.corpus
from crispedit.corpus import read_documents
from crispedit.curvature import Curvature


@pytest.fixture
def small_documents(monkeypatch):
    """Documents of 24 tokens, 4 at a time: the command's corpus in a few seconds."""
    small = functools.partial(crispedit.generated.generate_corpus, doc_tokens=24, batch_size=4)
    monkeypatch.setattr(crispedit.generated, "generate_corpus", small)


def test_generate_writes_a_corpus_that_curvature_build_reads(
    cli, tmp_path, tiny_model_dir, small_documents
):
    out = tmp_path / "corpora" / "generated.jsonl"  # missing folders are created
    code, stdout, err = cli("corpus", "generate", "--model", tiny_model_dir, "--tokens", 120,
                            "--out", out)  # fmt: skip
    assert code == 0, err
    assert read_documents(out)
    assert "tokens/s" in stdout and "seed 0" in stdout and stdout.strip().endswith(f"-> {out}")
    code, _, err = cli("corpus", "generate", "--model", tiny_model_dir, "--tokens", 120,
                       "--out", tmp_path / "again.jsonl")  # fmt: skip
    assert (tmp_path / "again.jsonl").read_bytes() == out.read_bytes()
    code, _, err = cli("corpus", "generate", "--model", tiny_model_dir, "--tokens", 120,
                       "--out", tmp_path / "seed1.jsonl", "--seed", 1)  # fmt: skip
    assert (tmp_path / "seed1.jsonl").read_bytes() != out.read_bytes()

    curv = tmp_path / "curv"
    code, _, err = cli("curvature", "build", "--model", tiny_model_dir, "--corpus", out,
                       "--tokens", 100, "--out", curv)  # fmt: skip
    assert code == 0, err
    curvature = Curvature.load(curv)
    assert curvature.meta["corpus"] == str(out) and curvature.meta["key"]["tokens"] == 100


@pytest.mark.parametrize(
    ("args", "message"),
    (
        (["--tokens", 0], "--tokens must be at least 1, not 0"),
        (["--tokens", -5], "--tokens must be at least 1, not -5"),
        ([*BUDGET, "--temperature", 0], "the temperature must be above 0"),
        ([*BUDGET, "--top-p", 1.5], "top_p must be above 0 and at most 1"),
    ),
)
def test_bad_settings_fail_in_one_line_and_write_nothing(
    cli, tmp_path, tiny_model_dir, monkeypatch, args, message
):
    monkeypatch.setattr(crispedit_cli.corpus, "load_model_of", lambda args: pytest.fail("loaded"))
    out = tmp_path / "generated.jsonl"
    code, stdout, err = cli("corpus", "generate", "--model", tiny_model_dir, "--out", out, *args)
    assert code == 2 and stdout == ""
    assert err.startswith("crispedit: error: ") and err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_cannot_be_a_file_fails_in_one_line(cli, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(crispedit_cli.corpus, "load_model_of", lambda args: pytest.fail("loaded"))
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    for out, message in (
        (tmp_path / "a-folder", "is a folder, not a file"),
        (tmp_path / "a-file" / "sub" / "c.jsonl", f"{tmp_path / 'a-file'} is not a folder"),
    ):
        code, stdout, err = cli("corpus", "generate", "--model", tiny_model_dir, *BUDGET,
                                "--out", out)  # fmt: skip
        assert code == 2 and stdout == "" and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"]
    assert list((tmp_path / "a-folder").iterdir()) == []
