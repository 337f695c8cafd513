"""Edit metrics the editor and the workers attach to every result: efficacy and perplexity.

Efficacy is teacher-forced: a prompt counts when every target token is the model's argmax given
the prompt and the previous target tokens. Perplexity is over held-out text, never the curvature
corpus, so capability drift is measured on text the projector did not see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from crispedit.corpus import pad_batches, token_sequences
from crispedit.curvature import valid_label_mask
from crispedit.targets import target_batches, target_hits

EVAL_BATCH = 32


@torch.no_grad()
def teacher_forced_accuracy(
    model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = EVAL_BATCH
) -> float:
    """Fraction of (prompt, target) pairs whose whole target is the greedy prediction."""
    if not pairs:
        return float("nan")
    device = next(model.parameters()).device
    hits = 0
    for batch in target_batches(tokenizer, pairs, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hits += int(target_hits(logits, batch["labels"]).sum())
    return hits / len(pairs)


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer, documents: list[str], max_tokens: int = 8192, batch_size: int = 8
) -> float:
    """exp(mean next-token cross-entropy) over the first `max_tokens` tokens of `documents`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    sequences = token_sequences(tokenizer, documents, max_tokens)
    for batch in pad_batches(sequences, tokenizer.pad_token_id, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch, use_cache=False).logits
        mask = valid_label_mask(batch["attention_mask"])
        labels = batch["input_ids"][:, 1:][mask[:, :-1]]
        total += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1][mask[:, :-1]].float(), labels, reduction="sum"
            )
        )
        count += int(mask.sum())
    return math.exp(total / count)
