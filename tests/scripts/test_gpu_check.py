"""The GPU smoke check, run on the CPU on a tiny Llama so that it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# small enough to take seconds, enough for the tiny model's edits to land
QUICK = ["--device", "cpu", "--tokens", "256", "--epochs", "15", "--lr", "5e-2", "--layers", "2-3"]


def gpu_check(model_dir: Path, out: Path, *args: str) -> tuple[int, dict, str]:
    """Run scripts/gpu_check.sh as a user would; its exit status, JSON result and markdown."""
    env = {**os.environ, "PYTHON": sys.executable}
    argv = [str(SCRIPT), "--model", str(model_dir), "--out", str(out), *QUICK, *args]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    (result,) = out.glob("gpu-check-*.json")
    (page,) = out.glob("gpu-check-*.md")
    return done.returncode, json.loads(result.read_text()), page.read_text()


def test_float32_run_passes_every_check(tiny_model_dir, tmp_path):
    status, result, page = gpu_check(tiny_model_dir, tmp_path, "--dtype", "float32")
    assert result["error"] is None, result["error"]
    assert status == 0 and result["ok"]
    names = {c["check"] for c in result["checks"]}
    assert {"edited weights on device", "curvature on device", "projector on device"} <= names
    assert {"version 1 efficacy rose", "version 2 delta in the kept subspace"} <= names
    assert list(result["phases"]) == [
        "load", "curvature build", "version 1", "version 2", "materialize head"
    ]  # fmt: skip
    assert result["model_dtype"] == "float32" and "| version 2 |" in page


@pytest.fixture(scope="module")
def bf16_run(tiny_model_dir, tmp_path_factory):
    """One bf16 run on the CPU, what the check runs on a GPU: (status, result)."""
    status, result, _ = gpu_check(
        tiny_model_dir, tmp_path_factory.mktemp("bf16"), "--dtype", "bfloat16"
    )
    return status, result


def test_bfloat16_run_on_the_cpu_goes_the_whole_path(bf16_run):
    _, result = bf16_run
    assert result["error"] is None, result["error"]
    assert result["model_dtype"] == "bfloat16" and len(result["phases"]) == 5
    failed = [c for c in result["checks"] if not c["ok"] and "kept subspace" not in c["check"]]
    assert not failed, failed


def test_bfloat16_deltas_stay_in_the_kept_subspace(bf16_run):
    status, result = bf16_run
    failed = [c for c in result["checks"] if not c["ok"]]
    assert status == 0 and not failed, failed


def test_a_failed_check_exits_1_and_is_written_down(tiny_model_dir, tmp_path):
    # one epoch is too short for the tiny model to learn a fact: "efficacy rose" fails
    status, result, page = gpu_check(
        tiny_model_dir, tmp_path, "--dtype", "float32", "--epochs", "1"
    )
    failed = [c["check"] for c in result["checks"] if not c["ok"]]
    assert status == 1 and not result["ok"] and "version 1 efficacy rose" in failed
    assert "FAILED" in page.splitlines()[0]


def test_cuda_on_a_machine_without_it_is_refused(tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    argv = [str(SCRIPT), "--model", str(tiny_model_dir), "--out", str(tmp_path), "--device", "cuda"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no CUDA device" in done.stderr
    assert not list(tmp_path.iterdir())  # nothing written
