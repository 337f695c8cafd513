"""The docker images' Python environments: everything an image runs imports inside that image.

For each image the test reads its Dockerfile (never a list kept by hand) and derives
- what it installs: every `pip install` of its RUN lines, i.e. the requirement files it COPYs
  and names with -r, the packages named on the line, and the project (`.` or `.[extras]`) with
  its dependencies and extras from pyproject.toml, unless --no-deps; the distributions these pull
  in are their closure as this venv's metadata reports it. The project's own packages are the
  folders the Dockerfile COPYs next to the pyproject.toml it installs, so a package that is not
  copied is missing, as it would be in the image;
- what it runs: ENTRYPOINT + CMD and the HEALTHCHECK, followed through a copied shell script's
  `exec` line to the program it starts, a console script to its module (the project's from
  pyproject.toml, another's from its distribution), `python -c`, `python -m` and `python FILE`,
  and `module:attribute` arguments such as uvicorn's `service.main:create_app`.

From these entry points the imports are walked statically (ast) through the project's packages.
Each import must be the standard library, a module of a package the image installs, or a module
of a distribution in the image's closure. The rules:
- every import of a module that the image loads counts, at module level or inside a function:
  any function of a loaded module may run in the container (a CLI's every command is reachable
  from the same program), except in the few functions NEVER_CALLED names for an image, each
  with its reason;
- except the imports under `if TYPE_CHECKING:`, which never run, and those in a `try` whose
  handlers catch ImportError or ModuleNotFoundError (and the fallbacks in those handlers): the
  code is written to run without them;
- a module loaded by path or by a computed name (importlib) is not followed: the API's
  runtime check at the end of this file imports every module of `service` for real;
- a requirement file written inside the image (not copied from the repository) is not read, so
  the environment derived may be smaller than the image's, never larger: the test can fail
  wrongly, never pass wrongly.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, distribution, entry_points
from importlib.metadata import packages_distributions as _packages_distributions
from pathlib import Path

import pytest
from dockerfiles import (
    Instructions,
    container_argv,
    copied_files,
    dockerfile,
    healthcheck_argv,
    pip_installs,
    requirement_file,
)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {
    "api": ROOT / "docker" / "api.Dockerfile",
    "worker": ROOT / "docker" / "worker.Dockerfile",
}
# Docker's PATH when an image sets none: where a copied script is found by its bare name.
DEFAULT_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
# `module:attribute`, the way uvicorn, gunicorn and console scripts name an object to load.
IMPORT_STRING = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):[A-Za-z_][\w.]*")
# The functions an image never calls, each with the reason: their imports are not required there.
# Kept short on purpose; each entry must name a function that exists (a test checks it).
NEVER_CALLED = {
    "api": {},
    "worker": {
        # httpx: `crispedit submit/jobs/...` talk to the API from a user's machine
        "crispedit.cli.api_client": "the container runs `crispedit worker`, never the API client",
    },
}


# ---------------------------------------------------------------------------------------------
# What an image installs


@dataclass
class Image:
    """One image as its Dockerfile builds it, seen from the build context."""

    context: Path
    instructions: Instructions
    placed: dict[str, str]  # image path → build-context path, from COPY
    distributions: set[str]  # canonical names of every distribution installed, with their deps
    packages: set[str]  # the project's top-level packages installed
    scripts: dict[str, str]  # the project's console scripts: name → "module:attribute"


def read_image(path: Path, context: Path = ROOT) -> Image:
    """The image that the Dockerfile at `path` builds from `context`, derived from its text."""
    instructions = dockerfile(path)
    placed = copied_files(instructions)
    image = Image(context, instructions, placed, set(), set(), {})
    for install in pip_installs(instructions):
        requirements = list(install.requirements)
        for file in install.requirement_files:
            if file in placed:  # else written inside the image: not counted (module docstring)
                requirements += requirement_file(context / placed[file])
        for folder, extras in install.local:
            requirements += _install_project(image, folder, extras, install.no_deps)
        if install.no_deps:
            image.distributions |= {canonicalize_name(r.name) for r in requirements}
        else:
            image.distributions |= closure(requirements)
    return image


def _install_project(image: Image, folder: str, extras: set[str], no_deps: bool) -> list:
    """Add the project that `pip install FOLDER[extras]` installs; return its requirements."""
    pyproject = image.placed.get(posixpath.join(folder, "pyproject.toml"))
    assert pyproject, f"pip install {folder}: no pyproject.toml was copied there"
    project = tomllib.loads((image.context / pyproject).read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    for target, source in image.placed.items():
        name = posixpath.basename(target)
        copied_package = (image.context / source / "__init__.py").is_file()
        included = any(fnmatch.fnmatch(name, pattern) for pattern in include)
        if posixpath.dirname(target) == folder and copied_package and included:
            image.packages.add(name)
    image.scripts |= project["project"].get("scripts", {})
    if no_deps:
        return []
    optional = project["project"].get("optional-dependencies", {})
    unknown = extras - set(optional)
    assert not unknown, f"pip install {folder}{sorted(unknown)}: no such extra in pyproject.toml"
    names = project["project"]["dependencies"] + [r for e in sorted(extras) for r in optional[e]]
    return [Requirement(r) for r in names]


def closure(requirements: list[Requirement]) -> set[str]:
    """The installed distributions `requirements` pull in, transitively (markers evaluated)."""
    seen, todo = set(), [(r, ("",)) for r in requirements]
    while todo:
        requirement, extras = todo.pop()
        if requirement.marker and not any(
            requirement.marker.evaluate({"extra": e}) for e in extras
        ):
            continue
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = distribution(requirement.name).requires or []
        except PackageNotFoundError:
            pytest.fail(f"{requirement.name} is not installed here: cannot check the images")
        todo += [(Requirement(r), ("", *requirement.extras)) for r in requires]
    return seen


@cache
def packages_distributions() -> dict[str, list[str]]:
    """Top-level module → canonical names of the distributions installed here that provide it."""
    found = _packages_distributions()
    return {module: [canonicalize_name(d) for d in dists] for module, dists in found.items()}


# ---------------------------------------------------------------------------------------------
# What an image runs


@dataclass(frozen=True)
class Entry:
    """Python code that the image runs: a module of its packages, or a source text."""

    where: str  # how the image gets there, for the failure messages
    module: str | None = None
    source: str | None = None


def entries(image: Image) -> tuple[list[Entry], list[str]]:
    """The entry points of the image's command and health check, and the problems met."""
    found, problems = [], []
    for why, argv in (
        ("ENTRYPOINT/CMD", container_argv(image.instructions)),
        ("HEALTHCHECK", healthcheck_argv(image.instructions)),
    ):
        _program_entries(image, argv, why, found, problems)
    return found, problems


def _program_entries(
    image: Image, argv: list[str], why: str, found: list[Entry], problems: list[str]
) -> None:
    """Append to `found` the Python that `argv` runs in the image; to `problems` what is amiss."""
    program, args = argv[0], argv[1:]
    why = f"{why}: {shlex.join(argv)}"
    if program in {"sh", "/bin/sh"} and args[:1] == ["-c"]:
        _program_entries(image, shlex.split(args[1]), why, found, problems)
    elif posixpath.basename(program) in {"python", "python3"}:
        found.append(_python_entry(image, args, why))
    elif (script := _copied_program(image, program)) is not None:
        text = (image.context / script).read_text()
        if text.startswith("#!") and "python" in text.splitlines()[0]:
            found.append(Entry(f"{why} ({script})", source=text))
        else:
            for command in _exec_lines(text, script):
                _program_entries(image, command, f"{why} ({script})", found, problems)
    elif program in image.scripts:
        module = image.scripts[program].split(":")[0]
        found.append(Entry(why, module=module))
    else:
        scripts = {e.name: e for e in entry_points(group="console_scripts")}
        owner = scripts[program].dist if program in scripts else None
        if owner is None or canonicalize_name(owner.name) not in image.distributions:
            problems.append(f"{why}: no program {program!r} is installed in the image")
    for arg in args:  # e.g. uvicorn's APP, `service.main:create_app`
        if (match := IMPORT_STRING.fullmatch(arg)) and match.group(1).split(".")[0] in (
            image.packages | first_party(image.context)
        ):
            found.append(Entry(why, module=match.group(1)))


def _python_entry(image: Image, args: list[str], why: str) -> Entry:
    if args[0] == "-c":
        return Entry(why, source=args[1])
    if args[0] == "-m":
        return Entry(why, module=args[1])
    assert args[0] in image.placed, f"{why}: {args[0]} is not a file the Dockerfile copies"
    return Entry(why, source=(image.context / image.placed[args[0]]).read_text())


def _copied_program(image: Image, program: str) -> str | None:
    """The build-context path of a program the image copied in, found as the shell finds it."""
    places = [program] if "/" in program else [posixpath.join(d, program) for d in DEFAULT_PATH]
    return next((image.placed[p] for p in places if p in image.placed), None)


def _exec_lines(script: str, name: str) -> list[list[str]]:
    """The commands a shell script hands its process to (`exec PROGRAM ARGS`)."""
    joined = re.sub(r"\\\n", " ", script)
    commands = [
        shlex.split(line.strip())[1:]
        for line in joined.splitlines()
        if line.strip().startswith("exec ")
    ]
    assert commands, f"{name}: no `exec PROGRAM` line: which program does it run?"
    return commands


# ---------------------------------------------------------------------------------------------
# Walking the imports


@cache
def first_party(context: Path) -> set[str]:
    """The project's top-level packages in the build context (whether an image copies them)."""
    return {p.parent.name for p in context.glob("*/__init__.py")}


def module_file(context: Path, module: str) -> Path | None:
    """The source file of a project module in the build context, or None."""
    base = context.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_problems(image: Image, skip: frozenset[str] = frozenset()) -> list[str]:
    """Every import that the image's entry points reach and that would fail in the image.

    `skip` names the functions (`module.function`) that the image never calls.
    """
    found, problems = entries(image)
    visited: set[str] = set()
    todo = [(entry.module, entry.where) for entry in found if entry.module]
    for entry in found:
        if entry.source is not None:
            names = imported_names(entry.source, "__main__", context=image.context)
            todo += [(name, entry.where) for name in names]
    while todo:
        module, where = todo.pop()
        top = module.split(".")[0]
        if top in image.packages:
            for prefix in _prefixes(module):  # importing a.b.c runs a/__init__ and a/b/__init__
                if prefix in visited:
                    continue
                visited.add(prefix)
                path = module_file(image.context, prefix)
                if path is None:
                    if prefix == module:
                        problems.append(f"{where}: imports {module}, no such module")
                    continue
                names = imported_names(
                    path.read_text(), prefix, is_package=path.name == "__init__.py",
                    context=image.context, skip=skip,
                )  # fmt: skip
                for name in names:
                    todo.append((name, str(path.relative_to(image.context))))
        elif top in first_party(image.context):
            problems.append(f"{where}: imports {module}, but the image does not COPY {top}/")
        elif top in sys.stdlib_module_names:
            continue
        else:
            dists = packages_distributions().get(top)
            if not dists:
                problems.append(f"{where}: imports {module}, which nothing installed here provides")
            elif not set(dists) & image.distributions:
                problems.append(
                    f"{where}: imports {module} (from {', '.join(dists)}), "
                    "which the image does not install"
                )
    return sorted(set(problems))


def _prefixes(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def imported_names(
    source: str,
    module: str,
    *,
    is_package: bool = False,
    context: Path | None = None,
    skip: frozenset[str] = frozenset(),
) -> list[str]:
    """The absolute names of the modules that `source`, the code of `module`, imports.

    Under the rules of the module docstring; `skip` names functions (`module.function`) that the
    image never calls. `from a import b` yields `a`, and `a.b` as well when that is a project
    module in `context` (b may be a submodule rather than a name defined in a); relative
    imports resolve against the package of `module`.
    """
    package = module if is_package else module.rpartition(".")[0]
    names = []
    for node in _running_imports(ast.parse(source).body, module, skip):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
            continue
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            assert package and node.level <= len(parts), f"{module}: a relative import too far up"
            parent = parts[: len(parts) - node.level + 1]
            base = ".".join([*parent, base] if base else parent)
        names.append(base)
        if context is not None:
            names += [
                f"{base}.{alias.name}"
                for alias in node.names
                if module_file(context, f"{base}.{alias.name}") is not None
            ]
    return names


def _running_imports(
    nodes: Iterable[ast.AST], scope: str, skip: frozenset[str]
) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements among `nodes` that can run and must succeed (module docstring).

    `scope` is the qualified name of the code that holds `nodes`; functions and classes named
    in `skip` are left out.
    """
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _running_imports(node.orelse, scope, skip)
        elif isinstance(node, ast.Try) and _catches_import_error(node):
            yield from _running_imports([*node.orelse, *node.finalbody], scope, skip)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if f"{scope}.{node.name}" not in skip:
                yield from _running_imports(node.body, f"{scope}.{node.name}", skip)
        else:
            yield from _running_imports(ast.iter_child_nodes(node), scope, skip)


def _is_type_checking(test: ast.expr) -> bool:
    name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", None)
    return name == "TYPE_CHECKING"


def _catches_import_error(node: ast.Try) -> bool:
    caught = []
    for handler in node.handlers:
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        caught += [getattr(t, "id", None) for t in types]
    return bool({"ImportError", "ModuleNotFoundError"} & set(caught))


# ---------------------------------------------------------------------------------------------
# The images


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_every_module_an_image_runs_imports_in_that_image(name):
    image = read_image(IMAGES[name])
    found, _ = entries(image)
    assert found, "no entry point found: the test would check nothing"
    problems = import_problems(image, frozenset(NEVER_CALLED[name]))
    assert not problems, f"{name} image:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_never_called_names_functions_that_exist(name):
    for qualified in NEVER_CALLED[name]:
        module, _, function = qualified.rpartition(".")
        path = module_file(ROOT, module)
        assert path is not None, f"NEVER_CALLED[{name!r}]: no module {module}"
        defined = {
            node.name
            for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        assert function in defined, f"NEVER_CALLED[{name!r}]: {module} has no {function}()"


def test_the_images_run_what_the_deployment_expects():
    """The derivation finds the programs each image really runs (so the walk starts there)."""
    api, _ = entries(read_image(IMAGES["api"]))
    worker, _ = entries(read_image(IMAGES["worker"]))
    assert "service.main" in {e.module for e in api}
    worker_modules = {e.module for e in worker}
    crispedit_script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert crispedit_script["crispedit"].split(":")[0] in worker_modules
    healthcheck = (ROOT / "docker" / "worker_healthcheck.py").read_text()
    assert healthcheck in {e.source for e in worker}


def _variant(tmp_path: Path, name: str, old: str, new: str) -> Path:
    text = IMAGES[name].read_text()
    assert old in text, f"{old!r} is not in {IMAGES[name].name} any more: update this test"
    path = tmp_path / IMAGES[name].name
    path.write_text(text.replace(old, new))
    return path


def test_a_worker_image_without_the_worker_extra_lacks_redis_and_rq(tmp_path):
    # the worker image as it was before the fix: the project and its plain dependencies only
    variant = _variant(tmp_path, "worker", '".[worker]"', ".")
    problems = "\n".join(import_problems(read_image(variant), frozenset(NEVER_CALLED["worker"])))
    assert "worker_healthcheck.py" in problems
    for module in ("redis", "rq"):
        assert f"imports {module} (from {module})" in problems


def test_a_package_the_image_does_not_copy_is_missing(tmp_path):
    variant = _variant(tmp_path, "worker", "COPY curvature_store ./curvature_store\n", "")
    problems = import_problems(read_image(variant), frozenset(NEVER_CALLED["worker"]))
    assert any("the image does not COPY curvature_store/" in p for p in problems), problems


def test_guarded_and_type_checking_imports_are_optional_the_rest_count():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import never_at_runtime\n"
        "try:\n    import fast_json\nexcept ImportError:\n    fast_json = None\n"
        "try:\n    import strict\nexcept ValueError:\n    pass\n"
        "def command():\n    import lazy\n"
    )
    assert imported_names(source, "m") == ["typing", "strict", "lazy"]
    assert imported_names(source, "m", skip=frozenset({"m.command"})) == ["typing", "strict"]


# ---------------------------------------------------------------------------------------------
# The API image, run: no module outside its environment, and no torch

# Run in a subprocess: refuse every top-level module installed in site-packages that the API
# image would not have, then use the API the way the image does.
BLOCKING_RUNNER = """
import importlib.abc, importlib.machinery, json, site, sys
in_image = set(json.loads(sys.argv[1]))
site_dirs = tuple(site.getsitepackages())

class NotInImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if "." in name or name in in_image:  # a submodule's parent was checked already
            return None
        spec = importlib.machinery.PathFinder.find_spec(name)
        if spec is None:
            return None
        places = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
        if any(p.startswith(site_dirs) for p in places):
            raise ModuleNotFoundError(f"No module named {name!r} (not in the API image)", name=name)
        return None  # the standard library: let the normal finders have it

sys.meta_path.insert(0, NotInImage())

import pkgutil
import service
from uvicorn.importer import import_from_string
for module in pkgutil.walk_packages(service.__path__, "service."):
    __import__(module.name)
app = import_from_string("service.main:create_app")()
from starlette.testclient import TestClient
assert TestClient(app).get("/healthz").status_code == 200
assert "torch" not in sys.modules
print("ok")
"""


def test_api_image_serves_without_torch():
    """Every module the API imports at run time is in the API image's environment.

    A subprocess refuses any other installed package (as if only the image's packages were
    there), imports every `service` module, creates the app the way uvicorn does and answers
    /healthz, without torch.
    """
    image = read_image(IMAGES["api"])
    in_image = {
        module
        for module, dists in packages_distributions().items()
        if set(dists) & image.distributions
    }
    in_image |= image.packages
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRISPEDIT_")}
    done = subprocess.run(
        [sys.executable, "-c", BLOCKING_RUNNER, json.dumps(sorted(in_image))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr
