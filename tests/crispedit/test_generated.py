"""A corpus the tiny Llama writes itself: reproducible from its seed, as long as asked, read back by
`crispedit.corpus`, a curvature from it, on the logical accelerator and in bf16."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny
from devices import accelerator

from crispedit.corpus import read_documents, sequences_digest, token_sequences
from crispedit.curvature import plan_curvature, run_recipe
from crispedit.generated import STARTERS, generate_corpus, sample_next

SMALL = {"doc_tokens": 24, "batch_size": 4, "progress": False}  # a few documents, fast
TOKENS = 150


@pytest.fixture(scope="module")
def llama():
    return make_tiny("llama")


@pytest.fixture(scope="module")
def corpus(llama, tiny_tokenizer, tmp_path_factory):
    """A generated corpus of the tiny Llama (seed 0) and what `generate_corpus` said of it."""
    out = tmp_path_factory.mktemp("generated") / "corpus.jsonl"
    return out, generate_corpus(llama, tiny_tokenizer, out, TOKENS, **SMALL)


def read_tokens(tokenizer, path, budget: int = 10**6) -> list[list[int]]:
    return token_sequences(tokenizer, read_documents(path), budget, SMALL["doc_tokens"])


def test_the_corpus_holds_the_tokens_asked_for_as_jsonl(corpus, tiny_tokenizer):
    out, info = corpus
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records and all(set(r) == {"text"} and r["text"].strip() for r in records)
    docs = read_documents(out)
    assert docs == [r["text"] for r in records] and info["documents"] == len(docs)
    counts = [len(tiny_tokenizer(d, add_special_tokens=True)["input_ids"]) for d in docs]
    # at least the tokens asked for, and less than one document more
    assert info["tokens"] == sum(counts) and TOKENS <= info["tokens"] < TOKENS + counts[-1]
    # documents start from the starters in turn, a batch to each
    assert docs[0].startswith(STARTERS[0]) and docs[SMALL["batch_size"]].startswith(STARTERS[1])
    assert info["seed"] == 0 and info["temperature"] == 1.0 and info["top_p"] == 1.0
    assert info["seconds"] > 0 and len(info["model_fingerprint"]) == 32


def test_a_seed_reproduces_its_corpus_and_another_seed_does_not(
    corpus, llama, tiny_tokenizer, tmp_path
):
    out, _ = corpus
    generate_corpus(llama, tiny_tokenizer, tmp_path / "again.jsonl", TOKENS, **SMALL)
    assert (tmp_path / "again.jsonl").read_bytes() == out.read_bytes()
    generate_corpus(llama, tiny_tokenizer, tmp_path / "seed1.jsonl", TOKENS, seed=1, **SMALL)
    assert (tmp_path / "seed1.jsonl").read_bytes() != out.read_bytes()


def test_a_curvature_from_the_generated_corpus_is_keyed_by_its_text(corpus, llama, tiny_tokenizer):
    out, _ = corpus
    recipe = plan_curvature(llama, tiny_tokenizer, out, tokens=100, layers="2-3", seq_len=24)
    wiki = plan_curvature(llama, tiny_tokenizer, "wikitext", tokens=100, layers="2-3", seq_len=24)
    assert recipe.key_fields["tokens"] == 100
    assert recipe.key_fields["corpus_digest"] == sequences_digest(
        read_tokens(tiny_tokenizer, out, 100)
    )
    assert recipe.key_fields["corpus_digest"] != wiki.key_fields["corpus_digest"]
    curvature = run_recipe(llama, tiny_tokenizer, recipe, batch_size=2, progress=False)
    assert curvature.tokens > 0 and curvature.meta["corpus"] == str(out)
    for layer in curvature.layers.values():
        assert torch.isfinite(layer.A).all() and layer.A.abs().sum() > 0


def test_sampling_settings_change_the_corpus(corpus, llama, tiny_tokenizer, tmp_path):
    out, _ = corpus
    for name, settings in {"cool": {"temperature": 0.5}, "top-p": {"top_p": 0.5}}.items():
        info = generate_corpus(llama, tiny_tokenizer, tmp_path / name, TOKENS, **settings, **SMALL)
        assert (tmp_path / name).read_bytes() != out.read_bytes()
        assert info["temperature"] == settings.get("temperature", 1.0)


def test_top_p_keeps_the_most_likely_tokens_reaching_it():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(200, 1)
    draws = sample_next(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8: the first two
    assert set(sample_next(logits, 1.0, 0.1, torch.Generator()).tolist()) == {0}


def test_on_the_accelerator_the_corpus_is_the_cpus(llama, tiny_tokenizer, tmp_path):
    generate_corpus(llama, tiny_tokenizer, tmp_path / "here.jsonl", 40, **SMALL)  # one batch
    with accelerator() as dev:
        model = make_tiny("llama").to(dev)
        generate_corpus(model, tiny_tokenizer, tmp_path / "there.jsonl", 40, **SMALL)
    # the same draws, from logits equal to rounding (the host draws them)
    assert (tmp_path / "there.jsonl").read_bytes() == (tmp_path / "here.jsonl").read_bytes()


def test_a_bf16_model_writes_a_corpus(tiny_tokenizer, tmp_path):
    model = make_tiny("llama").to(torch.bfloat16)
    info = generate_corpus(model, tiny_tokenizer, tmp_path / "bf16.jsonl", TOKENS, **SMALL)
    assert info["tokens"] >= TOKENS and read_documents(tmp_path / "bf16.jsonl")
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "bad", ({"tokens": 0}, {"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"doc_tokens": 1})
)
def test_bad_settings_are_refused_and_write_nothing(llama, tiny_tokenizer, tmp_path, bad):
    kwargs = {"tokens": TOKENS, **SMALL, **bad}
    with pytest.raises(ValueError):
        generate_corpus(llama, tiny_tokenizer, tmp_path / "c.jsonl", **kwargs)
    assert list(tmp_path.iterdir()) == []
