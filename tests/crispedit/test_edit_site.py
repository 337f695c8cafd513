"""The projected editor's `edit_site` option (issue 23's generalization lever): with "subject" the
change acts, while it is trained, only at each sequence's subject token. Its loss and gradient
against a reference that adds the change there and nowhere else, on Llama and GPT-2 (Conv1D
storage), by the cached fast forward and the full one, over two edited blocks (the gradient of the
lower one passes through the upper one's input everywhere); the sites under context prefixes and
without a subject; a bf16 edit; the settings' refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from contract.facts import Fact
from contract.settings import EditSettings, SettingsError
from crispedit.editor import CrispEditor, _Tally
from crispedit.models import is_conv1d, parse_layers
from crispedit.targets import subject_position, target_positions, target_token_losses_at

FACTS = [
    Fact(prompt=f"{s} works as a", target=t, subject=s)
    for s, t in [("Anna Berg", "chef"), ("Tom Hale", "pilot"), ("Ida Moss", "judge")]
] + [Fact(prompt="The capital of France is", target="Lyon")]  # no subject: the prompt's last
ROWS = [2, 0, 3, 1]


def subject_editor(model, tok, fast: bool, **options) -> CrispEditor:
    options = {"method": "ft", "anchors": 0, "loss_stop": 0.0, "edit_site": "subject", **options}
    return CrispEditor(
        model, tok, None, layers=parse_layers(model, "2-3"), fast=fast, progress=False, **options
    )


def reference_loss(model, modules, batch, site, change):
    """The batch's mean target-token loss with `change[name]` (storage layout) added to layer
    `name`'s weight at the `site` positions only, hooks adding x·change there."""

    def hook_for(module, P):
        def hook(_module, args, output):
            x = args[0]
            extra = x @ P if is_conv1d(module) else x @ P.T
            return output + site * extra

        return hook

    handles = [m.register_forward_hook(hook_for(m, change[n])) for n, m in modules.items()]
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        for handle in handles:
            handle.remove()
    labels = batch["labels"]
    where = target_positions(labels)
    return target_token_losses_at(logits[:, :-1][where], labels[:, 1:][where], where)[0].mean()


@pytest.mark.parametrize("fast", [True, False], ids=("fast", "full"))
def test_the_change_acts_at_the_subjects_token_alone(tiny, fast):
    """Weights moved by P from the edit's start: the editor's loss is the reference's, which
    adds P at the sites only, and its gradient on each edited weight is the reference's on P,
    over both blocks (the lower one's through the upper one's input at every token); with the
    change acting everywhere the gradient is another."""
    model, tok = tiny
    editor = subject_editor(model, tok, fast)
    assert (editor.fast is not None and editor.fast.start == 2) == fast
    run = editor._prepare(FACTS)
    batch = editor._batch(run, ROWS)
    site = torch.zeros(batch["input_ids"].shape, dtype=torch.bool)
    site[torch.arange(len(ROWS)), torch.tensor([run.sites[r] for r in ROWS])] = True
    torch.manual_seed(1)
    change = {
        n: (0.05 * torch.randn_like(m.weight)).requires_grad_() for n, m in editor.modules.items()
    }
    expected = reference_loss(model, editor.modules, batch, site[..., None], change)
    expected.backward()
    with torch.no_grad():
        for name, module in editor.modules.items():
            module.weight.grad = None  # the reference's, on the weights it also ran with
            module.weight.add_(change[name])
    loss = editor._batch_loss(run, batch, ROWS, _Tally())
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, module in editor.modules.items():
        torch.testing.assert_close(module.weight.grad, change[name].grad, rtol=1e-4, atol=1e-6)
    everywhere = {n: m.weight.grad.clone() for n, m in editor.modules.items()}
    editor._release(run)

    editor = subject_editor(model, tok, fast, edit_site="all")
    run = editor._prepare(FACTS)
    editor._batch_loss(run, editor._batch(run, ROWS), ROWS, _Tally()).backward()
    for name, module in editor.modules.items():
        assert (module.weight.grad - everywhere[name]).norm() > 0.1 * everywhere[name].norm()
    editor._release(run)


def test_sites_are_each_sequences_subject_token_after_its_context(tiny):
    """Under context prefixes every sequence's site is its subject's last token in the
    prefixed prompt (`subject_position`), the prompt's last token for a fact without one."""
    model, tok = tiny
    editor = subject_editor(model, tok, True, contexts=2)
    run = editor._prepare(FACTS)
    assert len(run.sites) == len(run.sequences.pairs) == 3 * len(FACTS)
    for fact, seqs in zip(FACTS, run.sequences.of_fact, strict=True):
        for s in seqs:
            prompt = run.sequences.pairs[s][0]
            ids, pos = subject_position(tok, prompt, fact.subject)
            assert run.sites[s] == pos
            if fact.subject is None:
                assert pos == len(ids) - 1
            else:
                assert tok.decode(ids[: pos + 1]).endswith(fact.subject)
    assert run.sites[run.sequences.of_fact[0][1]] > run.sites[run.sequences.of_fact[0][0]]
    editor._release(run)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_bf16_edit_at_the_subject_is_its_delta_and_its_gradient_the_fp32_ones(
    arch, tiny_tokenizer
):
    """A bf16 model: the site gradient is the fp32 copy's to bf16 precision (never the small
    remainder of two large bf16 products); an edit keeps bf16 weights, an fp32 delta, the
    weights before plus the delta rounded once, no hook left on a layer, and reports its
    site."""
    tok = tiny_tokenizer
    model = make_tiny(arch).to(torch.bfloat16)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        copy = make_tiny(arch).to(torch.bfloat16).to(dtype)
        editor = subject_editor(copy, tok, True)
        run = editor._prepare(FACTS)
        editor._batch_loss(run, editor._batch(run, ROWS), ROWS, _Tally()).backward()
        grads[dtype] = {n: m.weight.grad.float() for n, m in editor.modules.items()}
        editor._release(run)
    for name, reference in grads[torch.float32].items():
        error = (grads[torch.bfloat16][name] - reference).norm() / reference.norm()
        assert 0 < error < 0.05

    editor = subject_editor(model, tok, True, lr=3e-2, epochs=5)
    before = {n: m.weight.detach().clone() for n, m in editor.modules.items()}
    delta = editor.edit(FACTS)
    assert delta.report["edit_site"] == delta.meta["edit_site"] == "subject"
    for name, module in editor.modules.items():
        D = delta.tensors[f"{name}.weight"]
        assert D.dtype == torch.float32 and float(D.norm()) > 0.0
        assert module.weight.dtype == torch.bfloat16 and module.weight.grad is None
        assert torch.equal(module.weight, (before[name].float() + D).to(torch.bfloat16))
        assert not module._forward_hooks


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_closed_form_methods_refuse_the_option(method):
    with pytest.raises(SettingsError, match="edit_site applies to the projected editor") as err:
        EditSettings(method=method, edit_site="subject")
    assert err.value.field == "edit_site"
    with pytest.raises(SettingsError, match="edit_site must be one of all, subject"):
        EditSettings(edit_site="object")
