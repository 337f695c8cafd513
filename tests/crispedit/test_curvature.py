"""K-FAC/EK-FAC factors against a brute-force per-token computation on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny

from crispedit.artifacts import ArtifactError
from crispedit.corpus import pad_batches, read_documents, token_sequences
from crispedit.curvature import Checkpointing, Curvature, collect_curvature, sample_labels
from crispedit.models import get_layers, parse_layers, weight_matrix

SEED = 3


@pytest.fixture
def sequences(tiny_tokenizer):
    """Five sequences of different lengths, so batches need padding."""
    docs = read_documents("wikitext")[:40]
    seqs = token_sequences(tiny_tokenizer, docs, max_tokens=400, seq_len=64)
    seqs = [s[: 9 + 7 * i] for i, s in enumerate(seqs[:5])]
    assert len({len(s) for s in seqs}) == 5
    return seqs


def brute_force(model, layer_names, sequences, labels_per_seq):
    """A, B, per-sequence weight gradients, one sequence at a time, full backward, float64."""
    layers = get_layers(model, layer_names)
    A = {n: 0 for n in layers}
    B = {n: 0 for n in layers}
    grads = {n: [] for n in layers}
    n_tokens = 0
    for seq, y in zip(sequences, labels_per_seq, strict=True):
        seen = {}

        def hook(module, inputs, output, name, seen=seen):
            output.retain_grad()
            seen[name] = (inputs[0], output)

        handles = [
            m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
            for n, m in layers.items()
        ]
        model.zero_grad(set_to_none=True)
        ids = torch.tensor([seq])
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[0, :-1], torch.tensor(y), reduction="sum")
        loss.backward()
        for h in handles:
            h.remove()
        n_tokens += len(seq) - 1
        for name, module in layers.items():
            a_all, out = seen[name]
            G = torch.zeros_like(weight_matrix(module), dtype=torch.float64)
            # token t's rows, also where a block runs its MLP on flattened (T, d) rows (OPT)
            a_all, g_all = a_all.reshape(len(seq), -1), out.grad.reshape(len(seq), -1)
            for t in range(len(seq) - 1):
                a = a_all[t].double()
                g = g_all[t].double()
                A[name] = A[name] + torch.outer(a, a)
                B[name] = B[name] + torch.outer(g, g)
                G += torch.outer(g, a)
            # the brute force itself is right: Σ_t g_t a_tᵀ is autograd's weight gradient
            W_grad = (
                module.weight.grad.T if G.shape != module.weight.grad.shape else module.weight.grad
            )
            torch.testing.assert_close(G.float(), W_grad, rtol=1e-4, atol=1e-6)
            grads[name].append(G)
    return (
        {n: A[n] / n_tokens for n in layers},
        {n: B[n] / n_tokens for n in layers},
        grads,
        n_tokens,
    )


def assert_factor_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_kfac_factors_equal_brute_force_empirical(tiny, sequences, batch_size):
    model, tok = tiny
    layers = parse_layers(model, "1-3")
    curv = collect_curvature(
        model, layers, pad_batches(sequences, tok.pad_token_id, batch_size), progress=False
    )
    A, B, _, n = brute_force(model, layers, sequences, [s[1:] for s in sequences])
    assert curv.tokens == n
    for name in layers:
        assert_factor_close(curv.layers[name].A, A[name])
        assert_factor_close(curv.layers[name].B, B[name])


def test_kfac_factors_equal_brute_force_sampled(tiny, sequences):
    model, tok = tiny
    layers = parse_layers(model, "2-3")
    batches = list(pad_batches(sequences, tok.pad_token_id, batch_size=8))
    assert len(batches) == 1
    curv = collect_curvature(model, layers, batches, labels="sampled", seed=SEED, progress=False)
    with torch.no_grad():
        logits = model(**batches[0]).logits
    drawn = sample_labels(logits, torch.Generator().manual_seed(SEED))
    labels = [drawn[b, : len(s) - 1].tolist() for b, s in enumerate(sequences)]
    assert labels != [s[1:] for s in sequences]  # sampled, not observed
    A, B, _, _ = brute_force(model, layers, sequences, labels)
    for name in layers:
        assert_factor_close(curv.layers[name].A, A[name])
        assert_factor_close(curv.layers[name].B, B[name])
    empirical = collect_curvature(model, layers, batches, progress=False)
    assert not torch.allclose(empirical.layers[layers[-1]].B, curv.layers[layers[-1]].B)


def test_padding_contributes_nothing(tiny, sequences):
    """Padding with any token id, and any amount of it, leaves the factors unchanged."""
    model, _tok = tiny
    layers = parse_layers(model, "3")
    ref = collect_curvature(model, layers, pad_batches(sequences, 0, 1), progress=False)
    for pad_id in (0, 7, 300):
        padded = list(pad_batches(sequences, pad_id, 5))
        extra = {
            k: F.pad(v, (0, 10), value=pad_id if k == "input_ids" else 0)
            for k, v in padded[0].items()
        }
        for batches in (padded, [extra]):
            curv = collect_curvature(model, layers, batches, progress=False)
            assert curv.tokens == ref.tokens
            for f in ("A", "B"):
                assert_factor_close(
                    getattr(curv.layers[layers[0]], f), getattr(ref.layers[layers[0]], f).double()
                )


def test_backward_stops_at_lowest_layer(tiny, sequences):
    """No parameter gets a gradient, and the flags are restored afterwards."""
    model, _tok = tiny
    flags = [p.requires_grad for p in model.parameters()]
    collect_curvature(
        model, parse_layers(model, "2-3"), pad_batches(sequences, 0, 2), progress=False
    )
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_stopped_backward_gives_the_factors_of_a_full_backward(tiny, sequences):
    """Stopping the backward at the lowest edited layer changes nothing the factors see: the
    full backward of a training step (every parameter differentiated) gives the same A and B,
    and leaves every parameter's .grad as it found it."""
    model, tok = tiny
    layers = parse_layers(model, "2-3")
    batches = list(pad_batches(sequences, tok.pad_token_id, 2))
    stopped = collect_curvature(model, layers, batches, progress=False)
    full = collect_curvature(model, layers, batches, progress=False, stop_backward=False)
    assert full.tokens == stopped.tokens
    for name in layers:
        for f in ("A", "B"):
            ours, ref = getattr(stopped.layers[name], f), getattr(full.layers[name], f)
            assert_factor_close(ours, ref.double())
    assert all(p.grad is None for p in model.parameters())


def test_ekfac_eigenvalues_equal_brute_force(tiny, sequences):
    model, tok = tiny
    layers = parse_layers(model, "2-3")
    curv = collect_curvature(
        model, layers, pad_batches(sequences, tok.pad_token_id, 2), kind="ekfac", progress=False
    )
    assert curv.kind == "ekfac"
    _, _, grads, n = brute_force(model, layers, sequences, [s[1:] for s in sequences])
    for name in layers:
        c = curv.layers[name]
        U_A, U_B = c.U_A.double(), c.U_B.double()
        ref = sum((U_B.T @ G @ U_A) ** 2 for G in grads[name]) / n
        assert_factor_close(c.ekfac, ref)
        # the eigenbases are those of the K-FAC factors
        torch.testing.assert_close(
            U_A.T @ c.A.double() @ U_A,
            torch.diag(torch.diagonal(U_A.T @ c.A.double() @ U_A)),
            atol=1e-5 * c.A.abs().max().item(),
            rtol=0,
        )


def test_save_load_roundtrip_and_corruption(tiny, sequences, tmp_path):
    model, _tok = tiny
    layers = parse_layers(model, "2-3")
    curv = collect_curvature(
        model, layers, pad_batches(sequences, 0, 2), kind="ekfac", progress=False
    )
    curv.meta["model_fingerprint"] = "abc"
    path = curv.save(tmp_path)
    back = Curvature.load(tmp_path)
    assert back.tokens == curv.tokens and list(back.layers) == layers and back.kind == "ekfac"
    assert back.meta["model_fingerprint"] == "abc" and back.meta["labels"] == "empirical"
    for name in layers:
        for f in ("A", "B", "U_A", "U_B", "ekfac"):
            assert torch.equal(getattr(back.layers[name], f), getattr(curv.layers[name], f))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="corrupt"):
        Curvature.load(tmp_path)
    with pytest.raises(ArtifactError, match="not found"):
        Curvature.load(tmp_path / "nope.safetensors")


def test_rejects_unknown_label_mode(tiny, sequences):
    model, _ = tiny
    with pytest.raises(ValueError, match="labels"):
        collect_curvature(
            model, parse_layers(model, "3"), pad_batches(sequences, 0, 2), labels="gold"
        )


class Stop(Exception):
    """Raised from a progress hook: the build dies mid-pass."""


def stop_after(n_calls: int):
    calls = []

    def hook(info: dict) -> None:
        calls.append(info)
        if len(calls) == n_calls:
            raise Stop

    return hook, calls


@pytest.mark.parametrize(("kind", "labels", "stop_at"), [
    ("kfac", "empirical", 2),
    ("kfac", "sampled", 3),
    ("ekfac", "sampled", 2),  # in the K-FAC pass
    ("ekfac", "empirical", 7),  # in the EK-FAC pass
])  # fmt: skip
def test_a_killed_build_resumes_to_bitwise_the_same_factors(
    tiny, sequences, tmp_path, kind, labels, stop_at
):
    """A build stopped mid-pass (by its own progress hook) and started again from its checkpoint
    gives exactly the tensors of a build that was never stopped; progress counts both passes."""
    model, tok = tiny
    layers = parse_layers(model, "2-3")
    batches = list(pad_batches(sequences, tok.pad_token_id, 1))  # 5 batches a pass
    options = {"labels": labels, "kind": kind, "seed": SEED, "progress": False}
    whole = collect_curvature(model, layers, batches, **options)

    checkpoint = Checkpointing(tmp_path / "ck.safetensors", {"recipe": "r"}, every_batches=1)
    hook, calls = stop_after(stop_at)
    with pytest.raises(Stop):
        collect_curvature(
            model, layers, batches, checkpoint=checkpoint, on_progress=hook, **options
        )
    assert checkpoint.path.is_file()
    seen = []
    resumed = collect_curvature(
        model, layers, batches, checkpoint=checkpoint, on_progress=seen.append, **options
    )
    assert resumed.meta["resumed_from"]["batches_done"] == stop_at % 5
    assert resumed.tokens == whole.tokens
    for name in layers:
        for f in ("A", "B", "U_A", "U_B", "ekfac"):
            ours, ref = getattr(resumed.layers[name], f), getattr(whole.layers[name], f)
            assert (
                (ours is None) == (ref is None) == (kind == "kfac" and f in ("U_A", "U_B", "ekfac"))
            )
            if ref is not None:
                assert torch.equal(ours, ref), (name, f)
    total = sum(int(b["attention_mask"].sum()) for b in batches) * (2 if kind == "ekfac" else 1)
    progress = [c["tokens_done"] for c in calls + seen]
    assert progress == sorted(progress) and progress[-1] == total
    assert {c["tokens_total"] for c in calls + seen} == {total}


def test_a_checkpoint_of_another_build_is_not_resumed(tiny, sequences, tmp_path):
    """Sums of other batches (or another recipe) at the checkpoint's path are ignored and the
    build starts afresh: its factors are those of its own batches."""
    model, tok = tiny
    layers = parse_layers(model, "3")
    batches = list(pad_batches(sequences, tok.pad_token_id, 1))
    path = tmp_path / "ck.safetensors"
    hook, _ = stop_after(2)
    with pytest.raises(Stop):
        collect_curvature(
            model, layers, batches[1:], progress=False, on_progress=hook,
            checkpoint=Checkpointing(path, {"recipe": "r"}, every_batches=1),
        )  # fmt: skip
    for identity, batches_now in (({"recipe": "r"}, batches), ({"recipe": "other"}, batches[1:])):
        curv = collect_curvature(
            model, layers, batches_now, progress=False,
            checkpoint=Checkpointing(path, identity, every_batches=1),
        )  # fmt: skip
        ref = collect_curvature(model, layers, batches_now, progress=False)
        assert "resumed_from" not in curv.meta
        assert torch.equal(curv.layers[layers[0]].A, ref.layers[layers[0]].A)
    path.write_bytes(b"not a checkpoint")
    curv = collect_curvature(
        model, layers, batches, progress=False, checkpoint=Checkpointing(path, {"recipe": "r"})
    )
    assert "resumed_from" not in curv.meta


KILLED_BUILD = """
import os, signal, sys
from crispedit.curvature import plan_curvature
from crispedit.models import load_model
from crispedit.streams import cached_curvature
from curvature_store import Store

model, tok = load_model(sys.argv[1])
recipe = plan_curvature(model, tok, "wikitext", 600, "2-3", kind="ekfac", seq_len=16)
calls = []

def die_at_the_seventh_batch(info):
    calls.append(info)
    if len(calls) == 7:  # in the EK-FAC pass, after its checkpoint
        os.kill(os.getpid(), signal.SIGKILL)

cached_curvature(Store(sys.argv[2]), model, tok, recipe, progress=False,
                 on_progress=die_at_the_seventh_batch, checkpoint_every=1)
"""


def test_a_build_killed_for_the_store_resumes_from_its_staging_checkpoint(tiny_model_dir, tmp_path):
    """A process building curvature for the store is killed (SIGKILL) mid-build: the store holds
    no curvature, only the checkpoint in its staging area; the next build of the same recipe
    resumes from it, stores bitwise the curvature of an uninterrupted build, and deletes it."""
    import subprocess
    import sys

    from crispedit.curvature import plan_curvature
    from crispedit.models import load_model
    from crispedit.streams import cached_curvature
    from curvature_store import Store

    store = Store(tmp_path / "store")
    done = subprocess.run(
        [sys.executable, "-c", KILLED_BUILD, str(tiny_model_dir), str(store.root)], timeout=300
    )
    assert done.returncode == -9
    model, tok = load_model(str(tiny_model_dir))
    recipe = plan_curvature(model, tok, "wikitext", 600, "2-3", kind="ekfac", seq_len=16)
    key = store.curvature_key(**recipe.key_fields)
    assert store.list_curvature() == [] and store.checkpoint_file(key).is_file()

    resumed, manifest = cached_curvature(store, model, tok, recipe, progress=False)
    assert manifest["cache_hit"] is False and manifest["key"] == key
    assert manifest["meta"]["resumed_from"]["pass"] == "EK-FAC"
    assert not store.checkpoint_file(key).exists()
    whole, _ = cached_curvature(Store(tmp_path / "fresh"), model, tok, recipe, progress=False)
    stored = Curvature.load(store.curvature_file(key))
    for name in recipe.layers:
        for f in ("A", "B", "U_A", "U_B", "ekfac"):
            ref = getattr(whole.layers[name], f)
            assert torch.equal(getattr(resumed.layers[name], f), ref)
            assert torch.equal(getattr(stored.layers[name], f), ref)


def test_a_bf16_build_on_the_accelerator_resumes_bitwise(tiny_tokenizer, sequences, tmp_path):
    """The model in bf16 on a logical accelerator (where mixing it with the CPU fails, as on
    CUDA): the checkpoint goes to the host and its sums come back to the layers' device, and the
    resumed EK-FAC factors are bitwise those of an uninterrupted build there."""
    from devices import accelerator, on_accelerator

    with accelerator() as dev:
        model = make_tiny("llama").to(dev, torch.bfloat16)
        layers = parse_layers(model, "2-3")
        batches = list(pad_batches(sequences, tiny_tokenizer.pad_token_id, 2))  # 3 a pass
        options = {"kind": "ekfac", "labels": "sampled", "seed": SEED, "progress": False}
        whole = collect_curvature(model, layers, batches, **options)
        checkpoint = Checkpointing(tmp_path / "ck.safetensors", every_batches=1)
        hook, _ = stop_after(4)  # in the EK-FAC pass
        with pytest.raises(Stop):
            collect_curvature(
                model, layers, batches, checkpoint=checkpoint, on_progress=hook, **options
            )
        resumed = collect_curvature(model, layers, batches, checkpoint=checkpoint, **options)
        assert resumed.meta["resumed_from"] == {"pass": "EK-FAC", "batches_done": 1}
        for name in layers:
            for f in ("A", "B", "U_A", "U_B", "ekfac"):
                ours, ref = getattr(resumed.layers[name], f), getattr(whole.layers[name], f)
                assert on_accelerator(ours)
                assert torch.equal(ours.cpu(), ref.cpu()), (name, f)
