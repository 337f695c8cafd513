"""Writer processes for the concurrency tests: spawned by multiprocessing, or run as a script.

Kept apart from the test modules so that a child process imports only this file, numpy,
safetensors and the store (no torch, no pytest fixtures). Script use:

    python store_workers.py loop ROOT          # print "ready", then create versions forever
    python store_workers.py create-once ROOT   # create one version on the head, print its id
    python store_workers.py rollback-once ROOT # roll the head back to its parent
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from curvature_store import Conflict, Store

MODEL, STREAM = "tiny", "main"
LOOP_SIZE = (
    128 * 1024
)  # float32 values per file in the `loop` writer: 512 KiB delta + 512 KiB state


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that must import this checkout's `curvature_store`.

    The repository root goes first on PYTHONPATH: run as a script, a child's sys.path starts with
    this folder instead, and an editable install made before the package had its `__init__.py`
    would otherwise resolve `curvature_store` to an empty namespace package.
    """
    repo = str(Path(__file__).resolve().parents[2])
    paths = [repo, *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


def stage(store: Store, seed: int, size: int = 64, state: bool = False) -> dict[str, Path]:
    """Write a delta (and optionally a state file) of `size` float32 values into staging."""
    rng = np.random.default_rng(seed)
    folder = store.staging_dir()
    files = {"delta.safetensors": folder / "delta.safetensors"}
    save_file(
        {"layer.weight": rng.standard_normal(size, dtype=np.float32)}, files["delta.safetensors"]
    )
    if state:
        files["state.safetensors"] = folder / "state.safetensors"
        save_file(
            {"factor": rng.standard_normal(size, dtype=np.float32)}, files["state.safetensors"]
        )
    return files


def race(root: str, writer: int, rounds: int, barrier, results) -> None:
    """Each round: read the head, stage, wait for all writers, then all create on that head."""
    store = Store(root)
    try:
        for round_ in range(rounds):
            barrier.wait(timeout=60)  # everyone finished the previous round
            parent = store.head(MODEL, STREAM)
            files = stage(store, seed=writer * 1000 + round_)
            barrier.wait(timeout=60)  # everyone read the same head and staged: go
            try:
                doc = store.create_version(MODEL, STREAM, parent, files, {"writer": writer})
                results.put((round_, writer, "won", doc["id"], parent))
            except Conflict as err:
                results.put((round_, writer, "conflict", err.head, parent))
    except Exception as err:  # report instead of hanging the parent on a barrier
        barrier.abort()
        results.put((-1, writer, "error", repr(err), None))


def append_many(root: str, writer: int, count: int, results) -> None:
    """Create `count` versions, each on the current head, retrying on Conflict."""
    store = Store(root)
    created, conflicts = [], 0
    try:
        while len(created) < count:
            parent = store.head(MODEL, STREAM)
            files = stage(store, seed=writer * 1000 + len(created))
            try:
                doc = store.create_version(MODEL, STREAM, parent, files, {"writer": writer})
                created.append(doc["id"])
            except Conflict:
                conflicts += 1
        results.put((writer, created, conflicts))
    except Exception as err:
        results.put((writer, repr(err), conflicts))


def main(argv: list[str]) -> None:
    command, root = argv[0], argv[1]
    store = Store(root)
    if command == "loop":
        print("ready", flush=True)
        seed = 0
        while True:
            seed += 1
            files = stage(store, seed, size=LOOP_SIZE, state=True)
            store.create_version(MODEL, STREAM, store.head(MODEL, STREAM), files, {"seed": seed})
    elif command == "create-once":
        files = stage(store, seed=7, state=True)
        doc = store.create_version(MODEL, STREAM, store.head(MODEL, STREAM), files, {})
        print(doc["id"], flush=True)
    elif command == "rollback-once":
        parent = store.manifest(store.head(MODEL, STREAM))["parent"]
        print(store.rollback(MODEL, STREAM, parent)["version"], flush=True)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
