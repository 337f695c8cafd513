"""`crispedit plan`: the memory each phase of an edit needs on a GPU, before renting one.

    crispedit plan --model llama-3-8b --layers 21-25 --dtype bfloat16

The model is named by its config alone (a shipped config, a local folder, `smollm2`) and never
loaded; crispedit/plan.py adds up the tensors of each phase.
"""

from __future__ import annotations

import argparse
import json

from crispedit.corpus import BATCH_SIZE, SEQ_LEN
from crispedit.models import DTYPES
from crispedit_cli.common import CLIError


def cmd_plan(args: argparse.Namespace) -> None:
    """Print the memory plan of `--model` as a table (or JSON)."""
    from crispedit.plan import (
        PlanError,
        Workload,
        format_plan,
        load_config,
        meta_model,
        model_shape,
        plan_memory,
    )

    if min(args.batch_size, args.seq_len, args.facts) < 1 or args.micro_batch < 0:
        raise CLIError("--batch-size, --seq-len and --facts must be at least 1, --micro-batch 0+")
    try:
        model = meta_model(load_config(args.model))
        shape = model_shape(model, args.layers, name=args.model)
        workload = Workload(
            dtype=DTYPES[args.dtype],
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            facts=args.facts,
            micro_batch=args.micro_batch,
            kind=args.kind,
            projector_dtype=args.projector_dtype,
        )
        plan = plan_memory(shape, workload)
    except PlanError as err:
        raise CLIError(str(err)) from err
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))


def add_plan(sub: argparse._SubParsersAction) -> None:
    """`crispedit plan`."""
    from contract.settings import DEFAULTS, PROJECTOR_DTYPES
    from crispedit.plan import shipped_configs

    plan = sub.add_parser("plan", help="the GPU memory of each phase, from a model's config")
    configs = ", ".join(shipped_configs())
    plan.add_argument("--model", required=True, help=f"{configs}, smollm2, or a model folder")
    plan.add_argument("--layers", help="block indices or ranges (21-25), or module names")
    plan.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    plan.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="curvature batch size")
    plan.add_argument("--seq-len", type=int, default=SEQ_LEN, help="curvature sequence length")
    plan.add_argument("--facts", type=int, default=DEFAULTS.batch_size, help="facts per step")
    plan.add_argument(
        "--micro-batch", type=int, default=DEFAULTS.micro_batch, help="facts per forward (0: all)"
    )
    plan.add_argument("--kind", choices=("kfac", "ekfac"), default="kfac")
    plan.add_argument(
        "--projector-dtype", choices=PROJECTOR_DTYPES, default=DEFAULTS.projector_dtype
    )
    plan.add_argument("--json", action="store_true", help="print JSON instead of the table")
    plan.set_defaults(func=cmd_plan)
