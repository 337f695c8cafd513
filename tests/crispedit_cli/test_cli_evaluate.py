"""`crispedit eval` on the tiny Llama folder of the conftest: the JSON it writes, its table, and
clean failures that write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crispedit.corpus import read_documents
from crispedit.delta import Delta, add_to_weights
from crispedit.evaluate import perplexity
from crispedit.models import load_model, model_fingerprint

ZSRE = Path(__file__).resolve().parents[2] / "crispedit" / "assets" / "zsre_mend_train-1k.json"
LAYERS = ["model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"]
FAST = ["--tokens", "300", "--retention", "4", "--mmlu", "2"]
FACTS = [
    {
        "prompt": "The Eiffel Tower is located in",
        "target": "Rome",
        "paraphrases": ["The Eiffel Tower stands in", "Where is the Eiffel Tower? It is in"],
        "neighbors": [{"prompt": "The Louvre is located in", "target": "Paris"}],
        "ground_truth": "Paris",
    },
    {"subject": "Danielle Darrieux", "relation": "{} is in", "target": "English"},
]


@pytest.fixture(scope="session")
def facts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval-facts") / "facts.json"
    path.write_text(json.dumps(FACTS))
    return path


@pytest.fixture(scope="session")
def delta_file(tmp_path_factory, tiny_model_dir) -> Path:
    """A random delta on blocks 2-3 of the tiny model, as `crispedit edit` would write it."""
    model, _ = load_model(str(tiny_model_dir))
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{name}.weight": 0.3
        * torch.randn(dict(model.named_modules())[name].weight.shape, generator=g)
        for name in LAYERS
    }
    meta = {"base_fingerprint": model_fingerprint(model, LAYERS), "layers": LAYERS}
    return Delta(tensors=tensors, meta=meta).save(tmp_path_factory.mktemp("eval-delta"))


def test_eval_writes_metrics_with_counts(cli, tmp_path, tiny_model_dir, delta_file, facts_file):
    out = tmp_path / "eval.json"
    args = ["--model", tiny_model_dir, "--delta", delta_file, "--facts", facts_file, *FAST]
    code, stdout, err = cli("eval", *args, "--json", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    groups = ["efficacy", "generalization", "locality", "scores", "capability"]
    assert list(result) == [*groups, "chat_template", "device", "dtype"]
    assert result["chat_template"] == "off"  # the tiny tokenizer has no template
    auto = ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")
    assert (result["device"], result["dtype"]) == auto
    for group, n in (("efficacy", 2), ("generalization", 2)):
        assert result[group]["n"] == n
        for side in ("base", "edited"):
            scores = result[group][side]
            assert set(scores) == {"teacher_forced", "generation", "generation_qa"}
            assert all(0 <= v <= 1 for v in scores.values())
    assert result["locality"]["n"] == 1 and 0 <= result["locality"]["token_agreement"] <= 1
    # the CounterFact scores: only the first fact has a true object, its neighbour shares it
    scores = result["scores"]
    assert {k: v["n"] for k, v in scores.items()} == {
        "efficacy": 1, "paraphrase": 2, "neighborhood": 1
    }  # fmt: skip
    assert all(v[side] in (0, 0.5, 1) for v in scores.values() for side in ("base", "edited"))
    cap = result["capability"]
    assert 0 < cap["n_tokens"] <= 300 and cap["kl"] > 0
    assert cap["ppl_change_pct"] == pytest.approx(100 * (cap["ppl_edited"] / cap["ppl_base"] - 1))
    assert cap["fact_retention"]["n"] == 4 and cap["mmlu"]["n"] == 2
    for key in ("fact_retention", "mmlu"):
        assert 0 <= cap[key]["base"] <= 1 and 0 <= cap[key]["edited"] <= 1
    # the edited figures are those of the model with the delta applied
    model, tokenizer = load_model(str(tiny_model_dir))
    add_to_weights(model, Delta.load(delta_file).tensors)
    ppl = perplexity(model, tokenizer, read_documents("wikitext-heldout"), 300)
    assert cap["ppl_edited"] == pytest.approx(ppl, rel=1e-5)
    # a human table on stdout, progress on stderr
    lines = stdout.splitlines()
    assert lines[0].split() == ["metric", "base", "edited", "n"]
    assert any(line.startswith("efficacy (teacher-forced)") for line in lines)
    assert any(line.startswith("MMLU 5-shot") and line.split()[-1] == "2" for line in lines)
    ps = next(line for line in lines if line.startswith("PS: P(new) > P(true)"))
    edited = scores["paraphrase"]["edited"]
    assert ps.split()[-2:] == [f"{edited:.3f}", "2"]
    assert str(out) in lines[-1]
    assert "eval: MMLU" in err


def test_eval_without_delta_compares_the_model_with_itself(
    cli, tmp_path, tiny_model_dir, facts_file
):
    out = tmp_path / "sub" / "eval.json"  # a missing folder is created
    args = ["--model", tiny_model_dir, "--facts", facts_file, *FAST, "--no-generation"]
    code, _, err = cli("eval", *args, "--limit", "1", "--json", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["efficacy"]["n"] == 1
    assert result["efficacy"]["base"] == result["efficacy"]["edited"]
    assert result["efficacy"]["base"]["generation"] is None
    assert result["locality"] == {"n": 1, "token_agreement": 1.0, "unchanged": 1.0}
    cap = result["capability"]
    assert cap["kl"] == 0.0 and cap["ppl_change_pct"] == 0.0


def test_eval_retention_on_other_facts_and_skips(cli, tmp_path, tiny_model_dir, facts_file):
    # zsRE records have ground truths too (the bundled file has a bad record further down)
    zsre = tmp_path / "zsre.json"
    zsre.write_text(json.dumps(json.loads(ZSRE.read_text())[:20]))
    out = tmp_path / "eval.json"
    args = ["--model", tiny_model_dir, "--facts", facts_file, "--no-generation"]
    skip = ["--tokens", "0", "--mmlu", "0", "--retention", "3", "--retention-facts", zsre]
    code, stdout, err = cli("eval", *args, *skip, "--json", out)
    assert code == 0, err
    cap = json.loads(out.read_text())["capability"]
    assert cap["fact_retention"]["n"] == 3
    assert cap["mmlu"] == {"n": 0, "base": None, "edited": None}
    assert cap["n_tokens"] == 0 and cap["ppl_base"] is None and cap["kl"] is None
    assert "held-out perplexity" in stdout and " - " in stdout


def _bad_json(tmp: Path) -> Path:
    path = tmp / "broken.json"
    path.write_text('[{"prompt": "x", "target": "y"},')
    return path


# id -> (extra args given (tmp_path, ctx), fragments the error line must name)
BAD = {
    "facts-not-found": (
        lambda t, c: ["--facts", t / "missing.json"],
        ["not found", "missing.json"],
    ),
    "facts-invalid-json": (lambda t, c: ["--facts", _bad_json(t)], ["broken.json", "invalid JSON"]),
    "delta-other-model": (
        lambda t, c: ["--facts", c["facts"], "--delta", c["delta"], "--model", c["other"]],
        ["cannot evaluate delta", "made for model"],
    ),
    "delta-not-found": (
        lambda t, c: ["--facts", c["facts"], "--delta", t / "nope.safetensors"],
        ["delta file not found", "nope.safetensors"],
    ),
    "tokens-negative": (lambda t, c: ["--facts", c["facts"], "--tokens", "-1"], ["--tokens", "-1"]),
    "mmlu-negative": (lambda t, c: ["--facts", c["facts"], "--mmlu", "-5"], ["--mmlu", "-5"]),
    "retention-negative": (
        lambda t, c: ["--facts", c["facts"], "--retention", "-2"],
        ["--retention", "-2"],
    ),
    "limit-zero": (lambda t, c: ["--facts", c["facts"], "--limit", "0"], ["--limit", "0"]),
    "retention-facts-not-found": (
        lambda t, c: ["--facts", c["facts"], "--retention-facts", t / "nofacts.json"],
        ["not found", "nofacts.json"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_cleanly_and_writes_nothing(
    cli, tmp_path, tiny_model_dir, other_model_dir, facts_file, delta_file, case
):
    make_args, fragments = BAD[case]
    ctx = {"facts": facts_file, "delta": delta_file, "other": other_model_dir}
    out = tmp_path / "out" / "eval.json"
    args = ["eval", "--model", tiny_model_dir, *make_args(tmp_path, ctx), "--json", out]
    code, stdout, err = cli(*args)  # every case fails before any evaluation
    assert code == 2, err
    assert stdout == ""
    assert err.startswith("crispedit: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_json_that_is_a_folder_fails(cli, tmp_path, tiny_model_dir, facts_file):
    out = tmp_path / "folder"
    out.mkdir()
    code, _, err = cli("eval", "--model", tiny_model_dir, "--facts", facts_file, "--json", out)
    assert code == 2
    assert "is a folder" in err and err.count("\n") == 1
    assert list(out.iterdir()) == []


def test_eval_measures_the_prompts_as_the_delta_recorded_them(
    cli, tmp_path, tiny_model_dir, delta_file, facts_file
):
    """A delta made with the chat template is evaluated with it (here: refused, since the tiny
    tokenizer has none, which proves the recorded choice is read); --chat-template overrides."""
    delta = Delta.load(delta_file)
    wrapped = Delta(delta.tensors, {**delta.meta, "chat_template": "on"}).save(tmp_path / "on")
    out = tmp_path / "eval.json"
    args = ["--model", tiny_model_dir, "--delta", wrapped, "--facts", facts_file, *FAST]
    code, stdout, err = cli("eval", *args, "--json", out)
    assert (
        code == 2
        and stdout == ""
        and "chat_template is on, but the tokenizer has no chat template" in err
    )
    assert not out.exists()
    code, _, err = cli("eval", *args, "--chat-template", "off", "--json", out)
    assert code == 0, err
    assert json.loads(out.read_text())["chat_template"] == "off"
