// Building the page: every string goes in as a text node (never innerHTML), so whatever a user
// posted, a fact target of "<script>" included, shows as the characters it is.

/** An element: `attrs` are properties/attributes (on* values are listeners), children are
 * nodes or strings (as text); null/false children are skipped. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace a node's children. */
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

/** Announce a short message to screen readers (the polite live region). */
export function announce(text) {
  fill(document.getElementById("status"), text);
}

export function fmt(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return typeof value === "number" ? value.toFixed(digits) : String(value);
}

export function pct(value) {
  if (value === null || value === undefined) return "–";
  return `${value >= 0 ? "+" : ""}${value.toFixed(2)} %`;
}

export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

export function short(id) {
  return id ? `${id.slice(0, 10)}…` : "base";
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A small line chart: `series` = [{label, cls, points: [{x, y, hollow}]}] over the x labels
 * `xs`, y from `lo` to `hi`, drawn as inline SVG with a title for screen readers. */
export function lineChart({ title, xs, series, lo, hi, unit = "", width = 560, height = 150 }) {
  const pad = { left: 52, right: 12, top: 22, bottom: 26 };
  const w = width - pad.left - pad.right;
  const h = height - pad.top - pad.bottom;
  const x = (i) => pad.left + (xs.length > 1 ? (i * w) / (xs.length - 1) : w / 2);
  const y = (v) => pad.top + h - ((v - lo) / (hi - lo || 1)) * h;
  const root = svg("svg", {
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": title,
    class: "chart",
  });
  root.append(svg("title", {}, title));
  root.append(svg("text", { x: pad.left, y: 14, class: "chart-title" }, title));
  for (const v of [lo, (lo + hi) / 2, hi]) {
    root.append(svg("line", { x1: pad.left, x2: pad.left + w, y1: y(v), y2: y(v), class: "grid" }));
    root.append(
      svg("text", { x: pad.left - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, `${fmt(v, 2)}${unit}`),
    );
  }
  xs.forEach((label, i) => {
    root.append(svg("text", { x: x(i), y: height - 8, class: "tick", "text-anchor": "middle" }, label));
  });
  series.forEach((s, k) => {
    const pts = s.points.filter((p) => p.y !== null && p.y !== undefined);
    if (pts.length > 1) {
      const d = pts.map((p, j) => `${j ? "L" : "M"}${x(p.x).toFixed(1)},${y(p.y).toFixed(1)}`).join(" ");
      root.append(svg("path", { d, class: `line ${s.cls}` }));
    }
    for (const p of pts) {
      const dot = svg("circle", {
        cx: x(p.x),
        cy: y(p.y),
        r: 4,
        class: `dot ${s.cls}${p.hollow ? " hollow" : ""}`,
      });
      dot.append(svg("title", {}, `${s.label} at ${xs[p.x]}: ${fmt(p.y)}${unit}`));
      root.append(dot);
    }
    const lx = pad.left + w - 150 * (series.length - k);
    root.append(svg("rect", { x: lx, y: 6, width: 10, height: 10, class: `key ${s.cls}` }));
    root.append(svg("text", { x: lx + 14, y: 15, class: "tick" }, s.label));
  });
  return root;
}
