"""`contract` is imported by the API's request path: it must pull in no heavy dependency."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "numpy", "fastapi", "pydantic", "redis", "rq", "safetensors", "transformers")


def test_contract_imports_only_the_standard_library():
    modules = (
        "contract", "contract.adapters", "contract.facts", "contract.settings", "contract.jobs",
        "contract.names", "contract.policy",
    )  # fmt: skip
    assert heavy_after_importing(modules) == ""
    # and the guard itself can fail: the engine does import torch
    assert "torch" in heavy_after_importing(("crispedit",))


def heavy_after_importing(modules: tuple[str, ...]) -> str:
    """The heavy modules a fresh interpreter holds after importing `modules`, comma-separated."""
    code = (
        f"import sys\nfor m in {modules!r}: __import__(m)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()
