"""`crispedit export`: a version of a store as a PEFT adapter that the real `peft` loads; bad
ranks, energies and versions are one line on stderr, exit 2, and nothing written."""

from __future__ import annotations

import json
import tarfile
import zipfile

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file

from contract.names import DELTA_FILE
from crispedit.delta import add_to_weights
from crispedit.models import get_layers, load_model
from curvature_store import Store

LAYERS = ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"]


def stream_of_two(root, seed: int = 0) -> tuple[Store, str, dict[str, torch.Tensor]]:
    """A store whose stream `main` holds two versions of random deltas on the tiny Llama's
    layers 2-3; returns the store, the head and the cumulative delta."""
    store = Store(root)
    gen = torch.Generator().manual_seed(seed)
    head, total = None, {}
    for _ in range(2):
        delta = {f"{n}.weight": 0.02 * torch.randn(32, 48, generator=gen) for n in LAYERS}
        stage = store.staging_dir()
        save_file(delta, stage / DELTA_FILE)
        manifest = {"layers": LAYERS, "transposed_layers": []}
        head = store.create_version(
            "tiny", "main", head, {DELTA_FILE: stage / DELTA_FILE}, manifest
        )
        head = head["id"]
        total = {k: total.get(k, 0) + v for k, v in delta.items()}
    return store, head, total


def test_export_loads_in_peft_as_the_cumulative_delta(cli, tmp_path, tiny_model_dir):
    _, head, total = stream_of_two(tmp_path / "store")
    out = tmp_path / "adapter.tar.gz"
    code, stdout, err = cli(
        "export", "--store", tmp_path / "store", "--version", head, "--format", "peft",
        "--rank", 32, "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert f"adapter of {head} (r=32)" in stdout and stdout.count("relative error") == 2
    with tarfile.open(out) as archive:
        archive.extractall(tmp_path / "x", filter="data")
    config = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny" and config["target_modules"] == LAYERS

    model, _ = load_model(str(tiny_model_dir))
    merged = PeftModel.from_pretrained(model, str(tmp_path / "x")).merge_and_unload()
    reference, _ = load_model(str(tiny_model_dir))
    add_to_weights(reference, total)
    for name in LAYERS:
        torch.testing.assert_close(
            get_layers(merged, [name])[name].weight,
            get_layers(reference, [name])[name].weight,
            atol=1e-6,
            rtol=1e-5,
        )

    # an energy, into a zip, and a folder
    code, _, err = cli(
        "export", "--store", tmp_path / "store", "--version", head, "--energy", 0.5,
        "--out", tmp_path / "a.zip",
    )  # fmt: skip
    assert code == 0, err
    names = zipfile.ZipFile(tmp_path / "a.zip").namelist()
    assert sorted(names) == [
        "adapter_config.json", "adapter_model.safetensors", "crispedit_adapter.json",
    ]  # fmt: skip
    manifest = json.loads(zipfile.ZipFile(tmp_path / "a.zip").read("crispedit_adapter.json"))
    assert manifest["energy"] == 0.5 and all(
        0 < layer["rank"] < 32 for layer in manifest["layers"].values()
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "0"], "rank must be an integer ≥ 1"),
        (["--rank", "33"], "rank 33 is above min(d_out, d_in) = 32"),
        (["--energy", "1.5"], "energy must be a fraction in (0, 1]"),
        (["--energy", "0"], "energy must be a fraction in (0, 1]"),
        (["--rank", "4", "--version", "v" + "0" * 26], "v00000000000000000000000000"),
        (["--rank", "4", "--version", "nope"], "nope"),
    ],
)
def test_bad_export_is_one_line_and_writes_nothing(cli, tmp_path, args, message):
    _, head, _ = stream_of_two(tmp_path / "store")
    out = tmp_path / "out"
    code, _, err = cli(
        "export", "--store", tmp_path / "store", "--version", head, *args, "--out", out
    )
    assert code == 2 and err.count("\n") == 1 and err.startswith("crispedit: error:")
    assert message in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_rank_and_energy_together_are_a_usage_error(cli, tmp_path):
    _, head, _ = stream_of_two(tmp_path / "store")
    with pytest.raises(SystemExit) as exit_:
        cli(
            "export", "--store", tmp_path / "store", "--version", head, "--rank", "2",
            "--energy", "0.9", "--out", tmp_path / "o",
        )  # fmt: skip
    assert exit_.value.code == 2 and not (tmp_path / "o").exists()
    # neither: the default rank, capped at the layers' size (32)
    code, out, _ = cli(
        "export", "--store", tmp_path / "store", "--version", head, "--out", tmp_path / "o2"
    )
    assert code == 0 and "(r=32)" in out
