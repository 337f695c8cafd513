"""What every `crispedit` command shares: the error it raises, where it writes, how it names the
device and dtype of its model, and the checks of numeric flags.

Two promises hold for every command: a failure is one line on stderr and exit status 2 (the error
types listed in `USER_ERRORS` are the user's mistakes, never tracebacks), and a failed command
writes nothing to its `--out` (`staged_output` moves results in only once they are complete).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from contract.facts import FactsError
from contract.settings import DEFAULTS, OPTION_NAMES, EditSettings, SettingsError
from crispedit.artifacts import ArtifactError
from crispedit.corpus import CorpusError
from crispedit.delta import DeltaError
from crispedit.models import DTYPES, ModelError, load_model, resolve_device, resolve_dtype
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
    for name in ("tokens", "limit", "seq_len", "curvature_batch"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    for flag, name in (
        ("--tokens", "eval_tokens"),
        ("--retention", "retention"),
        ("--mmlu", "mmlu"),
    ):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise CLIError(f"{flag} must not be negative, not {value}")


# ---------------------------------------------------------------------------------------------
# Edit settings: one flag per option of contract.settings.EditSettings

FLAG_TYPES = {"int": int, "float": float, "str": str}


def add_settings_args(p: argparse.ArgumentParser, api_only: bool = False) -> None:
    """A flag per editor option of `EditSettings` (`--anchor-weight` for anchor_weight), its
    help, choices and default from there, so the CLI cannot drift from the engine and the API.
    Every flag defaults to None ("not given"): `settings_from_args` fills in the defaults.
    `api_only` keeps the options a client of the service may set (`crispedit submit`)."""
    group = p.add_argument_group("edit settings")
    for field in dataclasses.fields(EditSettings):
        if field.name == "layers" or (api_only and not field.metadata.get("api")):
            continue  # every command that edits takes --layers itself
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata['doc']} (default: {getattr(DEFAULTS, field.name)})"
        if field.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(
                flag, type=FLAG_TYPES[field.type], choices=field.metadata.get("choices"),
                help=help_text,
            )  # fmt: skip


def given_options(args: argparse.Namespace) -> dict:
    """The edit options the command line gave (those of `add_settings_args` not left out)."""
    return {
        name: getattr(args, name)
        for name in OPTION_NAMES
        if name != "layers" and getattr(args, name, None) is not None
    }


def settings_from_args(args: argparse.Namespace) -> EditSettings:
    """The edit's settings from its flags; a bad value is a CLIError naming the flag."""
    try:
        return EditSettings.from_options(given_options(args))
    except SettingsError as err:
        flag = "--" + err.field.replace("_", "-")
        raise CLIError(flag + str(err).removeprefix(err.field)) from err
