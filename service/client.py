"""A small typed client of the CrispEdit API (httpx; no torch).

    client = CrispEditClient("http://127.0.0.1:8000", api_key)
    fact = {"subject": "Eiffel Tower", "relation": "P17", "target": "Italy"}
    job = client.submit("smollm2", [fact])
    done = client.wait(job["job_id"])
    client.download_delta(done["version"], "delta.safetensors")

Every non-2xx answer raises `ApiError` with the API's error code, message and field. Downloads are
streamed to a temp file, checked against the ETag (the file's sha256) and renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled", "rejected")


class ApiError(Exception):
    """An error answer of the API: HTTP status, error code, message and the offending field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(f"{status} {code}: {message}" + (f" (field {field})" if field else ""))
        self.status, self.code, self.message, self.field = status, code, message, field


class CrispEditClient:
    """Submit edits, follow jobs, list versions and download deltas of one API server."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> CrispEditClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs) -> Any:
        response = self.http.request(method, path, **kwargs)
        _raise_for_error(response)
        return response.json()

    def submit(
        self,
        model: str,
        facts: list[dict],
        stream: str = "main",
        parent_version: str | None = None,
        options: dict | None = None,
        idempotency_key: str | None = None,
    ) -> dict:
        """POST /v1/edits; returns `{job_id, url, ...}`. `parent_version` makes it conditional."""
        body: dict[str, Any] = {"model": model, "stream": stream, "facts": facts}
        if parent_version is not None:
            body["parent_version"] = parent_version
        if options:
            body["options"] = options
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/edits", json=body, headers=headers)

    def job(self, job_id: str) -> dict:
        """GET /v1/jobs/{id}: status, progress, timings, version and metrics or error."""
        return self._call("GET", f"/v1/jobs/{job_id}")

    def wait(
        self,
        job_id: str,
        timeout: float = 3600.0,
        poll_s: float = 0.5,
        on_progress: Callable[[dict], None] | None = None,
    ) -> dict:
        """Poll a job until it ends (or `timeout` passes: TimeoutError); returns its last view."""
        deadline, last = time.monotonic() + timeout, None
        while True:
            job = self.job(job_id)
            seen = (job["status"], repr(job.get("progress")))
            if on_progress is not None and seen != last:
                on_progress(job)
            last = seen
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
            time.sleep(poll_s)

    def cancel(self, job_id: str) -> dict:
        """POST /v1/jobs/{id}/cancel."""
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def streams(self, model: str | None = None) -> dict:
        """GET /v1/streams: the streams this key may read (only `model`'s when given)."""
        return self._call("GET", "/v1/streams", params={"model": model} if model else None)

    def versions(self, model: str, stream: str = "main") -> dict:
        """GET /v1/streams/{model}/{stream}/versions, newest first."""
        return self._call("GET", f"/v1/streams/{model}/{stream}/versions")

    def stream_log(self, model: str, stream: str = "main") -> dict:
        """GET /v1/streams/{model}/{stream}/log: the owner and every head move, who and when."""
        return self._call("GET", f"/v1/streams/{model}/{stream}/log")

    def models(self) -> list[dict]:
        """GET /v1/models: the models this key may use, with the streams it may read."""
        return self._call("GET", "/v1/models")["models"]

    def build_curvature(
        self, model: str, kind: str = "kfac", tokens: int | None = None, corpus: str | None = None
    ) -> dict:
        """POST /v1/curvature (the admin role): the built key, or the job that builds it."""
        body = {"model": model, "kind": kind, "tokens": tokens, "corpus": corpus}
        return self._call("POST", "/v1/curvature", json=body)

    def version(self, version_id: str) -> dict:
        """GET /v1/versions/{id}: the manifest."""
        return self._call("GET", f"/v1/versions/{version_id}")

    def rollback(
        self, model: str, stream: str, version: str | None, expected_head: str | None = None
    ) -> dict:
        """POST /v1/streams/{model}/{stream}/rollback to `version` (None: the base model)."""
        body: dict[str, Any] = {"version": version}
        if expected_head is not None:
            body["expected_head"] = expected_head
        return self._call("POST", f"/v1/streams/{model}/{stream}/rollback", json=body)

    def policy(self, model: str, stream: str = "main") -> dict:
        """GET /v1/streams/{model}/{stream}/policy (ApiError 404 `no_policy` when unguarded)."""
        return self._call("GET", f"/v1/streams/{model}/{stream}/policy")

    def set_policy(self, model: str, stream: str, policy: dict) -> dict:
        """PUT /v1/streams/{model}/{stream}/policy: guard the stream; the stored policy."""
        return self._call("PUT", f"/v1/streams/{model}/{stream}/policy", json=policy)

    def delete_policy(self, model: str, stream: str = "main") -> None:
        """DELETE /v1/streams/{model}/{stream}/policy: stop guarding the stream."""
        _raise_for_error(self.http.delete(f"/v1/streams/{model}/{stream}/policy"))

    def publish(self, version_id: str, expected_head: str | None = None) -> dict:
        """POST /v1/versions/{id}/publish with force: move the head to a held version."""
        body: dict[str, Any] = {"force": True}
        if expected_head is not None:
            body["expected_head"] = expected_head
        return self._call("POST", f"/v1/versions/{version_id}/publish", json=body)

    def generate(
        self,
        version_id: str,
        prompts: list[str],
        max_new_tokens: int | None = None,
        timeout: float = 600.0,
    ) -> list[dict]:
        """POST /v1/versions/{id}/generate and wait for the job: `{prompt, version, parent}`
        greedy completions at the version and at its parent. RuntimeError when the job fails."""
        body: dict[str, Any] = {"prompts": prompts}
        if max_new_tokens is not None:
            body["max_new_tokens"] = max_new_tokens
        accepted = self._call("POST", f"/v1/versions/{version_id}/generate", json=body)
        job = self.wait(accepted["job_id"], timeout=timeout)
        if job["status"] != "succeeded":
            raise RuntimeError(f"generate job {job['job_id']} {job['status']}: {job['error']}")
        return job["result"]["completions"]

    def download_delta(self, version_id: str, out: str | Path, against: str = "parent") -> Path:
        """Stream a version's delta to `out`, verified against its ETag (sha256), atomically."""
        params = {"against": "base"} if against == "base" else {}
        return self._download(f"/v1/versions/{version_id}/delta", params, out)

    def download_adapter(
        self,
        version_id: str,
        out: str | Path,
        rank: int | None = None,
        energy: float | None = None,
        archive: str = "tar.gz",
    ) -> Path:
        """Stream the version's PEFT LoRA adapter archive (`tar.gz` or `zip`) of rank `rank`, or
        of the per-layer rank holding `energy`, to `out`, verified against its ETag."""
        params: dict[str, Any] = {"against": "base", "format": "peft", "archive": archive}
        if rank is not None:
            params["rank"] = rank
        if energy is not None:
            params["energy"] = energy
        return self._download(f"/v1/versions/{version_id}/adapter", params, out)

    def create_checkpoint(self, version_id: str) -> dict:
        """POST /v1/versions/{id}/checkpoint: `{status: ready}`, or the job writing it (`job_id`,
        `url`: follow it with `wait`)."""
        return self._call("POST", f"/v1/versions/{version_id}/checkpoint")

    def checkpoint(self, version_id: str) -> dict:
        """GET /v1/versions/{id}/checkpoint: the files (name, bytes, sha256, url)."""
        return self._call("GET", f"/v1/versions/{version_id}/checkpoint")

    def download_checkpoint(self, version_id: str, out: str | Path) -> Path:
        """Download every file of the version's checkpoint into the folder `out`, each checked
        against its sha256. A file already complete is skipped, and one whose download broke
        (`NAME.part`) resumes where it stopped, with a range request."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for f in self.checkpoint(version_id)["files"]:
            self._download_resumable(f["url"], out / f["name"], f["sha256"])
        return out

    def _download_resumable(self, url: str, out: Path, sha256: str) -> None:
        """GET `url` into `out` through `out.part`, continuing a partial `.part` with
        `Range: bytes=N-`; ApiError when the whole file does not have `sha256`."""
        if out.is_file() and _sha256(out) == sha256:
            return
        part = out.with_name(out.name + ".part")
        start = part.stat().st_size if part.is_file() else 0
        headers = {"Range": f"bytes={start}-"} if start else {}
        with self.http.stream("GET", url, headers=headers) as r:
            if r.status_code == 416:  # the part is whole already (or longer: start again)
                r.read()
            else:
                if r.status_code >= 400:
                    r.read()
                    _raise_for_error(r)
                with open(part, "ab" if r.status_code == 206 else "wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
        if _sha256(part) != sha256:
            part.unlink()
            raise ApiError(200, "checksum_mismatch", f"{out.name} does not match its sha256")
        os.replace(part, out)

    def _download(self, path: str, params: dict[str, Any], out: str | Path) -> Path:
        """GET `path` streamed into `out` through a temp file, checked against the ETag (the
        file's sha256) and renamed into place; ApiError for an error answer or a mismatch."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f, self.http.stream("GET", path, params=params) as r:
                if r.status_code >= 400:
                    r.read()
                    _raise_for_error(r)
                digest = hashlib.sha256()
                for chunk in r.iter_bytes(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                expected = r.headers.get("etag", "").strip('"')
            if expected and expected != digest.hexdigest():
                raise ApiError(r.status_code, "checksum_mismatch", "download does not match ETag")
            os.replace(tmp, out)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        raise ApiError(response.status_code, error["code"], error["message"], error.get("field"))
    except (ValueError, KeyError, TypeError):
        raise ApiError(response.status_code, "http_error", response.text[:200]) from None
