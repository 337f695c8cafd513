"""The README's table of edit settings names every option of `EditSettings`, with its default
and whether the API takes it: the table cannot drift from the one place options are defined."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from contract.settings import DEFAULTS, EditSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def table_rows() -> dict[str, tuple[bool, str | None]]:
    text = README.read_text()
    start = text.index("| option | API | default | meaning |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        name, api, default = cells[0].strip("`"), cells[1].startswith("yes"), cells[2]
        rows[name] = (api, default.strip("`") if default.startswith("`") else None)
    return rows


def test_every_setting_has_its_row_default_and_api_mark():
    rows = table_rows()
    fields = {f.name: f for f in dataclasses.fields(EditSettings)}
    assert list(rows) == list(fields)
    for name, (api, default) in rows.items():
        assert api == bool(fields[name].metadata.get("api")), name
        if getattr(DEFAULTS, name) is not None:
            assert default == str(getattr(DEFAULTS, name)), name
