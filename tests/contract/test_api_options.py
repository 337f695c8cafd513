"""The API's request options against EditSettings: same names, same bounds, same refusals."""

import dataclasses

import pytest
from pydantic import ValidationError

from contract.jobs import JOB_OPTIONS
from contract.settings import EditSettings, SettingsError, option_rules

pytest.importorskip("fastapi")
from service.routers.edits import EditOptions

API_OPTIONS = [f.name for f in dataclasses.fields(EditSettings) if option_rules(f.name).get("api")]


def api_accepts(name, value) -> bool:
    try:
        EditOptions(**{name: value})
    except ValidationError:
        return False
    return True


def engine_accepts(name, value) -> bool:
    try:
        EditSettings(**{name: value})
    except SettingsError:
        return False
    return True


def probes(name: str) -> list:
    """Values on and around every bound of the option, and its choices with one that is not."""
    rules = option_rules(name)
    if "choices" in rules:
        return [*rules["choices"], "none-of-these"]
    values = []
    for rule in ("ge", "gt", "le", "lt", "api_le"):
        if rule in rules:
            bound = rules[rule]
            step = 1 if isinstance(bound, int) and not isinstance(bound, bool) else 1e-9
            values += [bound - step, bound, bound + step]
    return values


def test_the_api_offers_the_options_marked_for_it_and_nothing_else():
    assert set(EditOptions.model_fields) == {*API_OPTIONS, *JOB_OPTIONS}
    assert {"method", "gamma", "epochs", "lr", "anchors", "anchor_weight", "clip"} <= set(
        API_OPTIONS
    )


@pytest.mark.parametrize("name", [n for n in API_OPTIONS if n != "layers"])
def test_the_api_refuses_what_the_engine_refuses_and_its_own_limits(name):
    limit = option_rules(name).get("api_le")
    for value in probes(name):
        expected = engine_accepts(name, value) and (limit is None or value <= limit)
        assert api_accepts(name, value) == expected, (name, value)


def test_the_api_documents_each_option_as_the_settings_do():
    for name in API_OPTIONS:
        assert EditOptions.model_fields[name].description == option_rules(name)["doc"]


@pytest.mark.parametrize(
    ("method", "option", "value"),
    (
        ("ekfac", "clip", 0.1),
        ("memit", "laplace", 1.0),
        ("alphaedit", "laplace", 0.5),
        ("memit", "contexts", 2),
        ("ft", "drift_budget", 1e-3),
        ("memit", "drift_budget", 1e-3),
        ("memit", "lr_schedule", "cosine"),
        ("alphaedit", "lr_schedule", "cosine"),
    ),
)
def test_an_option_the_method_refuses_is_refused_by_both_with_the_same_words(method, option, value):
    with pytest.raises(ValidationError) as api:
        EditOptions(method=method, **{option: value})
    with pytest.raises(SettingsError) as engine:
        EditSettings(method=method, **{option: value})
    assert str(engine.value) in str(api.value)
    assert api.value.errors()[0]["loc"] == (option,)
    assert getattr(EditOptions(method="kfac", **{option: value}), option) == value
