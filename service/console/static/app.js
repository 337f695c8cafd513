// The console's pages, one function each, chosen by the URL's hash:
//   #/                      models and their streams
//   #/stream/MODEL/STREAM   a stream's history: versions, metrics, plot, rollback
//   #/version/ID            one version: facts, before/after, downloads
//   #/job/ID                a job, live
//   #/submit[?model=M]      submit a few facts
// The pages show only what the API answers for the signed-in key; features the server lacks
// (policies, generation, adapters) are left out (api.features).

import { ApiError, download, features, followJob, get, key, post, seg } from "./api.js";
import { announce, el, fill, fmt, lineChart, pct, short, when } from "./dom.js";

const main = () => document.getElementById("main");
let pageAbort = new AbortController();

// --- small pieces ---------------------------------------------------------------------------

function errorBox(err, id = "error") {
  const field = err.field ? el("span", { class: "field" }, ` (field ${err.field})`) : null;
  const what = err instanceof ApiError ? `${err.status || ""} ${err.code}: ` : "";
  return el("p", { class: "error", role: "alert", id }, what.trimStart(), err.message, field);
}

function link(href, ...text) {
  return el("a", { href }, ...text);
}

const streamHref = (model, stream) => `#/stream/${seg(model)}/${seg(stream)}`;
const versionHref = (id) => `#/version/${seg(id)}`;

function confirmDialog(text, okLabel) {
  const dialog = document.getElementById("confirm");
  fill(document.getElementById("confirm-text"), text);
  fill(document.getElementById("confirm-ok"), okLabel);
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

function title(text, ...rest) {
  document.title = `${text} · CrispEdit console`;
  return el("h1", {}, text, ...rest);
}

/** A fact as one line: subject, the prompt, and the new target (all as text). */
function factLine(f) {
  return el(
    "span",
    { class: "fact" },
    f.subject ? el("span", { class: "subject" }, f.subject, " · ") : null,
    el("span", { class: "prompt" }, f.prompt ?? f.relation ?? ""),
    " → ",
    el("strong", { class: "target" }, f.target ?? f.object ?? ""),
  );
}

// What a version measured: its own efficacy, and with `evaluate`, the drift against the base.
function measured(metrics) {
  const m = metrics || {};
  const after = (m.evaluation && m.evaluation.after) || null;
  const before = (m.evaluation && m.evaluation.before) || null;
  const cap = (after && after.capability) || {};
  const retention = cap.fact_retention || {};
  return {
    efficacy: m.efficacy ?? null,
    efficacyBefore: m.efficacy_before ?? null,
    ppl: cap.ppl_change_pct ?? null,
    kl: cap.kl ?? null,
    retention: retention.edited ?? null,
    retentionBase: retention.base ?? null,
    before,
    after,
  };
}

// --- sign in ---------------------------------------------------------------------------------

function signIn(message) {
  document.getElementById("nav").hidden = true;
  const input = el("input", {
    id: "key",
    name: "key",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
  });
  const out = el("div", { id: "signin-error" });
  // method=post: were the script to fail, the browser would not put the key in the URL
  const form = el(
    "form",
    { method: "post", id: "signin", class: "card" },
    el("label", { for: "key" }, "API key"),
    input,
    el("p", { class: "hint" }, "Kept in this tab's session storage only, sent as a Bearer header."),
    el("button", { type: "submit" }, "Sign in"),
    out,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    key.set(input.value.trim());
    input.value = "";
    try {
      await get("/v1/streams");
    } catch (err) {
      key.clear();
      fill(out, errorBox(err));
      input.focus();
      return;
    }
    render();
  });
  fill(main(), title("Sign in"), message ? el("p", { role: "alert" }, message) : null, form);
  input.focus();
}

// --- models and streams ----------------------------------------------------------------------

async function streamsPage(signal) {
  const [{ models }, { streams }, feats] = await Promise.all([
    get("/v1/models", { signal }),
    get("/v1/streams", { signal }),
    features(),
  ]);
  const policies = new Map();
  if (feats.policy) {
    await Promise.all(
      streams.map(async (s) => {
        try {
          const p = await get(`/v1/streams/${seg(s.model)}/${seg(s.stream)}/policy`, { signal });
          policies.set(`${s.model}/${s.stream}`, p);
        } catch {
          policies.set(`${s.model}/${s.stream}`, null);
        }
      }),
    );
  }
  const sections = models.map((m) => {
    const mine = streams.filter((s) => s.model === m.name);
    const rows = mine.map((s) =>
      el(
        "tr",
        { dataset: { stream: s.stream } },
        el("th", { scope: "row" }, link(streamHref(s.model, s.stream), s.stream)),
        el("td", {}, s.head ? link(versionHref(s.head), short(s.head)) : "base"),
        el("td", { class: "num" }, String(s.versions)),
        el("td", {}, when(s.updated_at)),
        feats.policy ? el("td", {}, policySummary(policies.get(`${s.model}/${s.stream}`))) : null,
      ),
    );
    return el(
      "section",
      { class: "model", "aria-labelledby": `model-${m.name}` },
      el("h2", { id: `model-${m.name}` }, m.name),
      el(
        "p",
        { class: "meta" },
        `curvature ${m.curvature_status} · queue ${m.queue} · `,
        link(`#/submit?model=${seg(m.name)}`, "submit edits"),
      ),
      mine.length
        ? el(
            "table",
            {},
            el("caption", { class: "visually-hidden" }, `Streams of ${m.name}`),
            el(
              "thead",
              {},
              el(
                "tr",
                {},
                el("th", { scope: "col" }, "Stream"),
                el("th", { scope: "col" }, "Head"),
                el("th", { scope: "col" }, "Versions"),
                el("th", { scope: "col" }, "Last change"),
                feats.policy ? el("th", { scope: "col" }, "Policy") : null,
              ),
            ),
            el("tbody", {}, rows),
          )
        : el("p", {}, "No streams yet."),
    );
  });
  fill(
    main(),
    title("Models and streams"),
    sections.length ? sections : el("p", {}, "This key may use no served model."),
  );
}

// A stream policy's bounds in a few words (GET .../policy; 404 `no_policy`: none).
const BOUNDS = [
  ["min_efficacy", "efficacy ≥"],
  ["max_ppl_change_pct", "ppl change ≤"],
  ["max_kl", "KL ≤"],
  ["min_fact_retention", "retention ≥"],
];

function policySummary(policy) {
  if (!policy) return "none";
  const parts = BOUNDS.filter(([k]) => policy[k] !== null && policy[k] !== undefined).map(
    ([k, label]) => `${label} ${policy[k]}`,
  );
  const prompts = (policy.regression || []).length;
  if (prompts) parts.push(`${prompts} regression prompt${prompts > 1 ? "s" : ""}`);
  return parts.length ? parts.join(", ") : "guarded";
}

// Why a guarded stream's job was rejected: the broken rules of its guard's verdict.
function rejection(job) {
  const guard = (job.result && job.result.guard) || {};
  return (guard.failed || []).map((f) =>
    f.rule === "regression"
      ? `regression: “${f.prompt}” answered “${f.answer}”, expected “${f.expected}”`
      : `${f.rule} ${f.bound}: measured ${fmt(f.value, 4)}`,
  );
}

// --- a stream's history ----------------------------------------------------------------------

const MAX_MANIFESTS = 50; // the facts of the newest versions; older ones link to their page

async function streamPage(signal, model, stream) {
  const base = `/v1/streams/${seg(model)}/${seg(stream)}`;
  const [listing, feats] = await Promise.all([get(`${base}/versions`, { signal }), features()]);
  const versions = listing.versions;
  const manifests = await Promise.all(
    versions.slice(0, MAX_MANIFESTS).map((v) => get(`/v1/versions/${seg(v.id)}`, { signal })),
  );
  const byId = new Map(manifests.map((m) => [m.id, m]));
  let policy = null;
  if (feats.policy) {
    try {
      policy = await get(`${base}/policy`, { signal });
    } catch {
      policy = null;
    }
  }

  async function rollback(target) {
    const name = target ? `version #${target.number} (${target.id})` : "the base model";
    const ok = await confirmDialog(
      `Move the head of ${model}/${stream} back to ${name}? Later versions stay listed, ` +
        "marked rolled back; nothing is deleted.",
      "Roll back",
    );
    if (!ok) return;
    try {
      await post(`${base}/rollback`, { version: target ? target.id : null, expected_head: listing.head });
      announce(`rolled back to ${name}`);
      await streamPage(pageAbort.signal, model, stream);
    } catch (err) {
      fill(document.getElementById("actions-error"), errorBox(err));
    }
  }

  async function publish(held) {
    const ok = await confirmDialog(
      `Publish version #${held.number} (${held.id}) of ${model}/${stream} although it is ` +
        "outside the stream's policy? The stream's log records that it was forced.",
      "Publish",
    );
    if (!ok) return;
    try {
      await post(`/v1/versions/${seg(held.id)}/publish`, { force: true, expected_head: listing.head });
      announce(`published version #${held.number}`);
      await streamPage(pageAbort.signal, model, stream);
    } catch (err) {
      fill(document.getElementById("actions-error"), errorBox(err));
    }
  }

  const rows = versions.map((v) => {
    const m = measured(v.metrics);
    const doc = byId.get(v.id);
    const state = v.head ? "head" : v.in_lineage ? "in lineage" : v.held ? "held" : "rolled back";
    return el(
      "tr",
      { class: v.in_lineage ? "" : "rolled-back", dataset: { version: v.id } },
      el(
        "th",
        { scope: "row" },
        link(versionHref(v.id), `#${v.number}`),
        el("div", { class: "id" }, v.id),
      ),
      el("td", {}, when(v.created_at)),
      el(
        "td",
        { class: "facts" },
        doc ? el("ul", {}, doc.facts.map((f) => el("li", {}, factLine(f)))) : `${v.n_facts} facts`,
        doc && doc.actor ? el("div", { class: "meta" }, `by ${doc.actor.team ?? doc.actor}`) : null,
      ),
      el("td", { class: "num" }, `${fmt(m.efficacyBefore, 2)} → ${fmt(m.efficacy, 2)}`),
      el("td", { class: "num" }, pct(m.ppl), el("br"), m.kl === null ? "" : `KL ${fmt(m.kl, 4)}`),
      el("td", { class: "num" }, m.retention === null ? "–" : `${fmt(m.retention, 2)} (${fmt(m.retentionBase, 2)})`),
      el("td", {}, el("span", { class: `badge ${state.replace(" ", "-")}` }, state)),
      el(
        "td",
        {},
        v.in_lineage && !v.head
          ? el("button", { type: "button", onclick: () => rollback(v) }, "Roll back to here")
          : null,
        v.held && feats.publish
          ? el("button", { type: "button", onclick: () => publish(v) }, "Publish anyway")
          : null,
      ),
    );
  });

  fill(
    main(),
    title(`${model} / ${stream}`),
    el(
      "p",
      { class: "meta" },
      "head ",
      listing.head ? link(versionHref(listing.head), listing.head) : "base",
      ` · ${versions.length} versions · `,
      link(`#/submit?model=${seg(model)}&stream=${seg(stream)}`, "submit edits here"),
    ),
    feats.policy ? el("p", { class: "meta", id: "policy" }, "policy: ", policySummary(policy)) : null,
    versions.length ? historyChart(versions) : null,
    el("div", { id: "actions-error" }),
    el(
      "table",
      { id: "versions" },
      el("caption", {}, "Versions, newest first"),
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          ["Version", "Created", "Facts", "Efficacy (before → after)", "Drift: ppl, KL", "Retention (base)", "State", ""].map(
            (h) => el("th", { scope: "col" }, h),
          ),
        ),
      ),
      el("tbody", {}, rows),
    ),
    listing.head
      ? el("p", {}, el("button", { type: "button", onclick: () => rollback(null) }, "Roll back to the base model"))
      : null,
  );
}

function historyChart(versions) {
  const oldest = [...versions].reverse();
  const xs = oldest.map((v) => `#${v.number}${v.in_lineage ? "" : "×"}`);
  const points = (pick) => oldest.map((v, i) => ({ x: i, y: pick(measured(v.metrics)), hollow: !v.in_lineage }));
  const efficacy = lineChart({
    title: "Efficacy of each version's facts",
    xs,
    lo: 0,
    hi: 1,
    series: [{ label: "efficacy", cls: "s1", points: points((m) => m.efficacy) }],
  });
  const ppl = points((m) => m.ppl);
  const values = ppl.map((p) => p.y).filter((y) => y !== null);
  const drift = values.length
    ? lineChart({
        title: "Drift: held-out perplexity change against the base",
        xs,
        lo: Math.min(0, ...values),
        hi: Math.max(0.01, ...values),
        unit: "%",
        series: [{ label: "ppl change", cls: "s2", points: ppl }],
      })
    : el("p", { class: "hint" }, "Drift not measured: submit with “measure drift” to record it.");
  return el(
    "figure",
    { id: "history-plot" },
    efficacy,
    drift,
    el("figcaption", {}, "Oldest to newest; hollow points and × mark versions out of the lineage (rolled back or held)."),
  );
}

// --- one version -----------------------------------------------------------------------------

function beforeAfter(doc) {
  const m = measured(doc.metrics);
  const b = m.before || {};
  const a = m.after || {};
  const tf = (part) => part && part.edited && part.edited.teacher_forced;
  const cap = (x) => x.capability || {};
  const rows = [
    ["efficacy of these facts", m.efficacyBefore, m.efficacy],
    ["generalization (paraphrases)", tf(b.generalization), tf(a.generalization)],
    ["locality (neighbours unchanged)", b.locality && b.locality.unchanged, a.locality && a.locality.unchanged],
    ["held-out perplexity", b.heldout_ppl, a.heldout_ppl],
    ["perplexity change vs base, %", cap(b).ppl_change_pct, cap(a).ppl_change_pct],
    ["KL vs base", cap(b).kl, cap(a).kl],
    ["known-fact retention", (cap(b).fact_retention || {}).edited, (cap(a).fact_retention || {}).edited],
  ].filter(([, x, y]) => (x ?? y) !== undefined && (x ?? y) !== null);
  return el(
    "table",
    { id: "before-after" },
    el("caption", {}, "Recorded metrics: at the parent (before) and at this version (after)"),
    el(
      "thead",
      {},
      el("tr", {}, ["Metric", "Before", "After"].map((h) => el("th", { scope: "col" }, h))),
    ),
    el(
      "tbody",
      {},
      rows.map(([name, x, y]) =>
        el("tr", {}, el("th", { scope: "row" }, name), el("td", { class: "num" }, fmt(x, 4)), el("td", { class: "num" }, fmt(y, 4))),
      ),
    ),
  );
}

function downloadButton(label, path, filename, known) {
  const out = el("span", { class: "sha" }, known ? `sha256 ${known}` : "");
  const button = el("button", { type: "button" }, label);
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const got = await download(path, filename);
      fill(out, `sha256 ${got.sha256}`, got.verified ? " ✓ verified" : "");
      announce(`${label} downloaded`);
    } catch (err) {
      fill(out, errorBox(err));
    } finally {
      button.disabled = false;
    }
  });
  return el("li", {}, button, " ", out);
}

function generateForm(doc) {
  const prompts = el("textarea", { id: "prompts", rows: 4, cols: 60 });
  const out = el("div", { id: "generated" });
  const form = el(
    "form",
    { method: "post", class: "card stack", id: "generate" },
    el("h3", {}, "Answers at this version and at its parent"),
    el("label", { for: "prompts" }, "Prompts, one a line (at most 20)"),
    prompts,
    el("button", { type: "submit" }, "Answer at this version and its parent"),
    out,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const list = prompts.value.split("\n").map((p) => p.trim()).filter(Boolean);
    fill(out, el("p", {}, "Generating…"));
    try {
      let answer = await post(`/v1/versions/${seg(doc.id)}/generate`, { prompts: list });
      if (answer.job_id) {
        const job = await followJob(answer.job_id, () => {}, pageAbort.signal);
        if (job.status !== "succeeded") throw new ApiError(0, job.status, job.error || job.status);
        answer = job.result || job;
      }
      const items = answer.completions || answer.results || answer.answers || [];
      fill(
        out,
        el(
          "table",
          { id: "generations" },
          el("thead", {}, el("tr", {}, ["Prompt", "Parent", "This version"].map((h) => el("th", { scope: "col" }, h)))),
          el(
            "tbody",
            {},
            items.map((r) =>
              el(
                "tr",
                {},
                el("th", { scope: "row" }, r.prompt ?? ""),
                el("td", {}, r.parent ?? r.before ?? ""),
                el("td", {}, r.version ?? r.after ?? ""),
              ),
            ),
          ),
        ),
      );
    } catch (err) {
      fill(out, errorBox(err));
    }
  });
  return form;
}

async function versionPage(signal, id) {
  const [doc, feats] = await Promise.all([get(`/v1/versions/${seg(id)}`, { signal }), features()]);
  const delta = doc.files && doc.files["delta.safetensors"];
  const extra = [];
  if (feats.adapter) {
    const rank = el("input", { id: "rank", type: "number", min: 1, value: 8, class: "short" });
    const out = el("span", { class: "sha" });
    const button = el("button", { type: "button" }, "Adapter (PEFT LoRA, against base)");
    button.addEventListener("click", async () => {
      try {
        const got = await download(
          `/v1/versions/${seg(id)}/adapter?against=base&rank=${seg(rank.value)}`,
          `${id}-adapter-r${rank.value}.tar.gz`,
        );
        fill(out, `sha256 ${got.sha256}`, got.verified ? " ✓ verified" : "");
      } catch (err) {
        fill(out, errorBox(err));
      }
    });
    extra.push(el("li", {}, el("label", { for: "rank" }, "rank "), rank, " ", button, " ", out));
  }
  fill(
    main(),
    title(`Version #${doc.number}`),
    el(
      "p",
      { class: "meta" },
      link(streamHref(doc.model, doc.stream), `${doc.model} / ${doc.stream}`),
      ` · ${doc.id} · parent `,
      doc.parent ? link(versionHref(doc.parent), short(doc.parent)) : "base",
      ` · ${when(doc.created_at)} · method ${doc.method ?? "–"}`,
      doc.job ? [" · job ", link(`#/job/${seg(doc.job)}`, short(doc.job))] : null,
      doc.actor ? ` · by ${doc.actor.team ?? doc.actor}` : null,
    ),
    el("h2", {}, "Facts"),
    el(
      "table",
      { id: "facts" },
      el("thead", {}, el("tr", {}, ["Subject", "Prompt", "Target"].map((h) => el("th", { scope: "col" }, h)))),
      el(
        "tbody",
        {},
        (doc.facts || []).map((f) =>
          el("tr", {}, el("td", {}, f.subject ?? ""), el("td", {}, f.prompt ?? ""), el("td", { class: "target" }, f.target ?? "")),
        ),
      ),
    ),
    el("h2", {}, "Before and after"),
    beforeAfter(doc),
    feats.generate ? generateForm(doc) : null,
    el("h2", {}, "Downloads"),
    el(
      "ul",
      { class: "downloads" },
      downloadButton("Delta (this version's change)", `/v1/versions/${seg(id)}/delta`, `${id}.safetensors`, delta && delta.sha256),
      downloadButton(
        "Cumulative delta (against the base)",
        `/v1/versions/${seg(id)}/delta?against=base`,
        `${id}-cumulative.safetensors`,
      ),
      extra,
    ),
  );
}

// --- a job, live -----------------------------------------------------------------------------

const DONE = new Set(["succeeded", "failed", "cancelled", "rejected"]);

async function jobPage(signal, id) {
  const status = el("dd", { id: "job-status" }, "…");
  const phase = el("dd", { id: "job-phase" }, "–");
  const epoch = el("dd", { id: "job-epoch" }, "–");
  const loss = el("dd", { id: "job-loss" }, "–");
  const seen = el("dd", { id: "job-seen" }, "–");
  const bar = el("progress", { id: "job-progress", max: 1, value: 0, "aria-label": "epochs done" });
  const result = el("div", { id: "job-result", "aria-live": "polite" });
  const cancel = el("button", { type: "button" }, "Cancel the job");
  cancel.addEventListener("click", async () => {
    try {
      await post(`/v1/jobs/${seg(id)}/cancel`);
    } catch (err) {
      fill(result, errorBox(err));
    }
  });
  const where = el("p", { class: "meta" });
  fill(
    main(),
    title("Job"),
    el("p", { class: "meta" }, id),
    where,
    el(
      "dl",
      { class: "job" },
      el("dt", {}, "Status"),
      status,
      el("dt", {}, "Phase"),
      phase,
      el("dt", {}, "Epoch"),
      epoch,
      el("dt", {}, "Loss"),
      loss,
      el("dt", {}, "Seen"),
      seen,
    ),
    bar,
    el("p", {}, cancel),
    result,
  );
  let lastStatus = null;
  const phases = [];
  const show = (job) => {
    const p = job.progress || {};
    fill(
      status,
      job.status,
      job.position !== null && job.position !== undefined ? ` (position ${job.position})` : "",
      job.cancel_requested && !DONE.has(job.status) ? " · cancel requested" : "",
    );
    fill(phase, p.phase ?? (job.waiting_for ? `waiting for ${job.waiting_for}` : "–"));
    // the last epoch and loss stay shown once the worker moves on to publishing
    if (p.epoch !== undefined) fill(epoch, `${p.epoch} / ${p.epochs ?? "?"}`);
    if (p.loss !== undefined) fill(loss, fmt(p.loss, 4));
    const step = p.phase ?? job.status;
    if (phases.at(-1) !== step) {
      phases.push(step);
      fill(seen, phases.join(" → "));
    }
    if (p.epoch !== undefined && p.epochs) {
      bar.max = p.epochs;
      bar.value = p.epoch;
    }
    if (job.model && job.stream) fill(where, link(streamHref(job.model, job.stream), `${job.model} / ${job.stream}`));
    if (job.status !== lastStatus) announce(`job ${job.status}`);
    lastStatus = job.status;
    cancel.hidden = DONE.has(job.status) || job.cancel_requested;
    if (job.status === "succeeded" && job.version) {
      if (DONE.has(job.status)) bar.value = bar.max;
      const m = measured(job.metrics);
      fill(
        result,
        el(
          "p",
          { class: "ok" },
          "Published ",
          link(versionHref(job.version), `version ${job.version}`),
          ` · efficacy ${fmt(m.efficacyBefore, 2)} → ${fmt(m.efficacy, 2)}`,
          m.ppl !== null ? ` · ppl ${pct(m.ppl)}` : "",
        ),
      );
    } else if (job.status === "rejected") {
      fill(
        result,
        el(
          "div",
          { class: "error", role: "alert" },
          "rejected by the stream's policy; ",
          job.version ? link(versionHref(job.version), `version ${job.version}`) : "the version",
          " is kept, not published:",
          el("ul", {}, rejection(job).map((r) => el("li", {}, r))),
        ),
      );
    } else if (DONE.has(job.status)) {
      fill(result, el("p", { class: "error", role: "alert" }, `${job.status}: `, job.error ?? (job.status === "cancelled" ? "no version was published" : "no error recorded")));
    }
  };
  await followJob(id, show, signal);
}

// --- submit ----------------------------------------------------------------------------------

const FACT_FIELDS = ["subject", "prompt", "target"];

async function submitPage(signal, params) {
  const { models } = await get("/v1/models", { signal });
  const model = el(
    "select",
    { id: "model", name: "model" },
    models.map((m) => el("option", { value: m.name, selected: m.name === params.get("model") }, m.name)),
  );
  const stream = el("input", { id: "stream", name: "stream", value: params.get("stream") || "main", required: true });
  const factRows = el("tbody", {});
  const addFact = () => {
    const i = factRows.children.length;
    factRows.append(
      el(
        "tr",
        {},
        FACT_FIELDS.map((f) =>
          el(
            "td",
            {},
            el("label", { for: `fact-${i}-${f}`, class: "visually-hidden" }, `Fact ${i + 1} ${f}`),
            el("input", { id: `fact-${i}-${f}`, name: `fact-${i}-${f}`, class: `fact-${f}` }),
          ),
        ),
      ),
    );
  };
  for (let i = 0; i < 3; i++) addFact();
  const epochs = el("input", { id: "options-epochs", type: "number", min: 1, step: 1, class: "short" });
  const lr = el("input", { id: "options-lr", type: "text", inputmode: "decimal", class: "short" });
  const evaluate = el("input", { id: "options-evaluate", type: "checkbox" });
  const out = el("div", { id: "submit-result" });
  const form = el(
    "form",
    { method: "post", id: "submit", class: "card", novalidate: true },
    el("div", { class: "row" }, el("label", { for: "model" }, "Model"), model, el("label", { for: "stream" }, "Stream"), stream),
    el(
      "table",
      { class: "facts-form" },
      el("caption", {}, "Facts (a row left empty is skipped)"),
      el("thead", {}, el("tr", {}, FACT_FIELDS.map((f) => el("th", { scope: "col" }, f)))),
      factRows,
    ),
    el("p", {}, el("button", { type: "button", onclick: addFact }, "Add a fact")),
    el(
      "fieldset",
      {},
      el("legend", {}, "Options (empty: the worker's defaults)"),
      el("label", { for: "options-epochs" }, "epochs "),
      epochs,
      el("label", { for: "options-lr" }, " learning rate "),
      lr,
      el("label", { for: "options-evaluate", class: "check" }, evaluate, " measure drift (slower)"),
    ),
    el("button", { type: "submit" }, "Submit"),
    out,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
    const facts = [];
    const rowOf = [];
    Array.from(factRows.children).forEach((row, i) => {
      const fact = {};
      for (const f of FACT_FIELDS) {
        const value = row.querySelector(`.fact-${f}`).value;
        if (value.trim()) fact[f] = value;
      }
      if (Object.keys(fact).length) {
        facts.push(fact);
        rowOf.push(i);
      }
    });
    const options = {};
    // what is not a number goes as typed: the API's own message says what is wrong with it
    const number = (text) => (Number.isFinite(Number(text)) ? Number(text) : text);
    if (epochs.value) options.epochs = number(epochs.value);
    if (lr.value) options.lr = number(lr.value);
    if (evaluate.checked) options.evaluate = true;
    const body = { model: model.value, stream: stream.value, facts };
    if (Object.keys(options).length) body.options = options;
    try {
      const accepted = await post("/v1/edits", body);
      location.hash = `#/job/${seg(accepted.job_id)}`;
    } catch (err) {
      fill(out, errorBox(err, "submit-error"));
      const input = inputFor(err.field, rowOf) || form.querySelector("button[type=submit]");
      if (input.tagName === "INPUT" || input.tagName === "SELECT") {
        input.setAttribute("aria-invalid", "true");
        input.setAttribute("aria-describedby", "submit-error");
      }
      input.focus();
    }
  });
  fill(main(), title("Submit edits"), form);
}

/** The form control an API error's field names (facts[2].target → that row's target). */
function inputFor(field, rowOf) {
  if (!field) return null;
  const fact = /^facts\[(\d+)\](?:\.(\w+))?/.exec(field);
  if (fact) {
    const row = rowOf[Number(fact[1])];
    const name = FACT_FIELDS.includes(fact[2]) ? fact[2] : "prompt";
    return document.getElementById(`fact-${row}-${name}`);
  }
  if (field === "facts") return document.getElementById("fact-0-prompt");
  const option = /^options\.(\w+)/.exec(field);
  if (option) return document.getElementById(`options-${option[1]}`);
  return document.getElementById(field);
}

// --- routing ---------------------------------------------------------------------------------

const ROUTES = [
  [/^#?\/?$/, (s) => streamsPage(s)],
  [/^#\/stream\/([^/?]+)\/([^/?]+)$/, (s, m) => streamPage(s, decodeURIComponent(m[1]), decodeURIComponent(m[2]))],
  [/^#\/version\/([^/?]+)$/, (s, m) => versionPage(s, decodeURIComponent(m[1]))],
  [/^#\/job\/([^/?]+)$/, (s, m) => jobPage(s, decodeURIComponent(m[1]))],
  [/^#\/submit(?:\?(.*))?$/, (s, m) => submitPage(s, new URLSearchParams(m[1] || ""))],
];

async function render() {
  pageAbort.abort();
  pageAbort = new AbortController();
  const signal = pageAbort.signal;
  if (!key.get()) return signIn();
  document.getElementById("nav").hidden = false;
  const hash = location.hash || "#/";
  const route = ROUTES.find(([re]) => re.test(hash));
  fill(main(), el("p", { class: "hint" }, "Loading…"));
  try {
    if (!route) throw new ApiError(404, "not_found", `no page ${hash}`);
    await route[1](signal, route[0].exec(hash));
    main().focus({ preventScroll: true });
  } catch (err) {
    if (signal.aborted) return;
    if (err instanceof ApiError && err.status === 401) {
      key.clear();
      return signIn("The key was refused; sign in again.");
    }
    fill(main(), title("Not available"), errorBox(err), el("p", {}, link("#/", "Back to the streams")));
  }
}

document.getElementById("signout").addEventListener("click", () => {
  key.clear();
  location.hash = "#/";
  render();
});
window.addEventListener("hashchange", render);
render();

