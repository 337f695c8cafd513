"""openapi.yaml is generated from the app; it must not drift from it."""

from __future__ import annotations

import json

from service.openapi import OPENAPI_FILE, main, openapi_text


def test_openapi_file_matches_the_app():
    # JSON is YAML: the file is written as JSON so that no YAML library is needed to compare it
    on_disk = json.loads(OPENAPI_FILE.read_text())
    assert on_disk == json.loads(openapi_text()), (
        "openapi.yaml is stale: run `python -m service.openapi --write`"
    )


def test_openapi_describes_the_api(capsys):
    assert main([]) == 0
    document = json.loads(capsys.readouterr().out)
    paths = document["paths"]
    assert {"/v1/edits", "/v1/jobs/{job_id}", "/v1/versions/{version_id}/delta"} <= set(paths)
    edits = paths["/v1/edits"]["post"]
    assert {"202", "401", "409", "413", "422"} <= set(edits["responses"])
    assert edits["security"] == [{"HTTPBearer": []}]
    assert "HTTPValidationError" not in document["components"]["schemas"]  # our error shape only
