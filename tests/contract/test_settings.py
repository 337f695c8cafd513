"""EditSettings: the one definition of the editor's options, and everything built from it."""

import dataclasses
import math

import pytest

from contract.settings import (
    DEFAULTS,
    OPTION_NAMES,
    EditSettings,
    SettingsError,
    option_rules,
    resolve_method,
)


def test_defaults_are_valid_and_round_trip_through_options():
    assert EditSettings.from_options(DEFAULTS.to_options()) == DEFAULTS
    assert EditSettings.from_options(None) == DEFAULTS
    chosen = EditSettings(method="ekfac", gamma=0.5, layers=["a.b", "c.d"], anchors=0)
    assert chosen.layers == ("a.b", "c.d")  # frozen settings keep a tuple of a JSON list
    assert chosen.to_options()["layers"] == ["a.b", "c.d"]
    assert EditSettings.from_options(chosen.to_options()) == chosen
    assert hash(chosen) == hash(EditSettings.from_options(chosen.to_options()))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"gamma": 1.5}, "gamma"),
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": math.nan}, "gamma"),
        ({"gamma": "0.9"}, "gamma"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 2.5}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"anchors": -1}, "anchors"),
        ({"anchor_weight": math.inf}, "anchor_weight"),
        ({"clip": 1.0}, "clip"),
        ({"method": "rome"}, "method"),
        ({"project": "weights"}, "project"),
        ({"stop": "epoch"}, "stop"),
        ({"projector_dtype": "fp16"}, "projector_dtype"),
        ({"anchor_questions": 1}, "anchor_questions"),
        ({"anchor_choice": "nearest"}, "anchor_choice"),
        ({"anchor_choice": True}, "anchor_choice"),
        ({"layers": []}, "layers"),
        ({"layers": ["ok", ""]}, "layers"),
        ({"method": "ekfac", "clip": 0.1}, "clip"),
        ({"laplace": -0.5}, "laplace"),
        ({"laplace": math.inf}, "laplace"),
        ({"laplace": "1"}, "laplace"),
        ({"method": "memit", "laplace": 1.0}, "laplace"),
        ({"method": "alphaedit", "laplace": 0.1}, "laplace"),
        ({"contexts": -1}, "contexts"),
        ({"contexts": 11}, "contexts"),
        ({"method": "memit", "contexts": 2}, "contexts"),
        ({"drift_budget": -1e-3}, "drift_budget"),
        ({"drift_budget": math.nan}, "drift_budget"),
        ({"method": "ft", "drift_budget": 1e-3}, "drift_budget"),
        ({"method": "memit", "drift_budget": 1e-3}, "drift_budget"),
        ({"method": "alphaedit", "drift_budget": 1e-3}, "drift_budget"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"lr_schedule": 1}, "lr_schedule"),
        ({"method": "memit", "lr_schedule": "cosine"}, "lr_schedule"),
        ({"method": "alphaedit", "lr_schedule": "cosine"}, "lr_schedule"),
        ({"warm_start": "zero"}, "warm_start"),
        ({"method": "memit", "warm_start": "lstsq"}, "warm_start"),
        ({"method": "alphaedit", "warm_start": "lstsq"}, "warm_start"),
        ({"momentum": 0.9}, "momentum"),
    ],
)
def test_a_bad_option_names_its_field(options, field):
    with pytest.raises(SettingsError) as caught:
        EditSettings.from_options(options)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field} ")


def test_limits_are_inclusive_or_exclusive_as_written():
    assert EditSettings(gamma=0.0).gamma == 0.0 and EditSettings(gamma=1.0).gamma == 1.0
    assert EditSettings(clip=0.0, method="ekfac").clip == 0.0  # clip 0 is no clip at all
    assert EditSettings(lr=1e-12).lr == 1e-12
    assert EditSettings(epochs=1000).epochs == 1000  # the engine has no upper limit; the API has


def test_override_keeps_what_is_none_and_validates_the_rest():
    assert DEFAULTS.override(gamma=None, clip=None) == DEFAULTS
    assert DEFAULTS.override(gamma=0.5).gamma == 0.5
    with pytest.raises(SettingsError, match="gamma"):
        DEFAULTS.override(gamma=2.0)
    # a misspelt keyword names itself, as from_options does, rather than a TypeError
    with pytest.raises(SettingsError, match="gama is not an edit option"):
        DEFAULTS.override(gama=0.5)


def test_every_option_has_a_doc_and_rules_that_its_default_meets():
    for field in dataclasses.fields(EditSettings):
        rules = option_rules(field.name)
        assert rules["doc"], field.name
        if "choices" in rules:
            assert getattr(DEFAULTS, field.name) in rules["choices"]
    assert tuple(f.name for f in dataclasses.fields(EditSettings)) == OPTION_NAMES
    with pytest.raises(KeyError):
        option_rules("momentum")


def test_method_aliases():
    assert resolve_method("crispedit") == "kfac" == resolve_method("kfac")
    with pytest.raises(ValueError, match="unknown method 'rome'"):
        resolve_method("rome")


def test_the_editor_defaults_are_the_settings_defaults():
    # the engine's names for its defaults are re-exports, never second definitions
    import crispedit.anchors as anchors
    import crispedit.editor as editor
    import crispedit.projector as projector
    import crispedit.sequential as sequential

    assert (
        DEFAULTS.lr, DEFAULTS.epochs, DEFAULTS.batch_size, DEFAULTS.seed,
    ) == (editor.LR, editor.EPOCHS, editor.BATCH_SIZE, editor.SEED)  # fmt: skip
    assert (
        DEFAULTS.gamma, DEFAULTS.clip, DEFAULTS.beta,
    ) == (projector.GAMMA, projector.CLIP, sequential.BETA)  # fmt: skip
    assert (DEFAULTS.anchors, DEFAULTS.anchor_weight) == (anchors.ANCHORS, anchors.ANCHOR_WEIGHT)


def test_ft_needs_a_curvature_only_for_its_laplace_penalty_or_consolidation():
    from contract.jobs import curvature_kind

    assert curvature_kind("ft") is None and curvature_kind("ft", 0.0) is None
    assert curvature_kind("ft", 1.0) == "kfac" == curvature_kind("ft", 0.0, 0.5)
    assert curvature_kind("ft", 0.0, 0.0) is None
    assert curvature_kind("ekfac", 1.0) == "ekfac" == curvature_kind("ekfac")
    assert curvature_kind("crispedit", 2.0) == "kfac" == curvature_kind("kfac")
