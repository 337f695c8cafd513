"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"): closed-form edits of the MLP
output projections at the subject's last token.

For each fact (subject s, prompt p, target o) and the edited layers l_1 < ... < l_L:

1. Target value. At the output of block L (the last edited one), at the subject's last token, find
   z = h_L + δ with a few Adam steps on δ alone (the weights stay):
       min_δ  mean_j −log P(o | x_j ⊕ p ; h_L += δ)
              + kl_factor · KL(P(· | "{s} is a") ‖ P(· | "{s} is a" ; h_L += δ))
              + WEIGHT_DECAY · ‖δ‖² / ‖h_L‖²
   over short context prefixes x_j (the empty one and `value_contexts` greedy continuations of
   the model's, crispedit.contexts), keeping ‖δ‖ ≤ value_clamp · ‖h_L‖ after every step.
   A step runs only the blocks after L, and (causal attention: no token before the subject's
   last one sees δ) only on the tokens from the subject's last one on, against the keys and
   values of the tokens before it, computed once per chunk of facts (crispedit.prefix:
   `SuffixForward`; models it does not cover run whole rows from cached states, `FastForward`,
   or the whole model).
2. Spread. For l = l_1 .. l_L in turn, on the model as updated so far: the keys k (the input of
   layer l at the subject's last token, averaged over the prefixes), the residual r = (z − h_L) /
   (layers left, this one included), and the least-squares update (the paper's eq. 14)
       Δ = R Kᵀ (λ C + K Kᵀ)⁻¹
   that minimises ‖Δ K − R‖² + λ tr(Δ C Δᵀ), with C = E[k kᵀ] over generic text. C is our K-FAC
   factor A of the layer (crispedit.curvature), never collected twice; λ = covariance_weight.

AlphaEdit (crispedit.alphaedit) shares step 1 and the spread, and changes the solve. Both edit
in place and return a `Delta` like `CrispEditor.edit`, so stores, streams and evaluation take
them unchanged. Step 1 is nearly all of an edit's time and does not depend on the solve, so its
result can be kept (`target_values`, `TargetValues.save`) and given to another edit of the same
facts on the same model: MEMIT then AlphaEdit, or a sweep of the covariance weight. Targets,
keys and residuals are fp32 whatever the model's dtype, and the solve is float64 on the model's
device.

    editor = MemitEditor(model, tokenizer, curvature, settings=EditSettings(method="memit"))
    delta = editor.edit(facts)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from contract.facts import Fact, facts_digest
from contract.settings import DEFAULTS, EditSettings
from crispedit.artifacts import ArtifactError, load_tensors, save_tensors
from crispedit.contexts import context_prefixes
from crispedit.corpus import pad_batches
from crispedit.curvature import Curvature
from crispedit.delta import Delta, add_to_weights
from crispedit.evaluate import teacher_forced_accuracy
from crispedit.models import (
    containing_block,
    get_layers,
    is_conv1d,
    model_fingerprint,
    parse_layers,
    trainable_only,
    transformer_blocks,
)
from crispedit.prefix import FastForward, SuffixForward
from crispedit.targets import (
    IGNORE,
    encode_pair,
    resolve_chat_template,
    subject_position,
    target_positions,
    target_token_losses_at,
)

# the options' defaults (the papers'), each written once in contract.settings
VALUE_STEPS, VALUE_LR, VALUE_CLAMP = DEFAULTS.value_steps, DEFAULTS.value_lr, DEFAULTS.value_clamp
KL_FACTOR, COVARIANCE_WEIGHT = DEFAULTS.kl_factor, DEFAULTS.covariance_weight
WEIGHT_DECAY = 1e-3  # of ‖δ‖² / ‖h‖²: keeps δ from growing where the loss no longer cares
VALUE_STOP = 5e-2  # a chunk whose facts' losses are all below this stops optimising
KL_PROMPT = (
    "{} is a"  # the prompt whose next token the value must not change (the subject's essence)
)
VALUE_BATCH = 16  # facts whose values are optimised together (each its own δ)
ROW_BATCH = 64  # rows per forward when reading keys and states


class _Stop(Exception):
    """Raised by a hook to end a forward once the states it needs are read."""


def memit_solve(K: torch.Tensor, R: torch.Tensor, C: torch.Tensor, weight: float) -> torch.Tensor:
    """MEMIT's update Δ = R Kᵀ (λC + K Kᵀ)⁻¹ for keys K (d_in × n), residuals R (d_out × n) and
    the key covariance C (d_in × d_in), λ = `weight`: the minimiser of ‖Δ K − R‖² + λ tr(Δ C Δᵀ).
    Solved (not inverted) in float64 on K's device, wherever C is (C is near-singular, as text's
    covariances are; a bf16 model's own dtype would make the solve meaningless); returns
    (d_out × d_in) float32."""
    K, R = K.double(), R.double()
    # one float64 d_in × d_in matrix besides the LU factor (and C's copy when it is elsewhere)
    M = torch.addmm(C.to(K.device, torch.float64), K, K.T, beta=weight)
    # M is symmetric: Δᵀ = M⁻¹ K Rᵀ
    return torch.linalg.solve(M, K @ R.T).T.float()


@dataclass(frozen=True)
class TargetValues:
    """Step 1's result for one list of facts on one model (module doc): each fact's value change
    δ at block L's output (n_facts × d, fp32, CPU), each chunk's final loss, and the seconds the
    optimisation took. `key` names what it was computed for: the facts, the edited layers and
    their weights (`model_fingerprint`: the rest of the model is taken to be the same), the chat
    template and the value options; `MemitEditor.edit(facts, values=...)` refuses any other."""

    key: str
    delta: torch.Tensor
    losses: list[float]
    seconds: float

    def save(self, path: str | Path) -> None:
        """Write to one safetensors file, atomically (crispedit.artifacts)."""
        meta = {"kind": "target-values", "key": self.key, "losses": self.losses,
                "seconds": self.seconds}  # fmt: skip
        save_tensors(path, {"delta": self.delta}, meta)

    @classmethod
    def load(cls, path: str | Path) -> TargetValues:
        """Read a file written by `save`; a corrupt or foreign file raises `ArtifactError`."""
        tensors, meta = load_tensors(path, "target values")
        if meta.get("kind") != "target-values" or "delta" not in tensors:
            raise ArtifactError(f"{path} is not a target-values file")
        return cls(meta["key"], tensors["delta"], list(meta["losses"]), float(meta["seconds"]))


@dataclass
class _Rows:
    """The value optimisation's inputs for a set of facts: per row its token ids, the number of
    prompt tokens, the subject's last token and the fact it belongs to; `plain[i]` is fact i's row
    without a prefix, `kl[i]` its "{subject} is a" row (None without a subject)."""

    ids: list[list[int]]
    n_prompt: list[int]
    pos: list[int]
    fact: list[int]
    plain: list[int]
    kl_ids: list[list[int]]
    kl_pos: list[int]
    kl_fact: list[int]


class MemitEditor:
    """MEMIT on a resident model (module doc): `edit(facts)` writes the update into the model and
    returns it as a `Delta`.

    `curvature` supplies each edited layer's key covariance C = A; `settings` the method and its
    options (contract.settings: value_steps, value_lr, value_clamp, kl_factor,
    covariance_weight); `layers` defaults to the settings', else the curvature's. `on_epoch` is
    called after each chunk of facts' value optimisation with `{epoch, epochs, loss}` (a worker's
    progress and cancellation hook). `fast` computes the value steps from the block after the
    last edited one up, from cached states, where the architecture allows (crispedit.prefix);
    `cache_prefix` then also runs those blocks only from each row's subject token on, against the
    cached keys and values of the tokens before it (`SuffixForward`), where the model allows.
    """

    method = "memit"

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        curvature: Curvature | None,
        settings: EditSettings = DEFAULTS,
        *,
        layers: list[str] | str | None = None,
        progress: bool = True,
        on_epoch: Callable[[dict], None] | None = None,
        fast: bool = True,
        cache_prefix: bool = True,
        **options: Any,
    ):
        self.settings = settings.override(**options)
        self.model, self.tokenizer = model, tokenizer
        self.progress, self.on_epoch = progress, on_epoch
        self.chat = resolve_chat_template(tokenizer, self.settings.chat_template)
        if curvature is None:
            raise ValueError(f"method {self.method!r} needs curvature (its key covariance)")
        spec = layers if layers is not None else self.settings.layers
        if spec is None:
            spec = list(curvature.layers)
        self.layers = parse_layers(model, list(spec) if isinstance(spec, tuple) else spec)
        missing = [n for n in self.layers if n not in curvature.layers]
        if missing:
            raise ValueError(f"the curvature has no factors for layer {missing[0]!r}")
        self.curvature = curvature
        self.modules = get_layers(model, self.layers)
        self.block = self._last_block()
        blocks = transformer_blocks(model)[1]
        plan = FastForward.plan(model, self.layers) if fast else None
        # the value steps start after block L: the states entering block L+1 are cached
        after = self.block + 1
        self.fast = (
            dataclasses.replace(plan, start=after if after < len(blocks) else None)
            if plan is not None and plan.start is not None
            else plan
        )
        self.cache_prefix = cache_prefix and SuffixForward.supports(self.fast)

    def _last_block(self) -> int:
        """Index of the block holding the last edited layer (the layers must be in blocks)."""
        indices = []
        for name in self.layers:
            index = containing_block(self.model, name)
            if index is None:
                raise ValueError(f"{self.method} edits layers inside blocks, not {name!r}")
            indices.append(index)
        if indices != sorted(set(indices)):
            raise ValueError(f"{self.method} edits one layer per block, in order: {self.layers}")
        return indices[-1]

    def _log(self, message: str) -> None:
        if self.progress:
            print(message, file=sys.stderr, flush=True)

    # -----------------------------------------------------------------------------------------
    # editing

    def edit(self, facts: Sequence[Fact], *, values: TargetValues | None = None) -> Delta:
        """Edit the model in place so it completes each fact's prompt with its target (module
        doc); returns the fp32 delta against the weights before, whose `report` holds efficacy
        before/after and timings. The model ends with `W_before + delta` computed as `apply_delta`
        does. `values`, step 1's result for these facts on this model (`target_values`), skips
        step 1; values computed for anything else are refused, as is an empty list."""
        facts = list(facts)
        if not facts:
            raise ValueError("no facts to edit")
        started = time.perf_counter()
        pairs = [(f.prompt, f.target) for f in facts]
        base_fingerprint = model_fingerprint(self.model, self.layers)
        key = self._values_key(facts, base_fingerprint)
        if values is not None and values.key != key:
            raise ValueError(
                "these target values were computed for other facts, layer weights or value "
                "options than this edit's"
            )
        efficacy_before = teacher_forced_accuracy(self.model, self.tokenizer, pairs, chat=self.chat)
        rows = self._rows(facts)
        with torch.no_grad():
            h = self._probe(rows, None)[1]  # (n_facts, d) at block L: before the edit
        reused = values is not None
        if values is None:
            values = self._target_values(key, rows, h)
        losses = values.losses
        z = h + values.delta.to(h.device, h.dtype)
        tensors: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.layers):
            with torch.no_grad():
                keys, now = self._probe(rows, name)
            R = (z - now).T / (len(self.layers) - i)  # (d_out, n): this layer's share
            update = self._solve(name, keys.T, R, facts)
            module = self.modules[name]
            tensors[f"{name}.weight"] = (update.T if is_conv1d(module) else update).cpu()
            add_to_weights(self.model, {f"{name}.weight": tensors[f"{name}.weight"]})
            self._log(f"{self.method}: {name} updated, |Δ| {float(update.norm()):.3f}")
        efficacy = teacher_forced_accuracy(self.model, self.tokenizer, pairs, chat=self.chat)
        seconds = time.perf_counter() - started
        delta = self._delta(facts, tensors, base_fingerprint, (efficacy_before, efficacy), losses,
                            seconds)  # fmt: skip
        # the value optimisation's own time, and whether this edit reused it
        delta.report["time_s"]["values"] = round(values.seconds, 3)
        delta.report["values_reused"] = reused
        return delta

    def target_values(self, facts: Sequence[Fact]) -> TargetValues:
        """Step 1 alone (module doc) for `facts` on the model as it is now: what `edit(facts,
        values=...)` takes instead of computing it, by this editor or by another MEMIT or
        AlphaEdit editor of the same model, layers and value options."""
        facts = list(facts)
        if not facts:
            raise ValueError("no facts to edit")
        rows = self._rows(facts)
        with torch.no_grad():
            h = self._probe(rows, None)[1]
        return self._target_values(self.values_key(facts), rows, h)

    def values_key(self, facts: Sequence[Fact]) -> str:
        """The key of `target_values(facts)` on the model as it is now, without computing them:
        a digest of what they depend on (`TargetValues`)."""
        return self._values_key(list(facts), model_fingerprint(self.model, self.layers))

    def _target_values(self, key: str, rows: _Rows, h: torch.Tensor) -> TargetValues:
        started = time.perf_counter()
        with trainable_only(self.model, []):
            delta, losses = self._values(rows, h)
        return TargetValues(key, delta.cpu(), losses, time.perf_counter() - started)

    def _values_key(self, facts: list[Fact], fingerprint: str) -> str:
        """What step 1's result depends on (`TargetValues`), as a digest."""
        s = self.settings
        parts = {
            "fingerprint": fingerprint, "layers": self.layers, "facts": facts_digest(facts),
            "chat": bool(self.chat), "steps": s.value_steps, "lr": s.value_lr,
            "clamp": s.value_clamp, "contexts": s.value_contexts, "kl_factor": s.kl_factor,
            "rules": [WEIGHT_DECAY, VALUE_STOP, KL_PROMPT, VALUE_BATCH],
        }  # fmt: skip
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def _solve(self, name: str, K: torch.Tensor, R: torch.Tensor, facts: list[Fact]):
        """Layer `name`'s update (d_out × d_in, float32) for keys K (d_in × n) and residuals R."""
        A = self.curvature.layers[name].A
        if A is None:
            raise ValueError(f"the curvature of {name} keeps no factor A (a stream's curvature)")
        return memit_solve(K, R, A, self.settings.covariance_weight)

    def _delta(self, facts, tensors, base_fingerprint, efficacy, losses, seconds) -> Delta:
        """Wrap the update with the provenance and metrics `CrispEditor.edit` gives (`efficacy`:
        before and after)."""
        s = self.settings
        meta = {
            "base_fingerprint": base_fingerprint,
            "edited_fingerprint": model_fingerprint(self.model, self.layers),
            "model": getattr(self.model, "name_or_path", None),
            "layers": self.layers,
            "method": s.method,
            "projector": self.method,
            "gamma": None,
            "n_edits": len(facts),
            "facts_digest": facts_digest(facts),
            "seed": s.seed,
            "value_steps": s.value_steps,
            "value_lr": s.value_lr,
            "value_clamp": s.value_clamp,
            "value_contexts": s.value_contexts,
            "kl_factor": s.kl_factor,
            **self._solve_options(),
            "chat_template": "on" if self.chat else "off",
        }
        report = {
            **meta,
            "efficacy": efficacy[1],
            "efficacy_before": efficacy[0],
            "epochs": len(losses),
            "loss_curve": [round(x, 6) for x in losses],
            # the share of each layer's input space an update may use (alphaedit's null space)
            "kept_fraction": dict(getattr(self, "kept_fraction", {})),
            "delta_norm": {k: float(v.norm()) for k, v in tensors.items()},
            "time_s": {"edit": round(seconds, 3)},
        }
        return Delta(tensors=tensors, meta=meta, report=report)

    def _solve_options(self) -> dict:
        return {"covariance_weight": self.settings.covariance_weight}

    # -----------------------------------------------------------------------------------------
    # the rows: each fact's prompt under each context prefix, and its "{subject} is a" prompt

    def _contexts(self) -> list[str]:
        """The empty prefix and the model's first `value_contexts` context prefixes
        (crispedit.contexts: the same for every edit of this model, greedy)."""
        return ["", *context_prefixes(self.model, self.tokenizer, self.settings.value_contexts)]

    def _rows(self, facts: list[Fact]) -> _Rows:
        """Every fact's rows (`_Rows`), the prompts wrapped as the edit wraps them."""
        tok, chat = self.tokenizer, self.chat
        rows = _Rows([], [], [], [], [], [], [], [])
        for i, fact in enumerate(facts):
            for context in self._context_cache():
                prompt = context + fact.prompt
                prompt_ids, pos = subject_position(tok, prompt, fact.subject, chat=chat)
                ids, n_prompt = encode_pair(tok, prompt, fact.target, chat=chat)
                if ids[: len(prompt_ids)] != prompt_ids:
                    raise ValueError(f"prompt {prompt!r} tokenizes apart from its target")
                if context == "":
                    rows.plain.append(len(rows.ids))
                rows.ids.append(ids)
                rows.n_prompt.append(n_prompt)
                rows.pos.append(pos)
                rows.fact.append(i)
            if fact.subject:
                ids, pos = subject_position(tok, KL_PROMPT.format(fact.subject), fact.subject,
                                            chat=chat)  # fmt: skip
                rows.kl_ids.append(ids)
                rows.kl_pos.append(pos)
                rows.kl_fact.append(i)
        return rows

    def _context_cache(self) -> list[str]:
        if not hasattr(self, "_contexts_made"):
            self._contexts_made = self._contexts()
        return self._contexts_made

    # -----------------------------------------------------------------------------------------
    # forwards with the hidden state of block L changed at the subject's last token

    def _batch(self, ids: list[list[int]], n_prompt: list[int] | None) -> dict[str, torch.Tensor]:
        """One right-padded batch of `ids` on the model's device, with target labels when
        `n_prompt` is given."""
        device = next(self.model.parameters()).device
        batch = next(pad_batches(ids, self.tokenizer.pad_token_id, len(ids)))
        if n_prompt is not None:
            labels = torch.full_like(batch["input_ids"], IGNORE)
            for r, (row, n) in enumerate(zip(ids, n_prompt, strict=True)):
                labels[r, n : len(row)] = torch.tensor(row[n:])
            batch["labels"] = labels
        return {k: v.to(device) for k, v in batch.items()}

    def _block_hook(self, pos: torch.Tensor, add: torch.Tensor | None, seen: list | None):
        """A forward hook on block L that adds `add[r]` to row r's state at `pos[r]` and/or
        appends the states there (before the addition) to `seen`."""
        rows = torch.arange(len(pos), device=pos.device)

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if seen is not None:
                seen.append(hidden[rows, pos].float())
            if add is None:
                return None
            hidden = hidden.index_put((rows, pos), add.to(hidden.dtype), accumulate=True)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        blocks = transformer_blocks(self.model)[1]
        return blocks[self.block].register_forward_hook(hook)

    def _probe(self, rows: _Rows, name: str | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """On the model as it is now, fp32: the (n_facts, d_in) keys of layer `name` at the
        subject token, each the mean over its fact's rows (None without `name`), and the
        (n_facts, d) states of block L there in each fact's plain row. Runs `ROW_BATCH` rows at a
        time and no further than block L."""
        device = next(self.model.parameters()).device
        keys, states = [], []
        pending: dict[str, torch.Tensor] = {}

        def capture(module, args):
            pending["key"] = args[0]

        def stop(module, args, output):
            pending["state"] = output[0] if isinstance(output, tuple) else output
            raise _Stop

        blocks = transformer_blocks(self.model)[1]
        handles = [blocks[self.block].register_forward_hook(stop)]
        if name is not None:
            handles.append(self.modules[name].register_forward_pre_hook(capture))
        try:
            for start in range(0, len(rows.ids), ROW_BATCH):
                batch = self._batch(rows.ids[start : start + ROW_BATCH], None)
                pos = torch.tensor(rows.pos[start : start + ROW_BATCH]).to(device)
                at = torch.arange(len(pos), device=device)
                with contextlib.suppress(_Stop):
                    self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                states.append(pending["state"][at, pos].float())
                if name is not None:
                    keys.append(pending["key"][at, pos].float())
        finally:
            for handle in handles:
                handle.remove()
        plain = torch.cat(states)[torch.tensor(rows.plain).to(device)]
        if name is None:
            return None, plain
        facts = torch.tensor(rows.fact).to(device)
        n = len(rows.plain)
        total = torch.zeros(n, keys[0].shape[1], device=device).index_add_(
            0, facts, torch.cat(keys)
        )
        return total / torch.bincount(facts, minlength=n)[:, None], plain

    # -----------------------------------------------------------------------------------------
    # step 1: the target values

    def _values(self, rows: _Rows, h: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """(n_facts, d) fp32 value changes δ, optimised `VALUE_BATCH` facts at a time; and each
        chunk's final mean loss."""
        n = len(h)
        delta, losses = torch.zeros_like(h), []
        chunks = range(0, n, VALUE_BATCH)
        for c, start in enumerate(chunks, 1):
            chunk = slice(start, min(start + VALUE_BATCH, n))
            facts = list(range(chunk.start, chunk.stop))
            delta[chunk], loss = self._chunk_values(rows, facts, h[chunk])
            losses.append(loss)
            self._log(f"{self.method}: values {facts[-1] + 1}/{n}, loss {loss:.4f}")
            if self.on_epoch is not None:
                self.on_epoch({"epoch": c, "epochs": len(chunks), "loss": loss})
        return delta, losses

    def _chunk_values(
        self, rows: _Rows, facts: list[int], h: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """The value changes of `facts` (module doc, step 1) and their final mean loss."""
        s = self.settings
        local = {f: j for j, f in enumerate(facts)}
        mine = [r for r, f in enumerate(rows.fact) if f in local]
        kl_mine = [r for r, f in enumerate(rows.kl_fact) if f in local]
        batch = self._batch([rows.ids[r] for r in mine], [rows.n_prompt[r] for r in mine])
        device = batch["input_ids"].device
        pos = torch.tensor([rows.pos[r] for r in mine]).to(device)
        owner = torch.tensor([local[rows.fact[r]] for r in mine]).to(device)
        kl_batch = kl_pos = kl_owner = base_kl = None
        if kl_mine and s.kl_factor > 0:
            kl_batch = self._batch([rows.kl_ids[r] for r in kl_mine], None)
            kl_pos = torch.tensor([rows.kl_pos[r] for r in kl_mine]).to(device)
            kl_owner = torch.tensor([local[rows.kl_fact[r]] for r in kl_mine]).to(device)
        forward = _ValueForward(self, batch, pos)
        kl_forward = _ValueForward(self, kl_batch, kl_pos) if kl_batch is not None else None
        if kl_forward is not None:
            with torch.no_grad():
                base_kl = kl_forward.last_logp(None)
        delta = torch.zeros(len(facts), h.shape[1], device=device, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=s.value_lr)
        norm = h.to(device).norm(dim=-1)
        per_fact = torch.zeros(len(facts), device=device)
        for _ in range(s.value_steps):
            token_losses, row_of = forward.token_losses(delta[owner])
            row_loss = _mean_by(token_losses, row_of, len(mine))
            per_fact = _mean_by(row_loss, owner, len(facts))
            loss = per_fact.sum()
            if kl_forward is not None:
                logp = kl_forward.last_logp(delta[kl_owner])
                kl = torch.nn.functional.kl_div(logp, base_kl, log_target=True, reduction="none")
                loss = loss + s.kl_factor * kl.sum(-1).sum()
            loss = loss + WEIGHT_DECAY * (delta.norm(dim=-1) ** 2 / norm**2).sum()
            if float(per_fact.detach().max()) < VALUE_STOP:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # the clamp: ‖δ‖ ≤ value_clamp · ‖h‖
                limit = s.value_clamp * norm
                scale = (limit / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
                delta.mul_(scale[:, None])
        return delta.detach().float(), float(per_fact.detach().mean())


class _ValueForward:
    """The forward of one chunk's rows with block L's state changed at the subject's last token.
    Where the editor may (`cache_prefix`): the blocks after L on the tokens from the subject's
    last one on, against the cached keys and values of the tokens before it (positions before
    `pos` never see δ), with the head only where it is read (crispedit.prefix.SuffixForward).
    Else with the fast plan: from cached states entering block L+1, on whole rows
    (crispedit.prefix.FastForward). Else the whole model with a hook on block L."""

    def __init__(self, editor: MemitEditor, batch: dict[str, torch.Tensor], pos: torch.Tensor):
        self.editor, self.batch, self.pos = editor, batch, pos
        self.fast = editor.fast
        self.rows = list(range(len(pos)))
        self.states = self.suffix = None
        if editor.cache_prefix:
            self.suffix = SuffixForward(self.fast, batch, pos.tolist())
        elif self.fast is not None and self.fast.start is not None:
            self.states = self.fast.states_of([{k: v for k, v in batch.items() if k != "labels"}])

    def _changed(self, add: torch.Tensor) -> list[torch.Tensor]:
        """The cached states with `add[r]` at row r's subject token."""
        return [
            state.index_put((self.pos[r : r + 1],), add[r : r + 1].to(state.dtype), accumulate=True)
            for r, state in enumerate(self.states)
        ]

    def _run(self, add: torch.Tensor | None, read: Callable):
        if self.states is not None:
            states = self.states if add is None else self._changed(add)
            return read(self.batch, states, self.rows)
        handle = self.editor._block_hook(self.pos, add, None)
        try:
            return read(self.batch, None, None)
        finally:
            handle.remove()

    def token_losses(self, add: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each target token's loss and its row, the state changed by `add` (rows × d)."""
        if self.suffix is not None:
            return self.suffix.token_losses(add)
        if self.fast is not None:
            return self._run(add, self.fast.token_losses)
        labels = self.batch["labels"]

        def read(batch, states, rows):
            logits = self.editor.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            where = target_positions(labels)
            return target_token_losses_at(logits[:, :-1][where], labels[:, 1:][where], where)

        return self._run(add, read)

    def last_logp(self, add: torch.Tensor | None) -> torch.Tensor:
        """(rows, vocab) fp32 log-probabilities of the next token after each row's last token."""
        if self.suffix is not None:
            return self.suffix.last_logits(add).float().log_softmax(-1)
        if self.fast is not None:
            return self._run(add, self.fast.last_logits).float().log_softmax(-1)

        def read(batch, states, rows):
            logits = self.editor.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            last = batch["attention_mask"].sum(-1) - 1
            return logits[torch.arange(len(last), device=logits.device), last]

        return self._run(add, read).float().log_softmax(-1)


def _mean_by(values: torch.Tensor, group: torch.Tensor, n: int) -> torch.Tensor:
    """The mean of `values` per group index (0..n-1), differentiable."""
    total = torch.zeros(n, device=values.device, dtype=values.dtype).index_add(0, group, values)
    return total / torch.bincount(group, minlength=n).to(values.dtype)
