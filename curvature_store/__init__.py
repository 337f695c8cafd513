"""The persistent artifact layer: capability curvature, edit streams and versioned deltas.

Everything lives in one directory ROOT (a shared volume when workers run on several hosts) as
safetensors files plus JSON manifests. The package imports only the standard library, numpy,
`safetensors.numpy` and `contract` (the name rules and file names) — never torch — because the
web API reads the store on its request path.

Layout::

    ROOT/
      store.json                             {"format": 1, "created_at": ...}
      curvature/<key>/manifest.json          key fields, meta, sha256, bytes, created_at
      curvature/<key>/curvature.safetensors  written by the engine, owned by the store
      curvature/.lock                        flock(2): serialises puts and removals
      streams/<model>/<stream>/HEAD.json     {"version": id|null, "count", "moves", "moved_at"}
      streams/<model>/<stream>/log.jsonl     append-only: one line per head move (create/rollback)
      streams/<model>/<stream>/.lock         flock(2): serialises head moves of this stream
      versions/<id>/manifest.json            caller's fields + id, model, stream, parent, number,
                                             created_at, files: {name: {sha256, bytes}}
      versions/<id>/delta.safetensors        the change against the parent version
      versions/<id>/rows.safetensors         optional: the edit rows the stream state adds up
      versions/<id>/state.safetensors        optional, older versions: that state as sums
      tmp/                                   staging, on the same filesystem so renames are atomic

`<key>` is 32 hex digits (a digest of the curvature's key fields), `<model>` and `<stream>` match
`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$` and a version id is `v` + 12 hex digits of the creation time
in milliseconds + 14 random hex digits. HEAD.json's `count` is the number of versions in the head's
lineage (0 at the base) and `moves` counts every head move. Every write goes to a temp file or
folder on the same filesystem, is fsynced and renamed into place; a stream's HEAD.json moves last,
so a process killed at any point leaves the store readable with the previous head. See
`curvature_store.store` for the details.
"""

from curvature_store.files import atomic_write_bytes, atomic_write_json, sha256_file
from curvature_store.store import Conflict, Corrupt, NotFound, Store, StoreError

__all__ = [
    "Conflict",
    "Corrupt",
    "NotFound",
    "Store",
    "StoreError",
    "atomic_write_bytes",
    "atomic_write_json",
    "sha256_file",
]
