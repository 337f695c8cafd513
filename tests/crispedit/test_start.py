"""The warm start (issue 23's speed lever, `warm_start="lstsq"`): its direction solves the
projected least-squares problem, its length is searched on the edit's own loss, and an edit that
starts there keeps every promise of the projected editor (kept subspace, fp32 masters on a bf16
model, the model's device)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from devices import accelerator, on_accelerator
from test_device import tiny_batches
from test_editor import FACTS
from test_editor_bf16 import blocked_share

from contract.settings import EditSettings, SettingsError
from crispedit.curvature import LayerCurvature, collect_curvature
from crispedit.editor import CrispEditor, make_editor
from crispedit.models import get_layers, is_conv1d, parse_layers
from crispedit.projector import build_projector
from crispedit.start import search_length, step_direction

ONE_EPOCH = {"lr": 3e-2, "epochs": 1, "progress": False, "seed": 0}


@pytest.fixture(scope="module")
def curvature(tiny_tokenizer):
    """K-FAC curvature of the tiny Llama's blocks 2-3, collected once."""
    layers = parse_layers(make_tiny("llama"), "2-3")
    batches = tiny_batches(tiny_tokenizer)
    return layers, collect_curvature(make_tiny("llama"), layers, batches, progress=False)


def random_layer(d_out: int, d_in: int, seed: int) -> LayerCurvature:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3 * d_in, d_in, generator=g)
    b = torch.randn(3 * d_out, d_out, generator=g)
    return LayerCurvature(A=a.T @ a / len(a), B=b.T @ b / len(b))


def explicit_solution(G, keys, P, A, weight, ridge):
    """The projected least-squares problem of crispedit.start written out with the projector as
    a (d_out·d_in)² matrix: minimise ½ vec(D)ᵀ (I ⊗ H) vec(D) + vec(G)ᵀ vec(D) over D = P(D),
    in float64, by the normal equations on P's range."""
    d_out, d_in = G.shape
    H = keys.T.double() @ keys.double() / len(keys)
    if A is not None:
        H += weight * A.double()
    H += (ridge * H.diagonal().mean() + torch.finfo(torch.float32).tiny) * torch.eye(d_in)
    n = d_out * d_in
    basis = torch.eye(n, dtype=torch.float64).reshape(n, d_out, d_in)
    Pm = (
        torch.eye(n, dtype=torch.float64)
        if P is None
        else torch.stack([P(e.float()).double().reshape(-1) for e in basis], 1)
    )
    Q = torch.kron(torch.eye(d_out, dtype=torch.float64), H)  # row-major vec: tr(D H Dᵀ)
    lhs = Pm @ Q @ Pm + (torch.eye(n, dtype=torch.float64) - Pm)
    z = torch.linalg.solve(lhs, -(Pm @ G.double().reshape(-1)))
    return (Pm @ z).reshape(d_out, d_in)


@pytest.mark.parametrize("method", ("kfac", "ekfac", "nullspace", "ft"))
def test_the_direction_solves_the_projected_least_squares_problem(method):
    d_out, d_in = 5, 7
    layer = random_layer(d_out, d_in, seed=1)
    if method == "ekfac":  # eigenvalues that are no Kronecker product: a mask that is no staircase
        layer.U_A, layer.U_B = layer.eigen("A", "cpu")[1], layer.eigen("B", "cpu")[1]
        layer.ekfac = torch.rand(d_out, d_in, generator=torch.Generator().manual_seed(2))
    P = None if method == "ft" else build_projector(layer, method, gamma=0.6)
    g = torch.Generator().manual_seed(3)
    G, keys = torch.randn(d_out, d_in, generator=g), torch.randn(4, d_in, generator=g)
    A = None if method == "ft" else layer.A
    D, figures = step_direction(G, keys, P, A, capability_weight=0.5, ridge=1e-2, tolerance=1e-6)
    expected = explicit_solution(G, keys, P, A, 0.5, 1e-2)
    torch.testing.assert_close(D.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    assert figures["residual"] <= 1e-6 and 0 < figures["iterations"] <= d_out * d_in
    if P is not None:  # in the kept subspace, and not the plain (scaled) projected gradient
        torch.testing.assert_close(P(D), D, rtol=0, atol=1e-5 * float(D.abs().max()))
        assert 0 < blocked_share(P(G), P) <= 1e-6 < blocked_share(G, P)
    cosine = float((D * -G).sum() / (D.norm() * G.norm()))
    assert 0 < cosine < 0.999  # a descent direction that the keys have bent


def test_the_length_search_doubles_halves_and_gives_up():
    tried = []

    def quadratic(best):
        def loss(alpha):
            tried.append(alpha)
            return (alpha - best) ** 2

        return loss

    found = search_length(quadratic(5.0))
    assert tried == [0.0, 1.0, 2.0, 4.0, 8.0] and found["alpha"] == 4.0
    assert found["loss_before"] == 25.0 and found["loss_after"] == 1.0
    assert found["tried"] == [[1.0, 16.0], [2.0, 9.0], [4.0, 1.0], [8.0, 9.0]]
    tried.clear()
    found = search_length(quadratic(0.3))  # α = 1 overshoots: halve until the loss falls
    assert tried == [0.0, 1.0, 0.5] and found["alpha"] == 0.5
    found = search_length(lambda alpha: 1.0 + alpha, steps=4)  # nothing lowers it: stay at 0
    assert found["alpha"] == 0.0 and found["loss_after"] == found["loss_before"] == 1.0
    assert [a for a, _ in found["tried"]] == [1.0, 0.5, 0.25, 0.125]


@pytest.mark.parametrize("method", ("kfac", "nullspace", "ft"))
def test_an_edit_from_the_start_lowers_its_loss_first_and_stays_in_the_kept_subspace(
    tiny_tokenizer, curvature, method
):
    layers, curv = curvature
    model = make_tiny("llama")
    editor = CrispEditor(
        model, tiny_tokenizer, None if method == "ft" else curv, method=method, gamma=0.8,
        layers=layers, warm_start="lstsq", **ONE_EPOCH,
    )  # fmt: skip
    delta = editor.edit(FACTS)
    step = delta.report["warm_start_step"]
    assert delta.report["warm_start"] == delta.meta["warm_start"] == "lstsq"
    assert step["alpha"] > 0 and step["loss_after"] < step["loss_before"]
    assert step["tried"][0][0] == 1.0 and step["seconds"] > 0
    assert set(step["solves"]) == set(layers)
    # one epoch after the start lands more than one epoch from the base
    plain = CrispEditor(
        make_tiny("llama"), tiny_tokenizer, None if method == "ft" else curv, method=method,
        gamma=0.8, layers=layers, **ONE_EPOCH,
    ).edit(FACTS)  # fmt: skip
    assert delta.report["loss_curve"][0] < plain.report["loss_curve"][0]
    assert plain.report["warm_start_step"] is None and plain.report["warm_start"] == "off"
    for name in layers:
        D = delta.tensors[f"{name}.weight"]
        if method != "ft":
            assert blocked_share(D, editor.projectors[name]) <= 1e-5
        assert get_layers(model, [name])[name].weight.grad is None


def test_a_bf16_edit_from_the_start_keeps_its_delta_out_of_the_blocked_subspace(
    tiny_tokenizer, curvature
):
    """The start's step goes into the fp32 masters: the bf16 model ends at the delta rounded once,
    and the delta is in the kept subspace, GPT-2's transposed Conv1D included."""
    for arch in ("llama", "gpt2"):
        fp32 = make_tiny(arch)
        layers = parse_layers(fp32, "2-3")
        curv = (
            curvature[1]
            if arch == "llama"
            else collect_curvature(fp32, layers, tiny_batches(tiny_tokenizer), progress=False)
        )
        model = make_tiny(arch).to(torch.bfloat16)
        before = {n: m.weight.detach().clone() for n, m in get_layers(model, layers).items()}
        editor = CrispEditor(
            model, tiny_tokenizer, curv, gamma=0.8, layers=layers, warm_start="lstsq", **ONE_EPOCH
        )
        delta = editor.edit(FACTS)
        assert delta.report["warm_start_step"]["alpha"] > 0
        for name, module in get_layers(model, layers).items():
            D = delta.tensors[f"{name}.weight"]
            assert D.dtype == torch.float32
            assert blocked_share(D.T if is_conv1d(module) else D, editor.projectors[name]) <= 1e-5
            assert torch.equal(module.weight, (before[name].float() + D).to(torch.bfloat16))


def test_the_start_with_the_model_on_the_accelerator(tiny_tokenizer, curvature):
    """The curvature stays on the host while the model is on the logical accelerator of
    tests/devices.py (a mixed-device op raises as on CUDA): the same step as on the CPU."""
    layers, curv = curvature
    options = {**ONE_EPOCH, "layers": layers, "warm_start": "lstsq", "gamma": 0.8}
    expected = CrispEditor(make_tiny("llama"), tiny_tokenizer, curv, **options).edit(FACTS)
    with accelerator() as dev:
        delta = CrispEditor(make_tiny("llama").to(dev), tiny_tokenizer, curv, **options).edit(FACTS)
    step, other = delta.report["warm_start_step"], expected.report["warm_start_step"]
    assert step["alpha"] == other["alpha"]
    assert step["loss_after"] == pytest.approx(other["loss_after"], rel=1e-3)
    for key, d in delta.tensors.items():
        assert not on_accelerator(d)
        torch.testing.assert_close(d, expected.tensors[key], rtol=1e-3, atol=1e-3 * d.abs().max())


@pytest.mark.parametrize("method", ("memit", "alphaedit"))
def test_a_closed_form_editor_refuses_the_start(tiny_tokenizer, curvature, method):
    curv = curvature[1]
    with pytest.raises(SettingsError, match=f"warm_start applies to .*not to {method}") as err:
        make_editor(make_tiny("llama"), tiny_tokenizer, curv, method=method, warm_start="lstsq")
    assert err.value.field == "warm_start"
    with pytest.raises(SettingsError, match="warm_start"):
        EditSettings(warm_start="closed")


def test_the_start_takes_the_same_step_in_micro_batches(tiny_tokenizer, curvature):
    """The gradient the direction solves with is a step's, micro-batched as a step is: one fact
    at a time gives the same step length and delta, up to float rounding."""
    layers, curv = curvature
    options = {**ONE_EPOCH, "layers": layers, "warm_start": "lstsq", "gamma": 0.8}
    whole = CrispEditor(make_tiny("llama"), tiny_tokenizer, curv, **options).edit(FACTS)
    micro = CrispEditor(make_tiny("llama"), tiny_tokenizer, curv, micro_batch=1, **options).edit(
        FACTS
    )
    assert micro.report["warm_start_step"]["alpha"] == whole.report["warm_start_step"]["alpha"]
    for key, d in micro.tensors.items():
        torch.testing.assert_close(d, whole.tensors[key], rtol=1e-3, atol=1e-4 * d.abs().max())


def test_an_edit_already_below_loss_stop_takes_no_step_and_tries_no_length(
    tiny_tokenizer, curvature, monkeypatch
):
    layers, curv = curvature
    model = make_tiny("llama")
    before = {n: m.weight.detach().clone() for n, m in get_layers(model, layers).items()}
    editor = CrispEditor(
        model, tiny_tokenizer, curv, layers=layers, warm_start="lstsq", loss_stop=1e3, **ONE_EPOCH
    )
    monkeypatch.setattr(editor, "_objective", lambda run: pytest.fail("a length was tried"))
    step = editor.edit(FACTS).report["warm_start_step"]
    assert step["alpha"] == 0.0 and step["tried"] == [] and step["solves"] == {}
    for name, module in get_layers(model, layers).items():
        assert torch.equal(module.weight, before[name])
