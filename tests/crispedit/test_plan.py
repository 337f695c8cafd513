"""The memory plan against the live tensors of a tiny Llama, and the shipped configs against the
published parameter counts."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from torch.optim.optimizer import register_optimizer_step_post_hook

from contract.facts import Fact
from crispedit.corpus import pad_batches, read_documents, token_sequences
from crispedit.curvature import collect_curvature
from crispedit.editor import CrispEditor
from crispedit.models import parse_layers
from crispedit.plan import (
    FACT_TOKENS,
    Workload,
    _backward,
    load_config,
    meta_model,
    model_shape,
    plan_memory,
    shipped_configs,
    version_bytes,
)
from crispedit.sequential import StreamState, edit_set_factors, stream_curvature

FACTS = [
    Fact(prompt="The Eiffel Tower is located in", target="Rome"),
    Fact(prompt="The capital of France is", target="Berlin"),
]
# The model cards' parameter counts (and the counts the released safetensors indexes sum to).
PUBLISHED = {
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
    "gemma-2-9b": 9_241_705_984,
}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def item(plan, phase: str, starts: str) -> int:
    """Bytes of the item of `phase` whose name starts with `starts` (resident or at the peak)."""
    found = next(p for p in plan.phases if p.name == phase)
    every = found.resident + [i for items in found.moments.values() for i in items]
    names = [i for i in every if i.name.startswith(starts)]
    assert len({i.bytes for i in names}) == 1, (phase, starts, names)
    return names[0].bytes


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_configs_count_the_published_parameters(name):
    shape = model_shape(meta_model(load_config(name)), None, name)
    assert shape.parameters == PUBLISHED[name]
    assert len(shape.layers) == 5 and all(n.endswith("mlp.down_proj") for n in shape.layers)
    assert set(shipped_configs()) == set(PUBLISHED)


def test_plan_matches_the_live_tensors_of_a_tiny_llama(tiny_tokenizer):
    tok = tiny_tokenizer
    model = make_tiny("llama")
    layers = parse_layers(model, "2-3")
    # the plan sees the config alone, on the meta device
    shape = model_shape(meta_model(model.config), "2-3")
    assert list(shape.layers) == layers
    plan = plan_memory(shape, Workload(dtype=torch.float32))

    live_weights = nbytes(model.parameters()) + nbytes(model.buffers())
    assert item(plan, "curvature build", "model weights") == live_weights
    bf16 = plan_memory(shape, Workload(dtype=torch.bfloat16))
    params_bf16 = nbytes(make_tiny("llama").to(torch.bfloat16).parameters())
    assert item(bf16, "curvature build", "model weights") - shape.buffer_bytes == params_bf16

    seqs = token_sequences(tok, read_documents("wikitext"), 300, seq_len=64)
    curvature = collect_curvature(
        model, layers, pad_batches(seqs, tok.pad_token_id, 4), progress=False
    )
    factors = nbytes(t for c in curvature.layers.values() for t in (c.A, c.B))
    assert item(plan, "steady editing", "capability curvature A, B") == factors
    # the K-FAC sums are the same matrices in float64
    sums = nbytes(t.double() for c in curvature.layers.values() for t in (c.A, c.B))
    assert item(plan, "curvature build", "K-FAC sums") == sums

    held = {}  # per parameter Adam steps (the editor has one Adam per layer): it and its moments

    def record(optimizer, args, kwargs):  # what Adam holds after each step
        for p in (p for g in optimizer.param_groups for p in g["params"]):
            moments = [v for k, v in optimizer.state[p].items() if k != "step"]
            held[id(p)] = (nbytes([p]), nbytes(moments))

    hook = register_optimizer_step_post_hook(record)
    try:
        editor = CrispEditor(model, tok, curvature, epochs=2, progress=False, anchors=0)
        delta = editor.edit(FACTS)
    finally:
        hook.remove()
    projectors = editor.projectors.values()
    assert item(plan, "steady editing", "projector bases") == nbytes(
        t for P in projectors for t in (P.U_A, P.U_B)
    )
    assert item(plan, "steady editing", "projector keep-masks") == nbytes(P.M for P in projectors)
    assert held, "the edit took no Adam step"
    masters, moments = (sum(sizes) for sizes in zip(*held.values(), strict=True))
    assert item(plan, "steady editing", "fp32 master copies") == masters
    assert item(plan, "steady editing", "Adam exp_avg") == moments
    assert version_bytes(shape, plan.workload)["delta"] == nbytes(delta.tensors.values())

    rows = edit_set_factors(model, tok, layers, FACTS)
    state = StreamState.empty().plus(rows)
    assert item(plan, "stream update", "edit-set sums") == nbytes(
        [*state.S_A.values(), *state.S_B.values()]
    )
    # a head's entry in the worker's StreamCurvatureCache: its factors and its projector's bases
    head = stream_curvature(curvature, state)
    projectors = CrispEditor(model, tok, head, progress=False).projectors.values()
    entry = nbytes(t for c in head.layers.values() for t in (c.A, c.B))
    entry += nbytes(t for P in projectors for t in (P.U_A, P.U_B))
    assert item(plan, "steady editing", "other heads' cached stream curvatures (1)") == entry
    # the rows file of FACT_TOKENS-token texts: the live rows' bytes per token, and the count
    saved = rows.to_tensors()
    per_token = nbytes(v for k, v in saved.items() if k != "tokens") // rows.tokens
    stored = plan.workload.facts * FACT_TOKENS * per_token + nbytes([saved["tokens"]])
    assert item(plan, "version write", "edit rows for the file") == stored
    assert version_bytes(shape, plan.workload)["state"] == stored
    sums = nbytes(t.float() for t in [*state.S_A.values(), *state.S_B.values()])
    assert version_bytes(shape, plan.workload)["state_as_sums"] == sums


def test_levers_lower_a_missing_phase_until_it_fits():
    plan = plan_memory(model_shape(meta_model(load_config("llama-3-8b")), None, "llama-3-8b"))
    steady = next(p for p in plan.phases if p.name == "steady editing")
    peaks = [steady.peak] + [b for _, b in plan.levers["steady editing"]]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks)
    # a phase within its target gets no lever
    build = next(p for p in plan.phases if p.name == "curvature build")
    if build.peak <= 40 << 30:
        assert plan.levers["curvature build"] == []


def test_activation_estimate_is_near_what_the_backward_saves():
    """Activations are an estimate (kernels choose what they save): within 20 % of the bytes a
    curvature batch's backward holds, counted by autograd's saved-tensor hooks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=512,
        attn_implementation="sdpa",  # as `load_model` gets it, and a GPU's fused kernels save
    )
    model = LlamaForCausalLM(config).eval()
    shape = model_shape(model, "5-6")
    batch_size, seq_len = 4, 128
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages, alive = {}, []  # kept alive, so that no storage address is reused

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:  # frozen layers save their weight
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            alive.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        collect_curvature(model, list(shape.layers), [batch], progress=False)
    w = Workload(dtype=torch.float32, batch_size=batch_size, seq_len=seq_len)
    tokens = batch_size * seq_len
    planned = _backward(shape, w, tokens, grads=False) + tokens * shape.vocab * 4  # + log-softmax
    assert abs(sum(storages.values()) / planned - 1) < 0.2
