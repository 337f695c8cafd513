"""What every command promises (`crispedit_cli.main`): bad input exits 2 with one
`crispedit: error:` line and writes nothing, a failure keeps an existing `--out`, and the
installed console script runs the same code in a real process."""

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
from cli_helpers import (
    BLOCK,
    BUDGET,
    CORPUS_JSONL,
    DEFAULT_LAYERS,
    EDIT_BUDGET,
    FACTS,
    assert_nothing_written,
    delta_tensors,
    report_of,
    run_cli,
    stray_stages,
    write_json,
    write_jsonl,
)

from crispedit.models import load_model

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
    "facts-control-character": (
        lambda t, c: _edit(c, write_json(t / "f.json", [{**FACTS[0], "target": "Rome\u202e"}])),
        ["f.json", "record 0", "'target'", "U+202E", "RIGHT-TO-LEFT OVERRIDE"],
    ),
    "facts-expanded-prompt": (
        lambda t, c: _edit(
            c,
            write_json(
                t / "f.json", [{"subject": "s" * 2000, "relation": "{}" * 1000, "target": "t"}]
            ),
        ),
        ["f.json", "record 0", "'relation'", "2000000 characters"],
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


def test_every_edit_setting_is_a_flag_of_edit_and_the_api_ones_of_submit():
    """The flags come from contract.settings.EditSettings: an option added there is a flag
    here, parsed into the same settings the engine runs with."""
    import dataclasses

    from contract.settings import DEFAULTS, EditSettings
    from crispedit_cli.common import settings_from_args
    from crispedit_cli.main import parser

    changed = {
        "method": "nullspace", "gamma": 0.7, "epochs": 7, "lr": 0.01, "lr_schedule": "cosine",
        "warm_start": "lstsq", "edit_site": "subject",
        "batch_size": 4,
        "micro_batch": 2,
        "seed": 3, "project": "gradient", "projector_dtype": "model", "anchors": 1,
        "anchor_weight": 0.5, "anchor_questions": True, "anchor_choice": "similar",
        "loss_stop": 0.2, "stop": "fact",
        "clip": 0.01, "beta": 2.0, "laplace": 3.0, "drift_budget": 1e-3, "consolidate": 0.5,
        "contexts": 2,
        "chat_template": "on",
        "value_steps": 7, "value_lr": 0.1,
        "value_clamp": 2.0, "value_contexts": 2, "kl_factor": 0.1, "covariance_weight": 100.0,
        "null_threshold": 0.05, "alphaedit_l2": 1.0,
    }  # fmt: skip
    names = {f.name for f in dataclasses.fields(EditSettings)} - {"layers"}
    assert set(changed) == names, "a new option needs a non-default value here"
    argv = ["edit", "--model", "m", "--facts", "f", "--out", "o"]
    for name, value in changed.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    settings = settings_from_args(parser().parse_args(argv))
    assert settings == EditSettings(**changed)
    assert settings != DEFAULTS
    unset = settings_from_args(parser().parse_args(argv[:7]))
    assert unset == DEFAULTS

    api = {f.name for f in dataclasses.fields(EditSettings) if f.metadata.get("api")}
    submit = parser().parse_args(["submit", "--model", "m", "--facts", "f", "--gamma", "0.5"])
    assert {n for n in names if hasattr(submit, n)} == api - {"layers"}
    assert submit.gamma == 0.5
