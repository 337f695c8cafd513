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

`SuffixForward` goes one step further for a change that enters at one position per row (MEMIT's
value δ at the subject's last token): nothing before that position ever sees it, so the blocks
run on those earlier positions once, their keys and values kept in a cache, and each step runs
the blocks only on the positions from there on against them.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import DynamicCache

from crispedit.models import containing_block, transformer_blocks
from crispedit.targets import (
    IGNORE,
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
        return self.head_token_losses(self.hidden(batch, states, rows), batch["labels"])

    def last_logits(
        self,
        batch: dict[str, torch.Tensor],
        states: list[torch.Tensor] | None = None,
        rows: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """(batch, vocab) logits of the next token after each row's last real token."""
        return self.head_at(self.hidden(batch, states, rows), batch["attention_mask"].sum(-1) - 1)

    def head_token_losses(
        self, hidden: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`target_token_losses_at` from the backbone's last hidden states (batch, seq, d) and the
        batch's labels: the head runs at the target positions only."""
        where = target_positions(labels)
        return target_token_losses_at(self.head(hidden[:, :-1][where]), labels[:, 1:][where], where)

    def head_at(self, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(batch, vocab) logits at position `index[b]` of each row b of `hidden`."""
        return self.head(hidden[torch.arange(len(index), device=hidden.device), index])


# Causal LMs whose upper blocks can run on the tail of each row against cached keys and values of
# the positions before it (checked against the transformers 5 sources): each attention appends its
# new keys and values with `cache.update(k, v, self.layer_idx)` and reads positions only from
# `position_ids` (rotary) or not at all (GPT-2: its position embeddings are already in the states
# entering the blocks), and the backbone hands a ready 4-D attention mask to the blocks unchanged.
SUFFIX_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GemmaForCausalLM",
        "Phi3ForCausalLM",
        "GPT2LMHeadModel",
    }
)
# the attention implementations whose 4-D mask is built here: sdpa reads booleans (True: attend),
# eager adds floats (0 or the dtype's minimum)
_MASKED_ATTENTION = ("sdpa", "eager")
# rotary tables computed from the longest position in the batch: the tail alone may differ
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


class SuffixForward:
    """The blocks from `fast.start` up on one right-padded batch whose states entering block
    `start` change only from position `cut[r]` of each row r on (MEMIT adds its value δ at the
    subject's last token, and nothing before it).

    With causal attention nothing at a position before the cut depends on the change, in any
    block. So the positions before each row's cut (the prefix) run once, without grad, keeping
    their keys and values in a `DynamicCache`; every call then runs only the positions from the
    cut on (the suffix) against those cached keys and values. Prefixes are left-padded and
    suffixes right-padded to a common length; the rotary positions are the rows' true ones, and a
    4-D mask, causal by true position, keeps every pad slot from being attended to (a pad query
    of the prefix attends to itself only, so its state stays finite). The target positions and
    each row's last token lie in the suffix, so the losses and the last-token logits equal those
    of `FastForward` to float rounding. `supports` says which models qualify: the others keep
    `FastForward`'s whole-row forward.
    """

    def __init__(self, fast: FastForward, batch: dict[str, torch.Tensor], cut: Sequence[int]):
        self.fast = fast
        self.cache_arg = _cache_kwarg(fast.backbone)
        model = fast.model
        device = batch["input_ids"].device
        mask = batch["attention_mask"]
        self.dtype = next(model.parameters()).dtype
        states = fast.states_of([{"input_ids": batch["input_ids"], "attention_mask": mask}])
        cuts = torch.tensor([int(c) for c in cut], device=device)
        lengths = mask.sum(-1)
        n_prefix, n_suffix = int(cuts.max()), int((lengths - cuts).max())
        # slot j of row r: true position j - (n_prefix - cut[r]) in the prefix, cut[r] + j after
        prefix_at = torch.arange(n_prefix, device=device) - n_prefix + cuts[:, None]
        suffix_at = cuts[:, None] + torch.arange(n_suffix, device=device)
        prefix_real, suffix_real = prefix_at >= 0, suffix_at < lengths[:, None]
        self.fed = nn.utils.rnn.pad_sequence(
            [s[c:] for s, c in zip(states, cuts.tolist(), strict=True)], batch_first=True
        )
        self.positions = suffix_at
        self.last = lengths - cuts - 1
        self.labels = None
        if "labels" in batch:
            at = suffix_at.clamp(max=mask.shape[1] - 1)
            labels = batch["labels"].gather(1, at)
            self.labels = labels.masked_fill(~suffix_real, IGNORE)
        causal = torch.ones(n_suffix, n_suffix, dtype=torch.bool, device=device).tril()
        self.mask = self._attention_mask(
            torch.cat(
                [
                    prefix_real[:, None, :].expand(-1, n_suffix, -1),
                    causal[None] & suffix_real[:, None, :],
                ],
                dim=-1,
            )
        )
        self.cached: list[tuple[torch.Tensor, torch.Tensor]] = []
        if n_prefix > 0:
            self.cached = self._prefix_keys_values(states, cuts, prefix_at, prefix_real)

    @staticmethod
    def supports(fast: FastForward | None) -> bool:
        """Whether the model of `fast` can run its blocks on suffixes (module table; full
        attention in every block, an sdpa or eager attention, a rotary table that does not depend
        on the batch's length)."""
        if fast is None or fast.start is None:
            return False
        config = fast.model.config
        if type(fast.model).__name__ not in SUFFIX_ARCHITECTURES:
            return False
        if getattr(config, "_attn_implementation", None) not in _MASKED_ATTENTION:
            return False
        if getattr(config, "sliding_window", None) is not None:
            return False  # a window would need its own mask
        types = getattr(config, "layer_types", None)
        if types is not None and any(t != "full_attention" for t in types):
            return False
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
        return not (isinstance(rope, dict) and rope.get("rope_type") in _LENGTH_DEPENDENT_ROPE)

    def _attention_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """The (batch, 1, queries, keys) mask the model's attention reads for `allowed`."""
        if self.fast.model.config._attn_implementation == "sdpa":
            return allowed[:, None]
        blocked = torch.finfo(self.dtype).min
        return torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill(
            ~allowed, blocked
        )[:, None]

    def _run(
        self,
        fed: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        """The backbone's last hidden states with `fed` entering block `start`."""
        ids = torch.zeros(fed.shape[:2], dtype=torch.long, device=fed.device)
        with self.fast._from_block(self.fast.start, fed):
            return self.fast.backbone(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=cache is not None,
                **{self.cache_arg: cache},
            ).last_hidden_state

    @torch.no_grad()
    def _prefix_keys_values(
        self,
        states: list[torch.Tensor],
        cut: torch.Tensor,
        positions: torch.Tensor,
        real: torch.Tensor,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block from `start` up: the keys and values of the prefixes, each row's first
        `cut[r]` states left-padded to the true `positions` (`real`: not padding)."""
        n = positions.shape[1]
        fed = torch.stack(
            [
                nn.functional.pad(s[:c], (0, 0, n - c, 0))
                for s, c in zip(states, cut.tolist(), strict=True)
            ]
        )
        causal = torch.ones(n, n, dtype=torch.bool, device=fed.device).tril()
        allowed = (causal[None] & real[:, None, :]) | torch.eye(n, dtype=torch.bool,
                                                                 device=fed.device)  # fmt: skip
        cache = DynamicCache()
        self._run(fed, self._attention_mask(allowed), positions.clamp(min=0), cache)
        return [(layer.keys, layer.values) for layer in cache.layers[self.fast.start :]]

    def hidden(self, add: torch.Tensor | None) -> torch.Tensor:
        """(batch, suffix, d) last hidden states of the suffixes, `add[r]` (rows × d) added to
        row r's state at its cut (None: unchanged)."""
        fed = self.fed
        if add is not None:
            rows = torch.arange(len(fed), device=fed.device)
            first = torch.zeros_like(rows)
            fed = fed.index_put((rows, first), add.to(fed.dtype), accumulate=True)
        cache = None
        if self.cached:
            cache = DynamicCache()
            for i, (keys, values) in enumerate(self.cached, self.fast.start):
                cache.update(keys, values, i)
        return self._run(fed, self.mask, self.positions, cache)

    def token_losses(self, add: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`FastForward.token_losses` of the batch (it must have labels), changed by `add`."""
        return self.fast.head_token_losses(self.hidden(add), self.labels)

    def last_logits(self, add: torch.Tensor | None) -> torch.Tensor:
        """(batch, vocab) logits of the next token after each row's last real token."""
        return self.fast.head_at(self.hidden(add), self.last)


def _cache_kwarg(backbone: nn.Module) -> str:
    """The backbone's name for its key/value cache argument (`cache` in later transformers 5
    releases, `past_key_values` before)."""
    return (
        "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    )


def _prefix_start(model: nn.Module, blocks: nn.ModuleList, layers: Sequence[str]) -> int | None:
    """Index of the lowest block holding an edited layer, when everything below it is frozen and
    the upper blocks can run as a list of their own; None otherwise."""
    if not _PREFIX_OK:
        return None
    if transformer_blocks(model)[1] is not blocks:
        return None
    indices = [containing_block(model, name) for name in layers]
    if None in indices:
        return None  # a layer outside the blocks (the head, say) may feed the prefix
    start = min(indices, default=0)
    if start == 0:
        return None  # nothing to cache
    # per-layer attention types are looked up by position in the (sliced) loop: only a pattern
    # that reads the same from `start` on keeps every block on its own type
    types = getattr(model.config, "layer_types", None)
    if types is not None and list(types[start:]) != list(types[: len(types) - start]):
        return None
    return start
