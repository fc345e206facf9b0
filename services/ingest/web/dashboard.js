// The round dashboard: Dice and minutes per CT by round from the metrics service (through
// ingest's /v1/workbench/dashboard), the serving model, and the queue sizes of your sites.

import * as api from "./api.js";

const $ = (sel) => document.querySelector(sel);
const COLOURS = ["#3d8bfd", "#f0a23b", "#4cbf73"];

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "-" : Number(x).toFixed(digits);
}

function row(table, values) {
  const tr = $(`${table} tbody`).insertRow();
  for (const v of values) tr.insertCell().textContent = v;
}

// A small line chart: one x label per round, one or more series (null = no point).
function chart(canvas, title, labels, series, yMax) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width;
  const H = canvas.height;
  const pad = { l: 48, r: 12, t: 28, b: 44 };
  ctx.clearRect(0, 0, W, H);
  ctx.fillStyle = "#dfe3ea";
  ctx.font = "14px system-ui, sans-serif";
  ctx.fillText(title, pad.l, 18);
  const values = series.flatMap((s) => s.values.filter((v) => v !== null));
  const top = yMax ?? Math.max(1, ...values) * 1.1;
  const x = (i) => pad.l + ((i + 0.5) * (W - pad.l - pad.r)) / Math.max(1, labels.length);
  const y = (v) => H - pad.b - (v / top) * (H - pad.t - pad.b);
  ctx.strokeStyle = "#313742";
  ctx.fillStyle = "#8b93a1";
  ctx.font = "11px system-ui, sans-serif";
  for (let k = 0; k <= 4; k++) {
    const v = (top * k) / 4;
    ctx.beginPath();
    ctx.moveTo(pad.l, y(v));
    ctx.lineTo(W - pad.r, y(v));
    ctx.stroke();
    ctx.fillText(fmt(v, top > 5 ? 1 : 2), 6, y(v) + 4);
  }
  labels.forEach((label, i) => ctx.fillText(label, x(i) - 24, H - pad.b + 16));
  if (!labels.length) ctx.fillText("no rounds yet", W / 2 - 30, H / 2);
  series.forEach((s, n) => {
    ctx.strokeStyle = ctx.fillStyle = COLOURS[n % COLOURS.length];
    ctx.lineWidth = 2;
    ctx.beginPath();
    let pen = false;
    s.values.forEach((v, i) => {
      if (v === null) return (pen = false);
      if (pen) ctx.lineTo(x(i), y(v));
      else ctx.moveTo(x(i), y(v));
      pen = true;
    });
    ctx.stroke();
    s.values.forEach((v, i) => {
      if (v === null) return;
      ctx.beginPath();
      ctx.arc(x(i), y(v), 3.5, 0, 2 * Math.PI);
      ctx.fill();
    });
    ctx.fillText(s.name, pad.l + 8 + n * 170, H - 8);
  });
}

async function main() {
  if (!api.token()) {
    location.href = "/ui/";
    return;
  }
  let d;
  try {
    d = await api.getJson("/v1/workbench/dashboard");
  } catch (err) {
    $("#status").textContent = err.message;
    return;
  }
  const current = d.current_model;
  $("#current").textContent = current
    ? `Serving now: ${current.model} v${current.version}.`
    : "No model is serving yet.";
  if (d.metrics_error) $("#status").textContent = d.metrics_error;
  const report = d.report || { rounds: [], evaluation: [] };
  const key = (m) => `${m.model} v${m.version}`;
  const refs = [];
  for (const m of [...report.rounds, ...report.evaluation]) {
    if (!refs.some((r) => r.model === m.model && r.version === m.version)) refs.push(m);
  }
  const igniterFirst = (a, b) =>
    (a.role === "igniter" ? 0 : 1) - (b.role === "igniter" ? 0 : 1) || a.version - b.version;
  refs.sort(igniterFirst);
  const labels = refs.map((m) => `${m.role || m.model} v${m.version}`);
  const byRef = (list) => new Map(list.map((m) => [key(m), m]));
  const rounds = byRef(report.rounds);
  const evaluation = byRef(report.evaluation);
  const keys = refs.map(key);
  const pick = (map, field) =>
    keys.map((k) => (map.has(k) && map.get(k)[field] !== undefined ? map.get(k)[field] : null));
  chart($("#dice-chart"), "Dice by round", labels, [
    { name: "evaluation set", values: pick(evaluation, "mean_dice") },
    { name: "pre-annotation vs correction", values: pick(rounds, "mean_dice") },
  ], 1);
  chart($("#minutes-chart"), "Minutes per CT by round", labels, [
    { name: "minutes per CT", values: pick(rounds, "minutes_per_ct") },
  ]);
  for (const r of report.rounds) {
    row("#rounds", [
      r.round < 0 ? "-" : r.round,
      key(r),
      r.volumes_annotated,
      fmt(r.minutes_per_ct, 2),
      fmt(r.mean_dice),
    ]);
  }
  for (const e of report.evaluation) row("#evaluation", [key(e), e.volumes, fmt(e.mean_dice)]);
  for (const q of d.queues) row("#queues", [q.site_id, q.waiting, q.leased, q.annotated]);
  document.body.dataset.loaded = "true";
}

main();
