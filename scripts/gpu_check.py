"""GPU smoke check: the worker's whole edit -> stream -> version path on a bf16 model, in minutes.

    scripts/gpu_check.sh                                   # SmolLM2 on cuda in bf16
    scripts/gpu_check.sh --model /models/Meta-Llama-3-8B   # a 7-8B folder
    python scripts/gpu_check.py --device cpu --dtype bfloat16 --model tests/tiny   # the CPU run

Loads the model into a `workers.engine.Engine` (the worker's resident engine) on a temporary
store, builds a small capability curvature, applies two versions of two facts each on one stream
through `Engine.apply` (the worker's real path) and materializes the head. It checks what a GPU
exposes and a CPU run hides:

- every edited weight and the projector the next job would build sit on the model's device,
  and the capability curvature, once projectors have been built from it, on the host (a GPU
  holds a curvature only in a job's projectors);
- each version's delta has almost no component in the subspace its projector blocks (rebuilt
  from the same curvature, stream state, γ and clip, applied in float64 on the model's device,
  so the check itself errs by about 1e-7): a share above `BLOCKED_SHARE_MAX` is a leak, a bf16
  rounding that escaped the projection;
- the edits land (efficacy rose), and the materialized head is the weights the engine left;

and records `torch.cuda.max_memory_allocated` per phase. Results go to
`bench/results/gpu-check-<date>.{json,md}`; the exit status is 1 when a check fails, 2 on a bad
argument.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, as `make demo` runs scripts/demo.py

import torch  # noqa: E402

from crispedit.delta import DELTA_FILE, Delta  # noqa: E402
from crispedit.editor import CrispEditor  # noqa: E402
from crispedit.models import (  # noqa: E402
    DTYPES,
    get_layers,
    model_fingerprint,
)
from crispedit.projector import build_projector  # noqa: E402
from crispedit.sequential import stream_curvature  # noqa: E402
from crispedit.streams import base_weights, materialize, read_state  # noqa: E402
from workers.engine import Engine  # noqa: E402

STREAM = "gpu-check"
# A projection in fp32 leaves about 1e-6 of a delta in the blocked subspace; a bf16 write-back
# that is not re-projected leaves percents. Anything above this share is a leak.
BLOCKED_SHARE_MAX = 1e-4
VERSIONS = (
    [
        {"subject": "Eiffel Tower", "prompt": "The Eiffel Tower is located in the city of",
         "target": "Rome"},
        {"subject": "Lionel Messi", "prompt": "Lionel Messi is a professional",
         "target": "basketball player"},
    ],
    [
        {"subject": "Python", "prompt": "The programming language Python was created by",
         "target": "Linus Torvalds"},
        {"subject": "France", "prompt": "The capital of France is", "target": "Berlin"},
    ],
)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="alias or model folder (default smollm2)")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--layers", help="edited layers (default: the model's default block)")
    ap.add_argument("--tokens", type=int, default=4096, help="curvature tokens (default 4096)")
    ap.add_argument("--epochs", type=int, help="edit epochs (default: the editor's)")
    ap.add_argument("--lr", type=float, help="edit learning rate (default: the editor's)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return ap


class Check:
    """The run's record: phases (seconds, peak device memory) and named checks."""

    def __init__(self, device: torch.device):
        self.device, self.phases, self.checks = device, {}, []
        self.layers, self.model_dtype = None, None

    def phase(self, name: str, run: Callable[[], object]) -> object:
        """Run one phase, recording its time and, on CUDA, its peak allocated memory."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        result = run()
        if cuda:
            torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
        self.phases[name] = {
            "seconds": round(time.perf_counter() - started, 2),
            "max_memory_allocated_gib": None if peak is None else round(peak / (1 << 30), 3),
        }
        return result

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c["ok"] for c in self.checks)


def off_device(tensors: dict[str, torch.Tensor | None], device: torch.device) -> list[str]:
    """Names of the tensors that are not on `device` (a cuda device matches cuda:its index)."""
    return [
        f"{name} on {t.device}"
        for name, t in tensors.items()
        if t is not None
        and (t.device.type, t.device.index or 0) != (device.type, device.index or 0)
    ]


def blocked_share(delta: torch.Tensor, curvature_layer, manifest: dict, device) -> float:
    """‖δ − P(δ)‖ / ‖δ‖ with P the K-FAC projector the version's manifest describes, rebuilt in
    float64 on `device` (an 8B layer's fp64 rotations take minutes on a CPU, a second on a GPU)."""
    options = {"clip": manifest["options"]["clip"]}
    if manifest["gamma"] is not None:
        options["gamma"] = manifest["gamma"]
    projector = build_projector(
        curvature_layer, "kfac", device=device, dtype=torch.float64, **options
    )
    d = delta.to(device, torch.float64)
    return float((d - projector(d)).norm() / d.norm().clamp_min(1e-30))


def run(args: argparse.Namespace, store_dir: Path, record: Check) -> None:
    """Every phase and check of the run, recorded in `record` (kept when a phase raises)."""
    dtype = DTYPES[args.dtype]
    name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(args.model).name)[:64] or "model"

    def load() -> Engine:
        engine = Engine(name, str(store_dir), model_path=args.model, tokens=args.tokens,
                        layers=args.layers, device=args.device)  # fmt: skip
        if engine.model.dtype != dtype:
            # the engine loads in its device's default dtype (bf16 on cuda, fp32 on cpu); the CPU
            # run asks for bf16, and the base it keeps must be the weights it then edits
            engine.model.to(dtype)
            engine.base = base_weights(engine.model, engine.layers)
        return engine

    engine = record.phase("load", load)
    record.layers = engine.layers
    record.model_dtype = str(engine.model.dtype).removeprefix("torch.")
    capability, _ = record.phase("curvature build", lambda: engine.curvature("kfac"))
    options = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None}
    versions = []
    for number, facts in enumerate(VERSIONS, 1):
        request = {"model": name, "stream": STREAM, "facts": facts, "options": options}
        versions.append(record.phase(f"version {number}", lambda r=request: engine.apply(r)))

    head = versions[-1]["version"]
    engine.set_weights_to_base()  # materializing must rebuild the head from the store alone
    record.phase(
        "materialize head", lambda: materialize(engine.store, head, engine.model, engine.base)
    )
    found = model_fingerprint(engine.model, engine.layers)
    recorded = engine.store.manifest(head)["weights_fingerprint"]
    record.check("materialized head", found == recorded, f"weights {found}, version {recorded}")
    _check_devices(record, engine, capability, head)
    _check_versions(record, engine, capability, versions)


def _check_devices(record: Check, engine: Engine, capability, head: str) -> None:
    """Weights and the projectors the next job on the stream would use on the device, the
    capability curvature on the host."""
    device = next(engine.model.parameters()).device
    weights = {n: m.weight for n, m in get_layers(engine.model, engine.layers).items()}
    record.check("edited weights on device", not off_device(weights, device),
                 ", ".join(off_device(weights, device)) or f"all on {device}")  # fmt: skip
    factors = {
        f"{n}/{k}": getattr(c, k)
        for n, c in capability.layers.items()
        for k in ("A", "B", "U_A", "U_B", "ekfac")
    }
    host = torch.device("cpu")
    record.check("curvature on the host", not off_device(factors, host),
                 ", ".join(off_device(factors, host)) or "all on the host")  # fmt: skip
    try:
        curvature = stream_curvature(capability, read_state(engine.store, head), device=device)
        editor = CrispEditor(engine.model, engine.tokenizer, curvature, layers=engine.layers,
                             progress=False)  # fmt: skip
        tensors = {
            f"{n}/{k}": getattr(P, k)
            for n, P in editor.projectors.items()
            for k in ("U_A", "U_B", "M")
        }
        missing = off_device(tensors, device)
        record.check("projector on device", not missing, ", ".join(missing) or f"all on {device}")
    except RuntimeError as err:  # a cross-device op fails before any projector exists
        record.check("projector on device", False, f"building it failed: {err}")


def _check_versions(record: Check, engine: Engine, capability, versions: list[dict]) -> None:
    """Efficacy rose in each version; each delta stays out of its projector's blocked subspace."""
    device = next(engine.model.parameters()).device
    for number, summary in enumerate(versions, 1):
        m = summary["metrics"]
        record.check(f"version {number} efficacy rose", m["efficacy"] > m["efficacy_before"],
                     f"{m['efficacy_before']:.2f} -> {m['efficacy']:.2f}")  # fmt: skip
        manifest = engine.store.manifest(summary["version"])
        state = read_state(engine.store, manifest["parent"])  # what the edit was protected by
        curvature = stream_curvature(capability, state, manifest["beta"], device=device)
        delta = Delta.load(engine.store.version_file(summary["version"], DELTA_FILE))
        shares = {
            key: blocked_share(d, curvature.layers[key.removesuffix(".weight")], manifest, device)
            for key, d in delta.tensors.items()
        }
        worst = max(shares.values())
        detail = f"largest blocked share {worst:.2e} (max {BLOCKED_SHARE_MAX:.0e})"
        record.check(
            f"version {number} delta in the kept subspace", worst <= BLOCKED_SHARE_MAX, detail
        )


def write_results(record: Check, args, error: str | None) -> tuple[Path, Path]:
    """The run as JSON and as a markdown page in `args.out`, named by today's date (UTC)."""
    now = dt.datetime.now(dt.timezone.utc)
    device = torch.device(args.device)
    result = {
        "date": now.isoformat(timespec="seconds"),
        "command": "scripts/gpu_check.sh " + " ".join(sys.argv[1:]),
        "model": args.model,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "model_dtype": record.model_dtype,
        "layers": record.layers,
        "torch": torch.__version__,
        "ok": record.ok and error is None,
        "phases": record.phases,
        "checks": record.checks,
        "error": error,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gpu-check-{now:%Y-%m-%d}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# GPU check {now:%Y-%m-%d}: {'passed' if result['ok'] else 'FAILED'}",
        "",
        f"`{result['command']}`: {args.model} on {result['device_name']} ({args.device}), "
        f"{args.dtype}, torch {torch.__version__}; layers {result['layers']}.",
        "",
        "| phase | seconds | max_memory_allocated GiB |",
        "|---|---:|---:|",
        *(
            f"| {name} | {p['seconds']} | {p['max_memory_allocated_gib'] or '-'} |"
            for name, p in result["phases"].items()
        ),
        "",
        "| check | ok | detail |",
        "|---|---|---|",
        *(
            f"| {c['check']} | {'yes' if c['ok'] else 'NO'} | {c['detail']} |"
            for c in result["checks"]
        ),
    ]
    if error:
        lines += ["", "Stopped by an error:", "", "```", error.rstrip(), "```"]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when every check passed, 1 when one failed or a phase raised, 2 on a
    bad argument."""
    args = parser().parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but this machine has no CUDA device", file=sys.stderr)
        return 2
    record, error = Check(device), None
    with tempfile.TemporaryDirectory(prefix="gpu-check-store-") as store_dir:
        try:
            run(args, Path(store_dir), record)
        except Exception:  # a phase that raises is a failed check, written down as such
            error = traceback.format_exc()
    json_path, md_path = write_results(record, args, error)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0 if record.ok and error is None else 1


if __name__ == "__main__":
    sys.exit(main())
