"""Names and ids the store, the engine and the API share: their rules and the artifact file names.

A model or stream name becomes a folder of the store, so its rule is also the guard against path
traversal: the store refuses a bad name before any filesystem access, and the API answers 400 (or
422 in a body) with the same words. Standard library only.

Every rule is checked with `fullmatch` (through `is_name` and its siblings): `re.match` with `$`
also accepts a trailing newline ("nl\n" would become a folder), so the patterns carry no anchors
and no caller matches them itself.
"""

from __future__ import annotations

import re

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = (
    "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, and no '..'"
)
# `v` + 12 hex digits of the creation time in milliseconds + 14 random ones: ids sort by age
VERSION_RE = re.compile(r"v[0-9a-f]{26}")
VERSION_RULE = "expected 'v' followed by 26 hex digits"
KEY_RE = re.compile(r"[0-9a-f]{32}")  # a curvature key: a digest of its key fields
FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.safetensors")  # a file of a version

SHA256_RE = re.compile(r"[0-9a-f]{64}")  # a file's sha256, as manifests record it
# an RQ job id as the API makes them (uuid4 hex) or a caller may have (RQ's own ids, tests')
JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
JOB_ID_RULE = "expected 1-64 letters, digits, '_' or '-'"

DELTA_FILE = "delta.safetensors"  # a version's change against its parent
ROWS_FILE = "rows.safetensors"  # a version's own edits as K-FAC factor rows (a and g)
STATE_FILE = "state.safetensors"  # the whole stream state as sums (versions before ROWS_FILE)
CURVATURE_FILE = "curvature.safetensors"
MANIFEST_FILE = "manifest.json"  # of a version or a curvature artifact
HEAD_FILE = "HEAD.json"  # a stream's head pointer
POLICY_FILE = "policy.json"  # a stream's publishing policy (contract.policy)


def is_name(value: object) -> bool:
    """Whether `value` is a valid model or stream name (NAME_RULE)."""
    return isinstance(value, str) and bool(NAME_RE.fullmatch(value)) and ".." not in value


def is_version_id(value: object) -> bool:
    """Whether `value` is a well-formed version id (VERSION_RULE)."""
    return isinstance(value, str) and bool(VERSION_RE.fullmatch(value))


def is_curvature_key(value: object) -> bool:
    """Whether `value` is a well-formed curvature key (32 hex digits)."""
    return isinstance(value, str) and bool(KEY_RE.fullmatch(value))


def is_file_name(value: object) -> bool:
    """Whether `value` is a file name a version may hold (`NAME.safetensors`, no folders)."""
    return isinstance(value, str) and bool(FILE_RE.fullmatch(value))


def is_sha256(value: object) -> bool:
    """Whether `value` is a lowercase sha256 hex digest."""
    return isinstance(value, str) and bool(SHA256_RE.fullmatch(value))


def is_job_id(value: object) -> bool:
    """Whether `value` is a well-formed job id (JOB_ID_RULE)."""
    return isinstance(value, str) and bool(JOB_ID_RE.fullmatch(value))


CHECKPOINT_MANIFEST = "checkpoint.json"  # a merged checkpoint's files, sizes and sha256
# a file of a merged checkpoint (HF folder): config, tokenizer, weights shards; no folders
CHECKPOINT_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
