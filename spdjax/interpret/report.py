"""The component browser: one self-contained HTML file for a harvest (`store.read`'s dict) that works offline.

The page embeds plotly.js once, the harvest as JSON (`<script type="application/json" id="harvest-data">`) and
a small vanilla-JS app that builds everything from that JSON with `textContent` (never `innerHTML` of data):
- `#summary`: meta facts (`#meta-facts`), the run's summary (`#summary-table`) and Plotly charts of the eval
  losses (`#chart-eval-loss`), L0 per site (`#chart-l0`), the CI spectrum per site (`#chart-ci-spectrum`) and,
  for language models, CE / KL under each masking (`#chart-maskings`).
- `#component-list`: one `tr.component-row[data-id]` per component; `#search` filters rows by their text,
  `th[data-sort]` sorts (a second click reverses).
- `#card` (class `open` when shown): opened by a row click or the URL hash `#c=ID`; its charts are made when
  it opens. Token examples are `span.tok` (`.center` the example's token, `.hl` CI > tau); co-active and
  cluster members link to their cards (`a.coactive-link`, `a.cluster-link`).
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from pathlib import Path

from plotly.offline import get_plotlyjs

CSS = """
* { box-sizing: border-box; }
body { font: 13px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1f2328;
  background: #f6f7f9; }
header { padding: 10px 16px; background: #24292f; color: #fff; display: flex; align-items: baseline; gap: 16px; }
header h1 { font-size: 17px; margin: 0; }
header .sub { color: #c9d1d9; font-size: 12px; }
section, aside { background: #fff; border: 1px solid #d0d7de; border-radius: 6px; padding: 10px 12px; }
h2 { font-size: 15px; margin: 0 0 8px; }
h3 { font-size: 13px; margin: 12px 0 4px; color: #444; }
#summary { margin: 12px 16px; }
.facts { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 8px; margin-top: 8px; }
.chart { min-height: 40px; }
.note { color: #777; font-style: italic; }
table { border-collapse: collapse; }
td, th { padding: 2px 6px; text-align: left; border-bottom: 1px solid #eee; vertical-align: top; }
th { background: #f0f2f4; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv td:first-child { color: #555; }
table.kv td:last-child { font-family: ui-monospace, monospace; word-break: break-all; }
#summary-table-wrap { max-height: 220px; overflow: auto; }
#browser { display: flex; gap: 12px; margin: 0 16px 16px; align-items: flex-start; }
#list-pane { flex: 1 1 48%; min-width: 0; }
#list-tools { display: flex; gap: 12px; align-items: center; margin-bottom: 6px; }
#search { flex: 1; padding: 5px 8px; font-size: 13px; border: 1px solid #bbb; border-radius: 4px; }
#list-scroll { max-height: calc(100vh - 90px); overflow: auto; }
#component-list { width: 100%; }
#component-list thead th { position: sticky; top: 0; z-index: 1; }
th[data-sort] { cursor: pointer; user-select: none; white-space: nowrap; }
th[data-sort].sort-asc::after { content: " \\25B2"; font-size: 9px; }
th[data-sort].sort-desc::after { content: " \\25BC"; font-size: 9px; }
tr.component-row { cursor: pointer; }
tr.component-row:hover { background: #f3f8ff; }
tr.component-row.selected { background: #dbeafe; }
td.site { font-family: ui-monospace, monospace; font-size: 12px; }
.ttok { display: inline-block; white-space: pre; background: #eef1f4; border-radius: 3px; padding: 0 3px;
  margin-right: 3px; font-family: ui-monospace, monospace; font-size: 12px; }
#card { display: none; flex: 1 1 52%; min-width: 0; position: sticky; top: 8px; max-height: calc(100vh - 16px);
  overflow: auto; }
#card.open { display: block; }
#card-head { display: flex; justify-content: space-between; align-items: baseline; gap: 8px; }
#card-title { font-family: ui-monospace, monospace; }
#card-close { border: none; background: none; font-size: 20px; cursor: pointer; line-height: 1; }
.card-grid { display: flex; flex-wrap: wrap; gap: 16px; }
.card-grid > * { flex: 1 1 260px; min-width: 0; }
.example { padding: 3px 0; border-bottom: 1px dotted #e5e5e5; font-family: ui-monospace, monospace; font-size: 12px; }
.ex-ci { display: inline-block; min-width: 44px; margin-right: 8px; color: #666; font-size: 11px; }
span.tok { white-space: pre; padding: 1px 1px; margin-right: 1px; border-radius: 2px;
  box-shadow: inset 0 0 0 1px rgba(0, 0, 0, 0.07); }
span.tok.center { outline: 2px solid #1f6feb; outline-offset: 0; }
span.tok.hl { font-weight: 700; }
.feat { display: inline-block; margin-right: 10px; }
ul.links { margin: 0; padding-left: 18px; }
ul.links li { margin: 2px 0; }
a.coactive-link, a.cluster-link { font-family: ui-monospace, monospace; }
.stat { color: #555; font-size: 12px; }
.tok-text { white-space: pre; font-family: ui-monospace, monospace; background: #eef1f4; border-radius: 3px;
  padding: 0 3px; }
"""

JS = r"""
(function () {
"use strict";
const H = JSON.parse(document.getElementById("harvest-data").textContent);
const meta = isObj(H.meta) ? H.meta : {};
const comps = Array.isArray(H.components) ? H.components.filter(isObj) : [];
const byId = new Map(comps.map(c => [c.id, c]));
const bySiteIdx = new Map(comps.map(c => [c.site + "\u0000" + c.idx, c]));
const tau = num(meta.tau) ? meta.tau : null;
const isTokens = meta.input_kind ? meta.input_kind === "tokens"
  : comps.some(c => (exampleList(c, "top")[0] || {}).tokens !== undefined);
const PLOT_CONFIG = {displaylogo: false, displayModeBar: false, responsive: true};
const SITE_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
  "#bcbd22", "#17becf"];

function isObj(x) { return x !== null && typeof x === "object" && !Array.isArray(x); }
function num(x) { return typeof x === "number" && isFinite(x); }
function $(id) { return document.getElementById(id); }
function el(tag, props, children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "className" || k === "textContent" || k === "title" || k === "href") e[k] = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v);
  }
  for (const ch of children || []) if (ch !== null && ch !== undefined) e.append(ch);
  return e;
}
function fmt(x, digits) {
  if (x === null || x === undefined) return "\u2013";
  if (typeof x === "number") {
    if (!isFinite(x) || Number.isInteger(x)) return String(x);
    const a = Math.abs(x);
    if (a < 1e-3 || a >= 1e6) return x.toExponential(2);
    return String(Number(x.toPrecision(digits || 3)));
  }
  if (typeof x === "object") return JSON.stringify(x);
  return String(x);
}
// Plotly renders a few HTML-like tags in its labels; entities keep data text literal.
function ptext(s) { return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }
function showTok(s) { return String(s).replace(/\n/g, "\u21b5").replace(/\r/g, "\u240d").replace(/\t/g, "\u21e5"); }
function clamp01(x) { return num(x) ? Math.min(1, Math.max(0, x)) : 0; }
function exampleList(c, sampling) {
  const ex = isObj(c.examples) ? c.examples[sampling] : null;
  return Array.isArray(ex) ? ex.filter(isObj) : [];
}
function tokenStats(c, which) {
  const t = isObj(c.tokens) ? c.tokens[which] : null;
  return Array.isArray(t) ? t.filter(isObj) : [];
}
function exampleCi(ex) { return Array.isArray(ex.ci) ? ex.ci[ex.center] : ex.ci; }
function compLabel(c) { return "#" + c.id + " " + c.site + " / " + c.idx; }
function siteNames() {
  const names = (Array.isArray(meta.sites) ? meta.sites : []).map(s => isObj(s) ? s.name : s).filter(s => s != null);
  for (const c of comps) if (!names.includes(c.site)) names.push(c.site);
  return names;
}
function plot(div, traces, layout) {
  const base = {margin: {l: 50, r: 12, t: 30, b: 40}, height: 260, font: {size: 11}, showlegend: traces.length > 1,
    legend: {font: {size: 10}}};
  Plotly.newPlot(div, traces, Object.assign(base, layout), PLOT_CONFIG);
}
function title(text) { return {text: ptext(text), font: {size: 13}, x: 0.02, xanchor: "left"}; }
function note(parent, text) { parent.append(el("p", {className: "note", textContent: text})); }

// ---- summary ----
function kvRows(tbody, pairs) {
  for (const [k, v] of pairs) {
    tbody.append(el("tr", {}, [el("td", {textContent: k}), el("td", {textContent: fmt(v, 4)})]));
  }
}
function renderSummary() {
  kvRows($("meta-facts").tBodies[0], [
    ["input kind", meta.input_kind], ["rows harvested", meta.n_rows], ["tau", meta.tau], ["window", meta.window],
    ["components", comps.length], ["sites", siteNames().length], ["harvest seconds", meta.harvest_seconds],
    ["export sha256", meta.export_sha256], ["spdjax version", meta.spdjax_version]]);
  const summary = isObj(meta.summary) ? meta.summary : {};
  const keys = Object.keys(summary).sort();
  if (keys.length) kvRows($("summary-table").tBodies[0], keys.map(k => [k, summary[k]]));
  else note($("summary-table-wrap"), "no summary in this harvest");

  const evals = Array.isArray(meta.eval) ? meta.eval.filter(isObj) : [];
  const lossKeys = [...new Set(evals.flatMap(r => Object.keys(r).filter(k => k.includes("loss/"))))].sort();
  const traces = lossKeys.map(k => {
    const pts = evals.map((r, i) => [num(r.step) ? r.step : i, r[k]]).filter(p => num(p[1]));
    return {x: pts.map(p => p[0]), y: pts.map(p => p[1]), name: ptext(k.replace(/^eval\//, "")),
            mode: "lines+markers", type: "scatter"};
  }).filter(t => t.y.length);
  if (traces.length) {
    const positive = traces.every(t => t.y.every(v => v > 0));
    plot($("chart-eval-loss"), traces, {title: title("eval losses"), xaxis: {title: {text: "step"}},
      yaxis: {type: positive ? "log" : "linear"}, legend: {orientation: "h", y: -0.25, font: {size: 10}}, height: 300});
  } else note($("chart-eval-loss"), "no eval losses in this harvest");

  let l0 = Object.keys(summary).filter(k => k.startsWith("ci_l0/") && num(summary[k]))
    .map(k => [k.slice(6), summary[k]]);
  if (!l0.length && evals.length) {
    const last = evals[evals.length - 1];
    l0 = Object.keys(last).filter(k => k.startsWith("eval/ci_l0/") && num(last[k])).map(k => [k.slice(11), last[k]]);
  }
  if (l0.length) {
    plot($("chart-l0"), [{type: "bar", x: l0.map(p => ptext(p[0])), y: l0.map(p => p[1]), marker: {color: "#1f6feb"}}],
      {title: title("L0 per site (mean active components)"), height: 300, margin: {l: 50, r: 12, t: 30, b: 90}});
  } else note($("chart-l0"), "no ci_l0/<site> in the summary");

  const maskings = Object.keys(summary).filter(k => /^(ce|kl)\/[^/]+$/.test(k) && num(summary[k])).sort();
  if (maskings.length) {  // language models: the target's CE / KL under each masking of the decomposition
    const trace = (kind, color) => {
      const ks = maskings.filter(k => k.startsWith(kind + "/"));
      return {type: "bar", name: kind, x: ks.map(k => ptext(k.slice(kind.length + 1))), y: ks.map(k => summary[k]),
              marker: {color: color}};
    };
    plot($("chart-maskings"), [trace("ce", "#1f6feb"), trace("kl", "#d9822b")].filter(t => t.x.length),
      {title: title("CE / KL under each masking"), barmode: "group", height: 300,
       margin: {l: 50, r: 12, t: 30, b: 60}});
  }

  const spectrum = siteNames().map((s, i) => {
    const color = SITE_COLORS[i % SITE_COLORS.length];
    const y = comps.filter(c => c.site === s && num(c.mean_ci)).map(c => c.mean_ci).sort((a, b) => b - a);
    return {x: y.map((_, j) => j + 1), y: y, name: ptext(s), type: "scatter", mode: "lines+markers",
            marker: {size: 4, color: color}, line: {color: color}};
  }).filter(t => t.y.length);
  if (spectrum.length) {
    plot($("chart-ci-spectrum"), spectrum, {title: title("CI spectrum (mean CI, sorted)"), height: 300,
      xaxis: {title: {text: "rank"}}, yaxis: {type: "log"}, legend: {orientation: "h", y: -0.25, font: {size: 10}}});
  } else note($("chart-ci-spectrum"), "no components");
}

// ---- component list ----
const COLUMNS = [
  {key: "id", label: "id", num: true}, {key: "site", label: "site"}, {key: "idx", label: "idx", num: true},
  {key: "layer", label: "layer", num: true}, {key: "frequency", label: "freq", num: true},
  {key: "mean_ci", label: "mean CI", num: true}, {key: "n_active", label: "active", num: true},
  {key: "cluster", label: "cluster", num: true}].concat(isTokens ? [{key: "tokens", label: "top tokens"}] : []);
let rows = [];
let sortKey = null, sortDir = 1;

function topTokens(c) { return tokenStats(c, "input").slice(0, 3).map(t => String(t.token)); }
function sortValue(c, key) { return key === "tokens" ? topTokens(c).join(" ") : c[key]; }
function renderList() {
  const headRow = $("component-list").tHead.rows[0];
  for (const col of COLUMNS) {
    const th = el("th", {textContent: col.label, className: col.num ? "num" : "", dataset: {sort: col.key}});
    th.addEventListener("click", () => sortBy(col.key));
    headRow.append(th);
  }
  const tbody = $("component-list").tBodies[0];
  const frag = document.createDocumentFragment();
  rows = comps.map(c => {
    const tr = el("tr", {className: "component-row", dataset: {id: String(c.id)}});
    for (const col of COLUMNS) {
      if (col.key === "tokens") {
        tr.append(el("td", {}, topTokens(c).map(t => el("span", {className: "ttok", textContent: showTok(t)}))));
      } else {
        tr.append(el("td", {className: (col.num ? "num " : "") + col.key, textContent: fmt(c[col.key])}));
      }
    }
    tr.addEventListener("click", () => showCard(c.id));
    frag.append(tr);
    const words = [c.kind].concat(tokenStats(c, "input").map(t => t.token), tokenStats(c, "next").map(t => t.token));
    const cells = Array.from(tr.cells, td => td.textContent);
    return {c: c, tr: tr, text: cells.concat(words).join(" ").toLowerCase()};
  });
  tbody.append(frag);
  $("search").addEventListener("input", filterRows);
  filterRows();
}
function filterRows() {
  const terms = $("search").value.toLowerCase().split(/\s+/).filter(Boolean);
  let shown = 0;
  for (const r of rows) {
    const ok = terms.every(t => r.text.includes(t));
    r.tr.hidden = !ok;
    shown += ok;
  }
  $("row-count").textContent = shown + " of " + rows.length + " components";
}
function cmp(a, b) {
  const na = a === null || a === undefined, nb = b === null || b === undefined;
  if (na || nb) return na && nb ? 0 : na ? 1 : -1;
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b), undefined, {numeric: true});
}
function sortBy(key) {
  sortDir = key === sortKey ? -sortDir : 1;
  sortKey = key;
  rows.sort((r, s) => {
    const a = sortValue(r.c, key), b = sortValue(s.c, key);
    const missing = (a === null || a === undefined) - (b === null || b === undefined);
    if (missing) return missing;  // missing values last in both directions
    return sortDir * cmp(a, b) || cmp(r.c.id, s.c.id);
  });
  const tbody = $("component-list").tBodies[0];
  for (const r of rows) tbody.append(r.tr);
  for (const th of $("component-list").tHead.querySelectorAll("th[data-sort]")) {
    th.classList.toggle("sort-asc", th.dataset.sort === key && sortDir === 1);
    th.classList.toggle("sort-desc", th.dataset.sort === key && sortDir === -1);
  }
}

// ---- card ----
let currentId = null;
function idFromHash() {
  const m = /^#c=(-?\d+)$/.exec(location.hash);
  return m ? Number(m[1]) : null;
}
function showCard(id) {
  if (location.hash === "#c=" + id) openCard(id);
  else location.hash = "c=" + id;  // hashchange opens it, and Back returns to the previous card
}
function onHash() {
  const id = idFromHash();
  if (id === null) closeCard(); else openCard(id);
}
function purgeCharts() {
  const card = $("card");
  for (const d of card.querySelectorAll(".js-plotly-plot")) Plotly.purge(d);
  card.replaceChildren();
}
function closeCard() {
  purgeCharts();
  $("card").classList.remove("open");
  currentId = null;
  for (const r of rows) r.tr.classList.remove("selected");
}
function cardLink(c, cls) {
  return el("a", {className: cls, href: "#c=" + c.id, textContent: compLabel(c), dataset: {id: String(c.id)}});
}
function openCard(id) {
  const card = $("card");
  purgeCharts();
  card.classList.add("open");  // before the charts, so that Plotly sees the card's width
  currentId = id;
  buildCard(card, id);
  card.scrollTop = 0;
  if ($("browser").getBoundingClientRect().top > 0) $("browser").scrollIntoView({block: "start"});
}
function buildCard(card, id) {
  for (const r of rows) r.tr.classList.toggle("selected", r.c.id === id);
  const close = el("button", {id: "card-close", title: "close (Esc)", textContent: "\u00d7"});
  close.addEventListener("click", () => {
    if (idFromHash() !== null) location.hash = "";
    closeCard();
  });
  const c = byId.get(id);
  const head = el("h2", {id: "card-title", textContent: c ? compLabel(c) : "#" + id});
  card.append(el("div", {id: "card-head"}, [head, close]));
  if (!c) { note(card, "component " + id + " is not in this harvest"); return; }

  const facts = el("table", {className: "kv card-stats"}, [el("tbody")]);
  kvRows(facts.tBodies[0], [["site", c.site], ["index", c.idx], ["layer", c.layer], ["kind", c.kind],
    ["mean CI", c.mean_ci], ["frequency", c.frequency], ["n active", c.n_active], ["cluster", c.cluster]]);
  const hist = el("div", {id: "card-hist", className: "chart"});
  card.append(el("div", {className: "card-grid"}, [facts, hist]));
  histChart(hist, c);

  for (const [sampling, label] of [["top", "Top examples (largest CI)"], ["random", "Random active examples"]]) {
    card.append(el("h3", {textContent: label}));
    const box = el("div", {id: "card-examples-" + sampling, className: "examples"});
    card.append(box);
    const exs = exampleList(c, sampling);
    if (!exs.length) note(box, "none");
    for (const ex of exs) box.append(Array.isArray(ex.tokens) ? tokenExample(ex) : featureExample(ex));
  }
  const attEx = exampleList(c, "top").find(ex => Array.isArray(ex.attention) && ex.attention.length);
  if (attEx) {
    card.append(el("h3", {textContent: "Attention of the top example's token"}));
    const div = el("div", {id: "card-attention", className: "chart"});
    card.append(div);
    attentionChart(div, attEx);
  }
  if (tokenStats(c, "input").length || tokenStats(c, "next").length) {
    card.append(el("div", {className: "card-grid"}, [
      tokenTable("card-tokens-input", "Input tokens", tokenStats(c, "input")),
      tokenTable("card-tokens-next", "Next tokens", tokenStats(c, "next"))]));
  }
  card.append(el("h3", {textContent: "Co-active components"}));
  const co = (Array.isArray(c.coactive) ? c.coactive : []).filter(isObj);
  const ul = el("ul", {id: "card-coactive", className: "links"});
  for (const o of co) {
    const other = byId.get(o.other);
    ul.append(el("li", {}, [other ? cardLink(other, "coactive-link") : el("span", {textContent: "#" + o.other}),
      el("span", {className: "stat", textContent: "  precision " + fmt(o.precision) + " \u00b7 recall " +
        fmt(o.recall) + " \u00b7 jaccard " + fmt(o.jaccard) + " \u00b7 count " + fmt(o.count)})]));
  }
  if (co.length) card.append(ul); else note(card, "none recorded");
  if (Array.isArray(c.one_hot) && c.one_hot.length) {
    card.append(el("h3", {textContent: "CI on each feature's one-hot input"}));
    const div = el("div", {id: "card-one-hot", className: "chart"});
    card.append(div);
    const y = c.one_hot.map(v => num(v) ? v : null);
    plot(div, [{type: "bar", x: y.map((_, i) => i), y: y, marker: {color: "#e6550d"},
                hovertemplate: "feature %{x}: CI %{y:.3g}<extra></extra>"}],
      {xaxis: {title: {text: "feature"}}, yaxis: {title: {text: "CI"}}, height: 240,
       margin: {l: 50, r: 12, t: 10, b: 40}});
  }
  if (isObj(c.weight) && Array.isArray(c.weight.values) && c.weight.values.length) {
    card.append(el("h3", {textContent: "Weight V\u1d9c U\u1d9c (largest rows and columns)"}));
    const div = el("div", {id: "card-weight", className: "chart"});
    card.append(div);
    weightChart(div, c.weight);
  }
  if (c.cluster !== null && c.cluster !== undefined) clusterSection(card, c);
}
function histChart(div, c) {
  const h = Array.isArray(c.hist) ? c.hist : [];
  if (!h.length) { note(div, "no CI histogram"); return; }
  const e = Array.isArray(meta.hist_edges) && meta.hist_edges.length === h.length + 1 ? meta.hist_edges : null;
  const x = h.map((_, i) => e ? (e[i] + e[i + 1]) / 2 : i);
  const w = h.map((_, i) => e ? e[i + 1] - e[i] : 1);
  const positive = h.some(v => v > 0);
  plot(div, [{type: "bar", x: x, y: h, width: w, marker: {color: "#6e40c9", line: {color: "#fff", width: 0.5}},
              hovertemplate: "CI %{x:.3g}: %{y}<extra></extra>"}],
    {title: title("CI histogram"), xaxis: {title: {text: e ? "CI" : "bin"}}, yaxis: {type: positive ? "log" : "linear"},
     height: 220, bargap: 0});
}
function tokenExample(ex) {
  const cis = Array.isArray(ex.ci) ? ex.ci : [], acts = Array.isArray(ex.act) ? ex.act : [];
  const line = el("div", {className: "example"}, [el("span", {className: "ex-ci", textContent: fmt(exampleCi(ex))})]);
  ex.tokens.forEach((t, i) => {
    const s = el("span", {className: "tok", textContent: showTok(t),
                          title: "CI " + fmt(cis[i]) + "  act " + fmt(acts[i])});
    s.style.backgroundColor = "rgba(230, 85, 13, " + clamp01(cis[i]) + ")";
    if (i === ex.center) s.classList.add("center");
    if (tau !== null && num(cis[i]) && cis[i] > tau) s.classList.add("hl");
    line.append(s);
  });
  return line;
}
function featureExample(ex) {
  const feats = (Array.isArray(ex.features) ? ex.features : []).filter(Array.isArray);
  return el("div", {className: "example feature-example"}, [
    el("span", {className: "ex-ci", textContent: "CI " + fmt(ex.ci) + " \u00b7 act " + fmt(ex.act)})]
    .concat(feats.map(f => el("span", {className: "feat", textContent: "feature " + f[0] + " = " + fmt(f[1])}))));
}
function attentionChart(div, ex) {
  const toks = Array.isArray(ex.tokens) ? ex.tokens : [];
  const z = ex.attention.filter(Array.isArray);
  const w = Math.max(...z.map(r => r.length));
  const x = Array.from({length: w}, (_, i) => i);
  const ticks = x.map(i => i < toks.length ? ptext(showTok(toks[i])) : String(i))
    .map((t, i) => i === ex.center ? "<b>" + t + "</b>" : t);  // escaped above, so the only markup is ours
  plot(div, [{type: "heatmap", z: z, x: x, y: z.map((_, h) => "head " + h), zmin: 0,
              colorscale: [[0, "#f7fbff"], [1, "#08306b"]],
              hovertemplate: "%{y}, position %{x}: %{z:.3g}<extra></extra>"}],
    {xaxis: {tickvals: x, ticktext: ticks, tickangle: -45}, yaxis: {autorange: "reversed"},
     height: 120 + 22 * z.length, margin: {l: 60, r: 12, t: 10, b: 70}});
}
function weightChart(div, wt) {
  const z = wt.values.filter(Array.isArray);
  const rows_ = Array.isArray(wt.rows) ? wt.rows : [], cols = Array.isArray(wt.cols) ? wt.cols : [];
  const nx = Math.max(...z.map(r => r.length)), ny = z.length;
  const x = Array.from({length: nx}, (_, i) => i), y = Array.from({length: ny}, (_, i) => i);
  const lim = Math.max(1e-12, ...z.flat().filter(num).map(Math.abs));
  plot(div, [{type: "heatmap", z: z, x: x, y: y, zmin: -lim, zmax: lim,
              colorscale: [[0, "#2166ac"], [0.5, "#f7f7f7"], [1, "#b2182b"]],  // negative blue, positive red
              hovertemplate: "row %{y}, col %{x}: %{z:.3g}<extra></extra>"}],
    {xaxis: {tickvals: x, ticktext: x.map(i => ptext(cols[i] ?? i)), title: {text: "column"}},
     yaxis: {tickvals: y, ticktext: y.map(i => ptext(rows_[i] ?? i)), autorange: "reversed", title: {text: "row"}},
     height: Math.min(520, 140 + 18 * ny), margin: {l: 60, r: 12, t: 10, b: 50}});
}
function tokenTable(id, label, stats) {
  const t = el("table", {id: id, className: "token-stats"}, [
    el("caption", {textContent: label}),
    el("thead", {}, [el("tr", {}, [el("th", {textContent: "token"}), el("th", {className: "num", textContent: "count"}),
                                     el("th", {className: "num", textContent: "PMI"})])]),
    el("tbody")]);
  for (const s of stats) {
    const tok = el("span", {className: "tok-text", textContent: showTok(s.token)});
    t.tBodies[0].append(el("tr", {}, [el("td", {}, [tok]),
      el("td", {className: "num", textContent: fmt(s.count)}), el("td", {className: "num", textContent: fmt(s.pmi)})]));
  }
  return el("div", {}, [t]);
}
function clusterSection(card, c) {
  card.append(el("h3", {textContent: "Cluster " + c.cluster}));
  const box = el("div", {id: "card-cluster"});
  card.append(box);
  const g = Array.isArray(meta.clusters) ? meta.clusters[c.cluster] : null;
  if (!isObj(g)) { note(box, "the clusters are not in this harvest"); return; }
  const members = (Array.isArray(g.members) ? g.members : []).filter(Array.isArray);
  const stat = "size " + fmt(g.size ?? members.length) + " \u00b7 frequency " + fmt(g.frequency);
  box.append(el("p", {className: "stat", textContent: stat}));
  const ul = el("ul", {className: "links"});
  for (const [site, idx] of members) {
    const m = bySiteIdx.get(site + "\u0000" + idx);
    let item;
    if (m && m.id === c.id) item = el("b", {className: "cluster-self", textContent: compLabel(m) + " (this)"});
    else if (m) item = cardLink(m, "cluster-link");
    else item = el("span", {className: "note", textContent: site + " / " + idx + " (not harvested)"});
    ul.append(el("li", {}, [item]));
  }
  box.append(ul);
}

renderSummary();
renderList();
window.addEventListener("hashchange", onHash);
document.addEventListener("keydown", e => {
  if (e.key === "Escape" && currentId !== null && document.activeElement !== $("search")) {
    if (idFromHash() !== null) location.hash = "";
    closeCard();
  }
});
onHash();
document.body.dataset.ready = "1";
})();
"""


def _finite(x):
    """`x` with non-finite floats replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _script_json(data) -> str:
    """`data` as JSON that is safe inside a `<script>` element (no `</` or `<!--` to end or confuse it)."""
    try:
        text = json.dumps(data, allow_nan=False, separators=(",", ":"))
    except ValueError:  # NaN or Infinity somewhere: the slow path
        text = json.dumps(_finite(data), allow_nan=False, separators=(",", ":"))
    # `<` only occurs inside JSON strings, where `<\/` and `\u003c` decode to the same text.
    return text.replace("<!--", "\\u003c!--").replace("</", "<\\/")


def report_html(harvest: dict, title: str) -> str:
    """The component browser for `harvest` (`store.read`'s dict) as one self-contained HTML page."""
    plotly_js = get_plotlyjs().replace("</script", "<\\/script")
    t = html.escape(title)
    meta = harvest.get("meta") or {}
    sub = html.escape(f"{len(harvest.get('components') or [])} components, {meta.get('input_kind', '?')} harvest")
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
        '<link rel="icon" href="data:,">\n',  # no favicon request (a console error under file://)
        f"<title>{t}</title>\n<style>{CSS}</style>\n",
        f"<script>{plotly_js}</script>\n</head>\n<body>\n",
        f'<header><h1>{t}</h1><span class="sub">{sub}</span></header>\n',
        '<section id="summary"><h2>Summary</h2><div class="facts">',
        '<table id="meta-facts" class="kv"><tbody></tbody></table>',
        '<div id="summary-table-wrap"><table id="summary-table" class="kv"><tbody></tbody></table></div></div>',
        '<div class="charts"><div id="chart-eval-loss" class="chart"></div><div id="chart-l0" class="chart"></div>',
        '<div id="chart-ci-spectrum" class="chart"></div><div id="chart-maskings" class="chart"></div></div></section>\n',
        '<div id="browser"><section id="list-pane"><div id="list-tools">',
        '<input id="search" type="search" placeholder="filter: site, token, kind, number..." autocomplete="off">',
        '<span id="row-count"></span></div><div id="list-scroll">',
        '<table id="component-list"><thead><tr></tr></thead><tbody></tbody></table></div></section>\n',
        '<aside id="card" aria-live="polite"></aside></div>\n',
        f'<script type="application/json" id="harvest-data">{_script_json(harvest)}</script>\n',
        f"<script>{JS}</script>\n</body>\n</html>\n",
    ])


def write_report(harvest: dict, path: str | Path, title: str) -> Path:
    """Writes `report_html(harvest, title)` to `path` atomically (a temporary file, then a rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = report_html(harvest, title)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a report is for reading
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
