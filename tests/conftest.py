"""Shared fixtures: a tiny trained tokenizer, tiny random models of several architectures, the
real SmolLM2-135M (converted once from the packaged GGUF file), and the command line's artifacts
on the tiny model, built once through the CLI and read by the tests of tests/crispedit_cli.

The CLI's artifacts live here rather than in tests/crispedit_cli/conftest.py: a second module named
`conftest` would shadow this one for the tests that import `make_tiny` from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import BUDGET, EDIT_BUDGET, FACTS, LAYERS_23, run_cli, write_json

import crispedit.curvature
from crispedit.corpus import read_documents
from crispedit.models import load_model
from crispedit_cli.main import main as crispedit_main

TINY_VOCAB = 512


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained on a little WikiText: real merges, tiny vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(read_documents("wikitext")[:200], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.padding_side = "right"
    return fast


# The architectures `make_tiny` builds, each a few blocks of width 32: dense decoders, GPT-style
# models, OPT (MLP layers directly in the block), the text tower of the multimodal Gemma 3
# (`gemma3-vision`) and a mixture of experts (Mixtral).
TINY_ARCHS = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3-vision",
    "phi3",
    "gpt2",
    "gptj",
    "gptneox",
    "opt",
    "mixtral",
)


def tiny_stream_store(folder: Path, tokenizer):
    """(store, model, layers, curvature): a curvature store in `folder` holding a small WikiText
    curvature of a tiny Llama edited at blocks 2-3, for tests that edit on a stream."""
    from crispedit.curvature import plan_curvature
    from crispedit.models import parse_layers
    from crispedit.streams import cached_curvature
    from curvature_store import Store

    model = make_tiny("llama")
    layers = parse_layers(model, "2-3")
    store = Store(folder)
    recipe = plan_curvature(model, tokenizer, "wikitext", 400, layers, seq_len=64)
    curvature, _ = cached_curvature(store, model, tokenizer, recipe, progress=False)
    return store, model, layers, curvature


# a tiny model's edit that lands in a few steps: every stream test edits with it
TINY_EDIT = {"lr": 3e-2, "epochs": 8, "progress": False}


def tiny_stream_edit(setup, facts, **kwargs):
    """`edit_on_stream` of `facts` on stream "main" of a `tiny_stream_store` setup (store, model,
    tokenizer, layers, curvature) with TINY_EDIT; `base` (default: a fresh tiny Llama's layers)
    and `capability` (default: the setup's curvature) may be given, other keywords go through."""
    from crispedit.streams import base_weights, edit_on_stream

    store, model, tok, layers, curvature = setup
    base = kwargs.pop("base", None) or base_weights(make_tiny("llama"), layers)
    curvature = kwargs.pop("capability", curvature)
    return edit_on_stream(
        store, "tiny", "main", model, tok, base, curvature, facts, **TINY_EDIT, **kwargs
    )


BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench_script(name: str):
    """bench/NAME.py as the module `bench_NAME` (registered in sys.modules: dataclasses look
    their module up while a class is made), with bench/ on the path for the scripts that import
    bench/quality.py as `quality`."""
    import importlib.util
    import sys

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_tiny(arch: str, seed: int = 0):
    """A small randomly initialised causal LM of the given architecture (4 blocks), in eval mode
    and float32. `arch` is one of TINY_ARCHS."""
    import transformers as hf

    torch.manual_seed(seed)
    common = {"vocab_size": TINY_VOCAB, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}
    decoder = {  # the Llama-style shape most architectures share
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 256,
        **common,
    }
    llama_like = {
        "llama": (hf.LlamaConfig, hf.LlamaForCausalLM),
        "mistral": (hf.MistralConfig, hf.MistralForCausalLM),
        "qwen2": (hf.Qwen2Config, hf.Qwen2ForCausalLM),
        "qwen3": (hf.Qwen3Config, hf.Qwen3ForCausalLM),
        "gemma": (hf.GemmaConfig, hf.GemmaForCausalLM),
        "gemma2": (hf.Gemma2Config, hf.Gemma2ForCausalLM),
        "gemma3": (hf.Gemma3TextConfig, hf.Gemma3ForCausalLM),
    }
    # Gemma 3 alternates local (sliding-window) and global attention, each with its own rotary
    # table; a window shorter than the test sentences makes the difference count.
    gemma3 = {"layer_types": ["sliding_attention", "full_attention"] * 2, "sliding_window": 4}
    if arch in llama_like:
        config_cls, model_cls = llama_like[arch]
        model = model_cls(config_cls(**decoder, **(gemma3 if arch == "gemma3" else {})))
    elif arch == "gemma3-vision":
        vision = {
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        }
        text = {**decoder, **gemma3}
        config = hf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
        model = hf.Gemma3ForConditionalGeneration(config)
    elif arch == "phi3":
        model = hf.Phi3ForCausalLM(hf.Phi3Config(**decoder))
    elif arch == "mixtral":
        config = hf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **decoder)
        model = hf.MixtralForCausalLM(config)
    elif arch == "opt":
        config = hf.OPTConfig(
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=256,
            **common,
        )
        model = hf.OPTForCausalLM(config)
    elif arch == "gpt2":
        config = hf.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=256, **common)
        model = hf.GPT2LMHeadModel(config)
    elif arch == "gptj":
        config = hf.GPTJConfig(
            n_embd=32, n_layer=4, n_head=4, rotary_dim=4, n_positions=256, **common
        )
        model = hf.GPTJForCausalLM(config)
    elif arch == "gptneox":
        config = hf.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=256,
            **common,
        )
        model = hf.GPTNeoXForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}: one of {', '.join(TINY_ARCHS)}")
    return model.float().eval()


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request, tiny_tokenizer):
    """(model, tokenizer) for a tiny Llama-shaped and a tiny GPT-2-shaped model."""
    return make_tiny(request.param), tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama saved as a normal Hugging Face folder, for `--model PATH`."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32, CPU) and its tokenizer; loaded fresh per call."""
    from crispedit.models import load_model

    return lambda: load_model("smollm2")


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma 3 270M (fp32, CPU) and its tokenizer; loaded fresh per call."""
    from crispedit.models import load_model

    return lambda: load_model("gemma3-270m")


@pytest.fixture
def cli(capsys):
    """Run the `crispedit` CLI in-process and return (status, stdout, stderr) of that call alone."""

    def run(*args):
        capsys.readouterr()
        code = crispedit_main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


# ---------------------------------------------------------------------------------------------
# The command line's artifacts: facts, a model the tiny model's deltas and curvature do not fit,
# curvature files, an edit and the model it edits


@pytest.fixture(scope="session")
def facts_file(tmp_path_factory) -> Path:
    return write_json(tmp_path_factory.mktemp("facts") / "facts.json", FACTS)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with other weights in blocks 2-3: a delta of the tiny model does not fit."""
    model, tokenizer = load_model(str(tiny_model_dir))
    with torch.no_grad():
        for name in LAYERS_23:
            dict(model.named_modules())[name].weight.add_(0.01)
    path = tmp_path_factory.mktemp("tiny-llama-other")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def curv_other_model(tmp_path_factory, other_model_dir) -> Path:
    out = tmp_path_factory.mktemp("curv") / "other"
    assert run_cli("curvature", "build", "--model", other_model_dir, *BUDGET, "--out", out) == 0
    return out


@pytest.fixture(scope="session")
def curv_kfac(tmp_path_factory, tiny_model_dir) -> Path:
    """K-FAC curvature of blocks 2-3 of the tiny model."""
    out = tmp_path_factory.mktemp("curv") / "kfac"
    code = run_cli(
        "curvature", "build", "--model", tiny_model_dir, "--layers", "2-3", *BUDGET, "--out", out
    )
    assert code == 0
    return out


@pytest.fixture(scope="session")
def curv_ekfac(tmp_path_factory, tiny_model_dir) -> Path:
    """EK-FAC curvature of blocks 2-3 of the tiny model (same corpus and budget as curv_kfac)."""
    out = tmp_path_factory.mktemp("curv") / "ekfac"
    args = ["--layers", "2-3", "--kind", "ekfac", *BUDGET, "--out", out]
    assert run_cli("curvature", "build", "--model", tiny_model_dir, *args) == 0
    return out


@pytest.fixture(scope="session")
def edit_run(tmp_path_factory, tiny_model_dir, facts_file, curv_kfac) -> Path:
    """An edit of blocks 2-3 with the prebuilt K-FAC curvature: delta.safetensors + report."""
    out = tmp_path_factory.mktemp("edit") / "e1"
    code = run_cli(
        "edit", "--model", tiny_model_dir, "--facts", facts_file, "--curvature", curv_kfac,
        "--layers", "2-3", *EDIT_BUDGET, "--out", out,
    )  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="session")
def edited_dir(tmp_path_factory, tiny_model_dir, edit_run) -> Path:
    """The tiny model with edit_run's delta applied, written by `crispedit apply`."""
    out = tmp_path_factory.mktemp("apply") / "edited"
    delta = edit_run / "delta.safetensors"
    assert run_cli("apply", "--model", tiny_model_dir, "--delta", delta, "--out", out) == 0
    return out


@pytest.fixture(scope="session")
def base_state(tiny_model_dir) -> dict[str, torch.Tensor]:
    model, _ = load_model(str(tiny_model_dir))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def no_curvature_build(monkeypatch):
    """Make any attempt to build curvature fail the test."""

    def boom(*args, **kwargs):
        raise AssertionError("curvature was rebuilt")

    monkeypatch.setattr(crispedit.curvature, "build_curvature", boom)
