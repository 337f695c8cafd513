"""The same fact records mean the same edit on every path: the CLI, the API and the worker."""

import json

import pytest

from contract.facts import Fact, Neighbor, facts_digest, parse_facts
from crispedit.delta import Delta

RECORDS = [
    {"subject": "The Eiffel Tower", "relation": "P17", "target": "Italy"},
    {"subject": "Danielle Darrieux", "relation": "P103", "object": "English"},
    {"subject": "Toko Yasuda", "relation": "{} plays the", "target": "piano"},
    {
        "prompt": "The capital of France is ",
        "target": " Rome",
        "neighbors": [{"prompt": "Paris is in", "target": "France"}],
    },
]
# the same edits, spelled out by hand from CounterFact's templates
EXPANDED = [
    Fact("The Eiffel Tower is located in the country of", "Italy", subject="The Eiffel Tower"),
    Fact("The mother tongue of Danielle Darrieux is", "English", subject="Danielle Darrieux"),
    Fact("Toko Yasuda plays the", "piano", subject="Toko Yasuda"),
    Fact("The capital of France is", "Rome", neighbors=(Neighbor("Paris is in", "France"),)),
]


def test_the_engine_reads_relation_ids_as_their_templates():
    assert parse_facts(RECORDS) == EXPANDED


def test_the_cli_edits_the_expanded_prompt(cli, tmp_path, tiny_model_dir):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(RECORDS[:1]))
    out = tmp_path / "edit"
    args = ["--facts", facts, "--method", "ft", "--epochs", "2", "--tokens", "300"]
    code, _, err = cli("edit", "--model", tiny_model_dir, *args, "--out", out)
    assert code == 0, err
    digest = Delta.load(out / "delta.safetensors").meta["facts_digest"]
    assert digest == facts_digest(EXPANDED[:1])
    literal = Fact("The Eiffel Tower P17", "Italy", subject="The Eiffel Tower")
    assert digest != facts_digest([literal])


def test_the_api_and_the_worker_read_the_same_facts():
    pytest.importorskip("fastapi")
    from service.routers.edits import FactIn, _to_record

    # the API validates each fact and enqueues its canonical record; the worker parses that
    records = [_to_record(i, FactIn(**record)) for i, record in enumerate(RECORDS)]
    assert parse_facts(records, source="request") == EXPANDED
