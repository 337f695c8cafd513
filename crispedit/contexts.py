"""Context prefixes: short texts the model writes itself, put before an edited prompt.

An edit trained on the bare prompt holds for that sentence; trained also under a few prefixes
(as ROME and MEMIT do) it holds for the fact wherever the prompt comes in a text. The prefixes
are the model's greedy continuation of `CONTEXT_TOKENS` tokens of fixed starters, so they are
the same for every edit of the same weights: an edit rerun from its manifest meets the same
prefixes. Each ends in ". ", so `prefix + prompt` reads as a new sentence after it. Shared by
the projected editor (`contexts`) and MEMIT/AlphaEdit's value optimisation (`value_contexts`).
"""

from __future__ import annotations

import torch
from torch import nn

# the starters, in the order their prefixes are taken; contract.settings caps `contexts` at their
# number (`value_contexts` at the first five, MEMIT's own)
CONTEXTS = ("The", "Therefore", "Because", "I", "You", "He", "She", "It", "We", "They")
CONTEXT_TOKENS = 5  # tokens generated after each starter


@torch.no_grad()
def context_prefixes(model: nn.Module, tokenizer, n: int) -> list[str]:
    """The first `n` context prefixes of `model`: each starter of `CONTEXTS` followed by its
    greedy continuation of `CONTEXT_TOKENS` tokens, decoded with whitespace collapsed, then ". ".
    Plain text, not wrapped in a chat template (a prompt that takes one wraps prefix and prompt
    together). Refuses more prefixes than there are starters."""
    if not 0 <= n <= len(CONTEXTS):
        raise ValueError(f"{n} context prefixes asked for; there are {len(CONTEXTS)} starters")
    device = next(model.parameters()).device
    texts = []
    for starter in CONTEXTS[:n]:
        ids = tokenizer(starter, add_special_tokens=False)["input_ids"]
        for _ in range(CONTEXT_TOKENS):
            # built on the host and moved, and with a mask (which spares HF its padding check,
            # an indexing op on the device), as every other index tensor of the engine
            input_ids = torch.tensor([ids]).to(device)
            mask = torch.ones_like(input_ids)
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            ids.append(int(logits[0, -1].argmax()))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        texts.append(" ".join(text.split()) + ". ")
    return texts
