"""The memory plan against the live tensors of a tiny Llama, and the shipped configs against the
published parameter counts."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import make_tiny
from devices import accelerator, max_memory_allocated, memory_allocated, reset_peak_memory_stats
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
    assert all(P._mask is None for P in projectors)  # K-FAC's staircase: its counts alone
    assert item(plan, "steady editing", "projector kept counts") == nbytes(P.k for P in projectors)
    # what the capability keeps once its projectors are built: its factors and eigenbases
    eigen = [t for c in curvature.layers.values() for w in "AB" for t in c.eigen(w, "cpu")]
    assert item(plan, "steady editing", "capability eigenvalues and eigenbases") == nbytes(eigen)
    assert held, "the edit took no Adam step"
    masters, moments = (sum(sizes) for sizes in zip(*held.values(), strict=True))
    assert item(plan, "steady editing", "fp32 master copies") == masters
    assert item(plan, "steady editing", "Adam exp_avg") == moments
    assert version_bytes(shape, plan.workload)["delta"] == nbytes(delta.tensors.values())

    rows = edit_set_factors(model, tok, layers, FACTS)
    state = StreamState.empty().plus(rows)
    assert item(plan, "stream update", "the sum StreamState.plus returns") == nbytes(
        [*state.S_A.values(), *state.S_B.values()]
    )
    # a head's entry in the worker's StreamCurvatureCache: the eigendecompositions of its A and B
    head = stream_curvature(curvature, state)
    assert all(c.A is None and c.B is None and c.U_A is None for c in head.layers.values())
    entry = nbytes(t for c in head.layers.values() for w in "AB" for t in c.eigen(w, "cpu"))
    assert item(plan, "steady editing", "cached stream curvatures (1)") == entry
    # the rows file of FACT_TOKENS-token texts: the live rows' bytes per token, and the count
    saved = rows.to_tensors()
    per_token = nbytes(v for k, v in saved.items() if k != "tokens") // rows.tokens
    stored = plan.workload.facts * FACT_TOKENS * per_token + nbytes([saved["tokens"]])
    assert item(plan, "version write", "edit rows for the file") == stored
    assert version_bytes(shape, plan.workload)["state"] == stored
    sums = nbytes(t.float() for t in [*state.S_A.values(), *state.S_B.values()])
    assert version_bytes(shape, plan.workload)["state_as_sums"] == sums


def allocated() -> int:
    """Bytes on the logical accelerator once the tensors no longer referenced are freed."""
    gc.collect()
    return memory_allocated()


@pytest.mark.parametrize("kind", ("kfac", "ekfac"))
def test_the_plans_placement_is_what_the_accelerator_holds(tiny_tokenizer, kind):
    """A tiny Llama on the logical accelerator, whose bytes are counted: during a job the device
    holds the model and the projectors (the plan's device items that are not the editor's own
    state), between jobs the model alone; a stream curvature leaves nothing there, and its peak
    is the plan's moment less at most the eigh workspace (a GPU solver's; LAPACK's is no tensor).
    """
    tok = tiny_tokenizer
    shape = model_shape(meta_model(make_tiny("llama").config), "2-3")
    plan = plan_memory(shape, Workload(dtype=torch.float32, kind=kind))
    seqs = token_sequences(tok, read_documents("wikitext"), 300, seq_len=64)
    with accelerator() as dev:
        start = allocated()
        model = make_tiny("llama").to(dev)
        layers = parse_layers(model, "2-3")
        weights = item(plan, "steady editing", "model weights")
        assert allocated() - start == weights
        batches = pad_batches(seqs, tok.pad_token_id, 4)
        capability = collect_curvature(model, layers, batches, kind=kind, progress=False)
        editor = CrispEditor(model, tok, capability, method=kind, progress=False, anchors=0)
        mask = "projector keep-masks" if kind == "ekfac" else "projector kept counts"
        projectors = item(plan, "steady editing", "projector bases")
        projectors += item(plan, "steady editing", mask)
        assert allocated() - start == weights + projectors
        del editor
        assert allocated() - start == weights
        rows = edit_set_factors(model, tok, layers, FACTS)
        assert allocated() - start == weights
        before = allocated()
        reset_peak_memory_stats()
        state = StreamState.empty().plus(rows, dev)
        sums_peak = max_memory_allocated() - before
        reset_peak_memory_stats()
        head = stream_curvature(capability, state, 1.0, dev)
        peak = max_memory_allocated() - before
        assert allocated() == before and head.kind == kind
    phase = next(p for p in plan.phases if p.name == "stream update")
    moments = {m: sum(i.bytes for i in items if not i.host) for m, items in phase.moments.items()}
    assert rows.tokens <= plan.workload.facts * FACT_TOKENS  # the plan's texts hold these
    assert item(plan, "stream update", "their Gram") <= sums_peak <= moments["state sums"]
    eigh = moments["stream curvature + eigh"]
    assert peak <= max(eigh, moments.get("EK-FAC re-expression", 0))
    assert peak >= eigh - item(plan, "stream update", "its eigh: workspace")


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
