// The live view: reads /ws (hello, counters, result, lagged messages) and draws the latest
// windows as a table and a stacked-bar SVG chart. No libraries, nothing from a CDN.
"use strict";

const WINDOWS_SHOWN = 12;
const state = { groupBy: [], values: [], windows: new Map() }; // window start -> Map(key -> result)
const $ = (id) => document.getElementById(id);

function keyOf(r) {
  return state.groupBy.map((f) => {
    const v = f.split(".").reduce((o, p) => (o == null ? o : o[p]), r);
    return typeof v === "string" ? v : JSON.stringify(v);
  }).join(" / ");
}

// Colours by order of first appearance, so neighbouring keys never look alike.
const PALETTE = ["#2f6fde", "#e8793b", "#2a9d6f", "#c2417a", "#8a5cd1", "#b59a1a",
  "#1b9bb5", "#d64541", "#5f7d2a", "#7a5230", "#4b5bbf", "#999999"];
const colors = new Map();
function colorOf(key) {
  if (!colors.has(key)) colors.set(key, PALETTE[colors.size % PALETTE.length]);
  return colors.get(key);
}

// A round step for about four grid lines up to `max`: 1, 2 or 5 times a power of ten.
function niceStep(max) {
  const raw = Math.max(1, max / 4);
  const pow = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * pow).find((s) => s >= raw);
}

function latestWindows() {
  return [...state.windows.keys()].sort().slice(-WINDOWS_SHOWN);
}

function onResult(r) {
  const w = r.window_start;
  if (!state.windows.has(w)) state.windows.set(w, new Map());
  state.windows.get(w).set(keyOf(r), r);
  for (const old of [...state.windows.keys()].sort().slice(0, -WINDOWS_SHOWN)) {
    state.windows.delete(old);
  }
  scheduleDraw();
}

let pending = false;
function scheduleDraw() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => { pending = false; drawTable(); drawChart(); });
}

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function drawTable() {
  const thead = $("results").tHead.rows[0];
  thead.replaceChildren(el("th", {}, "window start"), el("th", {}, state.groupBy.join(" / ") || "key"),
    ...state.values.map((v) => el("th", { class: "num" }, v)));
  const body = document.createDocumentFragment();
  for (const w of latestWindows().reverse()) {
    const rows = [...state.windows.get(w).entries()].sort((a, b) => a[0].localeCompare(b[0]));
    rows.forEach(([key, r], i) => {
      const tr = el("tr", { "data-window": w, "data-key": key, class: i === 0 ? "first" : "" });
      tr.append(el("td", {}, i === 0 ? w : ""), el("td", { class: "key" }, key),
        ...state.values.map((v) => el("td", { class: `num v-${v}` }, String(r[v]))));
      body.append(tr);
    });
  }
  $("results").tBodies[0].replaceChildren(body);
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// Space kept between two time labels, in px.
const LABEL_GAP = 6;

// The width of a time label as the browser draws it (11 px font), measured once.
let labelWidth = 0;
function measureLabel(chart) {
  if (labelWidth > 0) return labelWidth;
  const probe = svg("text", { x: 0, y: -10, class: "time" }, "00:00:00");
  chart.append(probe);
  labelWidth = Math.ceil(probe.getComputedTextLength()) || 52;
  probe.remove();
  return labelWidth;
}

// Time labels placed from the latest window leftwards, each under its bar, skipping any
// that would come closer than LABEL_GAP to the one on its right: they never overlap and
// never leave the chart, however narrow it is. The latest window is always labelled.
function placeLabels(labels, width, left, right) {
  const placed = [];
  let limit = right;
  for (let i = labels.length - 1; i >= 0; i--) {
    const half = width / 2;
    let cx = labels[i].cx;
    if (i === labels.length - 1) cx = Math.min(cx, limit - half - 1);
    else if (cx + half + LABEL_GAP > limit) continue;
    if (cx - half < left) break;
    placed.push({ ...labels[i], cx });
    limit = cx - half;
  }
  return placed;
}

function drawChart() {
  const value = state.values[0];
  const chart = $("chart");
  // Drawn in the chart's own pixels (no stretching), so text keeps its shape and size on
  // any screen.
  const W = Math.max(200, Math.round(chart.getBoundingClientRect().width) || 640);
  const H = 260, left = 40, bottom = 22, top = 8;
  chart.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const windows = latestWindows();
  const totals = windows.map((w) => [...state.windows.get(w).values()].reduce((s, r) => s + (Number(r[value]) || 0), 0));
  const step = niceStep(Math.max(1, ...totals));
  const max = Math.ceil(Math.max(1, ...totals) / step) * step;
  const parts = [];
  for (let v = 0; v <= max; v += step) {
    const y = top + (H - top - bottom) * (1 - v / max);
    parts.push(svg("line", { x1: left, x2: W, y1: y, y2: y, stroke: "#dde1ea" }));
    parts.push(svg("text", { x: left - 4, y: y + 4, "text-anchor": "end" }, String(v)));
  }
  const slot = (W - left) / WINDOWS_SHOWN;
  const labels = [];
  const keys = new Set();
  windows.forEach((w, i) => {
    let y = H - bottom;
    const x = left + i * slot + slot * 0.15;
    for (const [key, r] of [...state.windows.get(w).entries()].sort((a, b) => a[0].localeCompare(b[0]))) {
      const h = (Number(r[value]) || 0) / max * (H - top - bottom);
      y -= h;
      keys.add(key);
      const rect = svg("rect", { x, y, width: slot * 0.7, height: Math.max(h, 0), fill: colorOf(key) });
      rect.append(svg("title", {}, `${w} ${key}: ${r[value]}`));
      parts.push(rect);
    }
    labels.push({ cx: x + slot * 0.35, text: (w.split("T")[1] || w).replace("Z", "") });
  });
  chart.replaceChildren(...parts);
  for (const l of placeLabels(labels, measureLabel(chart), 0, W)) {
    chart.append(svg("text", { x: l.cx, y: H - 6, "text-anchor": "middle", class: "time" }, l.text));
  }
  $("legend").replaceChildren(...[...keys].sort().map((k) => {
    const s = el("span", {}, k);
    s.prepend(el("i", { style: `background:${colorOf(k)}` }));
    return s;
  }));
}

function onCounters(c) {
  for (const k of ["events_in", "windowed", "results_out", "dead_letters", "late", "filtered",
    "replayed", "retried", "skipped", "blank_lines", "late_window_misses", "accepted"]) {
    if (k in c) $(`c-${k}`).textContent = c[k].toLocaleString("en");
  }
  $("c-watermark").textContent = c.watermark == null ? "–" : new Date(c.watermark).toISOString().replace("T", " ").replace(".000Z", "");
  const e = c.emit_latency;
  $("c-emit_latency").textContent = !e || e.windows === 0 ? "–" : `${e.p50_ms.toFixed(1)} / ${e.p99_ms.toFixed(1)} ms`;
}

function connect() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.onopen = () => { $("status").textContent = "live"; $("status").className = "live"; };
  ws.onclose = () => {
    $("status").textContent = "disconnected, retrying";
    $("status").className = "down";
    setTimeout(connect, 1000);
  };
  ws.onmessage = (ev) => {
    const m = JSON.parse(ev.data);
    switch (m.type) {
      case "hello":
        state.groupBy = m.group_by; state.values = m.values;
        $("pipeline").textContent = m.pipeline; $("backend").textContent = `${m.backend} backend`;
        state.windows.clear();
        break;
      case "result": onResult(m.result); break;
      case "counters": onCounters(m); break;
      case "lagged": console.warn(`live view fell behind; skipped ${m.skipped} messages`); break;
    }
  };
}

// Redraw at the new width when the window is resized or a phone turns.
let resized = null;
window.addEventListener("resize", () => {
  clearTimeout(resized);
  resized = setTimeout(scheduleDraw, 100);
});

connect();
