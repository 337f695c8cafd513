"""The README's configuration tables name every field of the classes that define them, with the
same defaults: `contract.settings.EditSettings` (the edit settings) and `service.config.Settings`
(the API's), so the user's document cannot drift from the code; and every relative link of the
README, bench/README.md and docs/ points at a file (and a heading) that exists."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from contract.settings import DEFAULTS, EditSettings
from service.config import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def table(header: str) -> list[list[str]]:
    """The cells of the README's table under `header`, a row each."""
    text = README.read_text()
    rows = []
    for line in text[text.index(header) :].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_every_edit_setting_has_its_row_default_and_api_mark():
    rows = {r[0].strip("`"): r for r in table("| option | API | default | meaning |")}
    fields = {f.name: f for f in dataclasses.fields(EditSettings)}
    assert list(rows) == list(fields)
    for name, (_, api, default, _) in rows.items():
        assert api.startswith("yes") == bool(fields[name].metadata.get("api")), name
        if getattr(DEFAULTS, name) is not None:
            assert default.strip("`") == str(getattr(DEFAULTS, name)), name


def test_every_api_setting_has_its_row():
    rows = {r[0].strip("`"): r for r in table("| setting | environment variable | default |")}
    assert list(rows) == list(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        env, default = rows[name][1].strip("`"), rows[name][2].strip("`")
        assert env == f"CRISPEDIT_{name.upper()}", name
        if isinstance(field.default, str | int | float) and not isinstance(field.default, bool):
            assert default == str(field.default), name


DOCS = [
    README,
    README.parent / "bench" / "README.md",
    *sorted((README.parent / "docs").glob("*.md")),
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    """The text of a Markdown file without its fenced code blocks, whose brackets are not links."""
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file: lower case, punctuation but `-`
    and `_` dropped, spaces turned into `-`, a repeated one suffixed `-1`, `-2`, ..."""
    found: list[str] = []
    for heading in re.findall(r"^#+\s+(.*?)\s*$", prose(path), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        repeats = found.count(slug)
        found.append(slug)
        if repeats:
            found.append(f"{slug}-{repeats}")
    return set(found)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(README.parent)))
def test_relative_links_point_at_files_and_headings_that_exist(doc: Path):
    broken = []
    for target in LINK.findall(prose(doc)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not this repository's
        name, _, anchor = target.partition("#")
        path = (doc.parent / name).resolve() if name else doc
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
            broken.append(target)
    assert not broken, f"{doc.name}: {broken}"
