"""Layers point down: the engine (`crispedit/`) imports neither the web service nor the worker.

The scan reads every module's syntax tree, so an import hidden inside a function (how the old
`crispedit/cli.py` took `service.client` and `workers.worker`) counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("service", "workers")


def _imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import statement and `import_module("...")` call."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def forbidden_imports(package: Path) -> list[str]:
    """`file:line module` for each import of a FORBIDDEN package by a module under `package`."""
    hits = []
    for path in sorted(package.rglob("*.py")):
        for line, module in _imported_names(ast.parse(path.read_text(), filename=str(path))):
            if module.split(".")[0] in FORBIDDEN:
                hits.append(f"{path.relative_to(package).as_posix()}:{line} {module}")
    return hits


def test_the_engine_imports_no_service_and_no_worker():
    assert (ROOT / "crispedit" / "models.py").is_file()  # the scan looks at the real package
    assert forbidden_imports(ROOT / "crispedit") == []


def test_the_scan_finds_imports_anywhere_in_a_module(tmp_path):
    package = tmp_path / "crispedit"
    (package / "sub").mkdir(parents=True)
    (package / "cli.py").write_text(
        "import os\n"
        "def worker(args):\n"
        "    from workers.worker import run_worker\n"
        "    import service.client as client\n"
    )
    (package / "sub" / "late.py").write_text(
        "import importlib\nmod = importlib.import_module('service.main')\n"
    )
    # names that only look alike, and relative imports, are the engine's own business
    (package / "fine.py").write_text(
        "import services_extra\nfrom crispedit import service_name\nfrom . import workers\n"
    )
    assert forbidden_imports(package) == [
        "cli.py:3 workers.worker",
        "cli.py:4 service.client",
        "sub/late.py:2 service.main",
    ]
