"""The drift budget (issue 23, lever 4): γ raised along 1 - (1 - γ)/2^k until the edit's predicted
capability-loss rise fits, the change so far carried over into each new kept subspace."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_tiny, tiny_stream_store
from devices import accelerator, on_accelerator
from test_device import tiny_batches
from test_editor import FACTS, curvature_for
from test_editor_bf16 import blocked_share

from contract.settings import EditSettings, SettingsError
from crispedit.curvature import collect_curvature
from crispedit.editor import BUDGET_RAISES, CrispEditor, make_editor, raised_gamma
from crispedit.models import get_layers, is_conv1d, parse_layers
from crispedit.projector import build_projector
from crispedit.streams import base_weights, edit_on_stream

GAMMA = 0.5  # low enough that each raise visibly shrinks the kept subspace of the tiny layers
FAST = {"lr": 3e-2, "epochs": 30, "progress": False, "seed": 0}
SHORT = {**FAST, "epochs": 5}  # where only the mechanics matter: every rung runs its epochs
IMPOSSIBLE = 1e-12  # no edit that changes the weights predicts less


@pytest.fixture(scope="module")
def curvatures(tiny_tokenizer):
    """Curvature of the tiny Llama's blocks 2-3, K-FAC and EK-FAC, collected once."""
    model = make_tiny("llama")
    layers = parse_layers(model, "2-3")
    kfac = curvature_for(model, tiny_tokenizer, layers)
    ekfac = collect_curvature(
        model, layers, tiny_batches(tiny_tokenizer), kind="ekfac", progress=False
    )
    return layers, {"kfac": kfac, "nullspace": kfac, "ekfac": ekfac}


def edit(tok, curvature, layers, model=None, **options):
    """(editor, delta) of FACTS on a fresh tiny Llama (or `model`) at GAMMA."""
    model = make_tiny("llama") if model is None else model
    editor = CrispEditor(model, tok, curvature, layers=layers, gamma=GAMMA, **options)
    return editor, editor.edit(FACTS)


@pytest.fixture(scope="module")
def plain(tiny_tokenizer, curvatures):
    """The K-FAC edit without a budget, at GAMMA: what the budgeted ones are measured against."""
    layers, curv = curvatures
    return edit(tiny_tokenizer, curv["kfac"], layers, **FAST)[1]


def blocked_shares(model, layers, curvature, method, gamma, delta) -> list[float]:
    """Per layer, the share of the delta outside the kept subspace of a projector built afresh at
    `gamma`, in the (d_out, d_in) layout the projector works in."""
    shares = []
    for name, module in get_layers(model, layers).items():
        P = build_projector(curvature.layers[name], method, gamma)
        D = delta.tensors[f"{name}.weight"]
        shares.append(blocked_share(D.T if is_conv1d(module) else D, P))
    return shares


def test_the_ladder_halves_the_unprotected_share():
    assert [raised_gamma(0.9, k) for k in range(4)] == pytest.approx([0.9, 0.95, 0.975, 0.9875])
    assert raised_gamma(0.0, 2) == 0.75 and raised_gamma(1.0, 3) == 1.0


def test_without_a_budget_the_report_has_no_search(plain):
    r = plain.report
    assert r["drift_budget"] == 0.0 == plain.meta["drift_budget"]
    assert r["gamma"] == GAMMA and r["drift_budget_met"] is None and r["gamma_trail"] == []


def test_a_budget_above_the_rise_changes_nothing(tiny_tokenizer, curvatures, plain):
    """The same edit bit for bit, and a trail of the one rung it ran."""
    layers, curv = curvatures
    rise = plain.report["predicted_loss_increase"]
    _, delta = edit(tiny_tokenizer, curv["kfac"], layers, drift_budget=2 * rise, **FAST)
    for key, d in plain.tensors.items():
        assert torch.equal(delta.tensors[key], d)
    r = delta.report
    assert r["loss_curve"] == plain.report["loss_curve"]
    assert r["predicted_loss_increase"] == rise
    assert (r["gamma"], r["drift_budget"], r["drift_budget_met"]) == (GAMMA, 2 * rise, True)
    (rung,) = r["gamma_trail"]
    assert rung["gamma"] == GAMMA and rung["predicted_loss_increase"] == rise
    assert rung["efficacy"] == r["efficacy"] and rung["epochs"] == r["epochs"]
    assert rung["seconds"] > 0


def test_a_tight_budget_raises_gamma_along_the_ladder(tiny_tokenizer, curvatures, plain):
    """A budget just under the fixed-γ edit's rise: γ goes up the ladder until the prediction
    fits (or the raises run out), the edit goes on at each rung (more epochs), and the report is
    the last rung's."""
    layers, curv = curvatures
    budget = 0.9 * plain.report["predicted_loss_increase"]
    editor, delta = edit(tiny_tokenizer, curv["kfac"], layers, drift_budget=budget, **FAST)
    r, trail = delta.report, delta.report["gamma_trail"]
    assert 2 <= len(trail) <= BUDGET_RAISES + 1
    assert [rung["gamma"] for rung in trail] == [raised_gamma(GAMMA, k) for k in range(len(trail))]
    assert trail[0]["predicted_loss_increase"] == plain.report["predicted_loss_increase"]
    rises = [rung["predicted_loss_increase"] for rung in trail]
    assert all(a >= b for a, b in itertools.pairwise(rises)) or rises[-1] <= budget
    assert all(rise > budget for rise in rises[:-1])  # the search stops at the first that fits
    assert r["drift_budget_met"] == (rises[-1] <= budget)
    assert r["gamma"] == trail[-1]["gamma"] == delta.meta["gamma"] > GAMMA
    assert r["predicted_loss_increase"] == rises[-1]
    assert r["epochs"] == sum(rung["epochs"] for rung in trail) == len(r["loss_curve"])
    # the report's kept share is the raised γ's; the editor's own projectors stay at GAMMA
    for name, P in editor.projectors.items():
        assert r["kept_fraction"][name] < P.kept_fraction == plain.report["kept_fraction"][name]


@pytest.mark.parametrize("method", ("kfac", "nullspace", "ekfac"))
def test_an_impossible_budget_ends_after_every_raise_in_the_last_kept_subspace(
    tiny_tokenizer, curvatures, method
):
    """No γ fits: the edit ends at the last rung with `met` false and a delta, which lies in that
    γ's kept subspace (a projector built afresh there blocks none of it), although the same edit
    at GAMMA alone would put a good share of it in directions that γ blocks."""
    layers, curv = curvatures
    curvature = curv[method]
    options = {"method": method, **SHORT}
    model = make_tiny("llama")
    _, delta = edit(tiny_tokenizer, curvature, layers, model, drift_budget=IMPOSSIBLE, **options)
    r, last = delta.report, raised_gamma(GAMMA, BUDGET_RAISES)
    assert [rung["gamma"] for rung in r["gamma_trail"]] == [
        raised_gamma(GAMMA, k) for k in range(BUDGET_RAISES + 1)
    ]
    assert r["drift_budget_met"] is False and r["gamma"] == last
    assert r["epochs"] == (BUDGET_RAISES + 1) * SHORT["epochs"]
    assert all(float(d.norm()) > 0 for d in delta.tensors.values())
    assert max(blocked_shares(model, layers, curvature, method, last, delta)) <= 1e-5
    _, fixed = edit(tiny_tokenizer, curvature, layers, **options)
    assert max(blocked_shares(model, layers, curvature, method, last, fixed)) > 1e-2


def test_a_raise_carries_the_change_so_far_into_the_new_kept_subspace(tiny_tokenizer, curvatures):
    """The warm start: masters = weights before + P_new(ΔW), written into the model, under a
    fresh Adam; the editor's own projectors (at the settings' γ) are left as they were."""
    layers, curv = curvatures
    model = make_tiny("llama")
    editor = CrispEditor(model, tiny_tokenizer, curv["kfac"], layers=layers, gamma=GAMMA,
                         drift_budget=1e-3, progress=False)  # fmt: skip
    own = dict(editor.projectors)
    run = editor._prepare(FACTS)
    g = torch.Generator().manual_seed(1)
    changes = {}
    for name, master in run.masters.items():
        changes[name] = 1e-2 * torch.randn(master.shape, generator=g)
        master += changes[name]
        run.optimizers[name].state[master]["step"] = torch.tensor(5.0)  # as if it had stepped
    editor._raise_gamma(run, raised_gamma(GAMMA, 1))
    assert run.gamma == 0.75 and editor.projectors == own
    for name, module in get_layers(model, layers).items():
        P = build_projector(curv["kfac"].layers[name], "kfac", 0.75)
        expected = run.before[name] + P(changes[name])
        torch.testing.assert_close(run.masters[name], expected, rtol=0, atol=1e-6)
        assert torch.equal(module.weight, run.masters[name])
        assert torch.equal(run.projectors[name].M, P.M)
        # the rebuilt projector rotates in the editor's bases: shared, not copied
        assert run.projectors[name].U_A is own[name].U_A
        assert run.projectors[name].U_B is own[name].U_B
        assert run.optimizers[name].state == {}
    editor._release(run)


def test_a_bf16_model_keeps_fp32_masters_through_the_raises(tiny_tokenizer, curvatures):
    """On a bf16 model the warm start works on the fp32 masters: the delta stays fp32 and inside
    the last γ's kept subspace, and the model ends at the delta rounded once into bf16."""
    layers, curv = curvatures
    model = make_tiny("llama").to(torch.bfloat16)
    before = {n: m.weight.detach().clone() for n, m in get_layers(model, layers).items()}
    _, delta = edit(tiny_tokenizer, curv["kfac"], layers, model, drift_budget=IMPOSSIBLE, **SHORT)
    last = raised_gamma(GAMMA, BUDGET_RAISES)
    assert delta.report["gamma"] == last
    assert max(blocked_shares(model, layers, curv["kfac"], "kfac", last, delta)) <= 1e-5
    for name, module in get_layers(model, layers).items():
        D = delta.tensors[f"{name}.weight"]
        assert D.dtype == torch.float32 and module.weight.dtype == torch.bfloat16
        assert torch.equal(module.weight, (before[name].float() + D).to(torch.bfloat16))
        assert module.weight.grad is None


@pytest.mark.parametrize("method", ("kfac", "nullspace", "ekfac"))
def test_raises_with_the_model_on_the_accelerator_and_the_curvature_on_the_host(
    tiny_tokenizer, curvatures, method
):
    """The raises' projectors, warm start and predictions on the model's device (the logical
    accelerator of tests/devices.py, where a mixed-device op raises as on CUDA): the same search
    and delta as on the CPU."""
    layers, curv = curvatures
    options = {"method": method, "drift_budget": IMPOSSIBLE, **SHORT}
    _, expected = edit(tiny_tokenizer, curv[method], layers, **options)
    with accelerator() as dev:
        model = make_tiny("llama").to(dev)
        editor, delta = edit(tiny_tokenizer, curv[method], layers, model, **options)
        assert all(on_accelerator(P.U_A) for P in editor.projectors.values())
    assert [r["gamma"] for r in delta.report["gamma_trail"]] == [
        r["gamma"] for r in expected.report["gamma_trail"]
    ]
    for key, d in delta.tensors.items():
        assert not on_accelerator(d)
        torch.testing.assert_close(d, expected.tensors[key], rtol=1e-3, atol=1e-3 * d.abs().max())
    assert delta.report["predicted_loss_increase"] == pytest.approx(
        expected.report["predicted_loss_increase"], rel=1e-3
    )


@pytest.mark.parametrize("method", ("ft", "memit", "alphaedit"))
def test_a_method_without_a_gamma_to_raise_refuses_a_budget(tiny_tokenizer, curvatures, method):
    layers, curv = curvatures
    with pytest.raises(SettingsError, match=f"drift_budget applies to .*not to {method}") as err:
        make_editor(make_tiny("llama"), tiny_tokenizer, curv["kfac"], layers=layers,
                    method=method, drift_budget=1e-3)  # fmt: skip
    assert err.value.field == "drift_budget"
    assert EditSettings(method=method, drift_budget=0.0).drift_budget == 0.0


def test_on_a_stream_the_budget_holds_the_stream_edits_own_rise(tmp_path, tiny_tokenizer):
    """A stream's second edit projects with the stream's curvature (its first edit's factors in
    it): the budget's search runs on the rise that curvature predicts, the one its report and
    its version's manifest give; the manifest records the search and the γ it ended at."""
    store, model, layers, capability = tiny_stream_store(tmp_path / "store", tiny_tokenizer)
    base = base_weights(make_tiny("llama"), layers)
    settings = EditSettings(
        gamma=GAMMA, drift_budget=IMPOSSIBLE, layers=tuple(layers), lr=3e-2, epochs=5
    )
    versions = [
        edit_on_stream(store, "tiny", "main", model, tiny_tokenizer, base, capability, facts,
                       settings=settings, progress=False)
        for facts in (FACTS[:1], FACTS[1:2])
    ]  # fmt: skip
    last = raised_gamma(GAMMA, BUDGET_RAISES)
    for manifest, delta in versions:
        metrics, trail = manifest["metrics"], delta.report["gamma_trail"]
        assert manifest["options"]["drift_budget"] == IMPOSSIBLE
        assert manifest["options"]["gamma"] == GAMMA and manifest["gamma"] == last
        assert metrics["drift_budget_met"] is False and metrics["gamma_trail"] == trail
        assert [rung["gamma"] for rung in trail][-1] == last
        assert trail[-1]["predicted_loss_increase"] == metrics["predicted_loss_increase"]
    # the second edit's curvature is the stream's: its report predicts under it, not the
    # capability's (crispedit.laplace's tests check that prediction against the Kronecker form)
    (_, first), (second_manifest, second) = versions
    assert second_manifest["metrics"]["predicted_loss_increase"] > 0
    assert second.report["kept_fraction"] != first.report["kept_fraction"]
