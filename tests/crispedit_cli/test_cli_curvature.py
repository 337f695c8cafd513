"""`crispedit curvature build` on the tiny Llama folder of the conftest: the file it writes
and what it records."""

from __future__ import annotations

import os

import torch
from cli_helpers import (
    BUDGET,
    CORPUS_JSONL,
    DEFAULT_LAYERS,
    LAYERS_23,
    stray_stages,
    write_jsonl,
)

from crispedit.corpus import read_documents, sequences_digest, token_sequences
from crispedit.curvature import Curvature
from crispedit.models import load_model, model_fingerprint

# ---------------------------------------------------------------------------------------------
# 1. curvature build


def test_curvature_build_writes_loadable_curvature(cli, tmp_path, tiny_model_dir):
    out = tmp_path / "curv"
    args = ["--corpus", "wikitext", *BUDGET, "--out", out]
    code, stdout, _ = cli("curvature", "build", "--model", tiny_model_dir, *args)
    assert code == 0
    assert sorted(os.listdir(out)) == ["curvature.safetensors"]
    assert str(out / "curvature.safetensors") in stdout
    assert stray_stages(tmp_path) == []

    curvature = Curvature.load(out / "curvature.safetensors")
    assert list(curvature.layers) == DEFAULT_LAYERS
    assert 0 < curvature.tokens <= 300
    assert curvature.kind == "kfac"
    A, B = curvature.layers[DEFAULT_LAYERS[0]].A, curvature.layers[DEFAULT_LAYERS[0]].B
    assert A.shape == (48, 48) and B.shape == (32, 32)  # down_proj: 48 -> 32
    assert A.abs().sum() > 0 and B.abs().sum() > 0
    model, tokenizer = load_model(str(tiny_model_dir))
    meta = curvature.meta
    assert meta["model_fingerprint"] == model_fingerprint(model, DEFAULT_LAYERS)
    sequences = token_sequences(tokenizer, read_documents("wikitext"), 300)
    assert meta["corpus_digest"] == sequences_digest(sequences)
    assert meta["key"]["tokens"] == sum(map(len, sequences)) == 300
    assert meta["labels"] == "empirical"
    assert meta["kind"] == "kfac"
    assert meta["layers"] == DEFAULT_LAYERS


def test_curvature_build_layer_range(curv_kfac):
    curvature = Curvature.load(curv_kfac)  # a folder works as well as the file
    assert list(curvature.layers) == LAYERS_23
    assert curvature.meta["layers"] == LAYERS_23


def test_curvature_build_records_labels_sampled(cli, tmp_path, tiny_model_dir, curv_kfac):
    out = tmp_path / "sampled"
    args = ["--layers", "2-3", "--labels", "sampled", *BUDGET, "--out", out]
    code, _, _ = cli("curvature", "build", "--model", tiny_model_dir, *args)
    assert code == 0
    sampled, empirical = Curvature.load(out), Curvature.load(curv_kfac)
    assert sampled.meta["labels"] == "sampled"
    assert empirical.meta["labels"] == "empirical"
    for name in LAYERS_23:
        # A only sees the inputs; B sees the gradients of the labels, which now differ
        assert torch.equal(sampled.layers[name].A, empirical.layers[name].A)
        assert not torch.allclose(sampled.layers[name].B, empirical.layers[name].B)


def test_curvature_build_records_kind_ekfac(curv_ekfac, curv_kfac):
    ekfac, kfac = Curvature.load(curv_ekfac), Curvature.load(curv_kfac)
    assert ekfac.meta["kind"] == "ekfac" and ekfac.kind == "ekfac"
    assert kfac.meta["kind"] == "kfac" and kfac.kind == "kfac"
    for name in LAYERS_23:
        layer = ekfac.layers[name]
        assert layer.ekfac is not None and layer.U_A is not None and layer.U_B is not None
        assert layer.ekfac.shape == (32, 48)
        assert kfac.layers[name].ekfac is None
        assert torch.equal(layer.A, kfac.layers[name].A)
        assert torch.equal(layer.B, kfac.layers[name].B)


def test_curvature_build_from_jsonl_corpus(cli, tmp_path, tiny_model_dir):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS_JSONL)
    out = tmp_path / "curv"
    code, _, _ = cli(
        "curvature", "build", "--model", tiny_model_dir, "--corpus", corpus, *BUDGET, "--out", out
    )
    assert code == 0
    curvature = Curvature.load(out)
    assert 0 < curvature.tokens < 300  # the file is smaller than the budget
    assert curvature.meta["corpus"] == str(corpus)
    _, tokenizer = load_model(str(tiny_model_dir))
    texts = [r["text"] for r in CORPUS_JSONL]
    assert curvature.meta["corpus_digest"] == sequences_digest(
        token_sequences(tokenizer, texts, 300)
    )
    wiki = token_sequences(tokenizer, read_documents("wikitext"), 300)
    assert curvature.meta["corpus_digest"] != sequences_digest(wiki)
