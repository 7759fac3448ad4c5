// tunejob dashboard: loss charts drawn by plotly.js (served from the installed plotly package).
"use strict";

function tjTraces(series, label) {
  const t = [];
  const pre = label ? label + ": " : "";
  if (series.train && series.train.length) {
    t.push({x: series.train.map(p => p[0]), y: series.train.map(p => p[1]), mode: "lines", name: pre + "training loss",
            line: {color: "#1f77b4", width: 1.5}});
  }
  if (series.valid && series.valid.length) {
    t.push({x: series.valid.map(p => p[0]), y: series.valid.map(p => p[1]), mode: "lines+markers", name: pre + "validation loss",
            line: {color: "#d62728", width: 2}});
  }
  if (series.best_step !== null && series.best_step !== undefined && series.best_valid_loss !== null) {
    t.push({x: [series.best_step], y: [series.best_valid_loss], mode: "markers", name: "best checkpoint (step " + series.best_step + ")",
            marker: {symbol: "star", size: 16, color: "#2ca02c"}});
  }
  // DPO runs: reward margin and accuracy on a second y axis
  const rewards = series.rewards || {};
  for (const [key, name, color, mode] of [["margin", "reward margin", "#9467bd", "lines"], ["reward_accuracy", "reward accuracy", "#ff7f0e", "lines"],
                                          ["valid_margin", "validation reward margin", "#9467bd", "lines+markers"],
                                          ["valid_reward_accuracy", "validation reward accuracy", "#ff7f0e", "lines+markers"],
                                          ["reward_mean", "grader reward", "#2ca02c", "lines"],
                                          ["valid_reward_mean", "held-out grader reward", "#2ca02c", "lines+markers"]]) {
    const pts = rewards[key];
    if (pts && pts.length) {
      t.push({x: pts.map(p => p[0]), y: pts.map(p => p[1]), mode: mode, name: pre + name, yaxis: "y2",
              line: {color: color, width: mode === "lines" ? 1 : 2, dash: mode === "lines" ? "dot" : "solid"}});
    }
  }
  return t;
}

const TJ_LAYOUT = {margin: {t: 30, r: 20, b: 45, l: 55}, xaxis: {title: {text: "step"}}, yaxis: {title: {text: "loss"}},
                   legend: {orientation: "h", y: -0.25}};

// The early stop as a dashed vertical line with a label.
function tjLayout(series) {
  const base = series.rewards ? {...TJ_LAYOUT, yaxis2: {title: {text: "reward"}, overlaying: "y", side: "right"}} : TJ_LAYOUT;
  if (series.early_stop_step === null || series.early_stop_step === undefined) return base;
  const x = series.early_stop_step;
  return {...base,
          shapes: [{type: "line", x0: x, x1: x, yref: "paper", y0: 0, y1: 1, line: {dash: "dash", color: "#555"}}],
          annotations: [{x: x, yref: "paper", y: 1, text: "early stop (step " + x + ")", showarrow: false, yanchor: "bottom"}]};
}

// The number of points drawn in a chart (tests read it).
function tjPointCount(id) {
  const el = document.getElementById(id);
  return (el && el.data) ? el.data.reduce((n, t) => n + t.x.length, 0) : 0;
}

// Replaces a server-rendered section when it changed (an unchanged one keeps what the user typed).
function tjSwap(id, htmlText) {
  const box = document.getElementById(id);
  if (box && typeof htmlText === "string" && box.dataset.html !== htmlText && !box.contains(document.activeElement)) {
    box.innerHTML = htmlText;
    box.dataset.html = htmlText;
  }
}

// Draws the chart; while the job is active, polls its metrics (chart, diagnosis, checkpoints, data,
// events) and stops polling when the job stops.
function tjLiveChart(id, url, intervalMs, active) {
  const el = document.getElementById(id);
  let timer = null;
  async function tick() {
    let data;
    try {
      const r = await fetch(url, {credentials: "same-origin"});
      if (!r.ok) return;
      data = await r.json();
    } catch (e) { return; }
    Plotly.react(el, tjTraces(data, ""), tjLayout(data), {displaylogo: false, responsive: true});
    const p = document.getElementById("progress");
    if (p) p.textContent = data.steps_done + " / " + (data.total_steps === null ? "?" : data.total_steps) + " steps";
    const s = document.getElementById("status");
    if (s) s.textContent = data.status;
    for (const part of ["diagnosis", "checkpoints", "data", "events"]) tjSwap(part + "-box", data.html[part]);
    if (!["queued", "running", "validating_files"].includes(data.status) && timer) {
      clearInterval(timer); timer = null;
    }
  }
  tick();
  if (active) timer = setInterval(tick, intervalMs);
}

function tjCompareChart(id, a, b) {
  const ta = {x: a.valid.map(p => p[0]), y: a.valid.map(p => p[1]), mode: "lines+markers", name: a.label, line: {color: "#d62728"}};
  const tb = {x: b.valid.map(p => p[0]), y: b.valid.map(p => p[1]), mode: "lines+markers", name: b.label, line: {color: "#9467bd"}};
  Plotly.newPlot(document.getElementById(id), [ta, tb], {...TJ_LAYOUT, yaxis: {title: {text: "validation loss"}}},
                 {displaylogo: false, responsive: true});
}
