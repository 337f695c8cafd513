"""Sequential editing through the store: versions, exact cumulative deltas, stream state."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import TINY_EDIT, make_tiny, tiny_stream_store
from conftest import tiny_stream_edit as edit
from devices import accelerator

from contract.facts import Fact
from contract.names import DELTA_FILE, ROWS_FILE, STATE_FILE
from crispedit.artifacts import load_tensors, save_tensors
from crispedit.corpus import pad_batches
from crispedit.curvature import LayerCurvature, collect_curvature, plan_curvature
from crispedit.delta import add_to_weights
from crispedit.models import get_layers, model_fingerprint, parse_layers
from crispedit.projector import build_projector
from crispedit.sequential import (
    EDIT_BATCH,
    EditRows,
    StreamState,
    edit_set_factors,
    stream_curvature,
)
from crispedit.streams import (
    StreamStateCache,
    base_weights,
    cached_curvature,
    edit_on_stream,
    materialize,
    read_state,
)
from crispedit.targets import encode_pair
from curvature_store import Conflict, Store, StoreError

BATCHES = [
    [Fact(prompt="The Eiffel Tower is located in", target="Rome")],
    [Fact(prompt="The capital of France is", target="Berlin"), Fact(prompt="Ice is", target="hot")],
    [Fact(prompt="Robert Boulter is an English", target="chef")],
]


@pytest.fixture
def setup(tmp_path, tiny_tokenizer):
    store, model, layers, curvature = tiny_stream_store(tmp_path / "store", tiny_tokenizer)
    return store, model, tiny_tokenizer, layers, curvature


def test_curvature_cache_hit_skips_collection(setup, monkeypatch):
    store, model, tok, layers, curvature = setup
    recipe = plan_curvature(model, tok, "wikitext", 400, layers, seq_len=64)

    def no_collection(*args, **kwargs):
        raise AssertionError("a cache hit must not collect")

    monkeypatch.setattr("crispedit.streams.run_recipe", no_collection)
    again, manifest = cached_curvature(store, model, tok, recipe)
    assert manifest["cache_hit"] is True
    for name in layers:
        assert torch.equal(again.layers[name].A, curvature.layers[name].A)
    other = plan_curvature(model, tok, "wikitext", 300, layers, seq_len=64)
    with pytest.raises(AssertionError, match="must not collect"):
        cached_curvature(store, model, tok, other)  # another token budget is another key


def test_versions_chain_and_cumulative_delta_is_bitwise_exact(setup):
    store, model, _tok, layers, _ = setup
    manifests = []
    for facts in BATCHES:
        manifest, _delta = edit(setup, facts)
        manifests.append(manifest)
        # the store's cumulative delta on a fresh base gives exactly the editor's weights
        fresh = make_tiny("llama")
        add_to_weights(
            fresh,
            {k: torch.from_numpy(v) for k, v in store.cumulative_delta(manifest["id"]).items()},
        )
        for name, module in get_layers(fresh, layers).items():
            assert torch.equal(module.weight, get_layers(model, [name])[name].weight), name
        assert manifest["weights_fingerprint"] == model_fingerprint(model, layers)
    assert [m["number"] for m in manifests] == [1, 2, 3]
    assert [m["parent"] for m in manifests] == [None, manifests[0]["id"], manifests[1]["id"]]
    assert store.head("tiny", "main") == manifests[-1]["id"]
    assert (manifests[1]["facts"][1]["prompt"], manifests[1]["facts"][1]["target"]) == (
        "Ice is",
        "hot",
    )
    assert manifests[0]["base_fingerprint"] == manifests[2]["base_fingerprint"]
    assert manifests[2]["metrics"]["n_edits"] == 1 and manifests[2]["method"] == "crispedit"
    # materialize a middle version onto another fresh base
    fresh = make_tiny("llama")
    materialize(store, manifests[1]["id"], fresh)
    expected = {
        k: torch.from_numpy(v) for k, v in store.cumulative_delta(manifests[1]["id"]).items()
    }
    base = make_tiny("llama")
    add_to_weights(base, expected)
    for name in layers:
        assert torch.equal(
            get_layers(fresh, [name])[name].weight, get_layers(base, [name])[name].weight
        )


def test_state_accumulates_and_protects_earlier_edits(setup):
    store, _model, _tok, layers, curvature = setup
    first, _ = edit(setup, BATCHES[0])
    second, _ = edit(setup, BATCHES[1])
    s1, s2 = read_state(store, first["id"]), read_state(store, second["id"])
    assert 0 < s1.tokens == first["edit_tokens"] < s2.tokens == second["edit_tokens"]
    for name in layers:
        assert torch.all(
            torch.linalg.eigvalsh(s2.S_A[name] - s1.S_A[name]) > -1e-6
        )  # sums only grow
    protected = stream_curvature(curvature, s2, beta=1.0)
    name = layers[-1]
    kept = build_projector(curvature.layers[name], "kfac", 0.8).kept_fraction
    kept_stream = build_projector(protected.layers[name], "kfac", 0.8).kept_fraction
    assert kept_stream != kept
    # the stream's eigenbases are those of A_cap + β·S_A/n (B likewise) as written, in float64
    for name in layers:
        c = curvature.layers[name]
        A = c.A.double() + 1.0 * s2.S_A[name] / s2.tokens
        B = c.B.double() + 1.0 * s2.S_B[name] / s2.tokens
        P = build_projector(protected.layers[name], "kfac", 0.8)
        Q = build_projector(LayerCurvature(A=A, B=B), "kfac", 0.8)
        assert torch.equal(P.U_A, Q.U_A) and torch.equal(P.U_B, Q.U_B)
        assert torch.equal(P.k, Q.k)
    # β = 0 ignores the stream state
    assert stream_curvature(curvature, s2, beta=0.0) is curvature
    # each version stores its own edits' rows, not the stream's sums
    rows, _ = load_tensors(store.version_file(second["id"], ROWS_FILE), "rows")
    assert EditRows.from_tensors(rows, layers).tokens == s2.tokens - s1.tokens
    assert STATE_FILE not in second["files"]


def test_wrong_parent_is_a_conflict_and_publishes_nothing(setup):
    store = setup[0]
    first, _ = edit(setup, BATCHES[0])
    with pytest.raises(Conflict, match="base"):
        edit(setup, BATCHES[1], parent=None)
    assert store.head("tiny", "main") == first["id"]
    assert [v["id"] for v in store.versions("tiny", "main")] == [first["id"]]
    second, _ = edit(setup, BATCHES[1], parent=first["id"])
    assert second["parent"] == first["id"]


def test_rollback_then_edit_continues_from_the_older_head(setup):
    store, model, _, layers, _ = setup
    first, _ = edit(setup, BATCHES[0])
    edit(setup, BATCHES[1])
    store.rollback("tiny", "main", first["id"])
    third, _ = edit(setup, BATCHES[2])
    assert third["parent"] == first["id"] and third["number"] == 2
    cumulative = store.cumulative_delta(third["id"])
    fresh = make_tiny("llama")
    add_to_weights(fresh, {k: torch.from_numpy(v) for k, v in cumulative.items()})
    for name in layers:
        assert torch.equal(
            get_layers(fresh, [name])[name].weight, get_layers(model, [name])[name].weight
        )


def test_a_stream_refuses_another_model(setup):
    store, _, _, layers, _ = setup
    edit(setup, BATCHES[0])
    other = base_weights(make_tiny("llama", seed=1), layers)
    with pytest.raises(StoreError, match="started on model"):
        edit(setup, BATCHES[1], base=other)
    with pytest.raises(StoreError, match="belongs to model"):
        materialize(store, store.head("tiny", "main"), make_tiny("llama", seed=1))
    assert len(store.versions("tiny", "main")) == 1


def test_ft_on_a_stream_needs_no_curvature(setup):
    store, model, tok, layers, _ = setup
    base = base_weights(make_tiny("llama"), layers)
    manifest, _delta = edit_on_stream(
        store, "tiny", "ft", model, tok, base, None, BATCHES[0], method="ft", **TINY_EDIT
    )
    assert manifest["gamma"] is None and manifest["stream"] == "ft"
    assert store.version_file(manifest["id"], ROWS_FILE).is_file()


def test_ekfac_on_a_stream_moves_to_the_streams_eigenbases(setup):
    store, model, tok, layers, _ = setup
    recipe = plan_curvature(model, tok, "wikitext", 400, layers, kind="ekfac", seq_len=64)
    curvature, _ = cached_curvature(store, model, tok, recipe, progress=False)
    first, _ = edit(setup, BATCHES[0], capability=curvature, method="ekfac", gamma=0.8)
    second, _ = edit(setup, BATCHES[1], capability=curvature, method="ekfac", gamma=0.8)
    assert (first["method"], second["method"]) == ("ekfac", "ekfac")

    state = read_state(store, second["id"])
    protected = stream_curvature(curvature, state, beta=0.5)
    assert protected.kind == "ekfac"
    for name in layers:
        c, p = curvature.layers[name], protected.layers[name]
        A_cap, B_cap = c.A.double(), c.B.double()
        A = A_cap + 0.5 * state.S_A[name] / state.tokens
        B = B_cap + 0.5 * state.S_B[name] / state.tokens
        # the new bases diagonalise the stream's factors
        for U, M in ((p.U_A.double(), A), (p.U_B.double(), B)):
            torch.testing.assert_close(U.T @ U, torch.eye(len(U), dtype=U.dtype), atol=1e-5, rtol=0)
            inner = U.T @ M @ U
            off = inner - torch.diag(torch.diagonal(inner))
            assert off.abs().max() <= 1e-5 * M.abs().max()
        # the eigenvalues: the diagonal there of the capability's EK-FAC matrix plus the increase
        # the K-FAC rule gives (cross terms B_cap ⊗ S_A and S_B ⊗ A_cap included)
        old = torch.kron(c.U_B.double(), c.U_A.double())
        new = torch.kron(p.U_B.double(), p.U_A.double())
        capability = old @ torch.diag(c.ekfac.double().flatten()) @ old.T
        increase = torch.kron(B, A) - torch.kron(B_cap, A_cap)
        expected = torch.diagonal(new.T @ (capability + increase) @ new).view_as(c.ekfac)
        scale = expected.abs().max()
        torch.testing.assert_close(p.ekfac.double(), expected, rtol=1e-4, atol=1e-6 * scale)
        assert p.ekfac.sum() > c.ekfac.sum()  # the edits' curvature is added, none taken away


# --- the stream state as each version's own rows ---------------------------------------------


def old_layout_sums(store: Store, version: str, tok, layers: list[str]) -> StreamState:
    """The sums a version stored before rows: for every version of its chain, collect_curvature's
    n·A and n·B of its facts' texts on its own weights, added in chain order, kept in fp32."""
    doc = store.manifest(version)
    S_A, S_B, tokens = {}, {}, 0
    for entry in reversed(store.lineage(doc["model"], doc["stream"], upto=version)):
        model = make_tiny("llama")
        materialize(store, entry["id"], model)
        texts = [encode_pair(tok, f["prompt"], f["target"])[0] for f in entry["facts"]]
        c = collect_curvature(
            model, layers, pad_batches(texts, tok.pad_token_id, EDIT_BATCH), progress=False
        )
        for name in layers:
            A, B = c.layers[name].A.double() * c.tokens, c.layers[name].B.double() * c.tokens
            S_A[name] = S_A[name] + A if name in S_A else A
            S_B[name] = S_B[name] + B if name in S_B else B
        tokens += c.tokens
    fp32 = lambda sums: {n: t.float().double() for n, t in sums.items()}  # noqa: E731
    return StreamState(S_A=fp32(S_A), S_B=fp32(S_B), tokens=tokens)


def assert_same_sums(ours: StreamState, ref: StreamState, exact: bool = False) -> None:
    """Equal, bitwise or to fp32 rounding (relative to each sum's largest entry)."""
    assert ours.tokens == ref.tokens and set(ours.S_A) == set(ref.S_A) == set(ours.S_B)
    for mine, theirs in ((ours.S_A, ref.S_A), (ours.S_B, ref.S_B)):
        for name, t in mine.items():
            assert t.device.type == "cpu" and t.dtype == torch.float64
            if exact:
                assert torch.equal(t, theirs[name]), name
            else:
                scale = theirs[name].abs().max().item()
                torch.testing.assert_close(t, theirs[name], rtol=1e-6, atol=1e-6 * scale)


def copy_version(store: Store, stream: str, parent: str | None, files: dict, like: str) -> str:
    """A version of `stream` holding copies of `files` (name -> path), on the base and layers of
    version `like`; its id."""
    stage = store.staging_dir()
    staged = {name: shutil.copy(path, stage / name) for name, path in files.items()}
    manifest = {k: store.manifest(like)[k] for k in ("layers", "base_fingerprint")}
    return store.create_version("tiny", stream, parent, staged, manifest)["id"]


def legacy_state_file(store: Store, state: StreamState) -> str:
    """A state.safetensors as versions before rows wrote it: fp32 sums and the token count."""
    path = store.staging_dir() / STATE_FILE
    tensors = {"tokens": torch.tensor([state.tokens], dtype=torch.int64)}
    for name in state.S_A:
        tensors[f"{name}/S_A"], tensors[f"{name}/S_B"] = (
            state.S_A[name].float(),
            state.S_B[name].float(),
        )
    save_tensors(path, tensors, {"edit_tokens": state.tokens})
    return path


def test_sums_rebuilt_from_rows_equal_the_sums_the_old_layout_stored(setup):
    store, _model, tok, layers, _ = setup
    for facts in BATCHES:
        manifest, _ = edit(setup, facts)
        assert set(manifest["files"]) == {DELTA_FILE, ROWS_FILE}
        state = read_state(store, manifest["id"])
        assert state.tokens == manifest["edit_tokens"]
        assert_same_sums(state, old_layout_sums(store, manifest["id"], tok, layers))


def test_rollback_then_a_new_version_sums_its_own_chain(setup):
    store, _model, tok, layers, _ = setup
    states = StreamStateCache()
    first, _ = edit(setup, BATCHES[0], states=states)
    second, _ = edit(setup, BATCHES[1], states=states)
    assert states.get("tiny", "main")[0] == second["id"]  # the worker's state of its last head
    store.rollback("tiny", "main", first["id"])
    third, _ = edit(setup, BATCHES[2], states=states)  # the cached head is off the chain now
    kept_id, kept = states.get("tiny", "main")
    assert kept_id == third["id"]
    rebuilt = read_state(store, third["id"])
    assert_same_sums(kept, rebuilt, exact=True)
    assert_same_sums(rebuilt, old_layout_sums(store, third["id"], tok, layers))
    own, _ = load_tensors(store.version_file(third["id"], ROWS_FILE), "rows")
    assert rebuilt.tokens == first["edit_tokens"] + EditRows.from_tensors(own, layers).tokens


def test_a_worker_adds_only_the_new_versions_rows(setup):
    store = setup[0]
    states = StreamStateCache()
    first, _ = edit(setup, BATCHES[0], states=states)
    second, _ = edit(setup, BATCHES[1], states=states)
    expected = read_state(store, second["id"])
    # break the first version's rows for real: only a rebuild along the chain reads them
    rows = store.root / "versions" / first["id"] / ROWS_FILE
    rows.chmod(0o644)
    rows.write_bytes(b"x" * rows.stat().st_size)
    with pytest.raises(StoreError, match=first["id"]):
        read_state(Store(store.root), second["id"])
    third, _ = edit(setup, BATCHES[2], states=states)
    assert third["parent"] == second["id"]
    head_rows, _ = load_tensors(store.version_file(third["id"], ROWS_FILE), "rows")
    assert_same_sums(
        states.get("tiny", "main")[1],
        expected.plus(EditRows.from_tensors(head_rows, setup[3])),
        exact=True,
    )


def test_the_state_cache_keeps_one_version_per_stream_for_its_last_streams():
    states = StreamStateCache(size=2)
    a, b, c = (StreamState.empty() for _ in range(3))
    states.put("m", "one", "v1", a)
    states.put("m", "one", "v2", b)  # replaces the stream's entry
    states.put("m", "two", "v3", c)
    assert states.get("m", "one") == ("v2", b)  # and makes "one" the last used
    states.put("m", "three", "v4", a)
    assert states.get("m", "two") is None and states.get("m", "one") == ("v2", b)
    with pytest.raises(ValueError, match="at least 1"):
        StreamStateCache(size=0)


def test_a_mixed_chain_starts_again_at_a_full_sums_version(setup):
    store, _model, _tok, layers, _ = setup
    versions = [edit(setup, facts)[0]["id"] for facts in BATCHES]

    def files(version: str, state: str) -> dict:
        return {DELTA_FILE: store.version_file(version), state: store.version_file(version, state)}

    # the same chain with its middle version as an old store wrote it: the sums of its chain
    legacy = read_state(store, versions[1])
    old_first = copy_version(store, "mixed", None, files(versions[0], ROWS_FILE), versions[0])
    middle = copy_version(
        store,
        "mixed",
        old_first,
        {DELTA_FILE: store.version_file(versions[1]), STATE_FILE: legacy_state_file(store, legacy)},
        versions[0],
    )
    last = copy_version(store, "mixed", middle, files(versions[2], ROWS_FILE), versions[0])
    # the walk stops at the full sums: what lies before them is never read
    (store.root / "versions" / old_first / ROWS_FILE).unlink()
    rows, _ = load_tensors(store.version_file(versions[2], ROWS_FILE), "rows")
    fp32 = StreamState.from_tensors(load_tensors(store.version_file(middle, STATE_FILE), "s")[0])
    assert_same_sums(read_state(store, middle), fp32, exact=True)
    mixed = read_state(store, last)
    assert_same_sums(mixed, fp32.plus(EditRows.from_tensors(rows, layers)), exact=True)
    assert_same_sums(mixed, read_state(store, versions[2]))  # fp32 rounding of the middle sums
    # a chain that starts with an old version
    old = copy_version(
        store,
        "old",
        None,
        {DELTA_FILE: store.version_file(versions[0]), STATE_FILE: legacy_state_file(store, legacy)},
        versions[0],
    )
    newer = copy_version(store, "old", old, files(versions[2], ROWS_FILE), versions[0])
    assert_same_sums(read_state(store, newer), mixed, exact=True)


@pytest.mark.parametrize("damage", ("corrupt", "missing", "not rows", "no state"))
def test_a_bad_rows_file_is_a_store_error_naming_the_version(setup, damage):
    store, _model, _tok, layers, _ = setup
    first, _ = edit(setup, BATCHES[0])
    head = first["id"]
    path = store.root / "versions" / head / ROWS_FILE
    if damage == "corrupt":
        path.chmod(0o644)
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "missing":
        path.unlink()
    else:  # a version whose files pass their sha256 but hold no usable state
        rows, _ = load_tensors(path, "rows")
        rows.pop(f"{layers[0]}/g")
        bad = store.staging_dir() / ROWS_FILE
        save_tensors(bad, rows, {})
        files = {DELTA_FILE: store.version_file(head)}
        files.update({ROWS_FILE: bad} if damage == "not rows" else {})
        head = copy_version(store, "main", head, files, first["id"])
    listed = [v["id"] for v in store.versions("tiny", "main")]
    with pytest.raises(StoreError, match=head):
        edit(setup, BATCHES[1])
    assert store.head("tiny", "main") == head
    assert [v["id"] for v in store.versions("tiny", "main")] == listed


def test_rows_are_added_on_the_models_device_and_the_sums_stay_on_the_host(setup):
    store = setup[0]
    versions = [edit(setup, facts)[0]["id"] for facts in BATCHES[:2]]
    on_host = read_state(store, versions[1])
    with accelerator() as device:
        on_device = read_state(Store(store.root), versions[1], device=device)
    assert_same_sums(on_device, on_host)  # the CPU checks it: same values, CPU tensors


def test_a_bf16_models_rows_are_its_own_values_and_rebuild_the_old_sums(tiny_tokenizer):
    tok = tiny_tokenizer
    model = make_tiny("llama").to(torch.bfloat16)
    layers = parse_layers(model, "2-3")
    rows = edit_set_factors(model, tok, layers, BATCHES[1])
    assert {t.dtype for t in [*rows.a.values(), *rows.g.values()]} == {torch.bfloat16}
    stored = EditRows.from_tensors(rows.to_tensors(), layers)
    # the old layout's sums: collect_curvature's n·A, n·B of the same texts, kept in fp32
    texts = [encode_pair(tok, f.prompt, f.target)[0] for f in BATCHES[1]]
    c = collect_curvature(
        model, layers, pad_batches(texts, tok.pad_token_id, EDIT_BATCH), progress=False
    )
    old = StreamState(
        S_A={n: (c.layers[n].A.double() * c.tokens).float().double() for n in layers},
        S_B={n: (c.layers[n].B.double() * c.tokens).float().double() for n in layers},
        tokens=c.tokens,
    )
    assert_same_sums(StreamState.empty().plus(stored), old)
