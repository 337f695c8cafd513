"""`crispedit edit` and `crispedit apply` end to end on the tiny Llama folder of the conftest.

The commands run in-process through `crispedit_cli.main.main` (it returns the exit status)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from cli_helpers import (
    COUNTERFACT,
    DEFAULT_LAYERS,
    EDIT_BUDGET,
    JSONL_FACTS,
    LAYERS_23,
    assert_nothing_written,
    delta_tensors,
    report_of,
    stray_stages,
    write_jsonl,
)

from contract.facts import facts_digest, load_facts
from crispedit.anchors import ANCHORS
from crispedit.curvature import Curvature
from crispedit.delta import Delta, add_to_weights
from crispedit.models import load_model, model_fingerprint
from crispedit.projector import GAMMA, build_projector

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


def test_edit_consolidate_reports_its_figures_and_the_delta_applies(
    cli, tmp_path, tiny_model_dir, facts_file, curv_kfac
):
    """A batch edit with --consolidate: the consolidated delta (crispedit.consolidate), which
    the report describes and `apply` lands as is; ft takes the curvature for it."""
    out = tmp_path / "edit"
    code, _, err = cli(
        "edit", "--model", tiny_model_dir, "--facts", facts_file, "--curvature", curv_kfac,
        "--layers", "2-3", "--consolidate", "1.0", *EDIT_BUDGET, "--out", out,
    )  # fmt: skip
    assert code == 0, err
    report = report_of(out)
    assert report["consolidate"] == 1.0 and report["consolidation"]["weight"] == 1.0
    assert set(report["consolidation"]["relative_change"]) == set(LAYERS_23)
    plain = tmp_path / "plain"
    code, _, err = cli(
        "edit", "--model", tiny_model_dir, "--facts", facts_file, "--curvature", curv_kfac,
        "--layers", "2-3", *EDIT_BUDGET, "--out", plain,
    )  # fmt: skip
    assert code == 0, err
    ours, theirs = delta_tensors(out), delta_tensors(plain)
    assert all(not torch.equal(ours[k], theirs[k]) for k in ours)
    assert Delta.load(out / "delta.safetensors").meta["consolidate"] == 1.0
    code, _, err = cli(
        "edit", "--model", tiny_model_dir, "--facts", facts_file, "--method", "ft",
        "--layers", "2-3", "--consolidate", "1.0", *EDIT_BUDGET, "--out", tmp_path / "ft",
    )  # fmt: skip
    assert code == 0, err
    assert report_of(tmp_path / "ft")["consolidation"]["weight"] == 1.0


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
