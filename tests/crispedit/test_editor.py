"""The projected editor on tiny models: projection, determinism, deltas, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from contract.facts import Fact
from crispedit.corpus import pad_batches, read_documents, token_sequences
from crispedit.curvature import collect_curvature
from crispedit.delta import Delta, DeltaError, apply_delta, revert_delta
from crispedit.editor import CrispEditor, fact_losses
from crispedit.models import (
    get_layers,
    is_conv1d,
    model_fingerprint,
    parse_layers,
    trainable_only,
)
from crispedit.projector import build_projector
from crispedit.targets import (
    target_batches,
    target_loss,
    target_positions,
    target_token_losses_at,
)

FACTS = [
    Fact(prompt="The Eiffel Tower is located in", target="Rome"),
    Fact(prompt="The capital of France is", target="Berlin"),
    Fact(prompt="Robert Boulter is an English", target="chef"),
]
FAST = {"lr": 3e-2, "epochs": 30, "progress": False}


def curvature_for(model, tok, layers, tokens=400):
    seqs = token_sequences(tok, read_documents("wikitext"), tokens, seq_len=64)
    return collect_curvature(model, layers, pad_batches(seqs, tok.pad_token_id, 4), progress=False)


@pytest.fixture
def setup(tiny):
    model, tok = tiny
    layers = parse_layers(model, "2-3")
    return model, tok, layers, curvature_for(model, tok, layers)


def test_ft_edit_lands_and_model_equals_base_plus_delta(setup):
    model, tok, layers, _ = setup
    base = {n: m.weight.detach().clone() for n, m in get_layers(model, layers).items()}
    delta = CrispEditor(model, tok, None, method="ft", layers=layers, **FAST).edit(FACTS)
    r = delta.report
    assert r["efficacy"] == 1.0 > r["efficacy_before"]
    assert r["loss_curve"][-1] < r["loss_curve"][0]
    assert r["n_edits"] == 3 and r["layers"] == layers and r["gamma"] is None
    # a fresh copy of the base model plus the delta is bitwise the edited model
    fresh = make_tiny("gpt2" if "transformer" in layers[0] else "llama")
    assert model_fingerprint(fresh, layers) == delta.meta["base_fingerprint"]
    apply_delta(fresh, delta)
    for name, module in get_layers(fresh, layers).items():
        assert torch.equal(module.weight, get_layers(model, [name])[name].weight)
        assert not torch.equal(module.weight, base[name])
    assert model_fingerprint(fresh, layers) == delta.meta["edited_fingerprint"]
    revert_delta(fresh, delta)
    for name, module in get_layers(fresh, layers).items():
        torch.testing.assert_close(module.weight, base[name], atol=1e-6, rtol=0)


def test_gradients_are_projected_in_the_weight_layout(setup):
    """Linear and GPT-2 Conv1D: a gradient in the weight's storage layout comes back as P(G) of
    the (d_out, d_in) G, in that same layout."""
    model, tok, layers, curv = setup
    editor = CrispEditor(model, tok, curv, method="kfac", gamma=0.8, layers=layers, progress=False)
    for name, module in get_layers(model, layers).items():
        grad = torch.randn_like(module.weight)
        conv1d = grad.shape != editor.projectors[name].M.shape  # stored as (d_in, d_out)
        expected = build_projector(curv.layers[name], "kfac", 0.8)(grad.T if conv1d else grad)
        projected = editor._project(name, grad)
        torch.testing.assert_close(projected.T if conv1d else projected, expected)


def reference_edit(model, tok, layers, projectors, facts, epochs, lr, batch_size, seed):
    """The edit before fp32 masters, written out: Adam on the model's own weights, the gradient
    projected before each step and the step after it; the full forward, every batch stepped.
    Returns the state-dict keyed `W_after - W_before`."""
    modules = get_layers(model, layers)
    before = {n: m.weight.detach().clone() for n, m in modules.items()}

    def project(name, T):
        return projectors[name](T.T).T if is_conv1d(modules[name]) else projectors[name](T)

    pairs = [(f.prompt, f.target) for f in facts]
    order = torch.Generator().manual_seed(seed)
    params = [m.weight for m in modules.values()]
    with trainable_only(model, params):
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
        for _ in range(epochs):
            perm = torch.randperm(len(pairs), generator=order).tolist()
            for batch in target_batches(tok, [pairs[i] for i in perm], batch_size):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                where = target_positions(batch["labels"])
                labels = batch["labels"][:, 1:][where]
                losses, _ = target_token_losses_at(logits.logits[:, :-1][where], labels, where)
                optimizer.zero_grad(set_to_none=True)
                losses.mean().backward()
                with torch.no_grad():
                    for name, module in modules.items():
                        module.weight.grad.copy_(project(name, module.weight.grad))
                    before_step = {n: m.weight.detach().clone() for n, m in modules.items()}
                    optimizer.step()
                    for name, module in modules.items():
                        step = module.weight - before_step[name]
                        module.weight.copy_(before_step[name] + project(name, step))
    return {f"{n}.weight": m.weight.detach() - before[n] for n, m in modules.items()}


def test_an_fp32_edit_equals_adam_on_the_weights_themselves(setup):
    """On an fp32 model the fp32 masters change nothing: the editor's delta is bitwise the one of
    Adam run on the model's weights directly (two batches an epoch, reshuffled by the seed), and
    the model ends at the base plus that delta."""
    model, tok, layers, curv = setup
    base = {n: m.weight.detach().clone() for n, m in get_layers(model, layers).items()}
    options = {"lr": 3e-2, "epochs": 4, "batch_size": 2, "seed": 3}
    editor = CrispEditor(
        model, tok, curv, method="kfac", gamma=0.8, layers=layers, fast=False, anchors=0,
        loss_stop=0.0, progress=False, **options,
    )  # fmt: skip
    delta = editor.edit(FACTS)
    edited = {n: m.weight.detach().clone() for n, m in get_layers(model, layers).items()}
    with torch.no_grad():
        for name, module in get_layers(model, layers).items():
            module.weight.copy_(base[name])
    expected = reference_edit(model, tok, layers, editor.projectors, FACTS, **options)
    for name in layers:
        assert torch.equal(delta.tensors[f"{name}.weight"], expected[f"{name}.weight"])
        assert torch.equal(edited[name], base[name] + expected[f"{name}.weight"])


def _leak(delta, editor) -> float:
    """The largest share of a layer's delta (Frobenius) that lies in blocked directions."""
    worst = 0.0
    for key, D in delta.tensors.items():
        P = editor.projectors[key.removesuffix(".weight")]
        D = D if D.shape == P.M.shape else D.T  # GPT-2 Conv1D stores (d_in, d_out)
        worst = max(worst, float((D - P(D)).norm() / D.norm()))
    return worst


def test_projecting_the_update_keeps_the_whole_delta_in_the_kept_subspace(setup):
    """Adam rescales the projected gradient per coordinate, so with `project="gradient"` part of
    the delta leaks into blocked directions; `project="update"` leaves none there."""
    model, tok, layers, curv = setup
    base = {n: m.weight.detach().clone() for n, m in get_layers(model, layers).items()}
    options = {"method": "kfac", "gamma": 0.8, "layers": layers, **FAST, "epochs": 5}
    by_gradient = CrispEditor(model, tok, curv, project="gradient", **options)
    leak_gradient = _leak(by_gradient.edit(FACTS), by_gradient)
    with torch.no_grad():
        for name, module in get_layers(model, layers).items():
            module.weight.copy_(base[name])
    by_update = CrispEditor(model, tok, curv, project="update", **options)
    delta = by_update.edit(FACTS)
    assert delta.meta["project"] == "update"
    assert _leak(delta, by_update) < 1e-4 < leak_gradient
    with pytest.raises(ValueError, match="project must be one of"):
        CrispEditor(model, tok, curv, project="weights", **options)


def test_fully_blocked_projector_does_not_change_predictions(setup):
    """γ = 1 keeps only zero-curvature directions. For Llama there are none (full-rank factors):
    the weights must not move. GPT-2's last block feeds a LayerNorm, which makes the all-ones
    output direction exactly flat: the weights may move there, but no prediction may change."""
    model, tok, layers, curv = setup
    ids = tok("Robert Boulter is an English film actor", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits_before = model(input_ids=ids).logits
    delta = CrispEditor(model, tok, curv, method="kfac", gamma=1.0, layers=layers, **FAST).edit(
        FACTS
    )
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits_before, atol=1e-4, rtol=0)
    assert delta.report["efficacy"] == delta.report["efficacy_before"]
    if "model.layers" in layers[0]:
        assert all(float(t.abs().max()) == 0.0 for t in delta.tensors.values())


def test_deterministic_under_a_seed(tiny):
    model, tok = tiny
    layers = parse_layers(model, "3")
    curv = curvature_for(model, tok, layers)
    arch = "gpt2" if "transformer" in layers[0] else "llama"
    deltas = [
        CrispEditor(make_tiny(arch), tok, curv, layers=layers, **FAST).edit(FACTS) for _ in range(2)
    ]
    for key in deltas[0].tensors:
        assert torch.equal(deltas[0].tensors[key], deltas[1].tensors[key])
    assert deltas[0].meta == deltas[1].meta


def test_loss_stop_ends_the_edit_at_its_threshold(setup):
    """The loop stops after the first epoch whose mean loss is below `loss_stop`: under the same
    seed a looser stop runs the same epochs, fewer of them, and changes the weights less."""
    model, tok, layers, _ = setup
    base = {n: m.weight.detach().clone() for n, m in get_layers(model, layers).items()}

    def edit(loss_stop):
        editor = CrispEditor(
            model, tok, None, method="ft", layers=layers, loss_stop=loss_stop, **FAST
        )
        report = editor.edit(FACTS).report
        for name, module in get_layers(model, layers).items():  # back to the base for the next
            module.weight.data.copy_(base[name])
        return report

    tight = edit(0.0)
    curve = tight["loss_curve"]
    assert len(curve) == FAST["epochs"] and curve[9] < curve[8]
    loose = edit((curve[8] + curve[9]) / 2)
    assert loose["loss_curve"] == curve[:10] and loose["epochs"] == 10
    assert loose["loss_stop"] > tight["loss_stop"] == 0.0
    assert sum(loose["delta_norm"].values()) < sum(tight["delta_norm"].values())


def fact_losses_now(model, tok, facts) -> torch.Tensor:
    """Each fact's `target_loss` under the model as it stands, one fact at a time."""
    out = []
    for fact in facts:
        batch = next(target_batches(tok, [(fact.prompt, fact.target)], 1))
        with torch.no_grad():
            out.append(target_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]))
    return torch.stack(out)


def test_fact_losses_are_each_rows_mean():
    token_losses = torch.tensor([1.0, 3.0, 4.0, 2.0, 6.0])
    row_of = torch.tensor([0, 0, 1, 2, 2])
    assert fact_losses(token_losses, row_of, 3).tolist() == [2.0, 4.0, 4.0]


def test_a_per_fact_stop_ends_once_every_fact_is_below_it(setup):
    """`stop="fact"`: the edit ends once every fact's own loss is below `loss_stop` (where the
    batch mean's rule may leave one above it), well before the epochs run out."""
    model, tok, layers, _ = setup
    threshold = float(fact_losses_now(model, tok, FACTS).max()) - 0.45
    editor = CrispEditor(
        model, tok, None, method="ft", layers=layers, loss_stop=threshold, stop="fact", **FAST
    )
    report = editor.edit(FACTS).report
    assert report["stop"] == "fact" and report["epochs"] < FAST["epochs"]
    assert fact_losses_now(model, tok, FACTS).max() < threshold


def test_delta_file_roundtrip_and_wrong_model(setup, tmp_path):
    model, tok, layers, curv = setup
    delta = CrispEditor(model, tok, curv, layers=layers, **FAST).edit(FACTS)
    path = delta.save(tmp_path)
    assert path.name == "delta.safetensors"
    back = Delta.load(path)
    assert back.meta == {**delta.meta, "format_version": 1}
    assert back.layers == layers
    other = make_tiny("gpt2" if "transformer" in layers[0] else "llama", seed=1)
    with pytest.raises(DeltaError, match="made for model"):
        apply_delta(other, back)
    with pytest.raises(DeltaError, match="made for model"):
        apply_delta(model, back)  # already edited: its base is no longer this model


def test_clip_reaches_the_projectors_and_the_report(setup):
    model, tok, layers, curv = setup
    plain = CrispEditor(model, tok, curv, layers=layers, **FAST)
    clipped = CrispEditor(model, tok, curv, layers=layers, clip=0.2, **FAST)
    for name in layers:
        expected = build_projector(curv.layers[name], "kfac", clipped.settings.gamma, clip=0.2)
        assert torch.equal(clipped.projectors[name].M, expected.M)
    assert any(not torch.equal(plain.projectors[n].M, clipped.projectors[n].M) for n in layers)
    assert clipped.edit(FACTS[:1]).meta["clip"] == 0.2
    with pytest.raises(ValueError, match="clip"):
        CrispEditor(model, tok, curv, layers=layers, clip=1.0)


def test_editor_errors(setup):
    model, tok, layers, curv = setup
    with pytest.raises(ValueError, match="needs curvature"):
        CrispEditor(model, tok, None, method="kfac")
    with pytest.raises(ValueError, match="no factors for layer"):
        CrispEditor(model, tok, curv, layers=parse_layers(model, "1-3"))
    with pytest.raises(ValueError, match="no facts"):
        CrispEditor(model, tok, curv, layers=layers).edit([])
    with pytest.raises(ValueError, match="loss_stop"):
        CrispEditor(model, tok, curv, layers=layers, loss_stop=-1.0)
    with pytest.raises(ValueError, match="stop must be one of"):
        CrispEditor(model, tok, curv, layers=layers, stop="epoch")
    with pytest.raises(ValueError, match="unknown method"):
        CrispEditor(model, tok, curv, method="rome")


def test_projector_dtype_follows_the_flag_on_a_bf16_model(tiny_tokenizer):
    """A bf16 model (as loaded on a GPU) projects in fp32 by default, in bf16 on request; the
    curvature stays fp32 and the edit runs either way (here on the CPU)."""
    model = make_tiny("llama").to(torch.bfloat16)
    layers = parse_layers(model, "2-3")
    curv = curvature_for(model.float(), tiny_tokenizer, layers)
    model = model.to(torch.bfloat16)
    assert all(c.A.dtype == torch.float32 for c in curv.layers.values())
    for choice, dtype in (("float32", torch.float32), ("model", torch.bfloat16)):
        options = {**FAST, "epochs": 1}
        editor = CrispEditor(
            model, tiny_tokenizer, curv, layers=layers, projector_dtype=choice, **options
        )
        assert {P.U_A.dtype for P in editor.projectors.values()} == {dtype}
        delta = editor.edit(FACTS[:1])
        assert all(t.dtype == torch.float32 for t in delta.tensors.values())
    with pytest.raises(ValueError, match="projector_dtype must be one of"):
        CrispEditor(model, tiny_tokenizer, curv, layers=layers, projector_dtype="fp16")
