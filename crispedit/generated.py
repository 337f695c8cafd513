"""A capability corpus the model writes itself: documents sampled from its own distribution.

The curvature protects the capability loss on text like the text the model will meet; the model's
own samples are that text as the model sees it, need no download, and come in any amount (the
published recipe uses ~10k Wikipedia articles, far more than the bundled WikiText-2 split). Each
document starts from one of a few fixed, diverse `STARTERS` and is sampled ancestrally, a token at
a time with a KV cache, for at most `DOC_TOKENS` tokens (one curvature sequence) or until EOS. A
batch shares its starter (so no row is ever padded); batches cycle through the starters.

The documents are written as JSONL `{"text": ...}` records, which `crispedit.corpus` reads like any
other corpus (so `crispedit curvature build --corpus FILE` takes it unchanged), until they hold
`tokens` tokens as the curvature reads them. A corpus is reproducible from its seed on the same
device and dtype: tokens are drawn on the host from one seeded generator, as `curvature`'s sampled
labels are, and the model's logits are the only thing the device computes. Its curvature never
passes for another's: the store keys a curvature by the digest of its token sequences, which is
the generated text itself (`corpus.sequences_digest`).
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from crispedit.corpus import SEQ_LEN
from crispedit.models import model_fingerprint, parse_layers
from curvature_store.files import atomic_write_bytes

DOC_TOKENS = SEQ_LEN  # tokens per document, starter included: a document fills one sequence
BATCH_SIZE = 32  # documents sampled at once
SEED = 0
# Plain ancestral sampling (temperature 1, no top-k, no top-p): the curvature is an expectation
# over text, and the model's own distribution, tails included, is the one it is protected on.
# Truncation (top-p < 1) or a lower temperature would sharpen it into the model's most likely
# text, which a small model repeats; both stay settable for the runs that measure them.
TEMPERATURE = 1.0
TOP_P = 1.0
# where documents start: varied registers and topics, so a small model does not write one text
STARTERS = (
    "The",
    "In 1887,",
    "The history of",
    "Scientists have found that",
    "Chapter 1",
    "How to",
    "The city of",
    "According to the report,",
    "She",
    "In mathematics,",
    "The album",
    "Yesterday",
    "The company announced",
    "def",
    "Q:",
    "Dear",
)


def generate_corpus(
    model: nn.Module,
    tokenizer,
    out: str | Path,
    tokens: int,
    seed: int = SEED,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    doc_tokens: int = DOC_TOKENS,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
) -> dict:
    """Sample documents from `model` until they hold `tokens` tokens and write them to `out` as
    JSONL (atomically: nothing is written unless the corpus is complete).

    Tokens are counted as `corpus.token_sequences` reads the text back (the tokenizer's special
    tokens included), so the file holds at least `tokens` and less than one document more. The
    model runs on its own device and dtype, in eval mode with no gradients; the draws are made on
    the host from a generator seeded with `seed`. Returns what the corpus is (model, fingerprint
    of its default layers, seed, sampling settings, documents, tokens) and how long it took.
    """
    check_settings(tokens, temperature, top_p, doc_tokens, batch_size)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    documents, total = [], 0
    bar = tqdm(total=tokens, desc="generating corpus", unit="tok", disable=not progress)
    try:
        batches = barren = 0
        while total < tokens:
            starter = STARTERS[batches % len(STARTERS)]
            batches += 1
            kept = 0
            for text in sample_batch(
                model, tokenizer, starter, batch_size, doc_tokens, temperature, top_p, generator
            ):
                n = len(tokenizer(text, add_special_tokens=True)["input_ids"])
                if not text.strip() or n < 2:
                    continue  # the corpus reader skips it, or it carries no next-token label
                documents.append(text)
                kept += 1
                total += n
                bar.update(min(n, tokens - bar.n))
                if total >= tokens:
                    break
            barren = 0 if kept else barren + 1
            if barren == len(STARTERS):  # a model that ends every text at once would never stop
                raise ValueError(f"the model wrote no text of 2 or more tokens in {barren} batches")
    finally:
        bar.close()
    data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents)
    atomic_write_bytes(out, data.encode())
    seconds = time.perf_counter() - started
    return {
        "model": getattr(model, "name_or_path", None),
        "model_fingerprint": model_fingerprint(model, parse_layers(model, None)),
        "seed": seed,
        "temperature": temperature,
        "top_p": top_p,
        "doc_tokens": doc_tokens,
        "batch_size": batch_size,
        "documents": len(documents),
        "tokens": total,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(total / seconds, 1) if seconds > 0 else None,
    }


def check_settings(
    tokens: int,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    doc_tokens: int = DOC_TOKENS,
    batch_size: int = BATCH_SIZE,
) -> None:
    """Raise ValueError for settings `generate_corpus` cannot sample with (the command line
    calls it before it loads the model)."""
    if tokens < 1:
        raise ValueError(f"a generated corpus needs at least 1 token, not {tokens}")
    if not temperature > 0:
        raise ValueError(f"the temperature must be above 0, not {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be above 0 and at most 1, not {top_p}")
    if doc_tokens < 2 or batch_size < 1:
        raise ValueError("documents need at least 2 tokens and batches at least 1 document")


@torch.no_grad()
def sample_batch(
    model: nn.Module,
    tokenizer,
    starter: str,
    batch_size: int,
    doc_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
) -> list[str]:
    """`batch_size` documents that continue `starter`, each sampled for up to `doc_tokens` tokens
    in all and cut before its first EOS, decoded without special tokens."""
    device = next(model.parameters()).device
    prompt = tokenizer(starter, add_special_tokens=True)["input_ids"][: doc_tokens - 1]
    rows = torch.tensor([prompt] * batch_size)  # on the host, where the draws are made
    step_ids, cache = rows, None
    eos = tokenizer.eos_token_id
    # transformers 5 renamed the KV cache `past_key_values` to `cache`, on the forward and its
    # output alike; the older name still works there, with a deprecation warning
    cache_name = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    ended = torch.zeros(batch_size, dtype=torch.bool)
    for _ in range(doc_tokens - len(prompt)):
        # ids and mask built on the host and moved, as every index tensor of the engine
        mask = torch.ones(batch_size, rows.shape[1], dtype=torch.long)
        out = model(
            input_ids=step_ids.to(device),
            attention_mask=mask.to(device),
            use_cache=True,
            **{cache_name: cache},
        )
        cache = getattr(out, cache_name)
        draws = sample_next(out.logits[:, -1], temperature, top_p, generator)
        rows = torch.cat([rows, draws[:, None]], dim=1)
        step_ids = draws[:, None]
        if eos is not None:
            ended |= draws == eos
            if bool(ended.all()):
                break
    texts = []
    for row in rows.tolist():
        body = row[len(prompt) :]
        if eos is not None and eos in body:
            body = body[: body.index(eos)]
        texts.append(tokenizer.decode(prompt + body, skip_special_tokens=True))
    return texts


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """One token per row of `logits` (batch, vocab), drawn on the host from the softmax at
    `temperature`, restricted to the smallest set of most likely tokens whose probability
    reaches `top_p` (all of them at 1)."""
    probs = torch.softmax(logits.detach().float().cpu() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # a token stays when the probability before it is under top_p: the most likely always
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
