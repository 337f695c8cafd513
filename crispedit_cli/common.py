"""What every `crispedit` command shares: the error it raises, where it writes, how it names the
device and dtype of its model, and the checks of numeric flags.

Two promises hold for every command: a failure is one line on stderr and exit status 2 (the error
types listed in `USER_ERRORS` are the user's mistakes, never tracebacks), and a failed command
writes nothing to its `--out` (`staged_output` moves results in only once they are complete).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from contract.facts import FactsError
from crispedit.artifacts import ArtifactError
from crispedit.corpus import CorpusError
from crispedit.delta import DeltaError
from crispedit.models import DTYPES, ModelError, load_model, resolve_device, resolve_dtype
from crispedit.projector import resolve_method
from curvature_store import StoreError

DEFAULT_TOKENS = 20_000
USER_ERRORS = (
    FactsError, CorpusError, ModelError, ArtifactError, DeltaError, StoreError, ValueError, OSError
)  # fmt: skip


class CLIError(Exception):
    """A usage error found by the CLI itself (a bad combination of flags)."""


@contextmanager
def staged_output(out: str | Path | None) -> Iterator[Path | None]:
    """Yield a temp folder next to `out`; on success move its files into `out`, else drop it.

    With no `out`, yields None (the command writes elsewhere, e.g. to a store).
    """
    if out is None:
        yield None
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.stage-"))
    try:
        yield stage
        out.mkdir(exist_ok=True)
        for item in stage.iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def open_store(path: str, create: bool = True):
    """The store at `path` (created when missing, unless `create` is False)."""
    from curvature_store import Store

    return Store(path, create=create)


def store_model_name(args: argparse.Namespace) -> str:
    """The model's name in the store: `--model-name`, else the alias or the folder's name."""
    if args.model_name:
        return args.model_name
    name = Path(args.model.rstrip("/")).name or args.model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "model"


# ---------------------------------------------------------------------------------------------
# Device and dtype of the model a command loads


def add_placement_args(p: argparse.ArgumentParser) -> None:
    """`--device` and `--dtype`, on every command that loads a model."""
    p.add_argument(
        "--device", default="auto", metavar="{auto,cpu,cuda,cuda:N,mps}",
        help="where the model runs (auto: cuda when present, else cpu)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES],
        help="the model's dtype (auto: bfloat16 on an accelerator, float32 on cpu); "
        "curvature and deltas stay float32",
    )  # fmt: skip


def resolve_placement(args: argparse.Namespace) -> None:
    """Replace the `--device`/`--dtype` choices by the torch device and dtype they mean here.

    Runs before any command starts, so a device this machine lacks fails before anything is
    loaded or written.
    """
    if hasattr(args, "device"):
        args.device = resolve_device(args.device)
        args.dtype = resolve_dtype(args.dtype, args.device)


def placement_record(args: argparse.Namespace) -> dict:
    """The device and dtype a command ran in, as its reports record them."""
    return {"device": str(args.device), "dtype": str(args.dtype).removeprefix("torch.")}


def load_model_of(args: argparse.Namespace):
    """The `--model` of a command, loaded on its `--device` in its `--dtype`, and its tokenizer."""
    return load_model(args.model, dtype=args.dtype, device=args.device)


# ---------------------------------------------------------------------------------------------
# Numeric flags, checked before any command runs


def check_numbers(args: argparse.Namespace) -> None:
    """Raise CLIError for a numeric flag out of its range (whichever command defines it)."""
    for name in ("tokens", "epochs", "batch_size", "limit", "seq_len", "curvature_batch"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    for flag, name in (
        ("--tokens", "eval_tokens"),
        ("--retention", "retention"),
        ("--mmlu", "mmlu"),
        ("--anchors", "anchors"),
        ("--anchor-weight", "anchor_weight"),
    ):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise CLIError(f"{flag} must not be negative, not {value}")
    gamma = getattr(args, "gamma", None)
    if gamma is not None and not 0.0 <= gamma <= 1.0:
        raise CLIError(f"--gamma must be between 0 and 1, not {gamma}")
    clip = getattr(args, "clip", None)
    if clip is not None and not 0.0 <= clip < 1.0:
        raise CLIError(f"--clip must be at least 0 and below 1, not {clip}")
    if clip and resolve_method(args.method) == "ekfac":
        raise CLIError("--clip applies to kfac and nullspace, not to ekfac")
    lr = getattr(args, "lr", None)
    if lr is not None and not lr > 0:
        raise CLIError(f"--lr must be positive, not {lr}")
