"""The README's table of the API's settings names every field of `service.config.Settings`,
with its environment variable and default: the table cannot drift from the settings class."""

from __future__ import annotations

from pathlib import Path

from service.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_api_setting_has_its_row():
    text = README.read_text()
    start = text.index("| setting | environment variable | default | meaning |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        name, env, default = (c.strip().strip("`") for c in line.strip("|").split("|")[:3])
        rows[name] = (env, default)
    assert list(rows) == list(Settings.model_fields)
    for name, field in Settings.model_fields.items():
        env, default = rows[name]
        assert env == f"CRISPEDIT_{name.upper()}", name
        if isinstance(field.default, str | int | float) and not isinstance(field.default, bool):
            assert default == str(field.default), name
