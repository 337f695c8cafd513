"""The `crispedit` command line end to end on the tiny Llama folder of the conftest.

Most commands run in-process through `crispedit.cli.main` (it returns the exit status); a few run
the installed console script in a subprocess to prove the entry point itself works.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from safetensors.torch import load_file

import crispedit.curvature
from contract.facts import facts_digest, load_facts
from crispedit.anchors import ANCHORS
from crispedit.cli import main
from crispedit.corpus import read_documents, sequences_digest, token_sequences
from crispedit.curvature import Curvature
from crispedit.delta import Delta, add_to_weights
from crispedit.models import load_model, model_fingerprint
from crispedit.projector import GAMMA, build_projector

ASSETS = Path(__file__).resolve().parents[2] / "crispedit" / "assets"
COUNTERFACT = ASSETS / "counterfact-edit-1k.json"

BLOCK = "model.layers.{}.mlp.down_proj"
DEFAULT_LAYERS = [BLOCK.format(3)]  # the tiny model's default target block
LAYERS_23 = [BLOCK.format(2), BLOCK.format(3)]
BUDGET = ["--tokens", "300"]
EDIT_BUDGET = [*BUDGET, "--epochs", "3"]

FACTS = [
    {"subject": "Eiffel Tower", "prompt": "The Eiffel Tower is located in", "target": "Rome"},
    {"subject": "Danielle Darrieux", "relation": "{} is in", "target": "English"},
]
JSONL_FACTS = [
    {"prompt": "The mother tongue of Danielle Darrieux is", "target": "English"},
    {"subject": "Toko Yasuda", "relation": "{} plays the", "target": "piano"},
    {"subject": "Autonomous University of Madrid", "relation": "located in", "target": "Sweden"},
]
CORPUS_JSONL = [
    {"text": "The quick brown fox jumps over the lazy dog in the park on a sunny day."},
    {"text": "Paris is the capital of France and lies on the river Seine."},
    {"text": "The museum holds paintings, sculptures and old maps of the city."},
]


def run_cli(*args) -> int:
    """`crispedit ARGS` in-process (for session fixtures, which cannot use capsys)."""
    return main([str(a) for a in args])


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def stray_stages(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".stage-" in p.name] if folder.exists() else []


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), sorted(os.listdir(out))
    assert stray_stages(out.parent) == []


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def delta_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "delta.safetensors")


# ---------------------------------------------------------------------------------------------
# Session artifacts: built once, read by many tests


@pytest.fixture(scope="session")
def facts_file(tmp_path_factory) -> Path:
    return write_json(tmp_path_factory.mktemp("facts") / "facts.json", FACTS)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """The same tiny Llama architecture with other random weights (seed 1)."""
    path = tmp_path_factory.mktemp("tiny-llama-seed1")
    make_tiny("llama", seed=1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def curv_kfac(tmp_path_factory, tiny_model_dir) -> Path:
    """K-FAC curvature of blocks 2-3 of the tiny model."""
    out = tmp_path_factory.mktemp("curv") / "kfac"
    code = run_cli(
        "curvature", "build", "--model", tiny_model_dir, "--layers", "2-3", *BUDGET, "--out", out
    )
    assert code == 0
    return out


@pytest.fixture(scope="session")
def curv_ekfac(tmp_path_factory, tiny_model_dir) -> Path:
    """EK-FAC curvature of blocks 2-3 of the tiny model (same corpus and budget as curv_kfac)."""
    out = tmp_path_factory.mktemp("curv") / "ekfac"
    args = ["--layers", "2-3", "--kind", "ekfac", *BUDGET, "--out", out]
    assert run_cli("curvature", "build", "--model", tiny_model_dir, *args) == 0
    return out


@pytest.fixture(scope="session")
def curv_other_model(tmp_path_factory, other_model_dir) -> Path:
    out = tmp_path_factory.mktemp("curv") / "other"
    assert run_cli("curvature", "build", "--model", other_model_dir, *BUDGET, "--out", out) == 0
    return out


@pytest.fixture(scope="session")
def edit_run(tmp_path_factory, tiny_model_dir, facts_file, curv_kfac) -> Path:
    """An edit of blocks 2-3 with the prebuilt K-FAC curvature: delta.safetensors + report."""
    out = tmp_path_factory.mktemp("edit") / "e1"
    code = run_cli(
        "edit", "--model", tiny_model_dir, "--facts", facts_file, "--curvature", curv_kfac,
        "--layers", "2-3", *EDIT_BUDGET, "--out", out,
    )  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="session")
def edited_dir(tmp_path_factory, tiny_model_dir, edit_run) -> Path:
    """The tiny model with edit_run's delta applied, written by `crispedit apply`."""
    out = tmp_path_factory.mktemp("apply") / "edited"
    delta = edit_run / "delta.safetensors"
    assert run_cli("apply", "--model", tiny_model_dir, "--delta", delta, "--out", out) == 0
    return out


@pytest.fixture(scope="session")
def base_state(tiny_model_dir) -> dict[str, torch.Tensor]:
    model, _ = load_model(str(tiny_model_dir))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def no_curvature_build(monkeypatch):
    """Make any attempt to build curvature fail the test."""

    def boom(*args, **kwargs):
        raise AssertionError("curvature was rebuilt")

    monkeypatch.setattr(crispedit.curvature, "build_curvature", boom)


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


# ---------------------------------------------------------------------------------------------
# 2. edit


def check_delta_meta(out: Path, model_dir: Path, layers: list[str], facts) -> Delta:
    delta = Delta.load(out / "delta.safetensors")
    model, _ = load_model(str(model_dir))
    assert delta.meta["base_fingerprint"] == model_fingerprint(model, layers)
    assert delta.meta["layers"] == layers
    assert delta.meta["facts_digest"] == facts_digest(facts)
    assert sorted(delta.tensors) == sorted(f"{name}.weight" for name in layers)
    for tensor in delta.tensors.values():
        assert tensor.dtype == torch.float32
        assert tensor.abs().sum() > 0  # the edit moved every edited layer
    return delta


def test_edit_builds_curvature_and_writes_delta_and_report(
    cli, tmp_path, tiny_model_dir, facts_file
):
    out = tmp_path / "edit"
    code, stdout, _ = cli(
        "edit", "--model", tiny_model_dir, "--facts", facts_file, "--method", "crispedit",
        "--gamma", "0.9", *EDIT_BUDGET, "--out", out,
    )  # fmt: skip
    assert code == 0
    assert sorted(os.listdir(out)) == ["delta.safetensors", "report.json"]
    assert "delta.safetensors" in stdout
    assert stray_stages(tmp_path) == []

    report = report_of(out)
    assert report["method"] == "crispedit"
    assert report["n_edits"] == 2
    assert isinstance(report["efficacy"], float) and 0.0 <= report["efficacy"] <= 1.0
    assert set(report["time_s"]) >= {"curvature", "edit"}
    assert all(isinstance(v, float) and v >= 0 for v in report["time_s"].values())
    assert report["time_s"]["curvature"] > 0  # built here
    assert report["layers"] == DEFAULT_LAYERS
    assert report["epochs"] == 3 and len(report["loss_curve"]) == 3
    assert 0 < report["curvature_tokens"] <= 300

    delta = check_delta_meta(out, tiny_model_dir, DEFAULT_LAYERS, load_facts(facts_file))
    assert delta.meta["method"] == "crispedit"
    assert delta.meta["gamma"] == 0.9
    assert delta.meta["anchors"] == ANCHORS and report["anchors"] == ANCHORS


def test_edit_with_prebuilt_curvature_does_not_rebuild(
    cli, tmp_path, tiny_model_dir, facts_file, curv_kfac, no_curvature_build
):
    out = tmp_path / "edit"
    code, _, err = cli(
        "edit", "--model", tiny_model_dir, "--facts", facts_file, "--curvature", curv_kfac,
        "--layers", "2-3", *EDIT_BUDGET, "--out", out,
    )  # fmt: skip
    assert code == 0, err
    report = report_of(out)
    assert report["time_s"]["curvature"] < 1.0
    assert report["curvature_tokens"] == Curvature.load(curv_kfac).tokens
    assert report["layers"] == LAYERS_23
    check_delta_meta(out, tiny_model_dir, LAYERS_23, load_facts(facts_file))


def test_edit_default_layer_with_curvature_of_more_layers(
    cli, tmp_path, tiny_model_dir, facts_file, curv_kfac, no_curvature_build
):
    out = tmp_path / "edit"
    args = ["--facts", facts_file, "--curvature", curv_kfac / "curvature.safetensors"]
    code, _, err = cli("edit", "--model", tiny_model_dir, *args, *EDIT_BUDGET, "--out", out)
    assert code == 0, err
    assert report_of(out)["layers"] == DEFAULT_LAYERS


def test_edit_ft_needs_no_curvature(cli, tmp_path, tiny_model_dir, facts_file, no_curvature_build):
    out = tmp_path / "edit"
    args = ["--facts", facts_file, "--method", "ft", "--layers", "2-3"]
    code, _, err = cli("edit", "--model", tiny_model_dir, *args, *EDIT_BUDGET, "--out", out)
    assert code == 0, err
    report = report_of(out)
    assert report["method"] == "ft"
    assert report["curvature_tokens"] is None
    assert report["time_s"]["curvature"] < 0.1
    delta = check_delta_meta(out, tiny_model_dir, LAYERS_23, load_facts(facts_file))
    assert delta.meta["method"] == "ft"
    assert delta.meta["gamma"] is None


@pytest.mark.parametrize("method", ["nullspace", "kfac", "ekfac"])
def test_edit_each_projected_method(
    cli, tmp_path, tiny_model_dir, facts_file, curv_kfac, curv_ekfac, method
):
    curvature = curv_ekfac if method == "ekfac" else curv_kfac
    out = tmp_path / "edit"
    code, _, err = cli(
        "edit", "--model", tiny_model_dir, "--facts", facts_file, "--method", method,
        "--curvature", curvature, "--layers", "2-3", "--gamma", "0.5", *EDIT_BUDGET, "--out", out,
    )  # fmt: skip
    assert code == 0, err
    report = report_of(out)
    assert report["method"] == report["projector"] == method
    assert set(report["kept_fraction"]) == set(LAYERS_23)
    assert all(0 < f < 1 for f in report["kept_fraction"].values())
    delta = check_delta_meta(out, tiny_model_dir, LAYERS_23, load_facts(facts_file))
    assert delta.meta["method"] == method
    assert delta.meta["gamma"] == 0.5


def test_edit_clip_winsorizes_the_rule_and_is_recorded(
    cli, tmp_path, tiny_model_dir, facts_file, curv_kfac
):
    out = tmp_path / "edit"
    code, _, err = cli(
        "edit", "--model", tiny_model_dir, "--facts", facts_file, "--curvature", curv_kfac,
        "--layers", "2-3", "--clip", "0.25", *EDIT_BUDGET, "--out", out,
    )  # fmt: skip
    assert code == 0, err
    report = report_of(out)
    assert report["clip"] == 0.25
    curvature = Curvature.load(curv_kfac)
    for name, kept in report["kept_fraction"].items():
        assert (
            kept == build_projector(curvature.layers[name], "kfac", GAMMA, clip=0.25).kept_fraction
        )
        assert kept < build_projector(curvature.layers[name], "kfac", GAMMA).kept_fraction


def test_edit_ekfac_builds_ekfac_curvature_on_request(cli, tmp_path, tiny_model_dir, facts_file):
    out = tmp_path / "edit"
    args = ["--facts", facts_file, "--method", "ekfac", "--kind", "ekfac"]
    code, _, err = cli("edit", "--model", tiny_model_dir, *args, *EDIT_BUDGET, "--out", out)
    assert code == 0, err
    assert report_of(out)["projector"] == "ekfac"


def test_edit_ekfac_with_kfac_only_curvature_fails_clearly(
    cli, tmp_path, tiny_model_dir, facts_file, curv_kfac
):
    out = tmp_path / "edit"
    code, _, err = cli(
        "edit", "--model", tiny_model_dir, "--facts", facts_file, "--method", "ekfac",
        "--curvature", curv_kfac, *EDIT_BUDGET, "--out", out,
    )  # fmt: skip
    assert code == 2
    error = err.strip().split("\n")[-1]
    assert error.startswith("crispedit: error:")
    assert "ekfac" in error and "--kind ekfac" in error
    assert_nothing_written(out)


def test_edit_jsonl_facts(cli, tmp_path, tiny_model_dir):
    facts = write_jsonl(tmp_path / "facts.jsonl", JSONL_FACTS)
    out = tmp_path / "edit"
    args = ["--facts", facts, "--method", "ft"]
    code, _, err = cli("edit", "--model", tiny_model_dir, *args, *EDIT_BUDGET, "--out", out)
    assert code == 0, err
    assert report_of(out)["n_edits"] == 3
    check_delta_meta(out, tiny_model_dir, DEFAULT_LAYERS, load_facts(facts))


def test_edit_counterfact_with_limit(cli, tmp_path, tiny_model_dir, curv_kfac):
    out = tmp_path / "edit"
    args = ["--facts", COUNTERFACT, "--limit", "3", "--curvature", curv_kfac]
    code, _, err = cli("edit", "--model", tiny_model_dir, *args, *EDIT_BUDGET, "--out", out)
    assert code == 0, err
    assert report_of(out)["n_edits"] == 3
    facts = load_facts(COUNTERFACT, limit=3)
    assert facts[0].target == "baseball"
    check_delta_meta(out, tiny_model_dir, DEFAULT_LAYERS, facts)
    assert facts_digest(facts) != facts_digest(load_facts(COUNTERFACT, limit=4))


# ---------------------------------------------------------------------------------------------
# 3. apply and revert


def test_apply_writes_base_plus_delta(edited_dir, edit_run, tiny_model_dir, base_state):
    assert (edited_dir / "config.json").is_file()
    assert any(edited_dir.glob("*.safetensors"))
    assert any(edited_dir.glob("tokenizer*"))
    assert stray_stages(edited_dir.parent) == []

    delta = Delta.load(edit_run / "delta.safetensors")
    expected, _ = load_model(str(tiny_model_dir))
    add_to_weights(expected, delta.tensors)
    expected = expected.state_dict()
    edited, tokenizer = load_model(str(edited_dir))
    assert tokenizer("Paris")["input_ids"]  # the tokenizer came along
    edited = edited.state_dict()
    assert edited.keys() == base_state.keys()
    edited_keys = {f"{name}.weight" for name in LAYERS_23}
    assert edited_keys <= edited.keys()
    for key, weight in edited.items():
        if key in edited_keys:
            assert torch.equal(weight, expected[key]), key
            assert torch.equal(weight, base_state[key] + delta.tensors[key]), key  # fp32 model
            assert not torch.equal(weight, base_state[key]), key
        else:
            assert torch.equal(weight, base_state[key]), key


def test_apply_revert_restores_base(cli, tmp_path, edited_dir, edit_run, base_state):
    out = tmp_path / "reverted"
    code, stdout, err = cli(
        "apply", "--model", edited_dir, "--delta", edit_run / "delta.safetensors",
        "--revert", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert "reverted" in stdout
    reverted, _ = load_model(str(out))
    reverted = reverted.state_dict()
    assert reverted.keys() == base_state.keys()
    for key, weight in reverted.items():
        assert torch.allclose(weight, base_state[key], rtol=0, atol=1e-6), key


def test_apply_twice_fails_on_fingerprint(cli, tmp_path, edited_dir, edit_run):
    out = tmp_path / "twice"
    delta = edit_run / "delta.safetensors"
    code, _, err = cli("apply", "--model", edited_dir, "--delta", delta, "--out", out)
    assert code == 2
    error = err.strip().split("\n")[-1]
    assert error.startswith("crispedit: error: cannot apply delta")
    assert Delta.load(delta).meta["base_fingerprint"] in error
    assert_nothing_written(out)


def test_revert_on_base_model_fails(cli, tmp_path, tiny_model_dir, edit_run):
    out = tmp_path / "revert-base"
    args = ["--delta", edit_run / "delta.safetensors", "--revert", "--out", out]
    code, _, err = cli("apply", "--model", tiny_model_dir, *args)
    assert code == 2
    assert err.strip().split("\n")[-1].startswith("crispedit: error: cannot revert delta")
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------
# 4. determinism


def test_edit_is_bitwise_deterministic(cli, tmp_path, tiny_model_dir, facts_file, edit_run):
    deltas = []
    for run in ("a", "b"):
        out = tmp_path / run
        code, _, err = cli(
            "edit", "--model", tiny_model_dir, "--facts", facts_file, "--layers", "2-3",
            *EDIT_BUDGET, "--out", out,
        )  # fmt: skip
        assert code == 0, err
        deltas.append(delta_tensors(out))
    a, b = deltas
    assert a.keys() == b.keys() == {f"{name}.weight" for name in LAYERS_23}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the curvature built on the fly equals the saved one: same delta as with --curvature
    prebuilt = delta_tensors(edit_run)
    for key in a:
        assert torch.equal(a[key], prebuilt[key]), key


def test_seed_orders_the_facts(cli, tmp_path, tiny_model_dir, facts_file):
    """With one fact per batch the seed's shuffle decides the order of the steps."""
    deltas = {}
    for seed in ("0", "0", "1"):
        out = tmp_path / f"s{seed}-{len(deltas)}"
        code, _, err = cli(
            "edit", "--model", tiny_model_dir, "--facts", facts_file, "--method", "ft",
            "--batch-size", "1", "--seed", seed, *EDIT_BUDGET, "--out", out,
        )  # fmt: skip
        assert code == 0, err
        deltas[out.name] = delta_tensors(out)
    same, again, other = deltas.values()
    assert all(torch.equal(same[k], again[k]) for k in same)
    assert not all(torch.equal(same[k], other[k]) for k in same)


# ---------------------------------------------------------------------------------------------
# 5. bad input: exit 2, one `crispedit: error:` line, nothing written


def _bad_facts(tmp: Path, content: str | bytes, name: str = "facts.json") -> Path:
    path = tmp / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _edit(ctx, facts, *extra):
    return ["edit", "--model", ctx["model"], "--facts", facts, *EDIT_BUDGET, *extra]


def _build(ctx, *extra):
    return ["curvature", "build", "--model", ctx["model"], *BUDGET, *extra]


def _apply(ctx, delta, *extra):
    return ["apply", "--model", ctx["model"], "--delta", delta, *extra]


def _bad_corpus(tmp: Path, kind: str) -> Path:
    if kind == "non-utf8":
        return _bad_facts(tmp, b"fine text\n\xff\xfe\x80 broken \xc3\x28\n", "corpus.txt")
    text = json.dumps(CORPUS_JSONL[0]) + "\n" + '{"text": "broken\n' + json.dumps(CORPUS_JSONL[1])
    return _bad_facts(tmp, text + "\n", "corpus.jsonl")


# id -> (args given (tmp_path, ctx), fragments the error line must name)
BAD_INPUTS = {
    "facts-missing-target": (
        lambda t, c: _edit(c, write_json(t / "f.json", [{"prompt": "The Eiffel Tower is in"}])),
        ["f.json", "record 0", "'target'", "missing"],
    ),
    "facts-empty-target": (
        lambda t, c: _edit(c, write_json(t / "f.json", [{**FACTS[0], "target": ""}])),
        ["f.json", "record 0", "'target'", "non-empty"],
    ),
    "facts-empty-target-jsonl": (
        lambda t, c: _edit(c, write_jsonl(t / "f.jsonl", [FACTS[0], {**FACTS[1], "target": ""}])),
        ["f.jsonl", "line 2", "'target'", "non-empty"],
    ),
    "facts-not-found": (
        lambda t, c: _edit(c, t / "missing.json"),
        ["not found", "missing.json"],
    ),
    "facts-invalid-json": (
        lambda t, c: _edit(c, _bad_facts(t, '[{"prompt": "x", "target": "y"},')),
        ["facts.json", "invalid JSON"],
    ),
    "unknown-model": (
        lambda t, c: _edit({"model": "no-such-model-xyz"}, c["facts"]),
        ["unknown model", "no-such-model-xyz"],
    ),
    "unknown-model-build": (
        lambda t, c: _build({"model": "no-such-model-xyz"}),
        ["unknown model", "no-such-model-xyz"],
    ),
    "unknown-model-apply": (
        lambda t, c: _apply({"model": "no-such-model-xyz"}, c["delta"]),
        ["unknown model", "no-such-model-xyz"],
    ),
    "layer-99": (
        lambda t, c: _edit(c, c["facts"], "--layers", "99"),
        ["unknown layer 99"],
    ),
    "layer-99-build": (
        lambda t, c: _build(c, "--layers", "99"),
        ["unknown layer 99"],
    ),
    "layer-bad-name": (
        lambda t, c: _edit(c, c["facts"], "--layers", "model.layers.1.nope"),
        ["unknown layer", "model.layers.1.nope"],
    ),
    "delta-other-model": (
        lambda t, c: _apply({"model": c["other_model"]}, c["delta"]),
        ["cannot apply delta", "made for model"],
    ),
    "delta-corrupt": (
        lambda t, c: _apply(c, c["random_bytes"]),
        ["delta file", "random.safetensors", "corrupt"],
    ),
    "delta-flipped-byte": (
        lambda t, c: _apply(c, c["flipped"]),
        ["delta file", "flipped.safetensors", "corrupt", "sha256"],
    ),
    "delta-truncated": (
        lambda t, c: _apply(c, c["truncated"]),
        ["delta file", "truncated.safetensors", "corrupt"],
    ),
    "delta-is-curvature": (
        lambda t, c: _apply(c, c["curvature_file"]),
        ["not a delta file"],
    ),
    "delta-not-found": (
        lambda t, c: _apply(c, t / "nope.safetensors"),
        ["delta file not found", "nope.safetensors"],
    ),
    "corpus-non-utf8-build": (
        lambda t, c: _build(c, "--corpus", _bad_corpus(t, "non-utf8")),
        ["corpus.txt", "not UTF-8"],
    ),
    "corpus-broken-jsonl-build": (
        lambda t, c: _build(c, "--corpus", _bad_corpus(t, "jsonl")),
        ["corpus.jsonl", "line 2", "invalid JSON"],
    ),
    "corpus-non-utf8-edit": (
        lambda t, c: _edit(c, c["facts"], "--corpus", _bad_corpus(t, "non-utf8")),
        ["corpus.txt", "not UTF-8"],
    ),
    "corpus-broken-jsonl-edit": (
        lambda t, c: _edit(c, c["facts"], "--corpus", _bad_corpus(t, "jsonl")),
        ["corpus.jsonl", "line 2", "invalid JSON"],
    ),
    "corpus-not-found-build": (
        lambda t, c: _build(c, "--corpus", t / "no.txt"),
        ["corpus not found", "no.txt"],
    ),
    "gamma-1.5": (
        lambda t, c: _edit(c, c["facts"], "--gamma", "1.5"),
        ["--gamma", "1.5"],
    ),
    "clip-1": (
        lambda t, c: _edit(c, c["facts"], "--clip", "1"),
        ["--clip", "below 1", "1.0"],
    ),
    "clip-ekfac": (
        lambda t, c: _edit(c, c["facts"], "--method", "ekfac", "--clip", "0.1"),
        ["--clip", "not to ekfac"],
    ),
    "anchors-negative": (
        lambda t, c: _edit(c, c["facts"], "--anchors", "-1"),
        ["--anchors", "-1"],
    ),
    "anchor-weight-negative": (
        lambda t, c: _edit(c, c["facts"], "--anchor-weight", "-0.5"),
        ["--anchor-weight", "-0.5"],
    ),
    "tokens-0-edit": (
        lambda t, c: _edit(c, c["facts"], "--tokens", "0"),
        ["--tokens", "0"],
    ),
    "tokens-0-build": (
        lambda t, c: _build(c, "--tokens", "0"),
        ["--tokens", "0"],
    ),
    "curvature-other-model": (
        lambda t, c: _edit(c, c["facts"], "--curvature", c["other_curvature"]),
        ["--curvature", "another model"],
    ),
    "curvature-missing-layer": (
        lambda t, c: _edit(c, c["facts"], "--curvature", c["other_curvature"], "--layers", "2-3"),
        ["--curvature", "no factors", BLOCK.format(2)],
    ),
    "curvature-corrupt": (
        lambda t, c: _edit(c, c["facts"], "--curvature", c["random_bytes"]),
        ["curvature file", "corrupt"],
    ),
}


@pytest.fixture
def bad_ctx(request, tmp_path, monkeypatch, tiny_model_dir, other_model_dir, facts_file, edit_run):
    """Paths the bad-input cases refer to; session curvatures only for the cases that need them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    random_bytes = tmp_path / "random.safetensors"
    random_bytes.write_bytes(random.Random(0).randbytes(4096))
    data = bytearray((edit_run / "delta.safetensors").read_bytes())
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    data[-5] ^= 0x01  # one bit in the last tensor's data: the header still parses
    (tmp_path / "flipped.safetensors").write_bytes(data)
    ctx = {
        "model": tiny_model_dir,
        "other_model": other_model_dir,
        "facts": facts_file,
        "delta": edit_run / "delta.safetensors",
        "random_bytes": random_bytes,
        "flipped": tmp_path / "flipped.safetensors",
        "truncated": tmp_path / "truncated.safetensors",
    }
    case = request.node.callspec.params["case"]
    if case in ("curvature-other-model", "curvature-missing-layer"):
        ctx["other_curvature"] = request.getfixturevalue("curv_other_model")
    if case == "delta-is-curvature":
        ctx["curvature_file"] = request.getfixturevalue("curv_kfac") / "curvature.safetensors"
    return ctx


def run_bad(cli, tmp_path, ctx, case) -> tuple[str, list[str]]:
    make_args, fragments = BAD_INPUTS[case]
    out = tmp_path / "runs" / "out"
    code, stdout, err = cli(*make_args(tmp_path, ctx), "--out", out)
    assert code == 2, err
    assert stdout == ""
    assert_nothing_written(out)
    return err, fragments


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(cli, tmp_path, bad_ctx, case):
    err, fragments = run_bad(cli, tmp_path, bad_ctx, case)
    lines = err.rstrip("\n").split("\n")
    errors = [line for line in lines if "crispedit: error:" in line]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0] and errors[0].startswith("crispedit: error: ")
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stderr_is_exactly_one_line(cli, tmp_path, bad_ctx, case):
    err, _ = run_bad(cli, tmp_path, bad_ctx, case)
    assert err.count("\n") == 1 and err.endswith("\n"), repr(err)
    assert err.startswith("crispedit: error: ")
    assert "\r" not in err


# ---------------------------------------------------------------------------------------------
# 6. a failed command leaves an existing --out as it was


@pytest.mark.parametrize("command", ["build", "edit", "apply"])
def test_failure_keeps_existing_out_untouched(cli, tmp_path, tiny_model_dir, other_model_dir,
                                              facts_file, edit_run, command):  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old result\n")
    corpus = _bad_corpus(tmp_path, "jsonl")
    args = {
        # both fail inside the staged output, after the stage folder exists
        "build": ["curvature", "build", "--model", tiny_model_dir, "--corpus", corpus, *BUDGET],
        "edit": ["edit", "--model", tiny_model_dir, "--facts", facts_file, "--corpus", corpus,
                 *EDIT_BUDGET],
        "apply": ["apply", "--model", other_model_dir, "--delta", edit_run / "delta.safetensors"],
    }[command]  # fmt: skip
    code, _, err = cli(*args, "--out", out)
    assert code == 2, err
    assert os.listdir(out) == ["old.txt"]
    assert (out / "old.txt").read_text() == "old result\n"
    assert stray_stages(tmp_path) == []


def test_out_that_is_a_file_fails_and_is_kept(cli, tmp_path, tiny_model_dir, facts_file):
    out = tmp_path / "out"
    out.write_text("not a folder\n")
    args = ["--facts", facts_file, "--method", "ft", *EDIT_BUDGET, "--out", out]
    code, _, err = cli("edit", "--model", tiny_model_dir, *args)
    assert code == 2
    assert "exists and is not a folder" in err.strip().split("\n")[-1]
    assert out.read_text() == "not a folder\n"
    assert stray_stages(tmp_path) == []


def test_success_overwrites_existing_out(cli, tmp_path, tiny_model_dir, facts_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    args = ["--facts", facts_file, "--method", "ft", *EDIT_BUDGET, "--out", out]
    code, _, err = cli("edit", "--model", tiny_model_dir, *args)
    assert code == 0, err
    assert report_of(out)["n_edits"] == 2
    assert stray_stages(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# The installed console script, in a real process


def console_script() -> str:
    script = Path(sys.executable).parent / "crispedit"
    return str(script) if script.exists() else shutil.which("crispedit") or "crispedit"


def test_console_script_end_to_end(tmp_path, tiny_model_dir, facts_file, base_state):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    edit_args = ["edit", "--model", str(tiny_model_dir), "--facts", str(facts_file),
                 "--method", "crispedit", "--gamma", "0.9", *EDIT_BUDGET]  # fmt: skip
    edit_out = tmp_path / "edit"
    edit = subprocess.run(
        [console_script(), *edit_args, "--out", str(edit_out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert edit.returncode == 0, edit.stderr
    assert "delta.safetensors" in edit.stdout
    assert report_of(edit_out)["method"] == "crispedit"
    assert stray_stages(tmp_path) == []

    # the same edit in this process gives the same bits
    assert run_cli(*edit_args, "--out", tmp_path / "again") == 0
    delta = delta_tensors(edit_out)
    assert delta.keys() == delta_tensors(tmp_path / "again").keys()
    for key, tensor in delta_tensors(tmp_path / "again").items():
        assert torch.equal(tensor, delta[key]), key

    # and the delta file from the other process applies here
    model_out = tmp_path / "edited"
    delta_file = edit_out / "delta.safetensors"
    assert (
        run_cli("apply", "--model", tiny_model_dir, "--delta", delta_file, "--out", model_out) == 0
    )
    edited, _ = load_model(str(model_out))
    key = f"{DEFAULT_LAYERS[0]}.weight"
    assert torch.equal(edited.state_dict()[key], base_state[key] + delta[key])


def test_console_script_bad_input_exits_2(tmp_path, tiny_model_dir):
    facts = write_json(tmp_path / "f.json", [{"prompt": "The Eiffel Tower is in"}])
    out = tmp_path / "out"
    result = subprocess.run(
        [console_script(), "edit", "--model", str(tiny_model_dir), "--facts", str(facts),
         "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("crispedit: error: ")
    assert result.stderr.count("\n") == 1
    assert "'target'" in result.stderr
    assert_nothing_written(out)
