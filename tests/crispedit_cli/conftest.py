"""Session artifacts of the CLI tests, built once and read by many tests: facts, a model that the
tiny model's deltas and curvature do not fit, curvature files, an edit and the model it edits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import (
    BUDGET,
    EDIT_BUDGET,
    FACTS,
    LAYERS_23,
    run_cli,
    write_json,
)

import crispedit.curvature
from crispedit.models import load_model


@pytest.fixture(scope="session")
def facts_file(tmp_path_factory) -> Path:
    return write_json(tmp_path_factory.mktemp("facts") / "facts.json", FACTS)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with other weights in blocks 2-3: a delta of the tiny model does not fit."""
    model, tokenizer = load_model(str(tiny_model_dir))
    with torch.no_grad():
        for name in LAYERS_23:
            dict(model.named_modules())[name].weight.add_(0.01)
    path = tmp_path_factory.mktemp("tiny-llama-other")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def curv_other_model(tmp_path_factory, other_model_dir) -> Path:
    out = tmp_path_factory.mktemp("curv") / "other"
    assert run_cli("curvature", "build", "--model", other_model_dir, *BUDGET, "--out", out) == 0
    return out


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
