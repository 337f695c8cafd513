"""The projected editor: fine-tune the target layers on the facts, every gradient projected.

DESIGN §2.5: text = prompt + " " + target, loss = mean cross-entropy on the target tokens, Adam
(lr 5e-4, no weight decay) on the target layers only, each gradient projected onto the kept
(low-curvature) subspace before the step and each step's update after it, batches of 32 (facts
reshuffled each epoch by the seed), up to 100 epochs; a batch whose loss is already below 0.01 is
skipped and the loop stops once an epoch's mean loss is below 0.01. Facts with a subject also
carry subject anchors (crispedit.anchors): each step adds the KL between the base and the edited
model's next token on the fact's question asked about other subjects, so the edit stays with its
own subject.

    editor = CrispEditor(model, tokenizer, curvature, gamma=0.9)
    delta = editor.edit(facts)      # the model now holds the edit; delta.report has the metrics

Each step computes the same loss as a full forward, but cheaper where the model allows it
(`fast=True`, crispedit.prefix): the frozen blocks below the lowest edited one run once per edit,
and the vocabulary projection only at the target positions.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from contract.facts import Fact, facts_digest
from contract.settings import DEFAULTS, EditSettings
from contract.settings import PROJECT_CHOICES as PROJECT_CHOICES  # re-exported for the CLI
from contract.settings import STOP_CHOICES as STOP_CHOICES
from crispedit.anchors import anchor_prompts
from crispedit.corpus import pad_batches
from crispedit.curvature import Curvature
from crispedit.delta import Delta, add_to_weights, weight_delta
from crispedit.evaluate import last_token_logits, teacher_forced_accuracy
from crispedit.models import (
    get_layers,
    is_conv1d,
    model_fingerprint,
    parse_layers,
    trainable_only,
)
from crispedit.prefix import FastForward
from crispedit.projector import (
    build_projector,
    resolve_method,
    resolve_projector_dtype,
)
from crispedit.targets import (
    encode_prompt,
    resolve_chat_template,
    target_batches,
    target_positions,
    target_token_losses_at,
)

# The editor's defaults, each written once in contract.settings (with why it was chosen)
LR, BATCH_SIZE, EPOCHS, SEED = DEFAULTS.lr, DEFAULTS.batch_size, DEFAULTS.epochs, DEFAULTS.seed
LOSS_STOP, STOP = DEFAULTS.loss_stop, DEFAULTS.stop
PROJECT, PROJECTOR_DTYPE = DEFAULTS.project, DEFAULTS.projector_dtype


def fact_losses(token_losses: torch.Tensor, row_of: torch.Tensor, n: int) -> torch.Tensor:
    """Each of a batch's `n` facts' mean target-token loss (detached), from its tokens' losses
    and the row each token belongs to."""
    total = torch.bincount(row_of, weights=token_losses.detach(), minlength=n)
    return total / torch.bincount(row_of, minlength=n)


@dataclass
class Anchors:
    """An edit's anchor prompts: which belong to which fact, their token ids, their cached prefix
    states (the fast forward's) and the base model's next-token log-probabilities, a row each."""

    owned: list[list[int]]  # per fact, the indices of its anchor prompts
    ids: list[list[int]]
    states: list[torch.Tensor] | None = None
    base: torch.Tensor | None = None


class CrispEditor:
    """Applies fact edits to a resident model with a (possibly identity) gradient projector.

    The projectors are built once from `curvature` and kept, so a worker can call `edit` for job
    after job. `method` is `crispedit` (our default), `kfac`, `ekfac`, `nullspace` or `ft`; `ft`
    needs no curvature. `layers` defaults to the curvature's layers (or the model's default block).
    `on_epoch` is called after every epoch with `{epoch, epochs, loss}` (a worker's progress and
    cancellation hook: an exception it raises aborts the edit). `fast` (default) computes each
    step's loss from the lowest edited block up and the logits only at the target positions,
    where the architecture allows (crispedit.prefix); `fast=False` runs the full model, as does
    a model in training mode. Both give the same edit up to float rounding. `projector_dtype`
    is `float32` (default) or `model`: the dtype the projectors live and rotate in, on the
    model's device. `anchors` prompts per fact ask the fact's question about other subjects and
    keep the base model's answer distribution there (crispedit.anchors), weighted by
    `anchor_weight` against the facts' loss; 0 turns them off; questions get none unless
    `anchor_questions`. `loss_stop` is the loss below which a batch is skipped and the loop stops
    after an epoch; `stop` says whether a batch's mean loss is compared with it (`batch`) or each
    fact's own (`fact`, see STOP). `clip` winsorizes each factor's eigenvalues before the energy
    rule (crispedit.projector.winsorize: a rule robust to outlier eigenvalues). `settings`
    (`contract.settings.EditSettings`) gives every option at once, with the defaults and valid
    ranges written there; an option also passed as a keyword overrides it.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        curvature: Curvature | None = None,
        method: str | None = None,
        gamma: float | None = None,
        layers: list[str] | str | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        epochs: int | None = None,
        seed: int | None = None,
        progress: bool = True,
        on_epoch: Callable[[dict], None] | None = None,
        fast: bool = True,
        project: str | None = None,
        projector_dtype: str | None = None,
        anchors: int | None = None,
        anchor_weight: float | None = None,
        anchor_questions: bool | None = None,
        loss_stop: float | None = None,
        stop: str | None = None,
        clip: float | None = None,
        settings: EditSettings = DEFAULTS,
    ):
        # an option given as a keyword (not None) overrides `settings`; the result is validated
        settings = settings.override(
            method=method, gamma=gamma, lr=lr, batch_size=batch_size, epochs=epochs, seed=seed,
            project=project, projector_dtype=projector_dtype, anchors=anchors,
            anchor_weight=anchor_weight, anchor_questions=anchor_questions, loss_stop=loss_stop,
            stop=stop, clip=clip,
        )  # fmt: skip
        self.settings = settings
        self.model, self.tokenizer = model, tokenizer
        method, gamma, clip = settings.method, settings.gamma, settings.clip
        self.method_name, self.method = method, resolve_method(method)
        self.gamma, self.lr = gamma, settings.lr
        self.batch_size, self.epochs = settings.batch_size, settings.epochs
        self.clip = clip
        self.seed, self.progress, self.on_epoch = settings.seed, progress, on_epoch
        self.project = settings.project
        self.anchors, self.anchor_weight = settings.anchors, settings.anchor_weight
        self.anchor_questions = settings.anchor_questions
        self.loss_stop, self.stop = settings.loss_stop, settings.stop
        # every prompt the edit trains and measures on is wrapped alike (crispedit.targets)
        self.chat = resolve_chat_template(tokenizer, settings.chat_template)
        if layers is None and settings.layers is not None:
            layers = settings.layers if isinstance(settings.layers, str) else list(settings.layers)
        weight = next(model.parameters())
        self.projector_dtype = resolve_projector_dtype(settings.projector_dtype, weight.dtype)
        if self.method != "ft" and curvature is None:
            raise ValueError(f"method {method!r} needs curvature (only 'ft' edits without)")
        if layers is None and curvature is not None:
            layers = list(curvature.layers)
        self.layers = parse_layers(model, layers)
        self.modules = get_layers(model, self.layers)
        self.projectors = {}
        if self.method != "ft":
            missing = [n for n in self.layers if n not in curvature.layers]
            if missing:
                raise ValueError(f"the curvature has no factors for layer {missing[0]!r}")
            for name in self.layers:  # built on the model's device, bases kept by `curvature`
                self.projectors[name] = build_projector(
                    curvature.layers[name],
                    self.method,
                    gamma,
                    device=weight.device,
                    dtype=self.projector_dtype,
                    clip=clip,
                )
        self.fast = FastForward.plan(model, self.layers) if fast else None

    def _log(self, message: str) -> None:
        if self.progress:
            print(message, file=sys.stderr, flush=True)

    def _project_gradients(self) -> None:
        for name, P in self.projectors.items():
            module = self.modules[name]
            if module.weight.grad is None:
                continue
            # the (d_out, d_in) view of the gradient, as weight_matrix gives of the weight
            G = module.weight.grad.T if is_conv1d(module) else module.weight.grad
            G.copy_(P(G))

    @torch.no_grad()
    def _project_updates(self, before_step: dict[str, torch.Tensor]) -> None:
        for name, P in self.projectors.items():
            W = self.modules[name].weight
            step = W - before_step[name]
            if is_conv1d(self.modules[name]):
                W.copy_(before_step[name] + P(step.T).T)
            else:
                W.copy_(before_step[name] + P(step))

    def _token_losses(
        self, batch, fast: FastForward | None, prefix, rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's `target_token_losses_at`: by the fast forward when there is one, else the
        full one."""
        if fast is not None:
            return fast.token_losses(batch, prefix, rows)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        where = target_positions(batch["labels"])
        return target_token_losses_at(
            logits.logits[:, :-1][where], batch["labels"][:, 1:][where], where
        )

    def _last_logits(self, batch, fast: FastForward | None, prefix, rows: list[int]):
        """(batch, vocab) next-token logits after each row's last token."""
        if fast is not None:
            return fast.last_logits(batch, prefix, rows)
        return last_token_logits(self.model, batch)

    @torch.no_grad()
    def _anchor_targets(self, facts: list[Fact], fast: FastForward | None, device) -> Anchors:
        """The edit's anchor prompts (crispedit.anchors) and the base model's next-token
        log-probabilities after each, computed once before the first step."""
        per_fact = anchor_prompts(facts, self.anchors, self.seed, self.anchor_questions)
        owned, ids = [], []
        for prompts in per_fact:
            owned.append(list(range(len(ids), len(ids) + len(prompts))))
            ids += [encode_prompt(self.tokenizer, p, chat=self.chat) for p in prompts]
        if not ids:
            return Anchors(owned, ids)
        batches = list(pad_batches(ids, self.tokenizer.pad_token_id, self.batch_size))
        states = fast.states_of(batches) if fast else None
        base, start = [], 0
        for batch in batches:
            rows = list(range(start, start + len(batch["input_ids"])))
            start += len(rows)
            batch = {k: v.to(device) for k, v in batch.items()}
            base.append(self._last_logits(batch, fast, states, rows).float().log_softmax(-1))
        return Anchors(owned, ids, states, torch.cat(base))

    def _anchor_loss(
        self, facts_rows: list[int], anchors: Anchors, fast: FastForward | None, device
    ) -> torch.Tensor | None:
        """Mean KL(base ‖ edited) of the next token over the anchors of the batch's facts."""
        rows = [a for r in facts_rows for a in anchors.owned[r]]
        if not rows:
            return None
        ids = [anchors.ids[r] for r in rows]
        batch = next(pad_batches(ids, self.tokenizer.pad_token_id, len(rows)))
        batch = {k: v.to(device) for k, v in batch.items()}
        logp = self._last_logits(batch, fast, anchors.states, rows).float().log_softmax(-1)
        return torch.nn.functional.kl_div(
            logp, anchors.base[rows], log_target=True, reduction="batchmean"
        )

    def edit(self, facts: Sequence[Fact]) -> Delta:
        """Edit the model in place so it completes each fact's prompt with its target.

        Returns the weight delta (fp32, against the weights before this call) whose `report`
        holds efficacy before/after, the loss curve and timings. The model ends with exactly
        `W_before + delta` (the operation `apply_delta` performs), so the delta reproduces it.
        """
        facts = list(facts)
        if not facts:
            raise ValueError("no facts to edit")
        started = time.perf_counter()
        pairs = [(f.prompt, f.target) for f in facts]
        before = {n: m.weight.detach().clone() for n, m in self.modules.items()}
        base_fingerprint = model_fingerprint(self.model, self.layers)
        efficacy_before = teacher_forced_accuracy(self.model, self.tokenizer, pairs, chat=self.chat)

        device = next(self.model.parameters()).device
        order = torch.Generator().manual_seed(self.seed)  # facts are reshuffled every epoch
        params = [m.weight for m in self.modules.values()]
        losses = []
        # the dropout of a model in training mode cannot be cached: full forward then
        fast = self.fast if self.fast is not None and not self.model.training else None
        # per fact: the hidden states entering the lowest edited block (frozen, so fixed)
        prefix = (
            fast.prefix_states(self.tokenizer, pairs, self.batch_size, chat=self.chat)
            if fast
            else None
        )
        anchors = self._anchor_targets(facts, fast, device)
        with trainable_only(self.model, params):
            optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=0.0)
            for epoch in range(1, self.epochs + 1):
                batch_losses, anchor_kls, skipped, worst = [], [], 0, 0.0
                perm = torch.randperm(len(pairs), generator=order).tolist()
                shuffled = [pairs[i] for i in perm]
                batches = list(
                    target_batches(self.tokenizer, shuffled, self.batch_size, chat=self.chat)
                )
                for b, batch in enumerate(batches):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    rows = perm[b * self.batch_size : (b + 1) * self.batch_size]
                    token_losses, row_of = self._token_losses(batch, fast, prefix, rows)
                    loss = token_losses.mean()
                    batch_losses.append(loss.item())
                    if self.stop == "fact":
                        per_fact = fact_losses(token_losses, row_of, len(rows))
                        worst = max(worst, float(per_fact.max()))
                        open_ = per_fact >= self.loss_stop  # the facts not yet landed
                        if not open_.any():
                            skipped += 1
                            continue
                        loss = token_losses[open_[row_of]].mean()
                    elif batch_losses[-1] < self.loss_stop:
                        skipped += 1
                        continue
                    kl = self._anchor_loss(rows, anchors, fast, device) if self.anchors else None
                    if kl is not None:
                        anchor_kls.append(kl.item())
                        loss = loss + self.anchor_weight * kl
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self._project_gradients()
                    if self.project == "update":
                        before_step = {
                            n: m.weight.detach().clone() for n, m in self.modules.items()
                        }
                    optimizer.step()
                    if self.project == "update":
                        self._project_updates(before_step)
                losses.append(sum(batch_losses) / len(batch_losses))
                self._log(
                    f"epoch {epoch:2d}/{self.epochs}  loss {losses[-1]:.4f}  "
                    f"batches skipped {skipped}/{len(batches)}"
                    + (f"  anchor KL {sum(anchor_kls) / len(anchor_kls):.4f}" if anchor_kls else "")
                )
                if self.on_epoch is not None:  # progress reports; raising here aborts the edit
                    self.on_epoch({"epoch": epoch, "epochs": self.epochs, "loss": losses[-1]})
                if (worst if self.stop == "fact" else losses[-1]) < self.loss_stop:
                    break
            optimizer.zero_grad(set_to_none=True)

        tensors = weight_delta(self.model, before)
        with torch.no_grad():
            for name, module in self.modules.items():
                module.weight.copy_(before[name])
        add_to_weights(self.model, tensors)
        edit_seconds = time.perf_counter() - started
        efficacy = teacher_forced_accuracy(self.model, self.tokenizer, pairs, chat=self.chat)
        meta = {
            "base_fingerprint": base_fingerprint,
            "edited_fingerprint": model_fingerprint(self.model, self.layers),
            "model": getattr(self.model, "name_or_path", None),
            "layers": self.layers,
            "method": self.method_name,
            "projector": self.method,
            "gamma": self.gamma if self.method != "ft" else None,
            "n_edits": len(facts),
            "facts_digest": facts_digest(facts),
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "project": self.project,
            "anchors": self.anchors,
            "anchor_weight": self.anchor_weight,
            "anchor_questions": self.anchor_questions,
            "loss_stop": self.loss_stop,
            "stop": self.stop,
            "clip": self.clip,
            "chat_template": "on" if self.chat else "off",
        }
        report = {
            **meta,
            "efficacy": efficacy,
            "efficacy_before": efficacy_before,
            "epochs": len(losses),
            "loss_curve": [round(x, 6) for x in losses],
            "kept_fraction": {n: P.kept_fraction for n, P in self.projectors.items()},
            "delta_norm": {k: float(v.norm()) for k, v in tensors.items()},
            "time_s": {"edit": round(edit_seconds, 3)},
        }
        return Delta(tensors=tensors, meta=meta, report=report)
