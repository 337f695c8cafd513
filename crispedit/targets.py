"""Prompts and prompt/target pairs as token ids: the one place a prompt becomes tokens.

The edit text is `prompt + " " + target` (DESIGN §2.5), or, with the chat template (`chat`),
the prompt as a user turn followed by the assistant's generation prompt, and the target right
after it as the start of the assistant's reply. The target tokens are those after the prompt's
own tokens; when a tokenizer merges across the boundary, the prompt and the target are tokenized
apart and joined, so the prompt tokens stay exactly those of the prompt. Every prompt the editor
trains or measures on (facts, paraphrases, neighbours, anchors, a stream's edit set, generated
answers) goes through `prompt_text` or `encode_prompt`; plain text (a corpus, held-out
perplexity, MMLU's few-shot prompts) does not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from contract.settings import CHAT_TEMPLATE_CHOICES, SettingsError

IGNORE = -100  # label of a position that carries no loss


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template (a Jinja string, or a dict of named ones)."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_chat_template(tokenizer, choice: str) -> bool:
    """Whether prompts are wrapped in the chat template for the option value `choice`: `on`,
    `off`, or `auto` (on exactly when the tokenizer has a template). `on` for a tokenizer
    without one raises SettingsError, as does a value that is none of the three."""
    if choice not in CHAT_TEMPLATE_CHOICES:
        choices = ", ".join(CHAT_TEMPLATE_CHOICES)
        raise SettingsError("chat_template", f"must be one of {choices}, not {choice!r}")
    if choice == "on" and not has_chat_template(tokenizer):
        raise SettingsError("chat_template", "is on, but the tokenizer has no chat template")
    return choice == "on" or (choice == "auto" and has_chat_template(tokenizer))


def prompt_text(tokenizer, prompt: str, *, chat: bool = False) -> str:
    """The text a prompt is fed as: itself, or with `chat` a user turn holding it followed by
    the assistant's generation prompt, as the tokenizer's chat template writes them."""
    if not chat:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def encode_prompt(tokenizer, prompt: str, *, chat: bool = False) -> list[int]:
    """Token ids of the prompt as `prompt_text` writes it. A templated text holds its own special
    tokens, so the tokenizer adds none to it (no second BOS)."""
    return tokenizer(prompt_text(tokenizer, prompt, chat=chat), add_special_tokens=not chat)[
        "input_ids"
    ]


def encode_pair(
    tokenizer, prompt: str, target: str, *, chat: bool = False
) -> tuple[list[int], int]:
    """Token ids of the prompt followed by the target and the number of prompt tokens before the
    target: `prompt + " " + target`, or with `chat` the templated prompt and the target (after a
    space only when the template's generation prompt does not already end in whitespace)."""
    text = prompt_text(tokenizer, prompt, chat=chat)
    sep = "" if chat and text[-1:].isspace() else " "
    prompt_ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]  # encode_prompt's
    ids = tokenizer(f"{text}{sep}{target}", add_special_tokens=not chat)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        ids = prompt_ids + tokenizer(f"{sep}{target}", add_special_tokens=False)["input_ids"]
    if len(ids) == len(prompt_ids):
        raise ValueError(f"target {target!r} of prompt {prompt!r} encodes to no tokens")
    return ids, len(prompt_ids)


def subject_position(
    tokenizer, prompt: str, subject: str | None, *, chat: bool = False
) -> tuple[list[int], int]:
    """Token ids of `prompt` as `encode_prompt` makes them and the index of the subject's last
    token: the last token that starts before the subject's first occurrence in the prompt ends
    (the token holding its last character, however the tokenizer merges). A fact without a
    subject, or whose subject is not in its prompt, takes the prompt's last token. `chat`: the
    prompt wrapped in the chat template, as every other prompt of the edit."""
    text = prompt_text(tokenizer, prompt, chat=chat)
    at = text.rfind(prompt)
    end = len(text) if at < 0 else at + len(prompt)
    if subject and at >= 0 and subject in prompt:
        end = at + prompt.index(subject) + len(subject)
    special = not chat  # a templated text holds its own special tokens
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        starts = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and a < end]
        return ids, starts[-1] if starts else len(ids) - 1
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    upto = tokenizer(text[:end], add_special_tokens=special)["input_ids"]
    return ids, min(len(upto), len(ids)) - 1


def target_batches(
    tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int, *, chat: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches `{input_ids, attention_mask, labels}`; labels are the target tokens.

    `labels[b, t]` is the token at t when t is a target position, else IGNORE: the prediction made
    at t-1 is scored against it (shift by one, as Hugging Face models do). `chat`: the prompts
    are wrapped in the chat template (`encode_pair`).
    """
    encoded = [encode_pair(tokenizer, p, t, chat=chat) for p, t in pairs]
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
