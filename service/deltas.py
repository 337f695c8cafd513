"""Delta files to download: a version's own delta, or its cumulative delta against the base.

A version never changes, so neither does either file: the sha256 is a strong ETag, and the
cumulative delta, which the store computes by summing the chain, is computed once per version and
kept in a cache folder (`Settings.cumulative_cache_dir`) beside its sha256. The cache holds at
most `Settings.cache_max_bytes` of deltas (each is as large as the edited layers: ~18 MB for
SmolLM2's five): when a new one pushes it over, the least recently downloaded are removed. An
entry used in the last EVICT_GRACE_S seconds is kept even then, because its download may not
have opened the file yet; the next miss removes it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from starlette.responses import FileResponse, Response

from contract.names import DELTA_FILE
from curvature_store import Store, atomic_write_json, sha256_file

EVICT_GRACE_S = 10.0  # an entry used this recently is not evicted (its download may be starting)


def version_delta(store: Store, version_id: str) -> tuple[Path, str]:
    """(path, sha256) of a version's delta file, verified against its manifest by the store."""
    path = store.version_file(version_id, DELTA_FILE)
    return path, store.manifest(version_id)["files"][DELTA_FILE]["sha256"]


def cumulative_delta(
    store: Store, cache_dir: Path, version_id: str, max_bytes: int | None = None
) -> tuple[Path, str]:
    """(path, sha256) of the version's cumulative delta against the base, cached in `cache_dir`
    (at most `max_bytes` of deltas there, least recently used evicted first; None: no bound).

    The file is `Store.write_cumulative_delta`'s (atomic), so two requests computing it at once
    both write the same bytes, and a reader never sees a partial file. The cache is trusted as it
    is while the file's identity (inode, size, mtime, ctime) is the one recorded beside it; a file
    touched since is rehashed, and recomputed unless it still has the recorded sha256, so the
    download never disagrees with its ETag.
    """
    store.manifest(version_id)  # NotFound / StoreError before touching the cache
    path = cache_dir / f"{version_id}.safetensors"
    record_path = cache_dir / f"{version_id}.json"
    try:
        record = json.loads(record_path.read_text())
        sha = record["sha256"]
        if _identity(path) == record["identity"] or (
            path.stat().st_size == record["bytes"] and sha256_file(path) == sha
        ):
            os.utime(record_path)  # the record's mtime is the entry's last use, for eviction
            return path, sha
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing, stale or corrupt: recompute below
    cache_dir.mkdir(parents=True, exist_ok=True)
    store.write_cumulative_delta(version_id, path)
    record = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "identity": None}
    record["identity"] = _identity(path)
    atomic_write_json(record_path, record)
    if max_bytes is not None:
        evict(cache_dir, max_bytes, keep=version_id)
    return path, record["sha256"]


def evict(cache_dir: Path, max_bytes: int, keep: str | None = None) -> list[str]:
    """Remove the least recently used cached deltas until the cache holds at most `max_bytes`;
    never `keep` nor an entry used in the last EVICT_GRACE_S seconds. Returns the version ids
    removed. Safe beside other API processes doing the same: a file already gone is skipped."""
    entries = []
    for record_path in cache_dir.glob("*.json"):
        try:
            used = record_path.stat().st_mtime
            size = (cache_dir / f"{record_path.stem}.safetensors").stat().st_size
        except OSError:
            continue
        entries.append((used, record_path.stem, size))
    total = sum(size for _, _, size in entries)
    now = time.time()
    removed = []
    for used, version_id, size in sorted(entries):
        if total <= max_bytes:
            break
        if version_id == keep or now - used < EVICT_GRACE_S:
            continue
        # the record first: without it a reader recomputes rather than trusting a vanishing file
        for name in (f"{version_id}.json", f"{version_id}.safetensors"):
            (cache_dir / name).unlink(missing_ok=True)
        total -= size
        removed.append(version_id)
    return removed


def _identity(path: Path) -> list[int]:
    """What changes whenever a file's bytes may have: inode, size, mtime and ctime."""
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def etag(sha256: str) -> str:
    """The strong ETag of a file with this sha256 (quoted, as HTTP wants)."""
    return f'"{sha256}"'


def not_modified(if_none_match: str | None, sha256: str) -> bool:
    """Whether an `If-None-Match` header matches the file (so the answer is 304)."""
    if not if_none_match:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip().removeprefix("W/")  # weak comparison, as RFC 9110 asks for GET
        if tag in ("*", etag(sha256)):
            return True
    return False


def immutable_file(
    path: Path, sha256: str, model: str, filename: str, media_type: str, if_none_match: str | None
) -> Response:
    """A file of a version (a delta, an adapter archive, a checkpoint shard) as a download: its
    sha256 as ETag and `X-Content-SHA256`, `X-Model`, cached for a year (a version never changes,
    and neither does anything made from it); 304 when `If-None-Match` matches."""
    headers = {
        "ETag": etag(sha256),
        "X-Content-SHA256": sha256,
        "X-Model": model,
        "Cache-Control": "private, max-age=31536000, immutable",
    }
    if not_modified(if_none_match, sha256):
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type=media_type, filename=filename, headers=headers)
