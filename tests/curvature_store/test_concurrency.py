"""The store under real processes: racing writers, many writers, and writers killed with -9."""

from __future__ import annotations

import multiprocessing
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import store_workers
from store_workers import MODEL, STREAM, child_env, stage

from curvature_store import Store

WORKERS = Path(store_workers.__file__)
SIZE = store_workers.LOOP_SIZE


def spawn_all(target, args_for: list[tuple]) -> list:
    """Run `target(*args, results)` in spawned processes; their results (one per process)."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, results)) for args in args_for]
    for proc in procs:
        proc.start()
    return ctx, results, procs


def assert_linear(store: Store, length: int) -> list[dict]:
    """The head's lineage has `length` versions numbered length..1, each the parent of the next."""
    lineage = store.lineage(MODEL, STREAM)
    assert [d["number"] for d in lineage] == list(range(length, 0, -1))
    assert [d["parent"] for d in lineage] == [d["id"] for d in lineage[1:]] + [None]
    assert lineage[0]["id"] == store.head(MODEL, STREAM)
    return lineage


def test_racing_writers_on_one_parent_one_wins(tmp_path):
    """Three processes create on the same parent at once, 20 times: one wins each round."""
    root, writers, rounds = str(tmp_path / "store"), 3, 20
    Store(root)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(writers), ctx.Queue()
    procs = [
        ctx.Process(target=store_workers.race, args=(root, w, rounds, barrier, results))
        for w in range(writers)
    ]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=60) for _ in range(writers * rounds)]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert not [o for o in outcomes if o[2] == "error"], outcomes

    store = Store(root)
    lineage = assert_linear(store, rounds)
    by_round = {r: [o for o in outcomes if o[0] == r] for r in range(rounds)}
    for r, entries in by_round.items():
        winners = [o for o in entries if o[2] == "won"]
        assert len(winners) == 1, entries
        assert all(o[4] == winners[0][4] for o in entries)  # everyone raced on the same parent
        assert all(o[3] == winners[0][3] for o in entries if o[2] == "conflict")  # saw the winner
        assert lineage[rounds - 1 - r]["id"] == winners[0][3]
    assert len(store.versions(MODEL, STREAM)) == rounds  # no losing version was published
    assert store.verify() == [] and store.garbage() == []


def test_many_writers_with_retry_lose_no_update(tmp_path):
    """Four processes each add 8 versions on the moving head, retrying on Conflict."""
    root, writers, count = str(tmp_path / "store"), 4, 8
    Store(root)
    _, results, procs = spawn_all(
        store_workers.append_many, [(root, w, count) for w in range(writers)]
    )
    outcomes = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    created = {}
    for writer, ids, _conflicts in outcomes:
        assert isinstance(ids, list), ids
        created[writer] = ids
    store = Store(root)
    lineage = assert_linear(store, writers * count)
    assert sorted(d["id"] for d in lineage) == sorted(i for ids in created.values() for i in ids)
    for writer, ids in created.items():  # each writer's versions keep their order in the chain
        own = [d["id"] for d in reversed(lineage) if d["writer"] == writer]
        assert own == ids
    assert store.verify() == [] and store.garbage() == []


def test_writer_killed_at_random_points_leaves_a_readable_store(tmp_path):
    """Kill -9 a writer that creates 1 MiB versions in a loop, 15 times at random moments."""
    root = tmp_path / "store"
    store = Store(root)
    rng = random.Random(1234)
    ours = 0
    for round_ in range(15):
        proc = subprocess.Popen(
            [sys.executable, str(WORKERS), "loop", str(root)],
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.25))
        proc.kill()
        proc.wait()
        proc.stdout.close()

        store = Store(root)  # a fresh reader, like the next worker or the API
        assert store.verify() == []
        head = store.head(MODEL, STREAM)
        lineage = assert_linear(store, store.head_info(MODEL, STREAM)["count"])
        if head is not None:
            store.cumulative_delta(head)
        doc = store.create_version(
            MODEL, STREAM, head, stage(store, round_, size=SIZE, state=True), {}
        )
        ours += 1
        assert store.head(MODEL, STREAM) == doc["id"] and doc["number"] == len(lineage) + 1
    assert len(store.versions(MODEL, STREAM)) > ours  # the killed writers did get work done
    store.collect_garbage(max_age_s=0)
    assert store.garbage() == [] and store.verify() == []
    assert_linear(store, store.head_info(MODEL, STREAM)["count"])


def run_worker(
    root: Path, command: str, failpoint: str | None = None
) -> subprocess.CompletedProcess:
    env = child_env(CURVATURE_STORE_FAILPOINT=failpoint) if failpoint else child_env()
    return subprocess.run(
        [sys.executable, str(WORKERS), command, str(root)], env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize("failpoint", ["create:staged", "create:published", "create:head_moved"])
def test_writer_killed_at_each_step_of_create(tmp_path, failpoint):
    """Deterministic kills at each step: before publishing, before the head moves, after."""
    root = tmp_path / "store"
    store = Store(root)
    v1 = stage(store, seed=1)
    v1 = store.create_version(MODEL, STREAM, None, v1, {})
    done = run_worker(root, "create-once", failpoint)
    assert done.returncode == -9, done.stderr

    store = Store(root)
    assert store.verify() == []
    head = store.head(MODEL, STREAM)
    if failpoint == "create:head_moved":  # committed: the head moved, the log line was lost
        assert head != v1["id"] and store.manifest(head)["parent"] == v1["id"]
        assert [d["id"] for d in store.versions(MODEL, STREAM)] == [head, v1["id"]]
        assert store.garbage() == []
        # The next head move logs the missing one first, so the version stays listed.
        store.rollback(MODEL, STREAM, v1["id"])
        listed = store.versions(MODEL, STREAM)
        assert [(d["id"], d["in_lineage"]) for d in listed] == [(head, False), (v1["id"], True)]
    else:  # not committed: the previous head stands, the leftover is garbage
        assert head == v1["id"]
        assert [d["id"] for d in store.versions(MODEL, STREAM)] == [v1["id"]]
        garbage = store.garbage()
        assert len(garbage) == 1
        assert garbage[0].parent.name == ("tmp" if failpoint == "create:staged" else "versions")
        assert store.collect_garbage(max_age_s=0) == garbage
    v2 = store.create_version(MODEL, STREAM, store.head(MODEL, STREAM), stage(store, seed=2), {})
    assert store.head(MODEL, STREAM) == v2["id"]
    assert store.verify() == [] and store.garbage() == []


def test_writer_killed_after_a_rollback_moved_the_head(tmp_path):
    root = tmp_path / "store"
    store = Store(root)
    v1 = store.create_version(MODEL, STREAM, None, stage(store, seed=1), {})
    v2 = store.create_version(MODEL, STREAM, v1["id"], stage(store, seed=2), {})
    done = run_worker(root, "rollback-once", "rollback:head_moved")
    assert done.returncode == -9, done.stderr
    store = Store(root)
    assert store.head(MODEL, STREAM) == v1["id"] and store.verify() == []
    v3 = store.create_version(MODEL, STREAM, v1["id"], stage(store, seed=3), {})
    ops = [(e["op"], e["version"]) for e in store._read_log(root / "streams" / MODEL / STREAM)]
    assert ops == [
        ("create", v1["id"]),
        ("create", v2["id"]),
        ("rollback", v1["id"]),  # recovered by the next move
        ("create", v3["id"]),
    ]
