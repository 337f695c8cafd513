"""Constants and helpers of the CLI tests in tests/crispedit_cli (fixtures: tests/conftest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from crispedit_cli.main import main

ASSETS = Path(__file__).resolve().parents[1] / "crispedit" / "assets"
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
