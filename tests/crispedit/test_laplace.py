"""The K-FAC Laplace form and penalty (crispedit.laplace): against the Kronecker quadratic form
written out with torch.kron, its gradient against autograd, and its effect on real edits."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import make_tiny
from devices import accelerator, on_accelerator
from test_device import tiny_batches
from test_editor import FACTS, curvature_for

from contract.settings import EditSettings, SettingsError
from crispedit.curvature import (
    Curvature,
    LayerCurvature,
    collect_curvature,
    eigenbasis,
    plan_curvature,
)
from crispedit.editor import CrispEditor
from crispedit.laplace import layer_form
from crispedit.models import get_layers, is_conv1d, parse_layers
from crispedit.sequential import StreamState, stream_curvature
from crispedit.streams import base_weights, cached_curvature, edit_on_stream, read_state
from curvature_store import Store

FAST = {"lr": 3e-2, "epochs": 30, "progress": False}
DEVICE_FAST = {"lr": 3e-2, "epochs": 4, "progress": False}
STREAM_FAST = {"lr": 3e-2, "epochs": 8}


def spd(n: int, seed: int) -> torch.Tensor:
    """A random symmetric positive definite matrix with a wide spectrum, as factors have."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(X)
    s = torch.logspace(-3, 1, n, dtype=torch.float64)
    return (Q * s) @ Q.T


def kron_form(delta: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """½ vec(ΔW)ᵀ H vec(ΔW), vec row-major (entry (i, j) at i·d_in + j, as torch.kron(B, A)
    indexes B ⊗ A)."""
    v = delta.reshape(-1)
    return 0.5 * v @ H @ v


def small_layer(d_out: int = 5, d_in: int = 7) -> tuple[LayerCurvature, torch.Tensor]:
    A, B = spd(d_in, 1), spd(d_out, 2)
    c = LayerCurvature(A=A.float(), B=B.float())
    delta = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(3))
    return c, delta


def test_the_kfac_form_is_the_kronecker_quadratic_form_and_its_gradient_autograds():
    c, delta = small_layer()
    H = torch.kron(c.B.double(), c.A.double())  # (d_out·d_in)²
    value, gradient = layer_form(c, "kfac", "cpu", "cpu")(delta)
    x = delta.double().requires_grad_(True)
    expected = kron_form(x, H)
    expected.backward()
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(gradient.double(), x.grad, rtol=1e-4, atol=1e-6)
    # and B ΔW A, the gradient the brief's formula names
    by_factors = c.B.double() @ x.detach() @ c.A.double()
    torch.testing.assert_close(gradient.double(), by_factors, rtol=1e-4, atol=1e-6)
    assert layer_form(c, "kfac", "cpu", "cpu")(delta, gradient=False)[1] is None


def test_the_ekfac_form_is_its_eigenvalues_quadratic_form_in_its_bases():
    c, delta = small_layer()
    (_, U_A), (_, U_B) = eigenbasis(c.A.double()), eigenbasis(c.B.double())
    lam = torch.rand(5, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    c.U_A, c.U_B, c.ekfac = U_A.float(), U_B.float(), lam.float()
    U = torch.kron(U_B, U_A)
    H = U @ torch.diag(lam.reshape(-1)) @ U.T
    x = delta.double().requires_grad_(True)
    expected = kron_form(x, H)
    expected.backward()
    value, gradient = layer_form(c, "ekfac", "cpu", "cpu")(delta)
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(gradient.double(), x.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="ekfac"):
        layer_form(LayerCurvature(A=c.A, B=c.B), "ekfac", "cpu", "cpu")


def explicit_predicted(model, layers, curvature, delta) -> dict[str, float]:
    """Per layer ½ vec(ΔW)ᵀ (B ⊗ A) vec(ΔW) with torch.kron, ΔW taken as (d_out, d_in)."""
    out = {}
    for name, module in get_layers(model, layers).items():
        d = delta.tensors[f"{name}.weight"].double()
        d = d.T if is_conv1d(module) else d
        c = curvature.layers[name]
        out[name] = float(kron_form(d, torch.kron(c.B.double(), c.A.double())))
    return out


@pytest.fixture
def setup(tiny):
    model, tok = tiny
    layers = parse_layers(model, "2-3")
    return model, tok, layers, curvature_for(model, tok, layers)


def test_the_report_predicts_the_kronecker_form_of_the_delta_in_either_layout(setup):
    """Llama (Linear, out × in) and GPT-2 (Conv1D, in × out): the reported prediction is the
    Kronecker form of the (d_out, d_in) delta, per layer and summed."""
    model, tok, layers, curv = setup
    delta = CrispEditor(model, tok, curv, layers=layers, gamma=0.5, **FAST).edit(FACTS)
    per_layer = delta.report["predicted_loss_increase_per_layer"]
    expected = explicit_predicted(model, layers, curv, delta)
    assert set(per_layer) == set(layers)
    for name in layers:
        assert per_layer[name] == pytest.approx(expected[name], rel=1e-4)
        assert per_layer[name] > 0
    assert delta.report["predicted_loss_increase"] == pytest.approx(sum(per_layer.values()))
    assert delta.report["laplace"] == 0.0 == delta.meta["laplace"]


def test_the_penalty_gradient_is_b_delta_a_in_the_storage_layout(setup):
    model, tok, layers, curv = setup
    editor = CrispEditor(model, tok, curv, layers=layers, laplace=2.0, progress=False)
    run = editor._prepare(FACTS)
    for name, module in get_layers(model, layers).items():
        step = 1e-2 * torch.randn_like(run.masters[name])
        run.masters[name] += step  # ΔW, in the weight's storage layout
        d = step.T if is_conv1d(module) else step
        c = curv.layers[name]
        expected = c.B @ d @ c.A
        got = editor._laplace_gradient(run, name)
        assert got.shape == module.weight.shape
        torch.testing.assert_close(got.T if is_conv1d(module) else got, expected, rtol=1e-4,
                                   atol=1e-6)  # fmt: skip
        assert float(run.penalty[name]) == pytest.approx(0.5 * float((d * expected).sum()), 1e-4)
    editor._release(run)


def blocked_energy(model, layers, curv, delta, top: float = 0.5) -> float:
    """The delta's energy along the most curved half of the eigen-directions (products s_B·s_A
    above their median), summed over the layers: where the Laplace penalty pulls hardest."""
    total = 0.0
    for name, module in get_layers(model, layers).items():
        d = delta.tensors[f"{name}.weight"].double()
        d = d.T if is_conv1d(module) else d
        c = curv.layers[name]
        (s_A, U_A), (s_B, U_B) = eigenbasis(c.A.double()), eigenbasis(c.B.double())
        lam = s_B[:, None] * s_A[None, :]
        R = U_B.T @ d @ U_A
        total += float((R[lam > lam.quantile(top)] ** 2).sum())
    return total


def test_a_laplace_penalty_keeps_the_edit_off_curved_kept_directions(setup):
    """The same facts, seed and γ: with the penalty the delta lands the facts with less energy
    along the curved directions the projector keeps, and a smaller predicted increase."""
    model, tok, layers, curv = setup
    base = {n: m.weight.detach().clone() for n, m in get_layers(model, layers).items()}
    options = {"layers": layers, "gamma": 0.5, "seed": 0, **FAST}
    plain = CrispEditor(model, tok, curv, laplace=0.0, **options).edit(FACTS)
    with torch.no_grad():
        for name, module in get_layers(model, layers).items():
            module.weight.copy_(base[name])
    penalised = CrispEditor(model, tok, curv, laplace=50.0, **options).edit(FACTS)
    assert plain.report["efficacy"] == 1.0 == penalised.report["efficacy"]
    assert (
        penalised.report["predicted_loss_increase"] < 0.7 * plain.report["predicted_loss_increase"]
    )
    assert blocked_energy(model, layers, curv, penalised) < 0.7 * blocked_energy(
        model, layers, curv, plain
    )


def test_ft_takes_a_penalty_only_with_a_curvature(setup):
    model, tok, layers, curv = setup
    with pytest.raises(SettingsError, match="laplace") as caught:
        CrispEditor(model, tok, None, method="ft", layers=layers, laplace=1.0)
    assert caught.value.field == "laplace"
    plain = CrispEditor(model, tok, None, method="ft", layers=layers, **FAST)
    assert plain.laplace_forms == {}
    delta = CrispEditor(model, tok, curv, method="ft", layers=layers, laplace=1.0, **FAST).edit(
        FACTS[:1]
    )
    assert delta.report["predicted_loss_increase"] == pytest.approx(
        sum(explicit_predicted(model, layers, curv, delta).values()), rel=1e-4
    )


@pytest.mark.parametrize("method", ("memit", "alphaedit"))
def test_closed_form_methods_refuse_a_penalty(method):
    words = f"laplace applies to the projected editor, not to {method}"
    with pytest.raises(SettingsError, match=words):
        EditSettings(method=method, laplace=0.5)
    assert EditSettings(method=method, laplace=0.0).laplace == 0.0


@pytest.mark.parametrize("value", (-1.0, float("nan"), float("inf"), "2", True))
def test_a_bad_laplace_is_a_settings_error_naming_it(value):
    with pytest.raises(SettingsError) as caught:
        EditSettings.from_options({"laplace": value})
    assert caught.value.field == "laplace" and str(caught.value).startswith("laplace ")


def test_laplace_round_trips_through_a_manifests_options():
    settings = EditSettings(laplace=2.5, method="nullspace")
    recorded = json.loads(json.dumps(settings.to_options()))
    assert recorded["laplace"] == 2.5
    assert EditSettings.from_options(recorded) == settings


def test_in_a_stream_the_penalty_uses_the_streams_curvature(tiny_tokenizer):
    """The curvature a stream edits with (A_cap + β·S_A/n, likewise B, kept as eigenbases only)
    is the one the penalty and the prediction use."""
    model = make_tiny("llama")
    layers = parse_layers(model, "2-3")
    capability = curvature_for(model, tiny_tokenizer, layers)
    g = torch.Generator().manual_seed(5)
    state = StreamState(S_A={}, S_B={}, tokens=7)
    for name, c in capability.layers.items():
        a = torch.randn(7, c.A.shape[0], generator=g, dtype=torch.float64)
        b = torch.randn(7, c.B.shape[0], generator=g, dtype=torch.float64)
        state.S_A[name], state.S_B[name] = a.T @ a, b.T @ b
    protected = stream_curvature(capability, state, beta=1.0)
    assert all(c.A is None for c in protected.layers.values())
    delta = CrispEditor(model, tiny_tokenizer, protected, layers=layers, laplace=5.0, **FAST).edit(
        FACTS[:2]
    )
    explicit = Curvature(
        layers={
            name: LayerCurvature(
                A=(c.A.double() + state.S_A[name] / 7), B=(c.B.double() + state.S_B[name] / 7)
            )
            for name, c in capability.layers.items()
        },
        tokens=capability.tokens,
    )
    expected = explicit_predicted(model, layers, explicit, delta)
    for name in layers:
        assert delta.report["predicted_loss_increase_per_layer"][name] == pytest.approx(
            expected[name], rel=1e-3
        )
    # the capability's alone predicts less: the stream's factors count the earlier edits
    alone = explicit_predicted(model, layers, capability, delta)
    assert sum(alone.values()) < delta.report["predicted_loss_increase"]


@pytest.mark.parametrize("method", ("kfac", "ekfac", "nullspace"))
def test_a_penalised_edit_with_the_model_on_the_accelerator_and_curvature_on_the_cpu(
    tiny_tokenizer, method
):
    """The penalty in fp32 on the masters' device (the logical accelerator of tests/devices.py,
    where a mixed-device op raises as on CUDA), from a curvature kept on the host: the same
    edit and prediction as on the CPU. It shares the projectors' bases there; with laplace 0
    its eigenvalues stay on the host (the device holds the model and the projectors only)."""
    layers = parse_layers(make_tiny("llama"), "2-3")
    kind = "ekfac" if method == "ekfac" else "kfac"
    curvature = collect_curvature(
        make_tiny("llama"), layers, tiny_batches(tiny_tokenizer), kind=kind, progress=False
    )
    options = {"method": method, "laplace": 20.0, "seed": 0, **DEVICE_FAST}
    expected = CrispEditor(make_tiny("llama"), tiny_tokenizer, curvature, **options).edit(FACTS)
    with accelerator() as dev:
        model = make_tiny("llama").to(dev)
        ours = CrispEditor(model, tiny_tokenizer, curvature, **options)
        for name, form in ours.laplace_forms.items():
            held = [
                form.U_A,
                form.U_B,
                *(t for t in (form.s_A, form.s_B, form.lam) if t is not None),
            ]
            assert all(on_accelerator(t) for t in held)
            if method != "nullspace":  # nullspace's projector has no U_B to share
                assert form.U_A is ours.projectors[name].U_A
        delta = ours.edit(FACTS)
        reporting = CrispEditor(model, tiny_tokenizer, curvature, method=method, progress=False)
        for form in reporting.laplace_forms.values():
            assert not any(
                on_accelerator(t) for t in (form.s_A, form.s_B, form.lam) if t is not None
            )
        predicted = reporting.predicted_loss_increase(delta.tensors)
    for key, d in delta.tensors.items():
        assert not on_accelerator(d)
        torch.testing.assert_close(d, expected.tensors[key], rtol=1e-3, atol=1e-3 * d.abs().max())
    assert delta.report["predicted_loss_increase"] == pytest.approx(
        expected.report["predicted_loss_increase"], rel=1e-3
    )
    assert sum(predicted.values()) == pytest.approx(delta.report["predicted_loss_increase"], 1e-4)


def test_on_a_stream_laplace_is_recorded_and_ft_takes_the_streams_curvature(
    tmp_path, tiny_tokenizer
):
    """A version's manifest records laplace among its options, and they read back into the
    settings it ran with; `ft` with a penalty edits under the stream's curvature (the earlier
    version's factors in it), and without a curvature says that laplace needs one."""
    model = make_tiny("llama")
    layers = parse_layers(model, "2-3")
    store = Store(tmp_path / "store")
    recipe = plan_curvature(model, tiny_tokenizer, "wikitext", 400, layers, seq_len=64)
    capability, _ = cached_curvature(store, model, tiny_tokenizer, recipe, progress=False)
    base = base_weights(make_tiny("llama"), layers)
    settings = EditSettings(method="ft", laplace=2.0, layers=tuple(layers), **STREAM_FAST)
    versions = [
        edit_on_stream(store, "tiny", "main", model, tiny_tokenizer, base, capability, facts,
                       settings=settings, progress=False)
        for facts in (FACTS[:1], FACTS[1:2])
    ]  # fmt: skip
    for manifest, delta in versions:
        assert manifest["options"]["laplace"] == 2.0
        # the manifest records the resolved template choice: off, the tiny tokenizer having none
        assert EditSettings.from_options(manifest["options"]) == replace(
            settings, chat_template="off"
        )
        assert delta.report["predicted_loss_increase"] > 0
        assert (
            manifest["metrics"]["predicted_loss_increase"]
            == (delta.report["predicted_loss_increase"])
        )
    # the second edit's prediction: under A_cap + S_A/n and B_cap + S_B/n after the first
    (first, _), (_, second) = versions
    state = read_state(store, first["id"])
    explicit = {
        name: LayerCurvature(
            A=c.A.double() + state.S_A[name] / state.tokens,
            B=c.B.double() + state.S_B[name] / state.tokens,
        )
        for name, c in capability.layers.items()
    }
    expected = explicit_predicted(model, layers, Curvature(explicit, 0), second)
    alone = explicit_predicted(model, layers, capability, second)  # what ft would see without
    assert sum(alone.values()) < 0.9 * second.report["predicted_loss_increase"]
    for name in layers:
        assert second.report["predicted_loss_increase_per_layer"][name] == pytest.approx(
            expected[name], rel=1e-3
        )
    with pytest.raises(SettingsError, match="laplace needs curvature"):
        edit_on_stream(store, "tiny", "other", model, tiny_tokenizer, base, None, FACTS[:1],
                       settings=settings, progress=False)  # fmt: skip


def test_a_bf16_model_with_bf16_projectors_penalises_with_fp32_bases(tiny_tokenizer):
    """projector_dtype "model" on a bf16 model: the report alone reads the projectors' bf16
    bases (cast), while the penalty gets fp32 bases of its own; the origin of ΔW is the bf16
    weight, which the fp32 masters start from exactly. Both land the facts and predict the
    Kronecker form of their delta (to the bf16 bases' precision for the report)."""
    model = make_tiny("gpt2").to(torch.bfloat16)
    layers = parse_layers(model, "2-3")
    curv = curvature_for(make_tiny("gpt2"), tiny_tokenizer, layers)
    options = {"layers": layers, "projector_dtype": "model", **FAST}
    reporting = CrispEditor(model, tiny_tokenizer, curv, **options)
    penalising = CrispEditor(model, tiny_tokenizer, curv, laplace=5.0, **options)
    for name, P in reporting.projectors.items():
        assert P.U_A.dtype == torch.bfloat16 and reporting.laplace_forms[name].U_A is P.U_A
        assert penalising.laplace_forms[name].U_A.dtype == torch.float32
    delta = penalising.edit(FACTS)
    assert delta.report["efficacy"] == 1.0
    expected = explicit_predicted(model, layers, curv, delta)
    for name, q in reporting.predicted_loss_increase(delta.tensors).items():
        assert q == pytest.approx(expected[name], rel=3e-2)
    for name, q in delta.report["predicted_loss_increase_per_layer"].items():
        assert q == pytest.approx(expected[name], rel=1e-4)
