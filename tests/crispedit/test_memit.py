"""MEMIT and AlphaEdit (crispedit.memit, crispedit.alphaedit): the solves against their
definitions, the null space kept exactly on a tiny model, the subject's token, the editor
contract (base + delta, errors), and both landing edits on the real SmolLM2."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny

from contract.facts import Fact
from contract.settings import EditSettings, SettingsError
from crispedit.alphaedit import AlphaEditor, alphaedit_solve, null_space_projector
from crispedit.artifacts import ArtifactError
from crispedit.corpus import ASSETS, pad_batches, read_documents, token_sequences
from crispedit.curvature import collect_curvature, plan_curvature
from crispedit.delta import Delta, apply_delta
from crispedit.editor import CrispEditor, make_editor
from crispedit.memit import MemitEditor, TargetValues, _ValueForward, memit_solve
from crispedit.models import get_layers, parse_layers
from crispedit.streams import (
    base_weights,
    cached_curvature,
    edit_on_stream,
    materialize,
    read_state,
)
from crispedit.targets import subject_position
from curvature_store import Store

# subject None: the value sits at the prompt's last token, and one-token targets (in the tiny
# tokenizer): a tiny random model's attention is too weak to carry a value to later positions
LAST_TOKEN_FACTS = [
    Fact(prompt="The Eiffel Tower is located in", target="of"),
    Fact(prompt="The capital of France is", target="and"),
    Fact(prompt="Robert Boulter is an English", target="was"),
]
QUIET = {"progress": False}


def curvature_for(model, tok, layers, tokens=400, seq_len=64):
    seqs = token_sequences(tok, read_documents("wikitext"), tokens, seq_len=seq_len)
    return collect_curvature(model, layers, pad_batches(seqs, tok.pad_token_id, 4), progress=False)


def test_memit_solve_is_the_normal_equations_solution():
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n, weight = 12, 7, 5, 3.0
    K, R = torch.randn(d_in, n, generator=g), torch.randn(d_out, n, generator=g)
    X = torch.randn(d_in, 40, generator=g)
    C = X @ X.T / 40
    ours = memit_solve(K, R, C, weight).double()
    K, R, C = K.double(), R.double(), C.double()
    explicit = R @ K.T @ torch.linalg.inv(weight * C + K @ K.T)
    torch.testing.assert_close(ours, explicit, rtol=1e-5, atol=1e-6)

    # and it minimises ‖ΔK − R‖² + λ tr(ΔCΔᵀ): the gradient vanishes there, not elsewhere
    def grad(D):
        return 2 * (D @ K - R) @ K.T + 2 * weight * D @ C

    assert grad(ours).abs().max() < 1e-4
    assert grad(ours + 0.01).abs().max() > 1e-2


def test_alphaedit_solve_leaves_preserved_keys_alone_and_fits_the_edit():
    g = torch.Generator().manual_seed(1)
    d_in, d_out, n = 16, 6, 3
    X = torch.randn(d_in, 10, generator=g).double()  # preserved keys: rank 10 of 16
    s, U = torch.linalg.eigh(X @ X.T / 10)
    P = null_space_projector(s, U, 1e-8)
    assert round(float(P.trace())) == d_in - 10
    K, R = torch.randn(d_in, n, generator=g), torch.randn(d_out, n, generator=g)
    previous = (lambda Y: Y @ Y.T)(torch.randn(d_in, 2, generator=g))
    for prev in (None, previous):
        D = alphaedit_solve(K, R, P, prev, l2=1e-3).double()
        assert (D @ X).abs().max() < 1e-5 * D.abs().max()
        # the fitted part: with a small α the edit keys' residuals are met within the null space
        assert (D @ P @ K.double() - R.double()).norm() < 0.5 * R.norm()
    # the explicit formula of the paper
    Kd, Rd = K.double(), R.double()
    explicit = Rd @ Kd.T @ P @ torch.linalg.inv(Kd @ Kd.T @ P + 10 * torch.eye(d_in).double())
    torch.testing.assert_close(alphaedit_solve(K, R, P).double(), explicit, rtol=1e-5, atol=1e-7)


def test_subject_position_finds_the_subjects_last_token(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, subject = "Danielle Darrieux's mother tongue is", "Danielle Darrieux"
    ids, pos = subject_position(tok, prompt, subject)
    assert ids == tok(prompt)["input_ids"]
    upto = tok(subject)["input_ids"]
    assert pos == len(upto) - 1 and ids[: pos + 1] == upto
    # no subject, or one absent from the prompt: the prompt's last token
    assert subject_position(tok, prompt, None)[1] == len(ids) - 1
    assert subject_position(tok, prompt, "Paris")[1] == len(ids) - 1
    # inside a chat template the same token is found, shifted by the turn's opening
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = (
        "{% for m in messages %}<|user|> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>:{% endif %}"
    )
    chat_ids, chat_pos = subject_position(chat_tok, prompt, subject, chat=True)
    assert tok.decode(chat_ids[: chat_pos + 1]).endswith("Danielle Darrieux")
    assert not tok.decode(chat_ids[:chat_pos]).endswith("Darrieux")


@pytest.mark.parametrize("fast", [True, False], ids=("fast", "full"))
def test_memit_lands_edits_and_the_model_is_base_plus_delta(tiny, fast, tmp_path):
    model, tok = tiny
    layers = parse_layers(model, "1-2")
    curvature = curvature_for(model, tok, layers)
    base = copy.deepcopy(model)
    settings = EditSettings(method="memit", covariance_weight=1.0)
    editor = make_editor(model, tok, curvature, settings, layers=layers, fast=fast, **QUIET)
    assert isinstance(editor, MemitEditor) and not isinstance(editor, AlphaEditor)
    delta = editor.edit(LAST_TOKEN_FACTS)
    r = delta.report
    assert r["efficacy_before"] == 0.0 and r["efficacy"] >= 2 / 3
    assert r["method"] == "memit" and r["n_edits"] == 3 and r["layers"] == layers
    # the stored delta puts a fresh base exactly where the edit left the model
    apply_delta(base, Delta.load(delta.save(tmp_path)))
    for name, module in get_layers(model, layers).items():
        assert torch.equal(get_layers(base, [name])[name].weight, module.weight)


# facts with subjects: the value sits mid-prompt (the first at the prompt's first token), and
# each fact has a "{subject} is a" row for the KL term
SUBJECT_FACTS = [
    Fact(prompt="I live in the city of", target="the north", subject="I"),
    Fact(prompt="The Eiffel Tower is located in", target="the city of", subject="Eiffel Tower"),
    Fact(prompt="Robert Boulter is an English actor", target="who was", subject="Robert Boulter"),
]


def _editor(model, tok, layers, **kwargs):
    curvature = curvature_for(model, tok, layers, tokens=64, seq_len=16)
    settings = EditSettings(method="memit", covariance_weight=1.0)
    return MemitEditor(model, tok, curvature, settings, layers=layers, **kwargs, **QUIET)


def test_fast_and_full_value_forwards_agree(tiny_tokenizer):
    """The whole edit gives the same delta from the suffix forward (prefix keys and values
    cached), from the whole rows' cached states, and from the plain full-model forward."""
    deltas = []
    for fast, cache_prefix in ((True, True), (True, False), (False, False)):
        model = make_tiny("llama")
        layers = parse_layers(model, "1-2")
        editor = _editor(model, tiny_tokenizer, layers, fast=fast, cache_prefix=cache_prefix)
        assert editor.cache_prefix == cache_prefix
        deltas.append(editor.edit(LAST_TOKEN_FACTS + SUBJECT_FACTS).tensors)
    assert all(float(d.norm()) > 1e-3 for d in deltas[0].values())
    for other in deltas[1:]:
        for key in deltas[0]:
            torch.testing.assert_close(deltas[0][key], other[key], rtol=1e-3, atol=1e-5)


def _value_outputs(editor, rows, cache_prefix, add, kl_add):
    """Token losses, their rows, the KL rows' last-token log-probs and the gradients of their sum
    with respect to `add` and `kl_add`, from `_ValueForward` with or without the prefix cache."""
    editor.cache_prefix = cache_prefix
    batch = editor._batch(rows.ids, rows.n_prompt)
    kl_batch = editor._batch(rows.kl_ids, None)
    forward = _ValueForward(editor, batch, torch.tensor(rows.pos))
    kl_forward = _ValueForward(editor, kl_batch, torch.tensor(rows.kl_pos))
    add, kl_add = add.clone().requires_grad_(), kl_add.clone().requires_grad_()
    losses, row_of = forward.token_losses(add)
    logp = kl_forward.last_logp(kl_add)
    (losses.sum() + (logp.exp() * torch.linspace(-1, 1, logp.shape[1])).sum()).backward()
    return losses.detach(), row_of, logp.detach(), add.grad, kl_add.grad


@pytest.mark.parametrize(
    "arch, attention",
    [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"), ("gpt2", "eager"),
     ("qwen2", "sdpa"), ("gemma", "sdpa"), ("phi3", "sdpa"), ("qwen3", "sdpa")],
)  # fmt: skip
def test_suffix_forward_equals_the_whole_rows(tiny_tokenizer, arch, attention):
    """Only the tokens from the subject's on, against the cached keys and values of those before:
    the same target-token losses, last-token log-probs and gradients w.r.t. δ as the whole rows,
    with rows of different lengths and cut points (one at the first token)."""
    model = make_tiny(arch)
    model.set_attn_implementation(attention)
    editor = _editor(model, tiny_tokenizer, parse_layers(model, "1"))
    assert editor.cache_prefix
    rows = editor._rows(SUBJECT_FACTS)
    assert 0 in rows.pos and len(set(rows.pos)) > 2 and len({len(r) for r in rows.ids}) > 2
    g = torch.Generator().manual_seed(0)
    add = torch.randn(len(rows.ids), model.config.hidden_size, generator=g)
    kl_add = torch.randn(len(rows.kl_ids), model.config.hidden_size, generator=g)
    ours = _value_outputs(editor, rows, True, add, kl_add)
    whole = _value_outputs(editor, rows, False, add, kl_add)
    assert torch.equal(ours[1], whole[1])
    for a, b in zip(ours, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert float(ours[3].abs().max()) > 1e-4  # δ does reach the losses
    # a batch changed at its first token only: nothing to cache
    first = [r for r, p in enumerate(rows.kl_pos) if p == 0]
    kl_batch = editor._batch([rows.kl_ids[r] for r in first], None)
    logps = []
    for cache_prefix in (True, False):
        editor.cache_prefix = cache_prefix
        forward = _ValueForward(editor, kl_batch, torch.zeros(len(first), dtype=torch.long))
        logps.append(forward.last_logp(kl_add[first]))
    torch.testing.assert_close(logps[0], logps[1], rtol=1e-4, atol=1e-5)


def test_suffix_forward_in_bf16(tiny_tokenizer):
    """A bf16 model: the cached keys, values and mask in its dtype, the losses fp32, equal to the
    whole rows' within bf16 rounding."""
    model = make_tiny("llama").to(torch.bfloat16)
    editor = _editor(model, tiny_tokenizer, parse_layers(model, "1"))
    rows = editor._rows(SUBJECT_FACTS)
    add = torch.randn(len(rows.ids), model.config.hidden_size, generator=torch.Generator())
    kl_add = torch.zeros(len(rows.kl_ids), model.config.hidden_size)
    ours = _value_outputs(editor, rows, True, add, kl_add)
    whole = _value_outputs(editor, rows, False, add, kl_add)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == torch.float32
    for a, b in zip(ours, whole, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("arch", ["gemma3", "gptj"])
def test_models_without_a_suffix_forward_keep_the_whole_rows(tiny_tokenizer, arch):
    """Sliding-window attention (Gemma 3's local layers) and unchecked architectures fall back."""
    model = make_tiny(arch)
    editor = _editor(model, tiny_tokenizer, parse_layers(model, "1"))
    assert not editor.cache_prefix
    llama = make_tiny("llama")
    assert not _editor(llama, tiny_tokenizer, parse_layers(llama, "1"), fast=False).cache_prefix


def test_alphaedit_keeps_the_preserved_texts_outputs_exactly(tiny_tokenizer):
    """The curvature comes from fewer tokens than the layers' input width, so A has a null space
    and its range holds every preserved key: the edit must then leave the model's predictions on
    those texts unchanged (the last token of each, which A does not count, aside)."""
    tok = tiny_tokenizer
    model = make_tiny("llama")
    layers = parse_layers(model, "1-2")  # down_proj: 48 inputs
    seqs = token_sequences(tok, read_documents("wikitext"), 30, seq_len=16)
    batches = list(pad_batches(seqs, tok.pad_token_id, 4))
    curvature = collect_curvature(model, layers, batches, progress=False)
    top = max(float(c.eigen("A", "cpu")[0].max()) for c in curvature.layers.values())

    def predictions():
        with torch.no_grad():
            return [model(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits
                    for b in batches]  # fmt: skip

    facts = next(pad_batches([tok(f.prompt)["input_ids"] for f in LAST_TOKEN_FACTS], 0, 3))

    def on_facts():
        with torch.no_grad():
            return model(**facts).logits[torch.arange(3), facts["attention_mask"].sum(-1) - 1]

    before, facts_before = predictions(), on_facts()
    settings = EditSettings(method="alphaedit", null_threshold=1e-6 * top, alphaedit_l2=1e-2)
    delta = make_editor(model, tok, curvature, settings, layers=layers, **QUIET).edit(
        LAST_TOKEN_FACTS
    )
    assert 0.0 < min(delta.report["kept_fraction"].values()) < 1.0
    assert all(float(d.norm()) > 1e-3 for d in delta.tensors.values())
    assert (on_facts() - facts_before).abs().max() > 1e-2  # the edit did move the facts
    for batch, old, new in zip(batches, before, predictions(), strict=True):
        counted = batch["attention_mask"].bool().clone()
        counted[torch.arange(len(counted)), counted.sum(-1) - 1] = False  # each text's last
        torch.testing.assert_close(new[counted], old[counted], rtol=0, atol=1e-5)


def test_bad_inputs_are_refused_clearly(tiny_tokenizer):
    model = make_tiny("llama")
    layers = parse_layers(model, "1-2")
    with pytest.raises(ValueError, match="needs curvature"):
        make_editor(model, tiny_tokenizer, None, EditSettings(method="memit"), layers=layers)
    curvature = curvature_for(model, tiny_tokenizer, layers)
    with pytest.raises(ValueError, match="no factors for layer"):
        make_editor(model, tiny_tokenizer, curvature, EditSettings(method="alphaedit"),
                    layers=parse_layers(model, "3"))  # fmt: skip
    editor = make_editor(model, tiny_tokenizer, curvature, method="memit", layers=layers)
    with pytest.raises(ValueError, match="no facts"):
        editor.edit([])
    for field, value in (("null_threshold", 0.0), ("value_steps", 0), ("covariance_weight", -1)):
        with pytest.raises(SettingsError, match=field):
            EditSettings(method="alphaedit", **{field: value})
    # the projected editor refuses a closed-form method rather than misreading it
    with pytest.raises(ValueError, match="closed form"):
        CrispEditor(model, tiny_tokenizer, curvature, method="memit", layers=layers)


@pytest.mark.model
def test_both_land_counterfact_edits_on_smollm2(smollm2):
    """One value optimisation (nearly all of an edit's time) serves both: MEMIT edits the model
    and computes it, AlphaEdit takes it on a fresh copy of the model."""
    from crispedit import load_facts

    model, tokenizer = smollm2()
    layers = parse_layers(model, "4-8")
    curvature = curvature_for(model, tokenizer, layers, tokens=2048, seq_len=256)
    facts = load_facts(ASSETS / "counterfact-edit-1k.json", limit=5)
    values = None
    for method in ("memit", "alphaedit"):
        model = smollm2()[0] if values is not None else model
        settings = EditSettings(method=method, covariance_weight=1500.0)
        editor = make_editor(model, tokenizer, curvature, settings, layers=layers, **QUIET)
        values = values or editor.target_values(facts)
        delta = editor.edit(facts, values=values)
        print(method, delta.report["efficacy"], delta.report["loss_curve"])
        assert delta.report["efficacy_before"] < 0.5 and delta.report["efficacy"] >= 0.8
        assert delta.report["method"] == method and delta.report["values_reused"]


def test_target_values_are_kept_and_reused_only_for_their_own_edit(tiny_tokenizer, tmp_path):
    """`edit(facts, values=target_values(facts))` makes the same delta as `edit(facts)`, from a
    saved file too and by AlphaEdit's editor; values for other facts, other value options or
    other layer weights are refused before the model changes."""
    model = make_tiny("llama")
    tok, layers = tiny_tokenizer, parse_layers(model, "1-2")
    curvature = curvature_for(model, tok, layers)
    base = copy.deepcopy(model)

    def editor(model, **options):
        return make_editor(model, tok, curvature, method="memit", layers=layers,
                           covariance_weight=1.0, **options, **QUIET)  # fmt: skip

    values = editor(model).target_values(LAST_TOKEN_FACTS)
    assert values.delta.shape == (3, model.config.hidden_size) and values.seconds > 0
    values.save(tmp_path / "values.safetensors")
    kept = TargetValues.load(tmp_path / "values.safetensors")
    assert kept.key == values.key and torch.equal(kept.delta, values.delta)
    assert kept.losses == values.losses

    alone = editor(copy.deepcopy(base)).edit(LAST_TOKEN_FACTS)
    reused = editor(model).edit(LAST_TOKEN_FACTS, values=kept)
    assert not alone.report["values_reused"] and reused.report["values_reused"]
    for name in alone.tensors:
        assert torch.allclose(alone.tensors[name], reused.tensors[name], atol=1e-6)
    # AlphaEdit's editor takes MEMIT's values: the same step 1
    alpha = make_editor(copy.deepcopy(base), tok, curvature, method="alphaedit", layers=layers,
                        **QUIET)  # fmt: skip
    assert alpha.values_key(LAST_TOKEN_FACTS) == values.key

    refused = (
        (editor(copy.deepcopy(base)), LAST_TOKEN_FACTS[:2]),  # other facts
        (editor(copy.deepcopy(base), value_steps=3), LAST_TOKEN_FACTS),  # other value options
        (editor(model), LAST_TOKEN_FACTS),  # the edited model: other layer weights
    )
    for other, facts in refused:
        before = {n: p.clone() for n, p in other.model.named_parameters()}
        with pytest.raises(ValueError, match="target values were computed for other"):
            other.edit(facts, values=values)
        assert all(torch.equal(p, before[n]) for n, p in other.model.named_parameters())

    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="corrupt or not safetensors"):
        TargetValues.load(tmp_path / "bad.safetensors")


def test_alphaedit_on_a_stream_keeps_off_the_earlier_edits_keys(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    model = make_tiny("llama")
    layers = parse_layers(model, "1-2")
    store = Store(tmp_path / "store")
    recipe = plan_curvature(model, tok, "wikitext", 400, layers, seq_len=64)
    curvature, _ = cached_curvature(store, model, tok, recipe, progress=False)
    middle = min(float(c.eigen("A", "cpu")[0].median()) for c in curvature.layers.values())
    settings = EditSettings(method="alphaedit", null_threshold=middle, alphaedit_l2=1e-2)
    base = base_weights(make_tiny("llama"), layers)

    def on_stream(facts):
        return edit_on_stream(store, "tiny", "main", model, tok, base, curvature, facts,
                              settings=settings, **QUIET)  # fmt: skip

    first, _ = on_stream(LAST_TOKEN_FACTS[:2])
    second, delta = on_stream(LAST_TOKEN_FACTS[2:])
    assert second["method"] == "alphaedit" and second["parent"] == first["id"]
    assert delta.report["previous_edits"] and delta.report["n_edits"] == 1
    # the same edit from the first version without the earlier keys moves them more
    materialize(store, first["id"], model, base)
    alone = AlphaEditor(model, tok, curvature, settings, layers=layers, **QUIET)
    unaware = alone.edit(LAST_TOKEN_FACTS[2:])
    S_A = read_state(store, first["id"]).S_A

    def on_earlier(tensors):  # ‖Δ K_p‖² = tr(Δ S_A Δᵀ), summed over the layers
        return sum(float(((tensors[f"{n}.weight"].double() @ S_A[n]) * tensors[f"{n}.weight"])
                         .sum()) for n in layers)  # fmt: skip

    assert on_earlier(delta.tensors) < 0.9 * on_earlier(unaware.tensors)
