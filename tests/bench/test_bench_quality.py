"""bench/quality.py's sequential mode on a tiny model: a stopped stream goes on from its head in the
store, keeps the rows of the chunks it had, and records its drift per chunk."""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import pytest
import torch
from conftest import load_bench_script, tiny_stream_store

from contract.settings import METHODS, SettingsError
from crispedit.models import get_layers
from crispedit.sequential import set_weights
from crispedit.streams import base_weights, read_cumulative

DRIFT_TOKENS = 256


quality = load_bench_script("quality")
RUN = replace(quality.BASE, lr=3e-2, epochs=3, chunk=2, n=6, layers="2-3")  # fast, not landed


@pytest.fixture
def bench(tmp_path, tiny_tokenizer):
    """(store, model, tokenizer, base, curvature) on a tiny Llama edited at blocks 2-3."""
    store, model, layers, curvature = tiny_stream_store(tmp_path / "store", tiny_tokenizer)
    return store, model, tiny_tokenizer, base_weights(model, layers), curvature


def run_stream(bench, run, facts=None, **kwargs):
    store, model, tokenizer, base, curvature = bench
    facts = quality.records(run) if facts is None else facts
    return quality.edit_stream(
        run, store, model, tokenizer, base, curvature, facts, model_name="tiny",
        drift_tokens=DRIFT_TOKENS, progress=False, **kwargs,
    )  # fmt: skip


@pytest.fixture
def edits(monkeypatch):
    """The chunks each edit_stream call edits, counted as edit_on_stream is called."""
    import crispedit.streams

    calls, real = [], crispedit.streams.edit_on_stream

    def counted(*args, **kwargs):
        calls.append(len(args[7]))
        return real(*args, **kwargs)

    monkeypatch.setattr(crispedit.streams, "edit_on_stream", counted)
    return calls


def test_a_longer_run_goes_on_from_the_head_and_keeps_the_rows(bench, edits):
    store, model, *_ = bench
    first = run_stream(bench, replace(RUN, n=4))  # 2 chunks
    assert [c["edits"] for c in first] == [2, 4] and len(edits) == 2
    rows = run_stream(bench, RUN)  # 3 chunks: only the third is edited
    assert len(edits) == 3
    assert rows[:2] == first and [c["edits"] for c in rows] == [2, 4, 6]
    stream = quality.stream_name(RUN)
    assert (
        stream
        == quality.stream_name(replace(RUN, n=4))
        != quality.stream_name(replace(RUN, lr=1e-2))
    )
    lineage = store.lineage("tiny", stream)
    assert len(lineage) == 3
    for row in rows:  # the drift per chunk, against the base
        for key in ("chunk_efficacy", "first_chunk_efficacy", "all_efficacy", "kl", "seconds"):
            assert math.isfinite(row[key]), key
        assert math.isfinite(row["ppl_change_pct"]) and row["kl"] >= 0
        assert row["all_n"] == row["edits"] and 0 < row["drift_tokens"] <= DRIFT_TOKENS

    # a run already on the stream edits nothing and leaves the model at its head
    _, fresh, _, base, _ = bench
    set_weights(fresh, base, {})
    assert run_stream(bench, RUN) == rows and len(edits) == 3
    head = read_cumulative(store, lineage[0]["id"])
    for name, module in get_layers(model, list(base)).items():
        assert torch.equal(module.weight, base[name] + head[f"{name}.weight"])

    # a shorter run reads its chunks off the stream
    assert run_stream(bench, replace(RUN, n=2)) == rows[:1] and len(edits) == 3


def test_a_new_field_at_its_default_keeps_a_streams_name():
    """A stream begun before `model`, `drift_budget`, `consolidate`, `lr_schedule`,
    `anchor_choice`, `warm_start` and `edit_site` existed is found again (its name digests the
    run's fields without them at their defaults); a run that sets one is another stream."""
    import hashlib
    import json
    from dataclasses import asdict

    fields = asdict(replace(RUN, n=0))
    later = (
        "model", "drift_budget", "consolidate", "lr_schedule", "anchor_choice", "warm_start",
        "edit_site",
    )  # fmt: skip
    for name in later:
        del fields[name]
    before = "bench-" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    assert quality.stream_name(RUN) == before[:22]
    assert quality.stream_name(replace(RUN, consolidate=1.0)) != quality.stream_name(RUN)
    assert quality.stream_name(replace(RUN, drift_budget=1e-3)) != quality.stream_name(RUN)
    assert quality.stream_name(replace(RUN, model="gemma3-270m")) != quality.stream_name(RUN)
    assert quality.stream_name(replace(RUN, lr_schedule="cosine")) != quality.stream_name(RUN)
    assert quality.stream_name(replace(RUN, anchor_choice="similar")) != quality.stream_name(RUN)
    assert quality.stream_name(replace(RUN, warm_start="lstsq")) != quality.stream_name(RUN)
    assert quality.stream_name(replace(RUN, edit_site="subject")) != quality.stream_name(RUN)


def test_a_consolidated_stream_records_its_figures_per_chunk(bench):
    store = bench[0]
    run = replace(RUN, n=4, consolidate=1.0)
    rows = run_stream(bench, run)
    lineage = store.lineage("tiny", quality.stream_name(run))
    assert [v["options"]["consolidate"] for v in lineage] == [1.0, 1.0]
    for row in rows:
        assert row["consolidation"]["weight"] == 1.0
        assert set(row["consolidation"]["relative_change"]) == set(bench[3])


def test_restart_starts_the_stream_over(bench, edits):
    store = bench[0]
    run = replace(RUN, n=2)
    run_stream(bench, run)
    again = run_stream(bench, run, restart=True)
    assert edits == [2, 2] and len(again) == 1
    stream = quality.stream_name(run)
    assert len(store.lineage("tiny", stream)) == 1
    assert len(store.versions("tiny", stream)) == 2  # the first stays listed, off the lineage


def test_a_stream_stopped_in_a_chunk_resumes_there(bench, edits, monkeypatch):
    store = bench[0]
    real, measured = quality.chunk_row, []

    def stopped(*args, **kwargs):  # Ctrl-C after chunk 2's edit, before its version is written
        measured.append(kwargs["end"])
        if len(measured) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(quality, "chunk_row", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_stream(bench, RUN)
    stream = quality.stream_name(RUN)
    assert len(store.versions("tiny", stream)) == 1  # no half-written version of chunk 2
    first = _row_of(store.lineage("tiny", stream)[0])
    monkeypatch.setattr(quality, "chunk_row", real)
    rows = run_stream(bench, RUN)
    assert edits == [2, 2, 2, 2]  # chunk 1, chunk 2 stopped, then chunks 2 and 3 only
    assert rows[0] == first and [c["edits"] for c in rows] == [2, 4, 6]


def test_a_stream_of_other_facts_is_refused(bench, edits):
    run_stream(bench, replace(RUN, n=2))
    other = quality.records(replace(RUN, start=10))
    with pytest.raises(SystemExit, match="--restart"):
        run_stream(bench, RUN, facts=other)
    assert len(edits) == 1


def _row_of(version: dict) -> dict:
    return quality._chunk_of(version)


def test_mixed_data_and_the_long_stream():
    cf, zsre = (replace(RUN, dataset=d, start=0, n=1000) for d in ("counterfact", "zsre"))
    mixed = quality.records(replace(RUN, dataset="counterfact+zsre", start=998, n=4))
    assert mixed == quality.records(cf)[998:] + quality.records(zsre)[:2]
    long = quality.records(quality.LONG_STREAM)
    assert len(long) == 1998  # zsRE records 534 and 723 hold no edit
    assert quality.stream_runs([quality.CHOSEN]) == [quality.LONG_STREAM]


def test_the_chunk_table_marks_what_old_rows_lack(tmp_path):
    old = {"edits": 100, "chunk_efficacy": 1.0, "first_chunk_efficacy": 0.9, "seconds": 60.0}
    new = {**old, "edits": 200, "all_efficacy": 0.95, "all_n": 200, "ppl_change_pct": 0.5,
           "kl": 0.01}  # fmt: skip
    lines = quality.chunk_table([old, new])
    assert lines[2] == "| 100 | 1.00 | 0.90 | - | - | - | - | 60 |"
    assert lines[3] == "| 200 | 1.00 | 0.90 | 0.95 | 200 | +0.50 % | 0.0100 | 60 |"
    row = {"run": {**quality.asdict(RUN), "n": 200, "chunk": 100}, "chunks": [old, new]}
    quality.plot_sequential([row], tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


@pytest.mark.parametrize("method", METHODS)
def test_the_plots_draw_every_method(tmp_path, method):
    """A stream of MEMIT edits once crashed the curves' plot (no colour for it), and the report's
    last runs (MEMIT, AlphaEdit) were silently left out of the trade-off plot (too few markers)."""
    assert len(quality.MARKERS) >= len(quality.REPORT)
    chunk = {"edits": 100, "chunk_efficacy": 0.9, "first_chunk_efficacy": 0.9, "seconds": 60.0,
             "all_efficacy": 0.9, "all_n": 100, "ppl_change_pct": 7.7, "kl": 0.11}  # fmt: skip
    stream = {"run": {**quality.asdict(RUN), "method": method, "n": 100, "chunk": 100},
              "chunks": [chunk]}  # fmt: skip
    quality.plot_sequential([stream], tmp_path / "curve.png")
    batch = {"run": quality.asdict(replace(quality.MEMIT, method=method)), "chunks": [],
             "metrics": {"capability": {"ppl_change_pct": 9.8},
                         "efficacy": {"edited": {"teacher_forced": 0.87}}}}  # fmt: skip
    quality.plot([batch], tmp_path / "trade-off.png")
    assert (tmp_path / "curve.png").stat().st_size > 0 < (tmp_path / "trade-off.png").stat().st_size


def test_a_run_takes_a_layer_set_written_with_commas():
    """A layer set as bench/layers.py writes a choice ("15,17-20") reads whole inside a run."""
    run = quality.parse_run("kfac:0.9,layers=15,17-20,epochs=100,project=update")
    assert (run.layers, run.epochs, run.project, run.gamma) == ("15,17-20", 100, "update", 0.9)
    assert quality.parse_run("kfac,anchors=2,layers=3").layers == "3"
    lever = [r.layers for r in quality.TUNE if r.layers in ("17-24", "15-24")]
    assert lever == ["17-24", "15-24"]


def test_a_drift_budget_is_a_run_field_the_editor_gets():
    """`drift_budget=` parses into the run, reaches its settings, names the run apart from the
    same settings without it, and a budgeted row's table line says the γ the edit ended at."""
    run = quality.parse_run("kfac:0.9,epochs=50,project=update,drift_budget=0.002")
    assert (run.method, run.gamma, run.epochs, run.drift_budget) == ("kfac", 0.9, 50, 0.002)
    assert run.settings().drift_budget == 0.002 and run.settings().gamma == 0.9
    assert quality.identity(run) != quality.identity(replace(run, drift_budget=0.0))
    assert quality._changes(run) == "epochs 50, project update, drift_budget 0.002"
    assert quality.parse_run("kfac:0.9").settings().drift_budget == 0.0
    with pytest.raises(SettingsError, match="drift_budget"):
        quality.parse_run("ft,drift_budget=0.002").settings()
    budgeted = [r for r in quality.TUNE if r.drift_budget]
    assert budgeted and all(r.settings().drift_budget == r.drift_budget for r in budgeted)
    trail = [
        {"gamma": 0.9, "predicted_loss_increase": 0.003},
        {"gamma": 0.95, "predicted_loss_increase": 0.0015},
    ]
    row = {"run": quality.asdict(run), "metrics": {}, "gamma_trail": trail}
    assert (
        "| epochs 50, project update, drift_budget 0.002 (γ used 0.95) |"
        in (quality.table([row])[2])
    )
    row["run"]["drift_budget"] = 0.001
    assert "(γ used 0.95, over budget)" in quality.table([row])[2]


def test_an_lr_schedule_is_a_run_field_the_editor_gets():
    """`lr_schedule=` parses into the run and reaches its settings; the TUNE entries run the
    defaults on a cosine schedule in half the epochs at twice the peak and a quarter at four
    times, and a closed-form method refuses it as the settings do."""
    run = quality.parse_run("kfac:0.9,epochs=50,lr_schedule=cosine,lr=0.001")
    assert (run.lr_schedule, run.lr, run.epochs) == ("cosine", 0.001, 50)
    assert run.settings().lr_schedule == "cosine" and run.settings().lr == 0.001
    assert quality.identity(run) != quality.identity(replace(run, lr_schedule="constant"))
    assert quality.parse_run("kfac:0.9").settings().lr_schedule == "constant"
    scheduled = [r for r in quality.TUNE if r.lr_schedule != "constant"]
    chosen = quality.CHOSEN
    assert [r.epochs for r in scheduled] == [chosen.epochs // 2, chosen.epochs // 4]
    for r in scheduled:  # the chosen run but for the schedule, its peak and its epochs
        assert replace(r, lr_schedule="constant", lr=chosen.lr, epochs=chosen.epochs) == chosen
        assert r.lr * r.epochs == pytest.approx(chosen.lr * chosen.epochs)
        assert r.settings().lr_schedule == "cosine"
    with pytest.raises(SettingsError, match="lr_schedule"):
        quality.parse_run("memit,lr_schedule=cosine").settings()


def test_an_anchor_choice_is_a_run_field_the_editor_gets():
    """`anchor_choice=` parses into the run and reaches its settings; the TUNE entries are the
    chosen run with similar anchors, two and four of them; a bad choice is refused as the
    settings refuse it."""
    run = quality.parse_run("kfac:0.9,anchors=2,anchor_choice=similar")
    assert run.anchor_choice == "similar" and run.settings().anchor_choice == "similar"
    assert quality.identity(run) != quality.identity(replace(run, anchor_choice="random"))
    assert quality.parse_run("kfac:0.9").settings().anchor_choice == "random"
    similar = [r for r in quality.TUNE if r.anchor_choice != "random"]
    assert similar == [
        replace(quality.CHOSEN, anchor_choice="similar"),
        replace(quality.CHOSEN, anchor_choice="similar", anchors=4),
    ]
    with pytest.raises(SettingsError, match="anchor_choice"):
        quality.parse_run("kfac,anchor_choice=nearest").settings()


def _row(run) -> dict:
    """A runs-file row of `run` with no measures (what the table needs of it)."""
    return {"run": quality.asdict(run), "metrics": {}, "chunks": [], "machine": "x86_64",
            "threads": 2, "torch": "2", "when": "then"}  # fmt: skip


def test_the_model_is_in_a_runs_identity_only_when_it_is_not_smollm2(tmp_path, monkeypatch):
    """SmolLM2's rows keep the identity (and stream names) they had before the field existed;
    a Gemma run of the same settings is another run, and the report on Gemma is GEMMA's list."""
    old = {k: v for k, v in quality.asdict(quality.CHOSEN).items() if k != "model"}
    assert quality.identity(quality.CHOSEN) == quality.json.dumps(old, sort_keys=True)
    gemma = replace(quality.CHOSEN, model="gemma3-270m", layers="12-16")
    assert quality.identity(gemma) != quality.identity(replace(gemma, model=quality.MODEL))
    # the stream's name: nor the later fields at their defaults (the test above)
    later = ("drift_budget", "consolidate", "lr_schedule", "anchor_choice", "warm_start",
             "edit_site")  # fmt: skip
    named = {k: v for k, v in old.items() if k not in later}
    stream = quality.hashlib.sha256(quality.json.dumps({**named, "n": 0}, sort_keys=True).encode())
    assert quality.stream_name(quality.CHOSEN) == f"bench-{stream.hexdigest()[:16]}"
    # a row written before the field, and the same settings on Gemma: two runs, the old one found
    monkeypatch.setattr(quality, "RUNS", tmp_path / "runs.jsonl")
    rows = [{**_row(quality.CHOSEN), "run": old}, _row(gemma)]
    quality.RUNS.write_text("".join(quality.json.dumps(r) + "\n" for r in rows))
    done = quality.done_runs()
    assert set(done) == {quality.identity(quality.CHOSEN), quality.identity(gemma)}
    # --runs on Gemma start from its base; the report's default is GEMMA
    run = quality.parse_run("ft", quality.BASES["gemma3-270m"])
    assert (run.model, run.layers, run.method) == ("gemma3-270m", "12-16", "ft")
    assert quality.parse_run("ft,layers=10-14", quality.BASES["gemma3-270m"]).layers == "10-14"
    assert {(r.model, r.layers) for r in quality.GEMMA} == {("gemma3-270m", "12-16")}
    assert [r.label for r in quality.GEMMA] == ["kfac γ0.9", "ft", "nullspace γ0.9"]
    assert quality.GEMMA[0] == replace(quality.CHOSEN, model="gemma3-270m", layers="12-16")
    executed = []
    monkeypatch.setattr(quality, "execute", lambda runs, *a: executed.extend(runs))
    monkeypatch.setattr(quality, "write_results", lambda: None)
    argv = ["quality.py", "report", "--model", "gemma3-270m", "--sizes", "100",
            "--datasets", "counterfact"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    quality.main()
    assert executed == [replace(r, start=100, n=100) for r in quality.GEMMA]
    monkeypatch.setattr(sys, "argv", ["quality.py", "tune", "--model", "gemma3-270m"])
    with pytest.raises(SystemExit, match="name the runs with --runs"):
        quality.main()


def test_another_models_runs_get_a_section_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    monkeypatch.setattr(quality, "RUNS", tmp_path / "runs.jsonl")
    monkeypatch.setattr(quality, "plot", lambda rows, path: None)
    gemma = replace(quality.GEMMA[1], start=100)
    rows = [_row(replace(quality.CHOSEN, start=100)), _row(gemma)]
    quality.RUNS.write_text("".join(quality.json.dumps(r) + "\n" for r in rows))
    quality.write_results()
    text = (tmp_path / "quality.md").read_text()
    ours, _, theirs = text.partition("## Gemma 3 270M (`--model gemma3-270m`)")
    assert theirs, "a section for Gemma"
    assert ours.count("| counterfact | 100-199 |") == theirs.count("| counterfact | 100-199 |") == 1
    assert "| ft | epochs 50, project update |" in theirs  # its layers are its base's: no change
    assert "model" not in quality._defaults()


def test_memit_and_alphaedit_runs_share_their_target_values(bench, monkeypatch, tmp_path):
    """The first MEMIT or AlphaEdit run of some facts saves its value optimisation in VALUES;
    a run of the other method on the same facts and value options reads it back."""
    from crispedit.editor import make_editor

    monkeypatch.setattr(quality, "VALUES", tmp_path / "values")
    _, model, tokenizer, _, curvature = bench
    facts = quality.records(replace(RUN, n=2))

    def editor(method, steps=2):
        layers = list(curvature.layers)
        return make_editor(model, tokenizer, curvature, method=method, layers=layers,
                           progress=False, value_steps=steps)  # fmt: skip

    made, reused = quality.shared_values(editor("memit"), facts)
    assert not reused and len(list((tmp_path / "values").iterdir())) == 1
    read, reused = quality.shared_values(editor("alphaedit"), facts)
    assert reused and read.key == made.key and torch.equal(read.delta, made.delta)
    # other value options are another optimisation: computed, and kept beside the first
    _, reused = quality.shared_values(editor("alphaedit", steps=3), facts)
    assert not reused and len(list((tmp_path / "values").iterdir())) == 2


def test_a_batch_run_is_measured_and_memit_then_alphaedit_share_the_values(
    tiny_model_dir, tmp_path, monkeypatch
):
    """`measure` end to end on a tiny model for a batch run of each kind of editor: the row has
    its edit time and metrics, and AlphaEdit after MEMIT on the same records reads MEMIT's target
    values."""
    from curvature_store import Store

    monkeypatch.setattr(quality, "VALUES", tmp_path / "values")
    store = Store(tmp_path / "store")
    tiny = replace(RUN, model=str(tiny_model_dir), chunk=0, n=2, epochs=2, tokens=400)
    rows = {}
    for method in ("kfac", "memit", "alphaedit"):
        run = replace(tiny, method=method, value_steps=2, value_contexts=0)
        rows[method] = quality.measure(run, store, mmlu=0, generation=False)
        # a tiny edit may round to 0.0 s
        assert rows[method]["edit_s"] >= 0 and rows[method]["metrics"]["efficacy"]["n"] == 2
    assert [rows[m]["values_reused"] for m in rows] == [False, False, True]
    assert rows["alphaedit"]["run"]["method"] == "alphaedit"
