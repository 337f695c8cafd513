"""The engine's fact parser (`crispedit/facts.py`), loaded without the `crispedit` package.

`crispedit/__init__.py` imports the torch-based engine, and the request path must never import
torch (it would add seconds and gigabytes to every API process). `crispedit/facts.py` itself is
pure standard library, so we load that one file as a standalone module rather than re-implement
the record rules: an API-accepted fact is then exactly what the engine accepts.
`importlib.util.find_spec("crispedit")` locates the package without executing its `__init__`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_MODULE_NAME = "_crispedit_facts_standalone"


def _load() -> ModuleType:
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    package = importlib.util.find_spec("crispedit")
    if package is None or package.origin is None:
        raise ImportError("the crispedit package is not installed")
    path = Path(package.origin).parent / "facts.py"
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path.name} from the crispedit package")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


_facts = _load()

Fact = _facts.Fact
FactsError = _facts.FactsError
fact_from_record = _facts.fact_from_record
fact_to_record = _facts.fact_to_record
facts_digest = _facts.facts_digest

__all__ = ["Fact", "FactsError", "fact_from_record", "fact_to_record", "facts_digest"]
