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

Adam runs on fp32 master copies of the edited layers' weights, made at the start of each edit
on the model's device: every step casts the model's weight gradient to fp32, projects it, lets
Adam update the master, projects the step, and writes the master back into the model's weight in
its dtype. A bf16 model thus keeps the protection of an fp32 one (a bf16 Adam state and a bf16
step put a share of every update back into the blocked subspace), and the delta, masters minus the
weights before, is the projected edit itself. The masters and their Adam state are three fp32
copies of the edited layers only; a step works through the layers one at a time, and the edit
frees them all when it returns.

With `laplace` > 0 each step also descends the K-FAC Laplace penalty (crispedit.laplace):
laplace times the capability-loss rise ½·tr(ΔWᵀ B ΔW A) that the curvature predicts for the
masters' change so far, ΔW = master - weight before, its gradient added to the cast gradient
before projection. It needs the weights before on the device too (in the model's dtype). Every
edit with a curvature reports that prediction for its delta (`predicted_loss_increase`).

With `drift_budget` > 0 the edit keeps its predicted capability-loss rise under that budget by
choosing γ: it runs at the settings' γ, and while its delta's prediction exceeds the budget it
raises γ along γ_k = 1 - (1 - γ)/2^k (0.9, 0.95, 0.975, ...), at most `BUDGET_RAISES` times.
Each raise rebuilds the projectors at the new γ from the same curvature (sharing their rotation
bases), projects the change made so far onto the new, smaller kept subspace (a warm start: the
edit goes on from there rather than from the weights before), starts a fresh Adam and runs the
configured epochs again under the usual stopping rules. The first γ whose delta fits ends the
search; if none does, the edit ends at the last one and says so. The report's `gamma_trail`
lists every rung tried.

With `lr_schedule="cosine"` each epoch runs at its own learning rate (`scheduled_lr`): a short
linear warm-up to `lr`, then a cosine decay to a tenth of it at the last planned epoch (`epochs`);
an edit that converges sooner stops wherever the schedule has got to. The schedule goes with its
Adam: each of a drift budget's raises, which starts a fresh Adam and runs the configured epochs
again, runs it again from its warm-up (a fresh Adam's first steps are its largest there too), and
each edit of a stream, an edit call of its own, runs its own. The report's `lr_curve` gives each
epoch's learning rate beside its loss (`loss_curve`).

With `warm_start="lstsq"` the masters first take one closed-form step (crispedit.start): per
layer the least-squares move of its keys' outputs against the facts' loss gradient on the kept
subspace, at the length that lowers the edit's objective most; the epochs then run from there as
usual, and the report's `warm_start_step` gives the length, the objective before and after and
each layer's solve.

With `contexts` = k > 0 each fact is trained as k + 1 sequences: its prompt, and the same after
each of the model's first k context prefixes (crispedit.contexts, generated once per edit), the
loss the mean over all their target tokens as over a batch of that many facts. A batch and a
micro-batch still count facts (k + 1 sequences each); a fact's anchors, its loss under
`stop="fact"` (over all its copies) and the efficacy stay the fact's, on its bare prompt.

With `edit_site="subject"` the facts' sequences are trained with the change acting at one token
of each, its subject's last (the prompt's last without a subject), and the edited layers' outputs
before the edit everywhere else, as MEMIT writes a fact into the subject's last token: the change
must then carry the fact through the subject, from where any prompt about it may read it, rather
than through the sentence's own tokens. The anchors, the efficacy and the edited model itself
apply the change at every token.

Each step computes the same loss as a full forward, but cheaper where the model allows it
(`fast=True`, crispedit.prefix): the frozen blocks below the lowest edited one run once per edit,
and the vocabulary projection only at the target positions.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from contract.facts import Fact, facts_digest
from contract.settings import DEFAULTS, LR_SCHEDULES, EditSettings, SettingsError
from contract.settings import PROJECT_CHOICES as PROJECT_CHOICES  # re-exported for the CLI
from contract.settings import STOP_CHOICES as STOP_CHOICES
from crispedit.alphaedit import AlphaEditor
from crispedit.anchors import anchor_prompts, lowest_block, subject_states
from crispedit.contexts import context_prefixes
from crispedit.corpus import pad_batches
from crispedit.curvature import Curvature
from crispedit.delta import Delta, add_to_weights
from crispedit.evaluate import last_token_logits, teacher_forced_accuracy
from crispedit.laplace import LaplaceForm, layer_form
from crispedit.memit import MemitEditor
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
from crispedit.sequential import edit_set_factors
from crispedit.start import search_length, step_direction
from crispedit.targets import (
    encode_prompt,
    resolve_chat_template,
    subject_position,
    target_batches,
    target_positions,
    target_token_losses_at,
)

# The editor's defaults, each written once in contract.settings (with why it was chosen)
LR, BATCH_SIZE, EPOCHS, SEED = DEFAULTS.lr, DEFAULTS.batch_size, DEFAULTS.epochs, DEFAULTS.seed
LOSS_STOP, STOP, LR_SCHEDULE = DEFAULTS.loss_stop, DEFAULTS.stop, DEFAULTS.lr_schedule
PROJECT, PROJECTOR_DTYPE = DEFAULTS.project, DEFAULTS.projector_dtype
# lr_schedule "cosine" (per epoch, over the `epochs` planned; a converged edit stops sooner). The
# warm-up: Adam's first steps move every coordinate by about lr whatever its gradient (its second
# moment has seen one gradient), so a peak above the constant default would start with its
# largest steps; the first WARMUP_SHARE of the epochs (5 at 100, 2 at 50, 1 at 25, none under 20)
# climb to it linearly instead (Goyal et al. 2017; Liu et al. 2020 for Adam). The decay: a cosine
# from lr down to LR_FLOOR · lr at the last planned epoch (Loshchilov & Hutter 2017), so the late
# epochs, which only polish the landed facts toward loss_stop, take a tenth of the peak's steps
# and add little to the delta; 0.1 is the usual floor (Hoffmann et al. 2022)
WARMUP_SHARE = 0.05
LR_FLOOR = 0.1
# a drift budget's raises of γ at most: each halves the share of the curvature energy left
# unprotected (three take 0.9 to 0.9875) and may cost another edit's worth of epochs, so the
# search costs at most four edits; a budget still missed there is reported rather than chased
BUDGET_RAISES = 3


def raised_gamma(gamma: float, k: int) -> float:
    """The drift budget's k-th rung above `gamma`: 1 - (1 - γ)/2^k, the share of the curvature
    energy left unprotected halved k times."""
    return 1.0 - (1.0 - gamma) / 2**k


def scheduled_lr(lr: float, epoch: int, epochs: int, schedule: str) -> float:
    """The learning rate of epoch `epoch` (1..`epochs`, the planned epochs) under `schedule`:
    `lr` throughout for "constant"; for "cosine", W = ⌊WARMUP_SHARE · epochs⌋ warm-up epochs at
    lr · e/(W + 1), then lr · (f + (1 - f) · ½(1 + cos πt)), f = LR_FLOOR, t going from 0 at
    epoch W + 1 (the peak) to 1 at the last epoch (f · lr)."""
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}: one of {', '.join(LR_SCHEDULES)}")
    warmup = int(WARMUP_SHARE * epochs)
    if epoch <= warmup:
        return lr * epoch / (warmup + 1)
    t = (epoch - warmup - 1) / max(1, epochs - warmup - 1)
    return lr * (LR_FLOOR + (1.0 - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * t)))


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


@dataclass
class Sequences:
    """An edit's training sequences: per fact its prompt, then the same prompt after each context
    prefix (`contexts`), each with the fact's target; `of_fact[i]` lists fact i's sequences
    (its bare prompt first)."""

    pairs: list[tuple[str, str]]
    of_fact: list[list[int]]
    prefixes: list[str]

    @classmethod
    def of(cls, facts: Sequence[Fact], prefixes: Sequence[str]) -> Sequences:
        """Every fact's sequences under `prefixes` (each ending in ". ": `prefix + prompt`)."""
        pairs, of_fact = [], []
        for fact in facts:
            texts = [fact.prompt, *(prefix + fact.prompt for prefix in prefixes)]
            of_fact.append(list(range(len(pairs), len(pairs) + len(texts))))
            pairs += [(text, fact.target) for text in texts]
        return cls(pairs, of_fact, list(prefixes))

    def rows(self, facts: Sequence[int]) -> tuple[list[int], torch.Tensor]:
        """The sequences of `facts` (indices), theirs in turn, and each one's position in
        `facts`."""
        seqs = [s for r in facts for s in self.of_fact[r]]
        owner = [j for j, r in enumerate(facts) for _ in self.of_fact[r]]
        return seqs, torch.tensor(owner, dtype=torch.long)


@dataclass
class _Run:
    """The working state of one `edit` call: made by `_prepare`, its masters and Adam state
    dropped by `_release` before `edit` returns or raises."""

    facts: list[Fact]
    pairs: list[tuple[str, str]]  # per fact, its (prompt, target): what efficacy is measured on
    sequences: Sequences  # what the steps train on (the pairs, and more with `contexts`)
    device: torch.device
    fast: FastForward | None
    prefix: list[torch.Tensor] | None  # per sequence
    anchors: Anchors
    before: dict[str, torch.Tensor]  # per layer, its weight before the edit (model's dtype, host)
    # the same on the model's device, with a Laplace penalty (its ΔW is taken at every step) or
    # edit_site "subject" (the layers' outputs before the edit, off the sites)
    origin: dict[str, torch.Tensor]
    masters: dict[str, torch.Tensor]  # per layer, the fp32 master Adam updates (storage layout)
    optimizers: dict[str, torch.optim.Adam]
    order: torch.Generator
    base_fingerprint: str
    efficacy_before: float
    gamma: float | None  # the γ the edit projects at now (None for ft)
    projectors: dict  # per layer, the projector at that γ (the editor's own at the settings' γ)
    losses: list[float] = field(default_factory=list)  # each epoch's mean batch loss
    lrs: list[float] = field(default_factory=list)  # each epoch's learning rate (`lr_schedule`)
    penalty: dict[str, torch.Tensor] = field(default_factory=dict)  # per layer, q at its last step
    # with a drift budget: per γ tried, what its rung ended with; and whether the budget was met
    trail: list[dict] = field(default_factory=list)
    budget_met: bool | None = None
    warm_start: dict | None = None  # with warm_start "lstsq": what the closed-form step did
    # with edit_site "subject": per sequence, the token its edit acts at while it is trained
    sites: list[int] | None = None


@dataclass
class _Tally:
    """One epoch's counts: each batch's loss, each anchor KL, the batches skipped, and the
    largest fact loss seen (`stop="fact"`)."""

    batch_losses: list[float] = field(default_factory=list)
    anchor_kls: list[float] = field(default_factory=list)
    skipped: int = 0
    worst: float = 0.0


def _rows_of(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows start..stop of a right-padded batch, cut to their own longest row (as a batch of just
    them is padded)."""
    width = int(batch["attention_mask"][start:stop].sum(-1).max())
    return {k: v[start:stop, :width] for k, v in batch.items()}


def _layer_spec(
    layers: list[str] | str | None, settings: EditSettings, curvature: Curvature | None
) -> list[str] | str | None:
    """The edited layers: the caller's, else the settings', else the curvature's (else None: the
    model's default block)."""
    if layers is not None:
        return layers
    if settings.layers is not None:
        return settings.layers if isinstance(settings.layers, str) else list(settings.layers)
    return list(curvature.layers) if curvature is not None else None


class CrispEditor:
    """Applies fact edits to a resident model with a (possibly identity) gradient projector.

    How an edit runs is `settings` (contract.settings.EditSettings: the method, γ, epochs, lr,
    anchors, clip, ... each with its default, bounds and why it was chosen); an option passed as
    a keyword (`gamma=0.8`) overrides it, validated the same way (SettingsError naming it). The
    projectors are built once from `curvature` and kept, so a worker can call `edit` for job
    after job (a drift budget's raised γ lasts for its one edit); `ft` needs no curvature.
    `layers` defaults to the settings' layers, else the curvature's, else the model's default
    block. `on_epoch` is called after every epoch with
    `{epoch, epochs, loss}` (a worker's progress and cancellation hook: an exception it raises
    aborts the edit). `fast` (default) computes each step's loss from the lowest edited block up
    and the logits only at the target positions, where the architecture allows
    (crispedit.prefix); `fast=False` runs the full model, as does a model in training mode. Both
    give the same edit up to float rounding. A `projector_dtype` of `model` on a bf16 model
    rounds each projection to bf16, which lets a small share of every step into blocked
    directions: the default, float32, does not.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        curvature: Curvature | None = None,
        settings: EditSettings = DEFAULTS,
        *,
        layers: list[str] | str | None = None,
        progress: bool = True,
        on_epoch: Callable[[dict], None] | None = None,
        fast: bool = True,
        **options: Any,
    ):
        # an option given as a keyword (not None) overrides `settings`; the result is validated
        self.settings = settings.override(**options)
        self.model, self.tokenizer = model, tokenizer
        self.method = resolve_method(self.settings.method)
        self.progress, self.on_epoch = progress, on_epoch
        # every prompt the edit trains and measures on is wrapped alike (crispedit.targets)
        self.chat = resolve_chat_template(tokenizer, self.settings.chat_template)
        if self.method != "ft" and curvature is None:
            raise ValueError(
                f"method {self.settings.method!r} needs curvature (only 'ft' edits without)"
            )
        if self.settings.laplace and curvature is None:
            raise SettingsError(
                "laplace", "needs curvature: 'ft' edits without one only with laplace 0"
            )
        self.layers = parse_layers(model, _layer_spec(layers, self.settings, curvature))
        self.modules = get_layers(model, self.layers)
        weight = next(model.parameters())
        self.projector_dtype = resolve_projector_dtype(self.settings.projector_dtype, weight.dtype)
        # kept for a drift budget's raises of γ (its eigenbases are kept with it, on the host)
        self.curvature = curvature
        self.projectors = self._build_projectors(curvature, weight.device, self.settings.gamma)
        self.laplace_forms = self._build_laplace_forms(curvature, weight.device)
        self.fast = FastForward.plan(model, self.layers) if fast else None

    def _build_projectors(
        self,
        curvature: Curvature | None,
        device: torch.device,
        gamma: float,
        share: dict | None = None,
    ) -> dict:
        """One projector per edited layer at `gamma` (none for `ft`), on the model's device; the
        bases they rotate in are computed once per curvature (`LayerCurvature.eigen`, kept on the
        host), so a worker's job copies them rather than decomposing again. `share`, projectors
        of the same curvature at another γ, lends them its bases (a drift budget's raise)."""
        if self.method == "ft":
            return {}
        missing = [n for n in self.layers if n not in curvature.layers]
        if missing:
            raise ValueError(f"the curvature has no factors for layer {missing[0]!r}")
        return {
            name: build_projector(
                curvature.layers[name],
                self.method,
                gamma,
                device=device,
                dtype=self.projector_dtype,
                clip=self.settings.clip,
                bases=None if share is None else (share[name].U_A, share[name].U_B),
            )
            for name in self.layers
        }

    def _build_laplace_forms(
        self, curvature: Curvature | None, device: torch.device
    ) -> dict[str, LaplaceForm]:
        """One Laplace form per edited layer (crispedit.laplace; none without a curvature), of
        the same curvature as the projectors: a stream's, in a stream. They share the
        projectors' bases on the device when those are fp32; bf16 ones (`projector_dtype`
        "model") only with `laplace` 0, where the forms serve the report alone, which then reads
        them cast to fp32 (the penalty gets fp32 bases of its own). With `laplace` 0 they keep
        whatever else they need on the host (EK-FAC's eigenvalue matrices included)."""
        if curvature is None:
            return {}
        missing = [n for n in self.layers if n not in curvature.layers]
        if missing:
            raise ValueError(f"the curvature has no factors for layer {missing[0]!r}")
        place = device if self.settings.laplace else torch.device("cpu")
        kind = "ekfac" if self.method == "ekfac" else "kfac"
        forms = {}
        for name in self.layers:
            P = self.projectors.get(name)
            shared = P is not None and P.U_B is not None
            shared = shared and (P.U_A.dtype == torch.float32 or not self.settings.laplace)
            bases = (P.U_A, P.U_B) if shared else None
            forms[name] = layer_form(curvature.layers[name], kind, device, place, bases)
            curvature.layers[name].to_host()  # as build_projector leaves it
        return forms

    def _log(self, message: str) -> None:
        if self.progress:
            print(message, file=sys.stderr, flush=True)

    def _project(
        self, name: str, tensor: torch.Tensor, projectors: dict | None = None
    ) -> torch.Tensor:
        """`tensor` (a gradient or step of layer `name`, in its weight's storage layout) projected
        onto the kept subspace of `projectors` (default: the editor's, at the settings' γ);
        unchanged under `ft`, which has no projectors."""
        P = (self.projectors if projectors is None else projectors).get(name)
        if P is None:
            return tensor
        # the projector works on the (d_out, d_in) view, as weight_matrix gives of the weight
        return self._oriented(name, P(self._oriented(name, tensor)))

    def _oriented(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor of layer `name` in its weight's storage layout as the (d_out, d_in) view, or
        back (GPT-2's Conv1D stores (d_in, d_out): a transpose either way)."""
        return tensor.T if is_conv1d(self.modules[name]) else tensor

    def _laplace_gradient(self, run: _Run, name: str) -> torch.Tensor:
        """∇q of layer `name` at its master (ΔW = master - weight before the edit), in the
        weight's storage layout; q itself is kept for the epoch's log."""
        delta = run.masters[name] - run.origin[name].float()
        value, gradient = self.laplace_forms[name](self._oriented(name, delta))
        run.penalty[name] = value
        return self._oriented(name, gradient)

    def predicted_loss_increase(self, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per edited layer, q of its delta in `tensors` (state-dict keyed, storage layout, any
        device): the rise of the capability loss, in nats per token, that the curvature this
        editor projects with predicts (crispedit.laplace); empty without a curvature."""
        return {
            name: float(form(self._oriented(name, tensors[f"{name}.weight"]), gradient=False)[0])
            for name, form in self.laplace_forms.items()
        }

    def _token_losses(self, run: _Run, batch, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The `target_token_losses_at` of `batch`, the sequences `rows` of the edit: by the fast
        forward when there is one, else the full one; the change acting at their sites only
        under edit_site "subject" (`_sites_only`)."""
        with self._sites_only(run, rows, batch["input_ids"].shape):
            if run.fast is not None:
                return run.fast.token_losses(batch, run.prefix, rows)
            logits = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        where = target_positions(batch["labels"])
        return target_token_losses_at(logits[:, :-1][where], batch["labels"][:, 1:][where], where)

    @contextmanager
    def _sites_only(self, run: _Run, rows: list[int], shape: torch.Size) -> Iterator[None]:
        """Inside, with edit_site "subject": every edited layer gives its output under its
        weights before the edit (`run.origin`, a constant: the gradient still reaches the
        layer's input, and through it the layers below) at each position of the (rows, tokens)
        batch but row b's site `run.sites[rows[b]]`, where its output is the edited one. The
        loss then reaches the change through the sites alone; no difference of two outputs is
        taken, so a bf16 gradient is not the small remainder of two large ones. Elsewhere a
        no-op."""
        if run.sites is None:
            yield
            return
        site = torch.zeros(shape, dtype=torch.bool)
        site[torch.arange(len(rows)), torch.tensor([run.sites[s] for s in rows])] = True
        site = site.to(run.device)[..., None]

        def hook_for(name: str):
            before = self._oriented(name, run.origin[name])  # (d_out, d_in), as F.linear takes

            def hook(module, args, output):
                base = nn.functional.linear(args[0], before, module.bias)
                return torch.where(site, output, base)

            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in self.modules.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _last_logits(self, batch, fast: FastForward | None, prefix, rows: list[int]):
        """(batch, vocab) next-token logits after each row's last token."""
        if fast is not None:
            return fast.last_logits(batch, prefix, rows)
        return last_token_logits(self.model, batch)

    @torch.no_grad()
    def _anchor_targets(self, facts: list[Fact], fast: FastForward | None, device) -> Anchors:
        """The edit's anchor prompts (crispedit.anchors; with `anchor_choice` "similar", their
        subjects those nearest the facts' by the base model's states entering the lowest edited
        block) and the base model's next-token log-probabilities after each, computed once
        before the first step."""
        block = lowest_block(self.model, self.layers)
        per_fact = anchor_prompts(
            facts,
            self.settings.anchors,
            self.settings.seed,
            self.settings.anchor_questions,
            self.settings.anchor_choice,
            # anchor_choice "similar": subjects compared as the lowest edited block reads them
            lambda subjects: subject_states(self.model, self.tokenizer, subjects, block),
        )
        owned, ids = [], []
        for prompts in per_fact:
            owned.append(list(range(len(ids), len(ids) + len(prompts))))
            ids += [encode_prompt(self.tokenizer, p, chat=self.chat) for p in prompts]
        if not ids:
            return Anchors(owned, ids)
        batches = list(pad_batches(ids, self.tokenizer.pad_token_id, self.settings.batch_size))
        states = fast.states_of(batches) if fast else None
        base, start = [], 0
        for batch in batches:
            rows = list(range(start, start + len(batch["input_ids"])))
            start += len(rows)
            batch = {k: v.to(device) for k, v in batch.items()}
            base.append(self._last_logits(batch, fast, states, rows).float().log_softmax(-1))
        return Anchors(owned, ids, states, torch.cat(base))

    def _anchor_loss(
        self,
        facts_rows: list[int],
        anchors: Anchors,
        fast: FastForward | None,
        device,
        reduction: str = "batchmean",
    ) -> torch.Tensor | None:
        """Mean KL(base ‖ edited) of the next token over the anchors of the batch's facts (their
        sum with `reduction="sum"`)."""
        rows = [a for r in facts_rows for a in anchors.owned[r]]
        if not rows:
            return None
        ids = [anchors.ids[r] for r in rows]
        batch = next(pad_batches(ids, self.tokenizer.pad_token_id, len(rows)))
        batch = {k: v.to(device) for k, v in batch.items()}
        logp = self._last_logits(batch, fast, anchors.states, rows).float().log_softmax(-1)
        return torch.nn.functional.kl_div(
            logp, anchors.base[rows], log_target=True, reduction=reduction
        )

    def edit(self, facts: Sequence[Fact]) -> Delta:
        """Edit the model in place so it completes each fact's prompt with its target.

        Returns the weight delta (fp32, against the weights before this call) whose `report`
        holds efficacy before/after, the loss curve and timings. The delta is the difference of
        the fp32 masters (see the module docstring), so it is the projected edit itself whatever
        the model's dtype. The model ends with `W_before + delta` computed as `apply_delta` does
        (in fp32, cast to the weight's dtype): exactly that for an fp32 model, that rounded once
        to bf16 for a bf16 one, and applying the delta to a copy of the base reproduces it bitwise.
        Refuses an empty list of facts. An exception (an `on_epoch` that aborts) leaves the
        weights of the last step in the model. With a drift budget the report also gives the γ
        the edit ended at (`gamma`), `drift_budget_met` and every rung tried (`gamma_trail`); the
        epochs, `on_epoch` and the `lr_schedule` included, count again from 1 at each rung.
        """
        facts = list(facts)
        if not facts:
            raise ValueError("no facts to edit")
        started = time.perf_counter()
        run = self._prepare(facts)
        try:
            with trainable_only(self.model, [m.weight for m in self.modules.values()]):
                if self.settings.warm_start == "lstsq":
                    self._closed_form_start(run)
                if self.settings.drift_budget:
                    self._edit_within_budget(run)
                else:
                    self._train(run)
            tensors = self._delta(run)
        finally:
            self._release(run)
        return self._finish(run, tensors, time.perf_counter() - started)

    def _closed_form_start(self, run: _Run) -> None:
        """Move the masters by the closed-form step of crispedit.start before the first epoch:
        per layer the direction D from the facts' loss gradient (the anchors' KL has none at
        the base weights), the layer's inputs over the facts' texts and its capability factor A,
        then the step length α searched on the edit's objective (`_objective`); `run.warm_start`
        keeps the figures."""
        started = time.perf_counter()
        keys = edit_set_factors(
            self.model, self.tokenizer, self.layers, run.facts, chat=self.chat
        ).a
        # the gradient of the objective, the mean over batches of each one's loss (micro-batched
        # as a step is); a batch already below loss_stop adds none
        batches, tally = self._fact_batches(run), _Tally()
        for rows in batches:
            self._backward(run, self._batch(run, rows), rows, tally)
        directions, solves = {}, {}
        with torch.no_grad():
            for name, module in self.modules.items():
                if module.weight.grad is None:
                    continue  # nothing to move (every batch has landed): no direction
                G = self._oriented(name, module.weight.grad).float() / len(batches)
                module.weight.grad = None
                D, solves[name] = step_direction(
                    G, keys.pop(name), run.projectors.get(name), self._capability_A(name)
                )
                directions[name] = self._oriented(name, D)
                del G, D

            def loss_at(alpha: float) -> float:
                for name in directions:
                    self.modules[name].weight.copy_(run.masters[name] + alpha * directions[name])
                return self._objective(run)

            # every batch landed already: no direction, and no length worth the forwards
            unmoved = {"alpha": 0.0, "loss_before": None, "loss_after": None, "tried": []}
            search = search_length(loss_at) if directions else unmoved
            for name in directions:
                run.masters[name].add_(directions[name], alpha=search["alpha"])
                self.modules[name].weight.copy_(run.masters[name])
        seconds = round(time.perf_counter() - started, 3)
        run.warm_start = {**search, "solves": solves, "seconds": seconds}
        if directions:
            self._log(
                f"warm start: step length {search['alpha']:g}, loss {search['loss_before']:.4f} "
                f"-> {search['loss_after']:.4f} ({len(search['tried'])} lengths tried, "
                f"{seconds:.1f} s)"
            )

    def _capability_A(self, name: str) -> torch.Tensor | None:
        """Layer `name`'s capability factor A (a stream's, in a stream, rebuilt from the
        eigenbasis it keeps instead), or None without a curvature (`ft`)."""
        if self.curvature is None:
            return None
        layer = self.curvature.layers[name]
        if layer.A is not None:
            return layer.A
        s, U = layer.eigen("A", "cpu")
        return (U * s) @ U.T

    def _fact_batches(self, run: _Run) -> list[list[int]]:
        """The facts, in order, in batches of `batch_size`."""
        size = self.settings.batch_size
        return [
            list(range(i, min(i + size, len(run.facts)))) for i in range(0, len(run.facts), size)
        ]

    @torch.no_grad()
    def _objective(self, run: _Run) -> float:
        """What the steps descend, over all the facts at the weights the model holds: the mean
        over batches of the facts' target-token loss plus the weighted anchor KL."""
        total, batches = 0.0, self._fact_batches(run)
        for rows in batches:
            seqs, _ = run.sequences.rows(rows)
            tokens, _ = self._token_losses(run, self._batch(run, rows), seqs)
            loss = tokens.mean()
            if self.settings.anchors:
                kl = self._anchor_loss(rows, run.anchors, run.fast, run.device)
                if kl is not None:
                    loss = loss + self.settings.anchor_weight * kl
            total += float(loss)
        return total / len(batches)

    def _train(self, run: _Run) -> None:
        """Epochs until the edit converges (`loss_stop`) or `epochs` have run."""
        for epoch in range(1, self.settings.epochs + 1):
            if self._epoch(run, epoch):
                break

    def _edit_within_budget(self, run: _Run) -> None:
        """Train at the settings' γ, then raise γ (`_raise_gamma`) until the delta's predicted
        capability-loss rise is within `drift_budget`, at most `BUDGET_RAISES` times; each rung
        joins `run.trail` with its γ, prediction, efficacy (on the model as the rung left it),
        epochs and seconds, and `run.budget_met` says whether the last one fits."""
        budget = self.settings.drift_budget
        for raises in range(BUDGET_RAISES + 1):
            rung_started, first_epoch = time.perf_counter(), len(run.losses)
            if raises:
                self._raise_gamma(run, raised_gamma(self.settings.gamma, raises))
            self._train(run)
            rise = sum(self.predicted_loss_increase(self._delta(run)).values())
            efficacy = teacher_forced_accuracy(
                self.model, self.tokenizer, run.pairs, chat=self.chat
            )
            run.trail.append({
                "gamma": run.gamma,
                "predicted_loss_increase": rise,
                "efficacy": efficacy,
                "epochs": len(run.losses) - first_epoch,
                "seconds": round(time.perf_counter() - rung_started, 3),
            })  # fmt: skip
            run.budget_met = rise <= budget
            self._log(
                f"gamma {run.gamma:.4g}  predicted capability loss {rise:.2e} "
                f"{'within' if run.budget_met else 'over'} the budget {budget:.2e}  "
                f"efficacy {efficacy:.3f}"
            )
            if run.budget_met:
                return
        self._log(
            f"no gamma up to {run.gamma:.4g} keeps the predicted capability loss within "
            f"{budget:.2e}: the edit ends at gamma {run.gamma:.4g}, over its budget"
        )

    @torch.no_grad()
    def _raise_gamma(self, run: _Run, gamma: float) -> None:
        """Go on editing at `gamma`: projectors rebuilt at it from the same curvature (no new
        curvature, the rotation bases shared), the change so far projected onto their kept
        subspace (masters = weights before + P(ΔW), written into the model), and a fresh Adam."""
        self._log(f"raising gamma from {run.gamma:.4g} to {gamma:.4g}")
        run.projectors = self._build_projectors(
            self.curvature, run.device, gamma, share=run.projectors
        )
        run.gamma = gamma
        for name, module in self.modules.items():
            master, before = run.masters[name], run.before[name].to(run.device, torch.float32)
            master.copy_(before + self._project(name, master - before, run.projectors))
            module.weight.copy_(master)
        # Adam starts over, as each chunk of a stream does (crispedit.sequential): its moments
        # average gradients projected onto the old kept subspace, part of which the new γ blocks.
        # Under project="gradient" (steps not projected) its first moment would carry those
        # directions into the new steps until it decayed; under either, its second moment holds
        # the scale of gradients the new projector no longer lets through. Fresh, the rest of the
        # edit is an edit of its own from the warm start, its first steps about lr per weight
        # (under lr_schedule, the rung's epochs count from 1 again: its warm-up tempers them).
        run.optimizers = self._optimizers(run.masters)

    def _prepare(self, facts: list[Fact]) -> _Run:
        """Everything an edit computes once: the weights before it, the base model's metrics,
        the cached prefix states and anchor targets, the fp32 masters and their optimizers."""
        pairs = [(f.prompt, f.target) for f in facts]
        # on the host: needed only to compute the delta and restore the weights at the end
        before = {n: m.weight.detach().to("cpu", copy=True) for n, m in self.modules.items()}
        base_fingerprint = model_fingerprint(self.model, self.layers)
        efficacy_before = teacher_forced_accuracy(self.model, self.tokenizer, pairs, chat=self.chat)
        device = next(self.model.parameters()).device
        # the dropout of a model in training mode cannot be cached: full forward then
        fast = self.fast if self.fast is not None and not self.model.training else None
        # on the weights before the edit, once: every epoch trains under the same prefixes
        prefixes = context_prefixes(self.model, self.tokenizer, self.settings.contexts)
        sequences = Sequences.of(facts, prefixes)
        # per sequence: the hidden states entering the lowest edited block (frozen, so fixed)
        prefix = (
            fast.prefix_states(
                self.tokenizer, sequences.pairs, self.settings.batch_size, chat=self.chat
            )
            if fast
            else None
        )
        anchors = self._anchor_targets(facts, fast, device)
        masters = {
            n: m.weight.detach().to(torch.float32, copy=True) for n, m in self.modules.items()
        }
        subject_site = self.settings.edit_site == "subject"
        # exactly the masters' start (fp32 holds every bf16 value), in the model's smaller dtype
        origin = (
            {n: m.weight.detach().clone() for n, m in self.modules.items()}
            if self.settings.laplace or subject_site
            else {}
        )
        # a sequence's prompt is its fact's after a context prefix: the subject within it
        sites = (
            [
                subject_position(
                    self.tokenizer, sequences.pairs[s][0], fact.subject, chat=self.chat
                )[1]
                for fact, seqs in zip(facts, sequences.of_fact, strict=True)
                for s in seqs
            ]
            if subject_site
            else None
        )
        for module in self.modules.values():
            module.weight.grad = None  # a gradient left from before would add to the first one
        return _Run(
            facts=facts,
            pairs=pairs,
            sequences=sequences,
            device=device,
            fast=fast,
            prefix=prefix,
            anchors=anchors,
            before=before,
            origin=origin,
            masters=masters,
            optimizers=self._optimizers(masters),
            # facts are reshuffled every epoch
            order=torch.Generator().manual_seed(self.settings.seed),
            base_fingerprint=base_fingerprint,
            efficacy_before=efficacy_before,
            gamma=self.settings.gamma if self.method != "ft" else None,
            projectors=self.projectors,
            sites=sites,
        )

    def _optimizers(self, masters: dict[str, torch.Tensor]) -> dict[str, torch.optim.Adam]:
        """A fresh Adam per layer's master: a step then holds one layer's temporaries at a
        time."""
        return {
            n: torch.optim.Adam([w], lr=self.settings.lr, weight_decay=0.0)
            for n, w in masters.items()
        }

    def _epoch(self, run: _Run, epoch: int) -> bool:
        """One pass over the reshuffled facts, a step per batch that has not landed yet; logs
        and reports the epoch, and returns whether the edit has converged (`loss_stop`)."""
        lr = scheduled_lr(self.settings.lr, epoch, self.settings.epochs, self.settings.lr_schedule)
        self._set_lr(run, lr)
        perm = torch.randperm(len(run.pairs), generator=run.order).tolist()
        size = self.settings.batch_size
        batches = [perm[i : i + size] for i in range(0, len(perm), size)]
        tally = _Tally()
        for rows in batches:
            batch = self._batch(run, rows)
            if not self._backward(run, batch, rows, tally):
                tally.skipped += 1
                continue
            self._step(run)
        run.losses.append(sum(tally.batch_losses) / len(tally.batch_losses))
        kls = tally.anchor_kls
        q = float(sum(run.penalty.values())) if run.penalty else None
        self._log(
            f"epoch {epoch:2d}/{self.settings.epochs}  loss {run.losses[-1]:.4f}  "
            f"batches skipped {tally.skipped}/{len(batches)}"
            + (f"  anchor KL {sum(kls) / len(kls):.4f}" if kls else "")
            + (f"  predicted capability loss {q:.2e}" if q is not None else "")
            + (f"  lr {lr:.2e}" if self.settings.lr_schedule != "constant" else "")
        )
        if self.on_epoch is not None:  # progress reports; raising here aborts the edit
            self.on_epoch({"epoch": epoch, "epochs": self.settings.epochs, "loss": run.losses[-1]})
        return (
            tally.worst if self.settings.stop == "fact" else run.losses[-1]
        ) < self.settings.loss_stop

    @staticmethod
    def _set_lr(run: _Run, lr: float) -> None:
        """Every layer's Adam at `lr` for the coming epoch, which `run.lrs` records. Under
        "constant" that is the lr each Adam was made with: its steps are the same as ever."""
        for optimizer in run.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr
        run.lrs.append(lr)

    def _batch(self, run: _Run, rows: list[int]) -> dict[str, torch.Tensor]:
        """The right-padded batch of the sequences of facts `rows`, in their order
        (`Sequences.rows`), on the model's device."""
        seqs, _ = run.sequences.rows(rows)
        pairs = [run.sequences.pairs[s] for s in seqs]
        batch = next(target_batches(self.tokenizer, pairs, len(pairs), chat=self.chat))
        return {k: v.to(run.device) for k, v in batch.items()}

    def _backward(self, run: _Run, batch: dict, rows: list[int], tally: _Tally) -> bool:
        """Put the batch's loss gradient on the edited weights; False when the batch has landed
        and is skipped. With `micro_batch`, in slices of that many facts (`_micro_backward`)."""
        micro = self.settings.micro_batch
        if micro and micro < len(rows):
            return self._micro_backward(run, batch, rows, tally, micro)
        loss = self._batch_loss(run, batch, rows, tally)
        if loss is None:
            return False
        loss.backward()
        return True

    def _micro_backward(
        self, run: _Run, batch: dict, rows: list[int], tally: _Tally, micro: int
    ) -> bool:
        """`_backward` a slice of `micro` facts (all their sequences) at a time, so that one
        slice's activations are held at once: a no-grad pass finds the batch's loss (skip?) and
        its token and anchor counts, then each slice backpropagates its share of the same loss,
        so the gradient is the whole batch's up to float rounding."""
        seqs, owner = run.sequences.rows(rows)
        owner = owner.to(run.device)
        first = [0, *itertools.accumulate(len(run.sequences.of_fact[r]) for r in rows)]
        slices = [range(i, min(i + micro, len(rows))) for i in range(0, len(rows), micro)]
        spans = [range(first[r.start], first[r.stop]) for r in slices]  # their batch rows
        part = lambda s: _rows_of(batch, s.start, s.stop)  # noqa: E731
        with torch.no_grad():
            losses = [self._token_losses(run, part(s), seqs[s.start : s.stop]) for s in spans]
        token_losses = torch.cat([t for t, _ in losses])
        row_of = torch.cat([o + s.start for (_, o), s in zip(losses, spans, strict=True)])
        fact_of = owner[row_of]
        tally.batch_losses.append(token_losses.mean().item())
        landed = torch.zeros(len(rows), dtype=torch.bool, device=token_losses.device)
        if self.settings.stop == "fact":
            per_fact = fact_losses(token_losses, fact_of, len(rows))
            tally.worst = max(tally.worst, float(per_fact.max()))
            landed = per_fact < self.settings.loss_stop
            if landed.all():
                return False
        elif tally.batch_losses[-1] < self.settings.loss_stop:
            return False
        n_tokens = int((~landed[fact_of]).sum())
        n_anchors = sum(len(run.anchors.owned[r]) for r in rows) if self.settings.anchors else 0
        kl_total = 0.0
        for r, s in zip(slices, spans, strict=True):
            sub_rows = rows[r.start : r.stop]
            tokens, of = self._token_losses(run, part(s), seqs[s.start : s.stop])
            loss = tokens[~landed[owner[of + s.start]]].sum() / n_tokens
            if n_anchors:
                kl = self._anchor_loss(sub_rows, run.anchors, run.fast, run.device, "sum")
                if kl is not None:
                    kl_total += kl.item()
                    loss = loss + self.settings.anchor_weight * kl / n_anchors
            loss.backward()
        if n_anchors:
            tally.anchor_kls.append(kl_total / n_anchors)
        return True

    def _batch_loss(
        self, run: _Run, batch: dict, rows: list[int], tally: _Tally
    ) -> torch.Tensor | None:
        """The batch's loss to descend: its facts' target-token loss over all their sequences
        (only the facts not yet below `loss_stop` under `stop="fact"`) plus the weighted anchor
        KL; None when the batch has already landed and is skipped."""
        seqs, owner = run.sequences.rows(rows)
        token_losses, row_of = self._token_losses(run, batch, seqs)
        fact_of = owner.to(row_of.device)[row_of]  # each target token's fact, 0..len(rows)
        loss = token_losses.mean()
        tally.batch_losses.append(loss.item())
        if self.settings.stop == "fact":
            per_fact = fact_losses(token_losses, fact_of, len(rows))
            tally.worst = max(tally.worst, float(per_fact.max()))
            open_ = per_fact >= self.settings.loss_stop  # the facts not yet landed
            if not open_.any():
                return None
            loss = token_losses[open_[fact_of]].mean()
        elif tally.batch_losses[-1] < self.settings.loss_stop:
            return None
        kl = (
            self._anchor_loss(rows, run.anchors, run.fast, run.device)
            if self.settings.anchors
            else None
        )
        if kl is not None:
            tally.anchor_kls.append(kl.item())
            loss = loss + self.settings.anchor_weight * kl
        return loss

    @torch.no_grad()
    def _step(self, run: _Run) -> None:
        """One optimizer step, a layer at a time: the model's gradient cast to fp32 and
        projected, Adam on the fp32 master, the step projected (`project="update"`), and the
        master written back into the model's weight in its dtype."""
        for name, module in self.modules.items():
            grad = module.weight.grad
            if grad is None:  # the loss does not reach this layer: Adam would skip it too
                continue
            module.weight.grad = None
            grad = grad.float()  # the model's-dtype gradient is freed here, before the rotation
            if self.settings.laplace:  # the penalty's gradient joins the loss's, then projected
                grad.add_(self._laplace_gradient(run, name), alpha=self.settings.laplace)
            master = run.masters[name]
            master.grad = self._project(name, grad, run.projectors)
            del grad
            before_step = master.clone() if self.settings.project == "update" else None
            run.optimizers[name].step()
            master.grad = None
            if before_step is not None:
                step = self._project(name, master - before_step, run.projectors)
                master.copy_(before_step + step)
            module.weight.copy_(master)

    def _delta(self, run: _Run) -> dict[str, torch.Tensor]:
        """The edit as the state-dict keyed fp32 `masters - before`, on the CPU."""
        return {
            f"{name}.weight": run.masters[name].cpu() - run.before[name].float().cpu()
            for name in self.modules
        }

    def _release(self, run: _Run) -> None:
        """Drop the masters, the Adam state and any gradient, so that an edit that ends, or
        aborts, leaves no copy of the edited layers behind (a traceback keeps `run` alive)."""
        run.masters.clear()
        run.optimizers.clear()
        run.origin.clear()
        for module in self.modules.values():
            module.weight.grad = None

    def _finish(self, run: _Run, tensors: dict[str, torch.Tensor], edit_seconds: float) -> Delta:
        """Set the model to `before + delta` the way `apply_delta` does, measure the edited
        model, and wrap the delta with its provenance (`meta`) and metrics (`report`)."""
        with torch.no_grad():
            for name, module in self.modules.items():
                module.weight.copy_(run.before[name])
        add_to_weights(self.model, tensors)
        efficacy = teacher_forced_accuracy(self.model, self.tokenizer, run.pairs, chat=self.chat)
        predicted = self.predicted_loss_increase(tensors)
        meta = {
            "base_fingerprint": run.base_fingerprint,
            "edited_fingerprint": model_fingerprint(self.model, self.layers),
            "model": getattr(self.model, "name_or_path", None),
            "layers": self.layers,
            "method": self.settings.method,
            "projector": self.method,
            "gamma": run.gamma,  # the one the edit ended at: a drift budget may have raised it
            "drift_budget": self.settings.drift_budget,
            "n_edits": len(run.facts),
            "facts_digest": facts_digest(run.facts),
            "lr": self.settings.lr,
            "lr_schedule": self.settings.lr_schedule,
            "batch_size": self.settings.batch_size,
            "seed": self.settings.seed,
            "project": self.settings.project,
            "anchors": self.settings.anchors,
            "anchor_weight": self.settings.anchor_weight,
            "anchor_questions": self.settings.anchor_questions,
            "anchor_choice": self.settings.anchor_choice,
            "loss_stop": self.settings.loss_stop,
            "stop": self.settings.stop,
            "clip": self.settings.clip,
            "laplace": self.settings.laplace,
            "contexts": self.settings.contexts,
            "warm_start": self.settings.warm_start,
            "edit_site": self.settings.edit_site,
            "chat_template": "on" if self.chat else "off",
        }
        report = {
            **meta,
            "efficacy": efficacy,
            "efficacy_before": run.efficacy_before,
            "context_prefixes": run.sequences.prefixes,
            "epochs": len(run.losses),
            "loss_curve": [round(x, 6) for x in run.losses],
            "lr_curve": run.lrs,  # each epoch's learning rate, beside its loss
            "kept_fraction": {n: P.kept_fraction for n, P in run.projectors.items()},
            "delta_norm": {k: float(v.norm()) for k, v in tensors.items()},
            # ½·vec(ΔW)ᵀ(B⊗A)vec(ΔW) summed over the layers, under this edit's curvature (a
            # stream's holds its earlier edits' factors too); None without a curvature
            "predicted_loss_increase": sum(predicted.values()) if predicted else None,
            "predicted_loss_increase_per_layer": predicted,
            # with a drift budget: whether the prediction ended within it, and every γ tried
            "drift_budget_met": run.budget_met,
            "gamma_trail": run.trail,
            # warm_start "lstsq": its step length, the objective before and after, each CG solve
            "warm_start_step": run.warm_start,
            "time_s": {"edit": round(edit_seconds, 3)},
        }
        return Delta(tensors=tensors, meta=meta, report=report)


def make_editor(
    model: nn.Module,
    tokenizer,
    curvature: Curvature | None = None,
    settings: EditSettings = DEFAULTS,
    *,
    previous: dict[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> CrispEditor | MemitEditor:
    """The editor of the settings' method (a `method=` keyword overrides it): `CrispEditor` for
    ft, nullspace, kfac and ekfac, `MemitEditor` for memit, `AlphaEditor` for alphaedit; every
    other argument goes to it as it is. Each has `edit(facts) -> Delta` and `chat`. `previous`,
    AlphaEdit's earlier stream edits' key Gram matrices per layer, is dropped for the others."""
    method = resolve_method(kwargs.get("method") or settings.method)
    if method == "alphaedit":
        return AlphaEditor(model, tokenizer, curvature, settings, previous=previous, **kwargs)
    if method == "memit":
        return MemitEditor(model, tokenizer, curvature, settings, **kwargs)
    return CrispEditor(model, tokenizer, curvature, settings, **kwargs)
