"""`--device` and `--dtype` on every command that loads a model: how a choice resolves
(`crispedit.models.resolve_device` / `resolve_dtype`), what is refused before anything is written,
and what the commands load and record on the tiny model in float32 and in bfloat16.

A bf16 run is told apart from an fp32 one by what the model computes: the tiny model's fp32
weights are not bf16 numbers, so its fingerprint, its curvature and its perplexity all change.
"""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch
from cli_helpers import BUDGET, DEFAULT_LAYERS, EDIT_BUDGET, delta_tensors, report_of
from safetensors import safe_open

import workers.worker
from crispedit.curvature import Curvature
from crispedit.delta import Delta
from crispedit.models import (
    ModelError,
    load_model,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
)
from crispedit_cli.common import resolve_placement
from crispedit_cli.main import parser
from workers.engine import Engine

DTYPE_OF = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}
LOADS_A_MODEL = {
    "curvature build", "corpus generate", "edit", "apply", "eval", "stream materialize",
    "generate", "worker", "demo",
}  # fmt: skip
KEY = f"{DEFAULT_LAYERS[0]}.weight"


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def safetensors_dtypes(folder) -> set[torch.dtype]:
    """The dtypes of the tensors of a saved model folder."""
    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            dtypes |= {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    return dtypes


def saved_weight(folder, key: str = KEY) -> torch.Tensor:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return f.get_tensor(key)


def fingerprint_in(model_dir, dtype: torch.dtype) -> str:
    model, _ = load_model(str(model_dir), dtype=dtype)
    return model_fingerprint(model, DEFAULT_LAYERS)


# ---------------------------------------------------------------------------------------------
# Resolution


def test_auto_is_cpu_and_float32_without_a_gpu(no_gpu):
    device = resolve_device("auto")
    assert device == torch.device("cpu")
    assert resolve_dtype("auto", device) is torch.float32


def test_auto_on_this_machine_follows_torch():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_auto_is_cuda_and_bfloat16_when_a_gpu_is_present(one_gpu):
    device = resolve_device("auto")
    assert device == torch.device("cuda")
    assert resolve_dtype("auto", device) is torch.bfloat16
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_dtype("float32", device) is torch.float32  # an explicit dtype wins
    assert resolve_dtype("auto", resolve_device("cpu")) is torch.float32


@pytest.mark.parametrize("choice", ["tpu", "cuda:x", "cuda:", "cpu:0", "mps:1", "", "CUDA"])
def test_unknown_devices_are_refused(choice):
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device(choice)


@pytest.mark.parametrize(
    ("choice", "message"),
    [("cuda", "CUDA is not available"), ("cuda:0", "CUDA is not available"),
     ("mps", "MPS is not available")],
)  # fmt: skip
def test_missing_accelerators_are_refused(no_gpu, choice, message):
    with pytest.raises(ModelError, match=message):
        resolve_device(choice)


def test_a_gpu_index_past_the_count_is_refused(one_gpu):
    with pytest.raises(ModelError, match="has 1 CUDA device"):
        resolve_device("cuda:1")


def test_unknown_dtype_is_refused():
    with pytest.raises(ModelError, match="unknown dtype 'float64'"):
        resolve_dtype("float64", torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# The flags on the command line


def _commands(ap: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every leaf command of the parser by its name ("curvature build", "edit", ...)."""
    found = {}
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= _commands(sub, f"{prefix}{name} ") or {f"{prefix}{name}": sub}
    return found


def test_every_command_that_loads_a_model_takes_device_and_dtype():
    commands = _commands(parser())
    # the rest read a store, talk to the API, or (plan) build the model without weights
    no_model = {"checkpoint", "curvature ls", "curvature rm", "curvature verify", "download",
                "log", "plan", "status", "stream delta", "stream ls", "stream rollback", "streams",
                "submit"}  # fmt: skip
    # export loads no model but takes both: where its SVD runs, the dtype of the adapter it saves
    placed = {"export"}
    assert set(commands) == LOADS_A_MODEL | no_model | placed
    with_flags = {
        name
        for name, sub in commands.items()
        if {"--device", "--dtype"} <= {s for a in sub._actions for s in a.option_strings}
    }
    assert with_flags == LOADS_A_MODEL | placed


def _refused_commands(tmp, model, facts) -> dict[str, tuple[list, object]]:
    """Each command that loads a model, with the path it would write."""
    out, store = tmp / "out", tmp / "store"
    return {
        "curvature build": (["curvature", "build", "--model", model, "--out", out], out),
        "curvature build --store": (["curvature", "build", "--model", model, "--store", store],
                                    store),
        "corpus generate": (["corpus", "generate", "--model", model, "--tokens", "10",
                             "--out", tmp / "c.jsonl"], tmp / "c.jsonl"),
        "edit": (["edit", "--model", model, "--facts", facts, "--out", out], out),
        "edit --stream": (["edit", "--model", model, "--facts", facts, "--store", store,
                           "--stream", "main"], store),
        "apply": (["apply", "--model", model, "--delta", tmp / "d.safetensors", "--out", out], out),
        "eval": (["eval", "--model", model, "--facts", facts, "--json", tmp / "e.json"],
                 tmp / "e.json"),
        "stream materialize": (["stream", "materialize", "--store", store, "--model", model,
                                "--version", "v" + "0" * 26, "--out", out], out),
        "generate": (["generate", "--store", store, "--model", model, "--version", "v" + "0" * 26,
                      "--prompt", "Ice is"], store),
        "worker": (["worker", "--model", model, "--store", store], store),
        "demo": (["demo", "--model", model, "--out", out], out),
    }  # fmt: skip


REFUSED = ["curvature build", "curvature build --store", "corpus generate", "edit", "edit --stream",
           "apply", "eval", "stream materialize", "generate", "worker", "demo"]  # fmt: skip


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps", "tpu"])
@pytest.mark.parametrize("command", REFUSED)
def test_a_device_this_machine_lacks_fails_cleanly(
    cli, no_gpu, tmp_path, tiny_model_dir, facts_file, command, device
):
    args, written = _refused_commands(tmp_path, tiny_model_dir, facts_file)[command]
    code, out, err = cli(*args, "--device", device)
    assert code == 2
    assert out == ""
    assert err.startswith("crispedit: error: ") and err.count("\n") == 1, err
    assert repr(device) in err
    assert not written.exists()


def test_an_unknown_dtype_is_a_usage_error(cli, tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli("apply", "--model", tiny_model_dir, "--delta", "d", "--out", tmp_path / "out",
            "--dtype", "float64")  # fmt: skip
    assert exit_info.value.code == 2
    assert "--dtype: invalid choice: 'float64'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# What the commands load and record


def test_curvature_build_in_each_dtype(cli, tmp_path, tiny_model_dir):
    factors = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        args = ["--model", tiny_model_dir, *BUDGET, "--device", "cpu", "--dtype", dtype]
        code, _, err = cli("curvature", "build", *args, "--out", out)
        assert code == 0, err
        curvature = Curvature.load(out)
        assert (curvature.meta["device"], curvature.meta["dtype"]) == ("cpu", dtype)
        layer = curvature.layers[DEFAULT_LAYERS[0]]
        assert layer.A.dtype == layer.B.dtype == torch.float32  # factors stay fp32
        factors[dtype] = layer.A
    # the bf16 model's activations are rounded: its factor is close to the fp32 one, not equal
    assert not torch.equal(factors["float32"], factors["bfloat16"])
    torch.testing.assert_close(factors["bfloat16"], factors["float32"], rtol=0.1, atol=1e-3)


@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16"])
def test_edit_loads_and_records_its_dtype(cli, no_gpu, tmp_path, tiny_model_dir, facts_file, dtype):
    out = tmp_path / "edit"
    args = ["--facts", facts_file, "--method", "ft", *EDIT_BUDGET, "--dtype", dtype]
    code, _, err = cli("edit", "--model", tiny_model_dir, *args, "--out", out)
    assert code == 0, err
    expected = DTYPE_OF[dtype]
    assert (report_of(out)["device"], report_of(out)["dtype"]) == ("cpu", str(expected)[6:])
    delta = Delta.load(out)
    assert delta.tensors[KEY].dtype == torch.float32  # a delta is fp32 whatever the model's dtype
    # the delta's base is the model as loaded in that dtype, and the dtype makes a difference
    assert delta.meta["base_fingerprint"] == fingerprint_in(tiny_model_dir, expected)
    other = torch.bfloat16 if expected == torch.float32 else torch.float32
    assert delta.meta["base_fingerprint"] != fingerprint_in(tiny_model_dir, other)


def test_a_bfloat16_edit_applies_to_a_bfloat16_model_saved_in_bfloat16(
    cli, tmp_path, tiny_model_dir, facts_file
):
    edit = tmp_path / "edit"
    bf16 = ["--device", "cpu", "--dtype", "bfloat16"]
    code, _, err = cli(
        "edit", "--model", tiny_model_dir, "--facts", facts_file, "--method", "kfac",
        *EDIT_BUDGET, "--lr", "0.03", *bf16, "--out", edit,
    )  # fmt: skip
    assert code == 0, err
    assert report_of(edit)["dtype"] == "bfloat16"
    delta = delta_tensors(edit)[KEY]
    assert delta.abs().max() > 0

    out = tmp_path / "edited"
    code, _, err = cli("apply", "--model", tiny_model_dir, "--delta", edit, *bf16, "--out", out)
    assert code == 0, err
    assert safetensors_dtypes(out) == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    base = load_model(str(tiny_model_dir), dtype=torch.bfloat16)[0].state_dict()[KEY]
    assert torch.equal(saved_weight(out), (base.float() + delta).to(torch.bfloat16))


def test_eval_runs_in_and_records_its_dtype(cli, tmp_path, tiny_model_dir, facts_file):
    results = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        code, _, err = cli(
            "eval", "--model", tiny_model_dir, "--facts", facts_file, "--tokens", "300",
            "--retention", "0", "--mmlu", "0", "--no-generation", "--device", "cpu",
            "--dtype", dtype, "--json", out,
        )  # fmt: skip
        assert code == 0, err
        results[dtype] = json.loads(out.read_text())
        assert (results[dtype]["device"], results[dtype]["dtype"]) == ("cpu", dtype)
    ppl = {dtype: r["capability"]["ppl_base"] for dtype, r in results.items()}
    assert ppl["float32"] != ppl["bfloat16"]
    assert ppl["bfloat16"] == pytest.approx(ppl["float32"], rel=0.05)


def test_stream_materialize_in_bfloat16(cli, tmp_path, tiny_model_dir, facts_file):
    store, bf16 = tmp_path / "store", ["--device", "cpu", "--dtype", "bfloat16"]
    code, out, err = cli(
        "edit", "--model", tiny_model_dir, "--facts", facts_file, "--method", "ft",
        *EDIT_BUDGET, "--store", store, "--stream", "main", "--model-name", "tiny", *bf16,
    )  # fmt: skip
    assert code == 0, err
    version = re.search(r"v[0-9a-f]{26}", out).group()
    delta = tmp_path / "cumulative.safetensors"
    args = ["--store", store, "--version", version]
    assert cli("stream", "delta", *args, "--against", "base", "--out", delta)[0] == 0
    model = tmp_path / "model"
    code, _, err = cli("stream", "materialize", *args, "--model", tiny_model_dir, *bf16,
                       "--out", model)  # fmt: skip
    assert code == 0, err
    assert safetensors_dtypes(model) == {torch.bfloat16}
    base = load_model(str(tiny_model_dir), dtype=torch.bfloat16)[0].state_dict()[KEY]
    expected = (base.float() + Delta.load(delta).tensors[KEY]).to(torch.bfloat16)
    assert torch.equal(saved_weight(model), expected)


def test_worker_passes_device_and_dtype_to_its_engine(cli, tmp_path, tiny_model_dir, monkeypatch):
    engines = []

    def run_worker(
        model, store_dir, redis_url, burst, heartbeat_s, build_curvature, **engine_options
    ):
        engines.append(Engine(model, store_dir, **engine_options))  # the real loader, no Redis

    monkeypatch.setattr(workers.worker, "run_worker", run_worker)
    args = ["--model", tiny_model_dir, "--store", tmp_path / "store", "--tokens", "300"]
    code, _, err = cli("worker", *args, "--device", "cpu", "--dtype", "bfloat16")
    assert code == 0, err
    (engine,) = engines
    assert engine.model.dtype == torch.bfloat16
    assert engine.model.device == torch.device("cpu")


def test_worker_device_defaults_to_auto():
    args = parser().parse_args(["worker", "--model", "m", "--store", "s"])
    assert (args.device, args.dtype) == ("auto", "auto")
    resolve_placement(args)
    assert args.device == resolve_device("auto")
    assert args.dtype is resolve_dtype("auto", args.device)


def test_demo_in_bfloat16(cli, tmp_path, tiny_model_dir):
    out = tmp_path / "demo"
    code, stdout, err = cli(
        "demo", "--model", tiny_model_dir, "--tokens", "300", "--device", "cpu",
        "--dtype", "bfloat16", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert "gives the same weights: True" in stdout
    fingerprint = Delta.load(out).meta["base_fingerprint"]
    assert fingerprint == fingerprint_in(tiny_model_dir, torch.bfloat16)
