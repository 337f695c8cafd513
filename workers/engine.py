"""The resident engine of a worker: a loaded model and everything an edit job needs from it.

Loading SmolLM2 takes a second, an 8B model a minute, and curvature minutes to hours: a worker
pays for them once, and builds curvature in curvature jobs (or at start), never inside an edit
job's timeout. Every job re-derives the model's edited layers from the base weights and its stream's
head (`crispedit.streams.edit_on_stream`), so one resident model serves every stream of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from contract.facts import Fact, parse_facts
from contract.jobs import (
    EditPayload,
    EditResult,
    GeneratePayload,
    GenerateResult,
    curvature_kind,
    edit_result,
    job_settings,
)
from crispedit.curvature import Curvature, plan_curvature
from crispedit.evaluate import evaluate_edit, swapped_weights
from crispedit.models import load_model, parse_layers
from crispedit.sequential import set_weights
from crispedit.streams import (
    StreamCurvatureCache,
    StreamStateCache,
    base_weights,
    cached_curvature,
    completions,
    edit_on_stream,
    materialize,
)
from curvature_store import Store
from curvature_store.checkpoints import prune, publish_checkpoint, read_checkpoint

CURVATURE_TOKENS = 20_000
EVAL_TOKENS = 2048
EVAL_RETENTION = 100  # known-fact retention is cheap; generation and MMLU are not: a job skips them
SHARD_SIZE = "2GB"  # of a merged checkpoint's safetensors shards (what HF hubs serve well)


class JobCancelled(Exception):
    """The job's cancellation was requested; nothing was published."""


class CurvatureMissing(RuntimeError):
    """An edit job found no curvature for its method: edit jobs never build it."""


class Engine:
    """A model resident in this process, with its base weights, store and capability curvature."""

    def __init__(
        self,
        model: str,
        store_dir: str,
        model_path: str | None = None,
        corpus: str = "wikitext",
        tokens: int = CURVATURE_TOKENS,
        layers: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ):
        self.name = model
        self.store = Store(store_dir)
        self.model, self.tokenizer = load_model(model_path or model, dtype=dtype, device=device)
        self.layers = parse_layers(self.model, layers)
        self.base = base_weights(self.model, self.layers)
        self.corpus, self.tokens = corpus, tokens
        self._curvature: dict[str, tuple[Curvature, str]] = {}
        self._stream_curvatures = StreamCurvatureCache()  # a job from a known head skips the eigh
        self._stream_states = StreamStateCache()  # and the next job on a stream its chain's rows

    def curvature(self, kind: str, build: bool = True) -> tuple[Curvature, str]:
        """The capability curvature of `kind` (from the worker's corpus and token budget) and its
        store key: memory, else store, else built (`build_curvature`). With `build=False` a
        curvature neither in memory nor in the store raises CurvatureMissing instead."""
        if kind not in self._curvature:
            if build:
                self.build_curvature(kind)
            else:
                self.set_weights_to_base()
                recipe = plan_curvature(
                    self.model, self.tokenizer, self.corpus, self.tokens, self.layers, kind=kind
                )
                manifest = self.store.find_curvature(**recipe.key_fields)
                if manifest is None:
                    raise CurvatureMissing(
                        f"model {self.name!r} has no {kind} curvature yet (corpus {self.corpus}, "
                        f"{self.tokens} tokens): build it with POST /v1/curvature or start a "
                        "worker with --build-curvature"
                    )
                curvature = Curvature.load(self.store.curvature_file(manifest["key"]))
                self._curvature[kind] = (curvature, manifest["key"])
        return self._curvature[kind]

    def build_curvature(
        self,
        kind: str,
        tokens: int | None = None,
        corpus: str | None = None,
        report: Callable[[dict], None] = lambda progress: None,
    ) -> tuple[Curvature, dict]:
        """The curvature of `kind` over `tokens` tokens of `corpus` (None: the worker's own),
        from the store or built into it, resuming a build that was interrupted; its manifest
        (`cache_hit`: it was there). `report` gets the build's progress
        (`crispedit.curvature.collect_curvature`); an exception it raises stops the build, whose
        checkpoint stays for the next one. The worker's own curvature stays resident."""
        tokens = self.tokens if tokens is None else tokens
        corpus = self.corpus if corpus is None else corpus
        own = (tokens, corpus) == (self.tokens, self.corpus)
        if own and kind in self._curvature:
            curvature = self._curvature[kind][0]
            manifest = self.store.find_curvature(**curvature.meta["key"])
            if manifest is not None:  # else removed from the store meanwhile: stored again
                return curvature, {**manifest, "cache_hit": True}
        self.set_weights_to_base()  # the curvature is the base model's, never an edited one's
        recipe = plan_curvature(self.model, self.tokenizer, corpus, tokens, self.layers, kind=kind)
        curvature, manifest = cached_curvature(
            self.store, self.model, self.tokenizer, recipe, progress=False, on_progress=report
        )
        if own:
            self._curvature[kind] = (curvature, manifest["key"])
        return curvature, manifest

    def set_weights_to_base(self) -> None:
        set_weights(self.model, self.base, {})

    def evaluate(self, model, facts: list[Fact], chat_template: str) -> dict:
        """The model as it is now (a stream head) against the base, on the job's facts: the
        cheap metrics of `crispedit.evaluate.evaluate_edit` (teacher-forced efficacy,
        generalization and locality, held-out perplexity and KL over 2k tokens, known-fact
        retention), plus `heldout_ppl`, the current model's held-out perplexity. The prompts are
        wrapped in the chat template as the job's edit wraps them (`chat_template`)."""
        current = {f"{name}.weight": w for name, w in base_weights(model, self.layers).items()}
        base = {f"{name}.weight": w for name, w in self.base.items()}
        with swapped_weights(model, base):  # evaluate_edit wants the base in the model
            metrics = evaluate_edit(
                model, self.tokenizer, facts, edited=current, tokens=EVAL_TOKENS,
                retention=EVAL_RETENTION, mmlu=0, generation=False, chat_template=chat_template,
            )  # fmt: skip
        return {"heldout_ppl": metrics["capability"]["ppl_edited"], **metrics}

    def apply(
        self,
        request: EditPayload,
        report: Callable[[dict], None] = lambda progress: None,
        cancelled: Callable[[], bool] = lambda: False,
        job_id: str | None = None,
        build_curvature: bool = True,
    ) -> EditResult:
        """Run one edit request (`contract.jobs`) and return the new version's summary; the
        version's manifest records `job_id`. Bad options raise SettingsError before any work.
        With `build_curvature=False` (an edit job: curvature is its own job) a missing curvature
        raises CurvatureMissing before any work instead of being built."""
        started = time.perf_counter()
        if request["model"] != self.name:
            raise ValueError(f"this worker serves {self.name!r}, not {request['model']!r}")
        settings, measure = job_settings(request.get("options"))
        if settings.layers is not None and list(settings.layers) != self.layers:
            raise ValueError(f"this worker edits layers {self.layers}, not {settings.layers}")
        facts = parse_facts(request["facts"], source="request")
        if cancelled():
            raise JobCancelled("cancelled before it started; no version was published")
        kind = curvature_kind(settings.method, settings.laplace, settings.consolidate)
        capability, key = None, None
        if kind is not None:
            report({"phase": "curvature", "facts_total": len(facts)})
            capability, key = self.curvature(kind, build=build_curvature)

        def on_epoch(info: dict) -> None:
            if cancelled():
                raise JobCancelled("cancelled by request; no version was published")
            report({"phase": "edit", "facts_total": len(facts), **info})

        chat_template = settings.chat_template
        evaluate = (lambda model: self.evaluate(model, facts, chat_template)) if measure else None
        parent = request.get("parent_version") if request.get("check_parent") else ...
        force = bool((request.get("options") or {}).get("force"))

        def on_phase(phase: str) -> None:  # the policy check, between the edit and "done"
            report({"phase": phase, "facts_total": len(facts)})

        manifest, _ = edit_on_stream(
            self.store, self.name, request["stream"], self.model, self.tokenizer, self.base,
            capability, facts, parent=parent, curvature_key=key, evaluate=evaluate, job=job_id,
            actor=request.get("actor"),
            cache=self._stream_curvatures, states=self._stream_states, settings=settings,
            force=force, progress=False, on_epoch=on_epoch, on_phase=on_phase,
        )  # fmt: skip
        report({"phase": "done", "facts_total": len(facts), "facts_done": len(facts)})
        return edit_result(manifest, time.perf_counter() - started)

    def generate(self, request: GeneratePayload) -> GenerateResult:
        """Greedy completions of the request's prompts at its version and at the version's
        parent (`contract.jobs.GeneratePayload`, `crispedit.streams.completions`). The resident
        model answers as each version for a moment and holds its weights bit for bit afterwards.
        ValueError for another model's version; StoreError for one of other layers or base."""
        started = time.perf_counter()
        manifest = self.store.manifest(request["version"])
        if manifest["model"] != self.name or request["model"] != self.name:
            raise ValueError(f"this worker serves {self.name!r}, not {manifest['model']!r}")
        found = completions(
            self.store, manifest["id"], self.model, self.tokenizer, request["prompts"],
            request["max_new_tokens"], base=self.base,
        )  # fmt: skip
        return GenerateResult(
            version=manifest["id"],
            parent=manifest["parent"],
            completions=found,
            seconds=round(time.perf_counter() - started, 3),
        )

    def write_checkpoint(self, version: str, keep: int) -> tuple[dict, list[str]]:
        """Write the full model at `version` (base + its cumulative delta, in the resident
        model's dtype) as a Hugging Face folder into the store: sharded safetensors, config and
        tokenizer, staged and renamed in whole (`curvature_store.checkpoints`), then keep the
        `keep` newest checkpoints. Returns the checkpoint's manifest (the one already there
        when it exists) and the versions whose checkpoints were pruned. The resident model is
        back at the base weights afterwards, whatever happens."""
        manifest = self.store.manifest(version)
        if manifest["model"] != self.name:
            raise ValueError(f"this worker serves {self.name!r}, not {manifest['model']!r}")
        existing = read_checkpoint(self.store, version)
        if existing is not None:
            return existing, prune(self.store, keep)
        stage = self.store.staging_dir()
        try:
            materialize(self.store, version, self.model, self.base)
            self.model.save_pretrained(stage, max_shard_size=SHARD_SIZE)
            self.tokenizer.save_pretrained(stage)
        finally:
            self.set_weights_to_base()
        checkpoint = publish_checkpoint(self.store, version, stage)
        return checkpoint, prune(self.store, keep)
