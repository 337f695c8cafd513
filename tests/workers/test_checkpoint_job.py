"""The checkpoint job with a real Redis, RQ worker and resident engine: the full model at a
version lands in the store as a Hugging Face folder (sharded safetensors, config, tokenizer)
that transformers loads as base + cumulative delta; retention prunes the oldest."""

from __future__ import annotations

import pytest
import torch
from live import redis_db, redis_url
from rq import Queue
from rq.job import Job, JobStatus
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from worker_helpers import resident_engine, run_burst

from contract.jobs import CHECKPOINT_FUNCTION, checkpoint_payload, queue_name
from contract.names import DELTA_FILE
from crispedit.models import get_layers, load_model, model_fingerprint
from curvature_store.checkpoints import checkpoint_dir, list_checkpoints
from workers import engine as engine_module
from workers.engine import Engine

REDIS_URL = redis_url(8)


@pytest.fixture
def redis():
    with redis_db(REDIS_URL) as connection:
        yield connection


@pytest.fixture
def engine(tmp_path, tiny_model_dir):
    with resident_engine(tmp_path / "store", tiny_model_dir) as engine:
        yield engine


def publish(engine: Engine, seed: int) -> tuple[str, dict[str, torch.Tensor]]:
    """A version on tiny/main whose delta is random on the engine's layers (as an edit's)."""
    gen = torch.Generator().manual_seed(seed)
    delta = {
        f"{n}.weight": 0.05 * torch.randn(w.shape, generator=gen) for n, w in engine.base.items()
    }
    stage = engine.store.staging_dir()
    save_file(delta, stage / DELTA_FILE)
    manifest = {
        "layers": engine.layers,
        "base_fingerprint": model_fingerprint(engine.model, engine.layers),
    }
    head = engine.store.head("tiny", "main")
    doc = engine.store.create_version(
        "tiny", "main", head, {DELTA_FILE: stage / DELTA_FILE}, manifest
    )
    return doc["id"], delta


def run(redis, version: str, keep: int = 3) -> Job:
    queue = Queue(queue_name("tiny"), connection=redis)
    job = queue.enqueue(CHECKPOINT_FUNCTION, checkpoint_payload("tiny", version, keep, "test"))
    run_burst(redis)
    return Job.fetch(job.id, connection=redis)


def test_the_checkpoint_is_the_model_at_the_version(redis, engine, monkeypatch, tiny_model_dir):
    monkeypatch.setattr(engine_module, "SHARD_SIZE", "100KB")  # the tiny model in several shards
    _, d1 = publish(engine, 1)
    v2, d2 = publish(engine, 2)
    job = run(redis, v2)
    assert job.get_status() == JobStatus.FINISHED, job.latest_result().exc_string
    result = job.return_value()
    folder = checkpoint_dir(engine.store, v2)
    shards = [f for f in result["files"] if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in result["files"]
    assert "config.json" in result["files"] and "tokenizer.json" in result["files"]
    assert result["bytes"] == sum(
        p.stat().st_size for p in folder.iterdir() if p.name in result["files"]
    )

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(folder) is not None
    base, _ = load_model(str(tiny_model_dir))
    loaded_params, base_params = dict(loaded.named_parameters()), dict(base.named_parameters())
    edited = set(d1)
    for name, param in base_params.items():
        expected = param + d1[name] + d2[name] if name in edited else param
        torch.testing.assert_close(loaded_params[name], expected, atol=1e-6, rtol=1e-6)
    # the resident model is back at the base for the next job
    for name, module in get_layers(engine.model, engine.layers).items():
        assert torch.equal(module.weight, engine.base[name])


def test_retention_and_a_repeat(redis, engine):
    versions = [publish(engine, seed)[0] for seed in (1, 2, 3)]
    for v in versions[:2]:
        assert run(redis, v, keep=2).get_status() == JobStatus.FINISHED
    created = list_checkpoints(engine.store)[0]["created_at"]
    again = run(redis, versions[1], keep=2)  # already there: found, not written again
    assert again.return_value()["pruned"] == []
    assert list_checkpoints(engine.store)[0]["created_at"] == created
    third = run(redis, versions[2], keep=2)
    assert third.return_value()["pruned"] == [versions[0]]
    assert [m["version"] for m in list_checkpoints(engine.store)] == versions[:0:-1]


def test_a_version_of_another_model_fails_and_writes_nothing(redis, engine):
    stage = engine.store.staging_dir()
    save_file({"w.weight": torch.ones(2, 2)}, stage / DELTA_FILE)
    other = engine.store.create_version("other", "main", None, {DELTA_FILE: stage / DELTA_FILE}, {})
    job = run(redis, other["id"])
    assert job.get_status() == JobStatus.FAILED
    assert "serves 'tiny', not 'other'" in job.latest_result().exc_string
    assert list_checkpoints(engine.store) == []
