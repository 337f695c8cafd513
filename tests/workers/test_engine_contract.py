"""The worker's engine reads a job through the contract: settings in, EditResult out."""

import pytest

from contract.facts import fact_to_record, parse_facts
from contract.jobs import EditResult, edit_payload
from contract.settings import EditSettings, SettingsError
from workers.engine import Engine

RECORDS = [{"subject": "The Eiffel Tower", "relation": "P17", "target": "Italy"}]


@pytest.fixture()
def engine(tmp_path, tiny_model_dir):
    return Engine("tiny", str(tmp_path / "store"), model_path=str(tiny_model_dir), tokens=300)


def payload(options: dict) -> dict:
    facts = [fact_to_record(fact) for fact in parse_facts(RECORDS)]
    actor = {"team": "team-a", "key_id": "0123456789ab"}
    return edit_payload("tiny", "main", facts, None, False, options, key_name="test", actor=actor)


def test_a_job_runs_with_its_options_and_the_version_records_them(engine):
    options = {"method": "ft", "epochs": 2, "lr": 0.01, "anchors": 0, "evaluate": False}
    result = engine.apply(payload(options))
    assert set(result) == set(EditResult.__annotations__)
    manifest = engine.store.manifest(result["version"])
    recorded = EditSettings.from_options(manifest["options"])
    # chat_template as resolved: the tiny tokenizer has no template, so auto was off
    assert recorded == EditSettings(
        method="ft", epochs=2, lr=0.01, anchors=0, layers=engine.layers, chat_template="off"
    )
    assert manifest["facts"][0]["prompt"] == "The Eiffel Tower is located in the country of"
    assert manifest["metrics"]["epochs"] <= 2
    # who asked: in the manifest and the stream's log
    assert manifest["actor"] == {"team": "team-a", "key_id": "0123456789ab"}
    assert engine.store.log("tiny", "main")[-1]["actor"] == manifest["actor"]


def test_bad_options_are_refused_before_any_work(engine):
    with pytest.raises(SettingsError, match="gamma"):
        payload({"gamma": 2.0})  # the API side refuses to build such a job
    job = {**payload({}), "options": {"method": "ekfac", "clip": 0.1}}  # a job built elsewhere
    with pytest.raises(SettingsError, match="clip"):
        engine.apply(job)
    assert engine.store.head("tiny", "main") is None
