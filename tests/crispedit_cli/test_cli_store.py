"""The CLI on a store: cached curvature, streams of versions, rollback, deltas, materialize."""

from __future__ import annotations

import json
import re

import pytest
import torch

from crispedit.delta import add_to_weights
from crispedit.models import get_layers, load_model
from crispedit_cli.main import main
from curvature_store import Store

BUDGET = ["--tokens", "300"]
EDIT = [*BUDGET, "--epochs", "3", "--lr", "0.03"]
VERSION = re.compile(r"v[0-9a-f]{26}")


@pytest.fixture
def run(capsys):
    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def facts(tmp_path):
    paths = []
    for i, (prompt, target) in enumerate([("The Eiffel Tower is in", "Rome"), ("Ice is", "hot")]):
        path = tmp_path / f"facts{i}.json"
        path.write_text(json.dumps([{"prompt": prompt, "target": target}]))
        paths.append(path)
    return paths


def test_curvature_in_the_store_is_built_once(run, tmp_path, tiny_model_dir):
    store = tmp_path / "store"
    code, out, err = run("curvature", "build", "--model", tiny_model_dir, *BUDGET, "--store", store)
    assert code == 0 and "built and stored" in err
    key = re.search(r"curvature ([0-9a-f]{32})", out).group(1)
    code, out, err = run("curvature", "build", "--model", tiny_model_dir, *BUDGET, "--store", store)
    assert code == 0 and "cache hit" in err and key in out
    code, out, _ = run("curvature", "ls", "--store", store)
    assert code == 0 and len(out.splitlines()) == 1 and out.startswith(key)
    assert run("curvature", "verify", "--store", store)[0] == 0

    path = Store(store).curvature_file(key, verify=False)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    code, _, err = run("curvature", "verify", "--store", store)
    assert code == 2 and err.count("\n") == 1 and err.startswith("crispedit: error:")
    assert str(tmp_path) not in err  # no filesystem paths leak into errors
    assert run("curvature", "rm", "--store", store, key)[0] == 0
    assert run("curvature", "ls", "--store", store)[1] == ""


def test_edits_on_a_stream(run, tmp_path, tiny_model_dir, facts):
    store = tmp_path / "store"
    on_stream = ["--model", tiny_model_dir, "--store", store, "--stream", "main", *EDIT]
    code, out, _ = run("edit", "--facts", facts[0], *on_stream)
    assert code == 0, out
    v1 = VERSION.search(out).group(0)
    code, out, _ = run("edit", "--facts", facts[1], *on_stream, "--out", tmp_path / "e2")
    assert code == 0
    v2 = VERSION.search(out).group(0)
    report = json.loads((tmp_path / "e2" / "report.json").read_text())
    assert report["version"] == {"id": v2, "number": 2, "parent": v1, "stream": "main"}

    name = tiny_model_dir.name
    code, out, _ = run("stream", "ls", "--store", store, "--model-name", name, "--stream", "main")
    assert code == 0 and out.index(v2) < out.index(v1) and f"head {v2}" in out

    # a stale --parent is refused before any work, and publishes nothing
    code, _, err = run("edit", "--facts", facts[0], *on_stream, "--parent", v1)
    assert code == 2 and "head of main is " + v2 in err
    assert Store(store).head(name, "main") == v2

    # the cumulative delta and the materialized model are the base plus both edits
    cum = tmp_path / "cum.safetensors"
    assert (
        run(
            "stream", "delta", "--store", store, "--version", v2, "--against", "base", "--out", cum
        )[0]
        == 0
    )
    from safetensors.torch import load_file

    deltas = load_file(cum)
    base, _ = load_model(str(tiny_model_dir))
    add_to_weights(base, deltas)
    mat = tmp_path / "mat"
    code, _, err = run("stream", "materialize", "--store", store, "--model", tiny_model_dir,
                       "--version", v2, "--out", mat)  # fmt: skip
    assert code == 0, err
    edited, _ = load_model(str(mat))
    layers = [k.removesuffix(".weight") for k in deltas]
    for layer in layers:
        a = get_layers(edited, [layer])[layer].weight
        assert torch.equal(a, get_layers(base, [layer])[layer].weight)

    code, out, _ = run("stream", "rollback", "--store", store, "--model-name", name,
                       "--stream", "main", "--to", "base")  # fmt: skip
    assert code == 0 and "head is now base" in out
    code, out, _ = run("stream", "ls", "--store", store, "--model-name", name, "--stream", "main")
    assert "head base" in out and v1 in out and v2 in out  # history is kept


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["edit", "--stream", "main"], "--stream needs --store"),
        (["edit"], "--out is required"),
        (["curvature", "build"], "exactly one of --out DIR and --store DIR"),
        (
            ["stream", "ls", "--model-name", "m", "--stream", "s", "--store", "{tmp}/none"],
            "no curvature store",
        ),
        (["edit", "--store", "{tmp}/s", "--stream", "../x", "--out", "{tmp}/o"], "stream"),
        (["edit", "--store", "{tmp}/s", "--stream", "nl\n", "--out", "{tmp}/o"], "stream"),
    ],
)
def test_store_usage_errors(run, tmp_path, tiny_model_dir, facts, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    if args[0] == "edit":
        args += ["--model", tiny_model_dir, "--facts", facts[0], *EDIT]
    elif args[0] == "curvature":
        args += ["--model", tiny_model_dir]
    code, _, err = run(*args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("crispedit: error:") and message in err
    assert not (tmp_path / "o").exists()
