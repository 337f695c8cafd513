"""Shared fixtures: a tiny trained tokenizer, tiny random models of several architectures, and
the real SmolLM2-135M (converted once from the packaged GGUF file)."""

from __future__ import annotations

import pytest
import torch

from crispedit.cli import main as crispedit_main
from crispedit.corpus import read_documents

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


@pytest.fixture
def cli(capsys):
    """Run the `crispedit` CLI in-process and return (status, stdout, stderr) of that call alone."""

    def run(*args):
        capsys.readouterr()
        code = crispedit_main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
