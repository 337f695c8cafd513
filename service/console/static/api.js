// The API as the console uses it: the key (session storage only, sent as a Bearer header, never
// in a URL), JSON calls that turn the API's error shape into ApiError, the job's server-sent
// events read from a fetch() body (EventSource cannot send headers), downloads checked against
// their sha256, and the optional features this server has (read from its OpenAPI document).

const KEY_SLOT = "crispedit.console.key";

export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field || null;
  }
}

export const key = {
  get: () => sessionStorage.getItem(KEY_SLOT),
  set: (value) => sessionStorage.setItem(KEY_SLOT, value),
  clear: () => sessionStorage.removeItem(KEY_SLOT),
};

function headers(extra = {}) {
  const h = { Accept: "application/json", ...extra };
  const k = key.get();
  if (k) h.Authorization = `Bearer ${k}`;
  return h;
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  const e = body && body.error;
  if (e) return new ApiError(response.status, e.code, e.message, e.field);
  return new ApiError(response.status, "http_error", `HTTP ${response.status}`, null);
}

/** A JSON call: the decoded body, or an ApiError with the API's code, message and field. */
export async function call(method, path, body, { signal } = {}) {
  const init = { method, headers: headers(), signal, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

export const get = (path, opts) => call("GET", path, undefined, opts);
export const post = (path, body, opts) => call("POST", path, body, opts);
export const seg = encodeURIComponent;

let featureCache = null;

/** Which optional routes this server has, by their OpenAPI paths (no key needed). */
export async function features() {
  if (featureCache) return featureCache;
  let paths = {};
  try {
    const response = await fetch("/openapi.json", { cache: "no-store" });
    if (response.ok) paths = (await response.json()).paths || {};
  } catch {
    // no OpenAPI document: only the base features
  }
  const has = (p, m) => Boolean(paths[p] && paths[p][m]);
  featureCache = {
    policy: has("/v1/streams/{model}/{stream}/policy", "get"),
    generate: has("/v1/versions/{version_id}/generate", "post"),
    adapter: has("/v1/versions/{version_id}/adapter", "get"),
    log: has("/v1/streams/{model}/{stream}/log", "get"),
    publish: has("/v1/versions/{version_id}/publish", "post"),
  };
  return featureCache;
}

/** Parse server-sent events from a fetch() body; `onEvent(name, data)` for each. */
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // a keep-alive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

const TERMINAL = new Set(["succeeded", "failed", "cancelled", "rejected"]);

/** Follow a job until it ends: its events stream, and polling when the stream breaks off.
 * `onJob(view)` gets every job view; resolves with the last one. */
export async function followJob(jobId, onJob, signal) {
  const path = `/v1/jobs/${seg(jobId)}`;
  let last = null;
  for (let attempt = 0; !signal.aborted; attempt++) {
    try {
      const response = await fetch(`${path}/events`, {
        headers: headers({ Accept: "text/event-stream" }),
        signal,
        cache: "no-store",
      });
      if (!response.ok) throw await errorOf(response);
      await readEvents(response, (name, data) => {
        if (name === "status") {
          last = data;
          onJob(data);
        }
      });
    } catch (err) {
      if (signal.aborted) break;
      if (err instanceof ApiError && err.status !== 503) throw err;
    }
    // the stream ended (terminal, timeout, or a dropped connection): look, and maybe go again
    last = await get(path, { signal });
    onJob(last);
    if (TERMINAL.has(last.status)) return last;
    await new Promise((resolve) => setTimeout(resolve, Math.min(500 * (attempt + 1), 5000)));
  }
  return last;
}

async function sha256Hex(buffer) {
  if (!globalThis.crypto || !crypto.subtle) return null; // plain HTTP off localhost
  const digest = await crypto.subtle.digest("SHA-256", buffer);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Fetch a file with the key, check its sha256 against the server's, and hand it to the
 * browser as a download named `filename`. Resolves with {sha256, verified, bytes}. */
export async function download(path, filename) {
  const response = await fetch(path, { headers: headers({ Accept: "*/*" }), cache: "no-store" });
  if (!response.ok) throw await errorOf(response);
  const buffer = await response.arrayBuffer();
  const claimed = (response.headers.get("X-Content-SHA256") || "").toLowerCase();
  const actual = await sha256Hex(buffer);
  if (actual && claimed && actual !== claimed) {
    throw new ApiError(0, "checksum_mismatch", `the download's sha256 is ${actual}, not ${claimed}`);
  }
  const url = URL.createObjectURL(new Blob([buffer], { type: "application/octet-stream" }));
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return { sha256: actual || claimed, verified: Boolean(actual && claimed), bytes: buffer.byteLength };
}
