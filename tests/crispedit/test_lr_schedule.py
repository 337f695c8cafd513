"""The learning-rate schedule (issue 23's speed lever, `lr_schedule`): "constant" is the editor as
it was, "cosine" sets each epoch's rate on every layer's Adam, restarts with a drift budget's raises
and with each edit of a stream, and is refused where there is no Adam to schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import make_tiny, tiny_stream_edit, tiny_stream_store
from devices import accelerator, on_accelerator
from test_device import tiny_batches
from test_editor import FACTS

from contract.settings import EditSettings, SettingsError
from crispedit.curvature import collect_curvature
from crispedit.editor import (
    BUDGET_RAISES,
    LR_FLOOR,
    WARMUP_SHARE,
    CrispEditor,
    make_editor,
    scheduled_lr,
)
from crispedit.models import get_layers, parse_layers

# a tiny edit that never stops early (loss_stop 0) and takes one step an epoch (3 facts, batch
# 32): the epochs the schedule plans are the epochs that run; 20 is the fewest with a warm-up
EPOCHS = 20
RUN_ALL = {"lr": 3e-2, "epochs": EPOCHS, "loss_stop": 0.0, "progress": False, "seed": 0}
COSINE = {**RUN_ALL, "lr_schedule": "cosine"}


def cosine(lr: float, epoch: int, epochs: int, warmup: int | None = None) -> float:
    """The schedule as the option documents it, written out: W = ⌊epochs/20⌋ (or `warmup`)
    warm-up epochs rising by lr/(W + 1) each, then a half cosine from lr to lr/10 at the last
    epoch."""
    warmup = epochs // 20 if warmup is None else warmup
    if epoch <= warmup:
        return lr * epoch / (warmup + 1)
    t = (epoch - warmup - 1) / max(1, epochs - warmup - 1)
    return lr / 10 + (lr - lr / 10) * (1 + math.cos(math.pi * t)) / 2


@pytest.fixture(scope="module")
def curvature(tiny_tokenizer):
    """K-FAC curvature of the tiny Llama's blocks 2-3, collected once."""
    layers = parse_layers(make_tiny("llama"), "2-3")
    batches = tiny_batches(tiny_tokenizer)
    return layers, collect_curvature(make_tiny("llama"), layers, batches, progress=False)


def stepped_lrs(editor: CrispEditor, monkeypatch) -> list[float]:
    """The learning rate each of the editor's steps finds in its layers' Adams (their
    param_groups), one per step, filled in as the editor edits; every layer's must agree."""
    seen, step = [], editor._step

    def recorded(run):
        rates = {g["lr"] for opt in run.optimizers.values() for g in opt.param_groups}
        assert len(rates) == 1, rates
        seen.append(rates.pop())
        step(run)

    monkeypatch.setattr(editor, "_step", recorded)
    return seen


def test_the_cosine_schedule_warms_up_peaks_once_and_decays_to_its_floor():
    lr = 1e-3
    for epochs, warmup in ((100, 5), (50, 2), (25, 1), (20, 1), (19, 0), (1, 0)):
        assert int(WARMUP_SHARE * epochs) == warmup
        rates = [scheduled_lr(lr, e, epochs, "cosine") for e in range(1, epochs + 1)]
        assert rates == pytest.approx([cosine(lr, e, epochs) for e in range(1, epochs + 1)])
        assert rates[warmup] == lr == max(rates) and rates.count(lr) == 1
        assert all(a < b for a, b in itertools.pairwise(rates[: warmup + 1]))
        assert all(a > b for a, b in itertools.pairwise(rates[warmup:]))
        if epochs > warmup + 1:
            assert rates[-1] == pytest.approx(LR_FLOOR * lr)
    assert [scheduled_lr(lr, e, 100, "constant") for e in (1, 50, 100)] == [lr, lr, lr]
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        scheduled_lr(lr, 1, 10, "linear")


def test_constant_is_the_edit_as_it_was(tiny_tokenizer, curvature, monkeypatch):
    """Under "constant" (the default) every step runs at lr, and the edit is bit for bit the
    one of the code path before the schedule: Adam left at the lr it was made with."""
    layers, curv = curvature
    options = {**RUN_ALL, "epochs": 6, "layers": layers}
    ours = CrispEditor(make_tiny("llama"), tiny_tokenizer, curv, lr_schedule="constant", **options)
    lrs = stepped_lrs(ours, monkeypatch)
    delta = ours.edit(FACTS)
    assert lrs == [options["lr"]] * 6 == delta.report["lr_curve"]
    assert delta.meta["lr_schedule"] == "constant" == delta.report["lr_schedule"]
    before = CrispEditor(make_tiny("llama"), tiny_tokenizer, curv, **options)
    assert before.settings == ours.settings
    monkeypatch.setattr(before, "_set_lr", lambda run, lr: None)  # nothing scheduled
    old = before.edit(FACTS)
    assert old.report["loss_curve"] == delta.report["loss_curve"]
    for key, d in old.tensors.items():
        assert torch.equal(delta.tensors[key], d), key


def test_cosine_sets_each_epochs_rate_on_every_adam(tiny_tokenizer, monkeypatch):
    """The steps' rates (read off the optimizers) follow the schedule epoch by epoch, the report
    says so, and the rate is Adam's own: its first step moves the most-moved weight by the
    epoch's rate (lr/2 in the warm-up) where the constant schedule moves it by lr."""
    model = make_tiny("llama")
    layers = parse_layers(model, "2-3")
    before = {n: m.weight.detach().clone() for n, m in get_layers(model, layers).items()}
    first = {}

    def after_epoch(info):  # the largest change the first step made (ft: nothing projected)
        if info["epoch"] == 1:
            first["moved"] = max(
                float((m.weight.detach() - before[n]).abs().max())
                for n, m in get_layers(model, layers).items()
            )

    editor = CrispEditor(model, tiny_tokenizer, None, method="ft", layers=layers,
                         on_epoch=after_epoch, **COSINE)  # fmt: skip
    lrs = stepped_lrs(editor, monkeypatch)
    delta = editor.edit(FACTS)
    expected = [cosine(COSINE["lr"], e, EPOCHS) for e in range(1, EPOCHS + 1)]
    assert lrs == pytest.approx(expected, rel=1e-12) and delta.report["lr_curve"] == lrs
    assert lrs[0] == COSINE["lr"] / 2 and lrs[1] == COSINE["lr"] and lrs[-1] < lrs[1] / 9
    assert delta.report["lr_schedule"] == "cosine" == delta.meta["lr_schedule"]
    assert first["moved"] == pytest.approx(COSINE["lr"] / 2, rel=1e-3)
    # the same first step under the constant schedule: the full lr
    model = make_tiny("llama")
    before = {n: m.weight.detach().clone() for n, m in get_layers(model, layers).items()}
    constant = {**RUN_ALL, "epochs": 1}
    CrispEditor(model, tiny_tokenizer, None, method="ft", layers=layers, on_epoch=after_epoch,
                **constant).edit(FACTS)  # fmt: skip
    assert first["moved"] == pytest.approx(COSINE["lr"], rel=1e-3)


def test_each_raise_of_a_drift_budget_restarts_the_schedule(tiny_tokenizer, curvature, monkeypatch):
    """A raise starts a fresh Adam and runs the planned epochs again: the schedule starts over
    with it, warm-up included, at every rung (a quarter of 4 epochs warms up here, to keep the
    four rungs short)."""
    layers, curv = curvature
    monkeypatch.setattr("crispedit.editor.WARMUP_SHARE", 0.25)
    editor = CrispEditor(make_tiny("llama"), tiny_tokenizer, curv, layers=layers, gamma=0.5,
                         drift_budget=1e-12, **{**COSINE, "epochs": 4})  # fmt: skip
    lrs = stepped_lrs(editor, monkeypatch)
    report = editor.edit(FACTS).report
    assert len(report["gamma_trail"]) == BUDGET_RAISES + 1
    assert all(rung["epochs"] == 4 for rung in report["gamma_trail"])
    one = [cosine(COSINE["lr"], e, 4, warmup=1) for e in range(1, 5)]
    assert one[0] == COSINE["lr"] / 2 and one[1] == COSINE["lr"]
    assert lrs == report["lr_curve"] == pytest.approx(one * (BUDGET_RAISES + 1), rel=1e-12)


@pytest.mark.parametrize(
    "options", ({"laplace": 5.0}, {"contexts": 1}), ids=("laplace", "contexts")
)
def test_cosine_with_the_other_levers(tiny_tokenizer, curvature, monkeypatch, options):
    """The schedule is the optimizer's alone: with a Laplace penalty or context prefixes (two
    sequences a fact, one step an epoch still) each epoch runs at its rate, and the loss
    falls."""
    layers, curv = curvature
    editor = CrispEditor(make_tiny("llama"), tiny_tokenizer, curv, layers=layers, gamma=0.5,
                         **options, **{**COSINE, "epochs": 4})  # fmt: skip
    lrs = stepped_lrs(editor, monkeypatch)
    delta = editor.edit(FACTS)
    assert lrs == pytest.approx([cosine(COSINE["lr"], e, 4) for e in range(1, 5)])
    assert lrs[0] == COSINE["lr"] > lrs[-1]  # no warm-up in 4 epochs
    assert delta.report["loss_curve"][-1] < delta.report["loss_curve"][0]


def test_a_bf16_model_is_scheduled_on_its_fp32_masters(tiny_tokenizer, curvature, monkeypatch):
    """On a bf16 model the Adams hold the fp32 masters: they take the schedule's rates, the
    delta stays fp32, and the model ends at it rounded once into bf16."""
    layers, curv = curvature
    model = make_tiny("llama").to(torch.bfloat16)
    before = {n: m.weight.detach().clone() for n, m in get_layers(model, layers).items()}
    editor = CrispEditor(model, tiny_tokenizer, curv, layers=layers, **COSINE)
    lrs = stepped_lrs(editor, monkeypatch)
    delta = editor.edit(FACTS)
    assert lrs == pytest.approx([cosine(COSINE["lr"], e, EPOCHS) for e in range(1, EPOCHS + 1)])
    for name, module in get_layers(model, layers).items():
        D = delta.tensors[f"{name}.weight"]
        assert D.dtype == torch.float32 and module.weight.dtype == torch.bfloat16
        assert torch.equal(module.weight, (before[name].float() + D).to(torch.bfloat16))


def test_cosine_with_the_model_on_the_accelerator(tiny_tokenizer, curvature):
    """The rates are Python floats in the optimizers' groups: with the model on the logical
    accelerator of tests/devices.py (a mixed-device op raises as on CUDA) the scheduled edit is
    the one on the CPU."""
    layers, curv = curvature
    options = {**COSINE, "epochs": 3, "layers": layers}
    expected = CrispEditor(make_tiny("llama"), tiny_tokenizer, curv, **options).edit(FACTS)
    with accelerator() as dev:
        delta = CrispEditor(make_tiny("llama").to(dev), tiny_tokenizer, curv, **options).edit(FACTS)
    assert delta.report["lr_curve"] == expected.report["lr_curve"]
    for key, d in delta.tensors.items():
        assert not on_accelerator(d)
        torch.testing.assert_close(d, expected.tensors[key], rtol=1e-3, atol=1e-3 * d.abs().max())


def test_a_stream_records_the_schedule_and_each_edit_runs_its_own(tmp_path, tiny_tokenizer):
    """Each edit on a stream (consolidated here) is an edit call of its own: its epochs, and its
    schedule, start from 1; the version's manifest records the schedule among its options, and
    they read back into the settings it ran with."""
    store, model, layers, curv = tiny_stream_store(tmp_path / "store", tiny_tokenizer)
    setup = (store, model, tiny_tokenizer, layers, curv)
    settings = EditSettings(lr_schedule="cosine", layers=tuple(layers), consolidate=1.0)
    for facts in (FACTS[:2], FACTS[2:]):
        manifest, delta = tiny_stream_edit(setup, facts, settings=settings)
        assert manifest["options"]["lr_schedule"] == "cosine"
        assert EditSettings.from_options(manifest["options"]).lr_schedule == "cosine"
        lr, planned = manifest["options"]["lr"], manifest["options"]["epochs"]
        curve = delta.report["lr_curve"]
        assert curve == [scheduled_lr(lr, e, planned, "cosine") for e in range(1, len(curve) + 1)]
        assert curve[0] == lr  # 8 epochs: no warm-up
        assert "consolidation" in manifest["metrics"]


@pytest.mark.parametrize("method", ("memit", "alphaedit"))
def test_a_closed_form_editor_refuses_a_schedule(tiny_tokenizer, curvature, method):
    layers, curv = curvature
    with pytest.raises(SettingsError, match=f"lr_schedule applies to .*not to {method}") as err:
        make_editor(make_tiny("llama"), tiny_tokenizer, curv, layers=layers, method=method,
                    lr_schedule="cosine")  # fmt: skip
    assert err.value.field == "lr_schedule"
    assert EditSettings(method=method, lr_schedule="constant").lr_schedule == "constant"


@pytest.mark.parametrize("value", ("linear", "", 1, None))
def test_a_bad_schedule_is_a_settings_error_naming_it(value):
    if value is None:  # from_options takes None as "the default"; a keyword None too
        assert EditSettings.from_options({"lr_schedule": None}).lr_schedule == "constant"
        return
    with pytest.raises(SettingsError) as caught:
        EditSettings.from_options({"lr_schedule": value})
    assert caught.value.field == "lr_schedule" and str(caught.value).startswith("lr_schedule ")


def test_the_cli_flag_reaches_the_settings(capsys):
    from crispedit_cli.common import settings_from_args
    from crispedit_cli.main import parser

    argv = ["edit", "--model", "m", "--facts", "f", "--out", "o"]
    args = parser().parse_args([*argv, "--lr-schedule", "cosine", "--lr", "0.002"])
    settings = settings_from_args(args)
    assert (settings.lr_schedule, settings.lr) == ("cosine", 0.002)
    assert settings_from_args(parser().parse_args(argv)).lr_schedule == "constant"
    submit = parser().parse_args(["submit", "--model", "m", "--facts", "f", "--lr-schedule",
                                  "cosine"])  # fmt: skip
    assert submit.lr_schedule == "cosine"
    with pytest.raises(SystemExit):
        parser().parse_args([*argv, "--lr-schedule", "linear"])
    assert "--lr-schedule" in capsys.readouterr().err
