"""GET /v1/versions/{id}/adapter: the cumulative delta as a PEFT LoRA adapter archive, built in
numpy by the API (no torch) and equal to what the engine's torch export gives; bad ranks,
energies and versions answer a clear 4xx and write nothing."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
from api_helpers import AUTH, AUTH_TINY, KEY_ALL
from safetensors.numpy import load, save_file

from contract.names import DELTA_FILE
from crispedit.adapter import adapter_tensors
from service.client import ApiError, CrispEditClient

LAYERS = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture
def two(store) -> list[str]:
    """Two versions on tiny/main whose deltas are random 12×20 matrices of rank ≤ 6 each."""
    rng = np.random.default_rng(0)
    ids = []
    for _ in range(2):
        deltas = {
            f"{n}.weight": (rng.normal(size=(12, 3)) @ rng.normal(size=(3, 20))).astype(np.float32)
            for n in LAYERS
        }
        stage = store.staging_dir()
        save_file(deltas, stage / DELTA_FILE)
        manifest = {"layers": LAYERS, "transposed_layers": [], "facts": [], "method": "ft"}
        head = store.head("tiny", "main")
        ids.append(
            store.create_version("tiny", "main", head, {DELTA_FILE: stage / DELTA_FILE}, manifest)[
                "id"
            ]
        )
    return ids


def members(body: bytes, archive: str = "tar.gz") -> dict[str, bytes]:
    if archive == "zip":
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            return {name: z.read(name) for name in z.namelist()}
    with tarfile.open(fileobj=io.BytesIO(body)) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def test_the_adapter_is_the_engines_export_of_the_cumulative_delta(client, store, two):
    response = client.get(f"/v1/versions/{two[1]}/adapter?against=base&rank=6", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    assert response.headers["etag"] == f'"{response.headers["x-content-sha256"]}"'
    files = members(response.content)
    config = json.loads(files["adapter_config.json"])
    report = json.loads(files["crispedit_adapter.json"])
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (6, 6, LAYERS)
    assert config["base_model_name_or_path"] == "tiny" and report["version"] == two[1]
    weights = load(files["adapter_model.safetensors"])

    cumulative = store.cumulative_delta(two[1])  # rank ≤ 6: rank 6 is exact
    reference, ref_config, ref_report = adapter_tensors(cumulative, store.manifest(two[1]), rank=6)
    assert ref_config == config
    for layer in LAYERS:
        b = weights[f"base_model.model.{layer}.lora_B.weight"]
        a = weights[f"base_model.model.{layer}.lora_A.weight"]
        assert (b.shape, a.shape) == ((12, 6), (6, 20))
        np.testing.assert_allclose(b @ a, cumulative[f"{layer}.weight"], atol=1e-4)
        ref = reference[f"base_model.model.{layer}.lora_B.weight"].numpy()
        ref = ref @ reference[f"base_model.model.{layer}.lora_A.weight"].numpy()
        np.testing.assert_allclose(b @ a, ref, atol=1e-4)
        assert report["layers"][layer]["rank"] == ref_report["layers"][layer]["rank"] == 6
        assert report["layers"][layer]["relative_error"] < 1e-5

    # a truncation reports its error; a zip and an energy; a repeat is served from the cache
    low = client.get(f"/v1/versions/{two[1]}/adapter?rank=2&archive=zip", headers=AUTH)
    assert low.status_code == 200 and low.headers["content-type"] == "application/zip"
    low_report = json.loads(members(low.content, "zip")["crispedit_adapter.json"])
    assert all(0.05 < layer["relative_error"] < 1 for layer in low_report["layers"].values())
    energy = client.get(f"/v1/versions/{two[1]}/adapter?energy=0.999999", headers=AUTH)
    energy_report = json.loads(members(energy.content)["crispedit_adapter.json"])
    assert [layer["rank"] for layer in energy_report["layers"].values()] == [6, 6]
    default = client.get(f"/v1/versions/{two[1]}/adapter", headers=AUTH)  # DEFAULT_RANK, capped
    assert json.loads(members(default.content)["adapter_config.json"])["r"] == 12
    again = client.get(
        f"/v1/versions/{two[1]}/adapter?rank=6",
        headers={**AUTH, "If-None-Match": response.headers["etag"]},
    )
    assert again.status_code == 304


@pytest.mark.parametrize(
    ("query", "status", "field"),
    [
        ("rank=0", 422, "rank"),
        ("rank=-1", 422, "rank"),
        ("rank=13", 422, "rank"),  # min(d_out, d_in) = 12
        ("rank=x", 422, "rank"),
        ("energy=0", 422, "energy"),
        ("energy=1.5", 422, "energy"),
        ("rank=2&energy=0.9", 422, "energy"),
        ("rank=2&archive=rar", 422, "archive"),
        ("rank=2&format=lora", 422, "format"),
        ("rank=2&against=parent", 422, "against"),
    ],
)
def test_bad_adapter_requests_are_422_and_write_nothing(
    client, settings, two, query, status, field
):
    response = client.get(f"/v1/versions/{two[1]}/adapter?{query}", headers=AUTH)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field
    assert not (settings.cumulative_cache_dir / "adapters").exists() or not any(
        (settings.cumulative_cache_dir / "adapters").iterdir()
    )


def test_unknown_malformed_and_forbidden_versions(client, store, two):
    missing = client.get(f"/v1/versions/v{'0' * 26}/adapter?rank=2", headers=AUTH)
    assert (missing.status_code, missing.json()["error"]["field"]) == (404, "version_id")
    malformed = client.get("/v1/versions/v12/adapter?rank=2", headers=AUTH)
    assert (malformed.status_code, malformed.json()["error"]["field"]) == (400, "version_id")
    stage = store.staging_dir()
    save_file({"w.weight": np.ones((2, 2), np.float32)}, stage / DELTA_FILE)
    other = store.create_version("other", "main", None, {DELTA_FILE: stage / DELTA_FILE}, {})
    forbidden = client.get(f"/v1/versions/{other['id']}/adapter?rank=1", headers=AUTH_TINY)
    assert forbidden.status_code == 404
    assert client.get(f"/v1/versions/{other['id']}/adapter?rank=1", headers=AUTH).status_code == 200


def test_the_client_downloads_an_adapter_checked_against_its_etag(live_server, two, tmp_path):
    out = tmp_path / "downloads"
    with CrispEditClient(live_server, KEY_ALL) as api:
        path = api.download_adapter(two[0], out / "a.zip", rank=3, archive="zip")
        assert "adapter_model.safetensors" in zipfile.ZipFile(path).namelist()
        with pytest.raises(ApiError) as err:
            api.download_adapter(two[0], out / "b.tar.gz", rank=50)
        assert (err.value.status, err.value.field) == (422, "rank")
    assert sorted(p.name for p in out.iterdir()) == ["a.zip"]


def test_the_cli_downloads_an_adapter(live_server, two, tmp_path, capsys):
    from crispedit_cli.main import main

    api = ["--api", live_server, "--key", KEY_ALL]
    out = tmp_path / "a.tar.gz"
    assert (
        main(["download", *api, two[1], "--format", "peft", "--rank", "4", "--out", str(out)]) == 0
    )
    assert json.loads(members(out.read_bytes())["adapter_config.json"])["r"] == 4
    bad = [
        "download",
        *api,
        two[1],
        "--format",
        "peft",
        "--rank",
        "99",
        "--out",
        str(tmp_path / "b.zip"),
    ]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank 99 is above" in err
    assert (
        main(["download", *api, two[1], "--format", "peft", "--out", str(tmp_path / "a.bin")]) == 2
    )
    assert main(["download", *api, two[1], "--rank", "2", "--out", str(tmp_path / "d")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "store"]
