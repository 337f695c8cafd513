"""Shared fixtures: a tiny trained tokenizer, tiny random models of several architectures, and
the real SmolLM2-135M (converted once from the packaged GGUF file)."""

from __future__ import annotations

import pytest
import torch

from crispedit.corpus import read_documents
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


def make_tiny(arch: str, seed: int = 0):
    """A small randomly initialised causal LM of the given architecture (4 blocks)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTJConfig,
        GPTJForCausalLM,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    common = {"vocab_size": TINY_VOCAB, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=256, **common)
        model = GPT2LMHeadModel(config)
    elif arch == "gptj":
        config = GPTJConfig(n_embd=32, n_layer=4, n_head=4, rotary_dim=4, n_positions=256, **common)
        model = GPTJForCausalLM(config)
    elif arch == "gptneox":
        config = GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=256,
            **common,
        )
        model = GPTNeoXForCausalLM(config)
    else:
        raise ValueError(arch)
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
