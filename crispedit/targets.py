"""Prompt/target pairs as token batches whose loss counts only the target tokens.

The edit text is `prompt + " " + target` with no template (DESIGN §2.5). The target tokens are
those after the prompt's own tokens; when a tokenizer merges across the boundary, the prompt and
the target are tokenized apart and joined, so the prompt tokens stay exactly those of the prompt.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

IGNORE = -100  # label of a position that carries no loss


def encode_pair(tokenizer, prompt: str, target: str) -> tuple[list[int], int]:
    """Token ids of `prompt + " " + target` and the number of prompt tokens before the target."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(f"{prompt} {target}")["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        ids = prompt_ids + tokenizer(f" {target}", add_special_tokens=False)["input_ids"]
    if len(ids) == len(prompt_ids):
        raise ValueError(f"target {target!r} of prompt {prompt!r} encodes to no tokens")
    return ids, len(prompt_ids)


def target_batches(
    tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches `{input_ids, attention_mask, labels}`; labels are the target tokens.

    `labels[b, t]` is the token at t when t is a target position, else IGNORE: the prediction made
    at t-1 is scored against it (shift by one, as Hugging Face models do).
    """
    encoded = [encode_pair(tokenizer, p, t) for p, t in pairs]
    pad = tokenizer.pad_token_id
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, IGNORE)
        for row, (ids, n_prompt) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        yield {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def target_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all target tokens of the batch."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE
    )


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq - 1) mask of the positions whose prediction is scored: t-1 for each target t.

    `logits[:, :-1][mask]` with `labels[:, 1:][mask]` is exactly what `target_loss` and
    `target_hits` read, so a model may compute logits at those rows only.
    """
    return labels[:, 1:] != IGNORE


def target_token_losses_at(
    logits: torch.Tensor, gold: torch.Tensor, where: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target token's cross-entropy, `(n,)`, and the batch row it belongs to, `(n,)`, from
    the `(n, vocab)` logits at the target positions `where` (see `target_positions`); their
    mean is `target_loss`."""
    return torch.nn.functional.cross_entropy(logits.float(), gold, reduction="none"), (
        where.nonzero()[:, 0]
    )


def target_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: True when every target token is the greedy (argmax) teacher-forced prediction."""
    pred = logits[:, :-1].argmax(-1)
    gold = labels[:, 1:]
    counted = gold != IGNORE
    return ((pred == gold) | ~counted).all(-1)
