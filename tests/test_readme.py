"""The README's configuration tables name every field of the classes that define them, with the
same defaults: `contract.settings.EditSettings` (the edit settings) and `service.config.Settings`
(the API's), so the user's document cannot drift from the code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

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
