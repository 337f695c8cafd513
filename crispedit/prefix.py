"""A cheaper forward for the edit steps: cached frozen prefix, logits only at target positions.

The loss of an edit step reads the model's predictions at the target positions only, and every
block below the lowest edited one is frozen. So, for the architectures whose causal-LM head is
exactly `lm_head(backbone(...).last_hidden_state)` (no logit scaling or soft-capping), a step

1. feeds the cached hidden states that enter the lowest edited block (computed once per edit,
   without grad, per fact sequence) into the blocks from there up: the backbone's block list is
   swapped for its upper slice and a forward hook on the module whose output enters the first
   block (the embedding, or the embedding dropout) replaces that output with the cached states;
2. applies the final norm (inside the backbone) and then the output embedding only to the rows at
   target positions.

Both are exact up to float rounding: with causal attention and right padding, pad positions never
reach real ones, so per-sequence states cached under one batching can be re-assembled into the
shuffled batches of each epoch. The block list is swapped only for the duration of one forward
call and restored in a `finally`, so the model is whole between steps (an `on_epoch` callback sees
the normal model) and after any exception. Unsupported models get no plan (`None`): the editor
then runs the plain full-model forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from crispedit.models import transformer_blocks
from crispedit.targets import (
    target_batches,
    target_positions,
    target_token_losses_at,
)

# Causal LMs whose logits are exactly `lm_head(backbone(...).last_hidden_state)`, with the name of
# the block list in the backbone and of the module whose output is the first block's input
# (checked against the transformers 5 sources: the hidden states go from that module, unchanged,
# into `for layer in self.<blocks>`; rotary tables and masks depend only on ids, positions and the
# attention mask, never on the number of blocks).
# Gemma scales its embeddings inside the embedding module, so its output is still the blocks'
# input. Not here: Gemma 2 (soft-capped logits), OPT (positions added after the embedding,
# outside any module), multimodal wrappers (image features merged into the embeddings).
ARCHITECTURES = {
    "LlamaForCausalLM": ("layers", "embed_tokens"),
    "MistralForCausalLM": ("layers", "embed_tokens"),
    "MixtralForCausalLM": ("layers", "embed_tokens"),
    "Qwen2ForCausalLM": ("layers", "embed_tokens"),
    "Qwen3ForCausalLM": ("layers", "embed_tokens"),
    "GemmaForCausalLM": ("layers", "embed_tokens"),
    "Gemma3ForCausalLM": ("layers", "embed_tokens"),
    "Phi3ForCausalLM": ("layers", "embed_tokens"),
    "GPT2LMHeadModel": ("h", "drop"),
    "GPTJForCausalLM": ("h", "drop"),
    "GPTNeoXForCausalLM": ("layers", "emb_dropout"),
}
# The block slicing relies on the model code of transformers 5; older versions get the head only.
_PREFIX_OK = int(transformers.__version__.split(".")[0]) >= 5


@dataclass(eq=False)
class FastForward:
    """How to run an edit step's forward cheaply on one model for one set of edited layers.

    `start` is the index of the lowest edited block, or None when the prefix cannot be cached (an
    edited layer outside the blocks, block 0, alternating layer types, ...): then only the head is
    restricted to the target positions.
    """

    model: nn.Module
    backbone: nn.Module
    blocks_attr: str
    entry: nn.Module
    head: nn.Module
    start: int | None

    @classmethod
    def plan(cls, model: nn.Module, layers: Sequence[str]) -> FastForward | None:
        """The fast forward for `model` editing `layers`, or None when the model is unsupported."""
        cls_name = type(model).__name__
        if cls_name not in ARCHITECTURES or not type(model).__module__.startswith("transformers."):
            return None
        config = model.config
        if getattr(config, "final_logit_softcapping", None) is not None:
            return None  # the logits are no longer the head's output (Gemma 3 may set it)
        if getattr(config, "use_bidirectional_attention", False):
            return None  # pad positions would reach real ones: the cached states are not exact
        blocks_attr, entry_attr = ARCHITECTURES[cls_name]
        backbone = model.base_model
        head = model.get_output_embeddings()
        blocks = getattr(backbone, blocks_attr, None)
        entry = getattr(backbone, entry_attr, None)
        if not isinstance(blocks, nn.ModuleList) or entry is None or head is None:
            return None
        return cls(model, backbone, blocks_attr, entry, head, _prefix_start(model, blocks, layers))

    def __repr__(self) -> str:
        return f"FastForward({type(self.model).__name__}, start={self.start})"

    # -----------------------------------------------------------------------------------------

    def _blocks(self) -> nn.ModuleList:
        return getattr(self.backbone, self.blocks_attr)

    @contextmanager
    def _from_block(self, start: int, states: torch.Tensor):
        """Inside: the backbone runs blocks[start:] only, fed `states` as their input."""
        blocks = self._blocks()

        def replace(module, args, output):
            if output.shape != states.shape:  # the cache and the batch must line up exactly
                raise RuntimeError(
                    f"cached prefix states {tuple(states.shape)} do not match the batch "
                    f"{tuple(output.shape)}"
                )
            return states

        handle = self.entry.register_forward_hook(replace)
        try:
            setattr(self.backbone, self.blocks_attr, blocks[start:])
            yield
        finally:
            setattr(self.backbone, self.blocks_attr, blocks)
            handle.remove()

    @torch.no_grad()
    def prefix_states(
        self, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int, *, chat: bool = False
    ) -> list[torch.Tensor] | None:
        """Per pair: the hidden states (n_tokens, d_model) entering block `start`, or None when
        the prefix is not cached. Built with the batches, padding and positions of the steps
        (`chat`: the prompts wrapped in the chat template, as the steps wrap them)."""
        return self.states_of(target_batches(tokenizer, pairs, batch_size, chat=chat))

    @torch.no_grad()
    def states_of(self, batches: Iterable[dict[str, torch.Tensor]]) -> list[torch.Tensor] | None:
        """Per sequence of the right-padded `batches`: the hidden states entering block `start`
        (unpadded), or None when the prefix is not cached."""
        if self.start is None:
            return None
        blocks, captured = self._blocks(), []

        def capture(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])

        handle = blocks[self.start].register_forward_pre_hook(capture, with_kwargs=True)
        states = []
        device = next(self.model.parameters()).device
        try:
            # blocks[:start + 1]: the forward stops one block after the states it needs
            setattr(self.backbone, self.blocks_attr, blocks[: self.start + 1])
            for batch in batches:
                captured.clear()
                mask = batch["attention_mask"].to(device)
                self.backbone(
                    input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False
                )
                (hidden,) = captured
                lengths = mask.sum(-1).tolist()
                states.extend(h[:n].clone() for h, n in zip(hidden, lengths, strict=True))
        finally:
            setattr(self.backbone, self.blocks_attr, blocks)
            handle.remove()
        return states

    def hidden(
        self,
        batch: dict[str, torch.Tensor],
        states: list[torch.Tensor] | None = None,
        rows: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """The backbone's last hidden states of the batch; `states[rows[b]]` are the cached
        states of its row b (or None: the full backbone runs)."""
        kwargs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "use_cache": False,
        }
        if states is None:
            return self.backbone(**kwargs).last_hidden_state
        rows = [int(i) for i in rows]
        fed = nn.utils.rnn.pad_sequence([states[i] for i in rows], batch_first=True)
        lengths = batch["attention_mask"].sum(-1).tolist()
        if fed.shape[1] != batch["input_ids"].shape[1] or lengths != [len(states[i]) for i in rows]:
            raise RuntimeError("cached prefix states do not match the batch's sequences")
        with self._from_block(self.start, fed):
            return self.backbone(**kwargs).last_hidden_state

    def token_losses(
        self,
        batch: dict[str, torch.Tensor],
        states: list[torch.Tensor] | None = None,
        rows: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`target_token_losses_at` of the batch (their mean is its `target_loss`): each target
        token's loss and its row; `states[rows[b]]` are the cached states of its row b."""
        labels = batch["labels"]
        hidden = self.hidden(batch, states, rows)
        where = target_positions(labels)
        return target_token_losses_at(self.head(hidden[:, :-1][where]), labels[:, 1:][where], where)

    def last_logits(
        self,
        batch: dict[str, torch.Tensor],
        states: list[torch.Tensor] | None = None,
        rows: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """(batch, vocab) logits of the next token after each row's last real token."""
        hidden = self.hidden(batch, states, rows)
        last = batch["attention_mask"].sum(-1) - 1
        return self.head(hidden[torch.arange(len(last), device=hidden.device), last])


def _prefix_start(model: nn.Module, blocks: nn.ModuleList, layers: Sequence[str]) -> int | None:
    """Index of the lowest block holding an edited layer, when everything below it is frozen and
    the upper blocks can run as a list of their own; None otherwise."""
    if not _PREFIX_OK:
        return None
    prefix, found = transformer_blocks(model)
    if found is not blocks:
        return None
    indices = []
    for name in layers:
        index, dot, _ = name.removeprefix(prefix + ".").partition(".")
        if not name.startswith(prefix + ".") or not dot or not index.isdigit():
            return None  # a layer outside the blocks (the head, say) may feed the prefix
        indices.append(int(index))
    start = min(indices, default=0)
    if start == 0:
        return None  # nothing to cache
    # per-layer attention types are looked up by position in the (sliced) loop: only a pattern
    # that reads the same from `start` on keeps every block on its own type
    types = getattr(model.config, "layer_types", None)
    if types is not None and list(types[start:]) != list(types[: len(types) - start]):
        return None
    return start
