"""Reading the project's Dockerfiles as text, the way `docker build` reads them.

The deploy tests never run Docker: they take a Dockerfile apart into its instructions, and from
those into what each instruction means for the image (its environment variables, the files it
copies from the build context and where they land, the commands it runs, the packages that pip
installs). A shape this module does not understand raises AssertionError naming it, so that a
Dockerfile change is never silently misread.
"""

from __future__ import annotations

import json
import posixpath
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement

Instructions = list[tuple[str, str]]


def dockerfile(path: Path) -> Instructions:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comment lines dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):  # Docker drops these even mid-instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, rest = (current + stripped).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def argv_of(arguments: str) -> list[str]:
    """The argv of a CMD/ENTRYPOINT/RUN: its JSON exec form, or the shell form under /bin/sh -c."""
    return json.loads(arguments) if arguments.startswith("[") else ["/bin/sh", "-c", arguments]


def last(instructions: Instructions, keyword: str) -> str | None:
    """The arguments of the last `keyword` instruction (the one that counts), or None."""
    found = [args for key, args in instructions if key == keyword]
    return found[-1] if found else None


def image_env(instructions: Instructions) -> dict[str, str]:
    """The ENV KEY=VALUE pairs an image sets."""
    env = {}
    for key, args in instructions:
        if key == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def copies(instructions: Instructions) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (not from another stage)."""
    result = []
    for key, args in instructions:
        if key != "COPY":
            continue
        words = shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]  # --chown=..., --chmod=...
        result.append((words[:-1], words[-1]))
    return result


def healthcheck_argv(instructions: Instructions) -> list[str]:
    """The argv of the image's HEALTHCHECK command (its options before CMD dropped)."""
    args = last(instructions, "HEALTHCHECK")
    assert args is not None, "no HEALTHCHECK"
    _, _, command = args.partition("CMD ")
    return argv_of(command.strip())


def container_argv(instructions: Instructions) -> list[str]:
    """What a container of the image runs: ENTRYPOINT followed by CMD, as Docker combines them."""
    entrypoint, cmd = last(instructions, "ENTRYPOINT"), last(instructions, "CMD")
    if entrypoint is None:
        assert cmd is not None, "neither ENTRYPOINT nor CMD"
        return argv_of(cmd)
    assert entrypoint.startswith("["), "a shell-form ENTRYPOINT ignores CMD and signals"
    return argv_of(entrypoint) + (argv_of(cmd) if cmd else [])


def copied_files(instructions: Instructions) -> dict[str, str]:
    """Image path → build-context path of every COPY, destinations resolved against WORKDIR.

    Docker's rule: a destination that ends in `/`, or that receives several sources, is a folder
    and each source lands in it under its own name; otherwise the destination is the new name.
    """
    placed, workdir = {}, "/"
    for key, args in instructions:
        if key == "WORKDIR":
            workdir = posixpath.join(workdir, args)
        if key != "COPY" or "--from" in args:
            continue
        ((sources, dest),) = copies([(key, args)])
        dest = posixpath.normpath(posixpath.join(workdir, dest))
        into_folder = args.rstrip().endswith("/") or len(sources) > 1
        for source in sources:
            target = posixpath.join(dest, posixpath.basename(source)) if into_folder else dest
            placed[target] = source.rstrip("/")
    return placed


def requirement_file(path: Path) -> list[Requirement]:
    """The requirements of a pip requirements file (comments and blank lines dropped)."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


@dataclass
class PipInstall:
    """One `pip install` of a RUN: what it names, where it ran, and whether deps come along."""

    workdir: str
    requirement_files: list[str] = field(default_factory=list)  # image paths given with -r
    requirements: list[Requirement] = field(default_factory=list)  # names given on the line
    local: list[tuple[str, set[str]]] = field(default_factory=list)  # (image path, extras)
    no_deps: bool = False


# pip options that take a value, and the flags that change nothing about what gets installed.
_PIP_VALUE_OPTIONS = {"-c", "--constraint", "-i", "--index-url", "--extra-index-url"}
_PIP_FLAGS = {"-q", "--quiet", "-U", "--upgrade", "--no-cache-dir", "--break-system-packages"}


def pip_installs(instructions: Instructions) -> list[PipInstall]:
    """Every `pip install` that the image's RUN instructions make, in order, parsed."""
    result, workdir = [], "/"
    for key, args in instructions:
        if key == "WORKDIR":
            workdir = posixpath.join(workdir, args)
        if key != "RUN":
            continue
        for command in _shell_commands(args):
            if command[:2] == ["pip", "install"] or command[:4] == [
                "python",
                "-m",
                "pip",
                "install",
            ]:
                words = command[command.index("install") + 1 :]
                result.append(_parse_pip_install(words, workdir))
    return result


def _shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell line: words split at `&&`, `||`, `;` and `|`."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for word in lexer:
        if word in {"&&", "||", ";", "|"}:
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [*commands, current]


def _parse_pip_install(words: list[str], workdir: str) -> PipInstall:
    install = PipInstall(workdir=workdir)
    words = iter(words)
    for word in words:
        if word in {"-r", "--requirement"}:
            install.requirement_files.append(posixpath.join(workdir, next(words)))
        elif word in _PIP_VALUE_OPTIONS:
            next(words)
        elif word == "--no-deps":
            install.no_deps = True
        elif word.startswith(">"):  # a redirection of pip's output
            next(words, None)
        elif word in _PIP_FLAGS:
            continue
        elif word.startswith("-"):
            raise AssertionError(f"pip install {word}: an option these tests do not understand")
        elif word.startswith((".", "/")):  # a local project, optionally with extras: .[worker]
            path, _, extras = word.partition("[")
            names = {e.strip() for e in extras.rstrip("]").split(",") if e.strip()}
            install.local.append((posixpath.normpath(posixpath.join(workdir, path)), names))
        else:
            install.requirements.append(Requirement(word))
    return install
