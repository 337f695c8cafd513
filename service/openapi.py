"""Print or write the app's OpenAPI document (`openapi.yaml` at the repository root).

    python -m service.openapi            # print it
    python -m service.openapi --write    # write openapi.yaml (what the drift test compares)

The document is JSON, which is valid YAML: no YAML library needed to write or read it. It is built
from default settings, so the environment cannot change it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from service.config import Settings
from service.main import create_app

OPENAPI_FILE = Path(__file__).resolve().parent.parent / "openapi.yaml"


def openapi_text() -> str:
    """The OpenAPI document as indented JSON, ending with a newline."""
    app = create_app(Settings.model_construct())  # defaults only, no environment
    return json.dumps(app.openapi(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--write"]:
        OPENAPI_FILE.write_text(openapi_text())
        print(f"wrote {OPENAPI_FILE.name}")
        return 0
    if args:
        print("usage: python -m service.openapi [--write]", file=sys.stderr)
        return 2
    sys.stdout.write(openapi_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
