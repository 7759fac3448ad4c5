"""compare.html: one self-contained page, the summary on top, then every prompt with the golden
and the candidate answer side by side, worst first (pure rendering of compare's result)."""

from __future__ import annotations

import html
import json
from pathlib import Path

STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}th{background:#f4f4f4}pre{white-space:pre-wrap;margin:0;max-width:44em}
.bad{background:#fdecea}.ok{background:#eef8ee}.meta{color:#666;font-size:12px}"""


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _answer(answer: dict) -> str:
    parts = [html.escape(answer.get("content") or "")]
    for call in answer.get("tool_calls") or []:
        fn = call.get("function") or {}
        parts.append(f"<b>tool call</b> {html.escape(str(fn.get('name')))}({html.escape(str(fn.get('arguments')))})")
    return "<pre>" + "\n".join(p for p in parts if p) + "</pre>"


def _summary(result: dict) -> str:
    head = "<tr><th>prompts</th><th>n</th><th>exact match</th><th>token F1</th><th>ROUGE-L</th><th>same tools</th><th>same arguments</th></tr>"
    body = "".join(
        f"<tr><td>{label}</td>" + "".join(f"<td>{_fmt(result[key][k])}</td>" for k in ("prompts", "exact_match", "f1", "rouge_l", "same_tools", "same_arguments")) + "</tr>"
        for key, label in (("all", "all"), ("seen_in_training", "seen in training"), ("not_seen_in_training", "never seen in training")))
    sides = "<tr><th></th><th>latency mean s</th><th>p50</th><th>p95</th><th>prompt tokens</th><th>answer tokens</th><th>USD / 1,000 queries</th></tr>" + "".join(
        f"<tr><td>{label}</td>" + "".join(f"<td>{_fmt(result[key][k])}</td>" for k in (
            "latency_mean_s", "latency_p50_s", "latency_p95_s", "prompt_tokens_mean", "completion_tokens_mean", "usd_per_1k_queries")) + "</tr>"
        for key, label in (("golden_side", "golden (source model)"), ("candidate_side", "candidate")))
    judge = result.get("judge")
    verdict = (f"<p>Judge {html.escape(str(judge['model']))}: candidate wins {judge['wins']}, ties {judge['ties']}, loses {judge['losses']} "
               f"of {judge['judged']} judged; win-or-tie rate {_fmt(judge['win_or_tie_rate'])} "
               f"(95% interval {_fmt(judge['win_or_tie_ci95'][0])} to {_fmt(judge['win_or_tie_ci95'][1])}).</p>") if judge else "<p>No judge was asked.</p>"
    return f"<table>{head}{body}</table><table>{sides}</table>{verdict}"


def render_html(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        s = r["scores"]
        cls = "bad" if (s.get("same_arguments") is False or s["rouge_l"] < 0.5) else "ok"
        prompt = html.escape(json.dumps(r["messages"][-3:], ensure_ascii=False, indent=1))
        rows.append(f"<tr class='{cls}'><td><pre>{prompt}</pre><div class='meta'>{html.escape(str(r['source']))}"
                    f"{' · trained on' if r['seen_in_training'] else ' · never seen'} · {r['id']}</div></td>"
                    f"<td>{_answer(r['golden'])}</td><td>{_answer(r['candidate'])}"
                    f"{'<div class=meta>' + html.escape(r['candidate_error']) + '</div>' if r.get('candidate_error') else ''}</td>"
                    f"<td>EM {_fmt(s['exact_match'])}<br>F1 {_fmt(s['f1'])}<br>ROUGE-L {_fmt(s['rouge_l'])}"
                    f"{'<br>same tools ' + str(s['same_tools']) + '<br>same args ' + str(s['same_arguments']) if 'same_tools' in s else ''}</td></tr>")
    title = f"{html.escape(result['source_model'])} against {html.escape(result['candidate'])}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head><body>"
            f"<h1>Golden set vs candidate</h1><p>{title}</p>{_summary(result)}"
            "<h2>Every prompt, worst first</h2><table><tr><th>prompt (last turns)</th><th>golden answer</th><th>candidate</th><th>scores</th></tr>"
            + "".join(rows) + "</table></body></html>")


def write_report(result: dict, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(result), encoding="utf-8")
    tmp.replace(path)
    return path
