"""`crispedit plan`: the memory table of a shipped config, as a table and JSON; bad arguments
exit 2 with one line."""

from __future__ import annotations

import json

import pytest

from crispedit_cli.main import main as crispedit_main

PUBLISHED_LLAMA_3_8B = 8_030_261_248  # parameters, as its model card says


def main(argv: list[str]) -> int:
    return crispedit_main(["plan", *argv])


def test_main_prints_a_table_and_json(capsys):
    assert main(["--model", "mistral-7b", "--layers", "20-21"]) == 0
    out = capsys.readouterr().out
    assert "| curvature build |" in out and "model.layers.21.mlp.down_proj" in out
    assert main(["--model", "llama-3-8b", "--json", "--dtype", "float32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == PUBLISHED_LLAMA_3_8B
    assert [p["phase"] for p in report["phases"]] == [
        "curvature build",
        "steady editing",
        "stream update",
        "version write",
    ]
    weights = report["phases"][0]["items"][0]
    assert weights["bytes"] >= 4 * PUBLISHED_LLAMA_3_8B


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no-such-model-anywhere"], "unknown model"),
        (["--model", "llama-3-8b", "--layers", "40"], "unknown layer 40"),
        (["--model", "llama-3-8b", "--batch-size", "0"], "at least 1"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_config_transformers_does_not_know_exits_2(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    assert main(["--model", str(tmp_path)]) == 2
    assert "cannot read the config" in capsys.readouterr().err
