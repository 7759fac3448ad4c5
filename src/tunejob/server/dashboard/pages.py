"""The dashboard's HTML: the page frame, tables, and the fragments a job page refreshes while it
polls (diagnosis, checkpoints, data and compute, events). Every value from a run is escaped."""

from __future__ import annotations

import html
import time

from fastapi.responses import HTMLResponse

from tunejob.server.dashboard.job_sources import JobSource, summary_of

e = html.escape


def frame(title: str, body: str, nav: bool = True, logout: bool = False, scripts: bool = False) -> HTMLResponse:
    links = '<a href="/">Jobs</a><a href="/upload">Upload</a><a href="/compare">Compare</a>' if nav else ""
    if logout:
        links += '<form method="post" action="/logout"><button>Log out</button></form>'
    js = '<script src="/static/plotly.min.js"></script><script src="/static/dashboard.js"></script>' if scripts else ""
    return HTMLResponse(f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(title)} - tunejob</title>
<link rel="stylesheet" href="/static/dashboard.css">{js}</head>
<body><header><b>tunejob</b>{links}</header><main><h1>{e(title)}</h1>{body}</main></body></html>""")


def table(head: list[str], rows: list[list[str]], id: str = "") -> str:
    """Cells are HTML already (escape before)."""
    th = "".join(f"<th>{h}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table{f" id={id!r}" if id else ""}><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'


def num(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else ("–" if v is None else e(f"{v:,}" if isinstance(v, int) else str(v)))


def diagnosis_html(records: list[dict], hyperparameters: dict) -> str:
    from tunejob.monitor.diagnose import diagnose

    if not any(r.get("kind") == "train" for r in records):
        return "<p>No metrics yet; the diagnosis appears here once the job has trained a few steps.</p>"
    lr = hyperparameters.get("spec.learning_rate", hyperparameters.get("learning_rate"))
    epochs = hyperparameters.get("spec.epochs", hyperparameters.get("epochs"))
    d = diagnose(records, learning_rate=lr if isinstance(lr, (int, float)) else None, epochs=epochs if isinstance(epochs, int) else None)
    rows = [[e(f["kind"]), e(f["message"]), e(f["advice"])] for f in d["findings"]]
    return f'<p class="verdict" id="verdict">Verdict: {e(d["verdict"])}</p>' + table(["finding", "what", "what to do"], rows)


def checkpoints_html(job: dict, ckpts: list[dict], best_step: int | None) -> str:
    rows = []
    for c in ckpts:
        star = " ★ best" if c["step"] == best_step else ""
        rows.append([f'{c["step"]}{star}', f'<code>{e(c["model"])}</code>', num(c["train_loss"]), num(c["valid_loss"]),
                     f'<form method="post" action="/jobs/{e(job["id"])}/chat"><input type="hidden" name="model" value="{e(c["model"])}">'
                     '<input type="text" name="message" placeholder="Say something" required> <button>Chat</button></form>'])
    return table(["step", "model id", "train loss", "valid loss", "chat with this checkpoint"], rows, id="checkpoints")


def events_html(events: list[tuple[float, str, str]]) -> str:
    rows = [[time.strftime("%H:%M:%S", time.gmtime(t)), e(level), e(msg)] for t, level, msg in events]
    return table(["time (UTC)", "level", "message"], rows, id="events")


def data_html(records: list[dict], summary: dict) -> str:
    start = next((r for r in reversed(records) if r.get("kind") == "start"), {})
    facts = [("training examples", summary.get("train_examples", start.get("train_examples"))),
             ("validation examples", summary.get("validation_examples", start.get("validation_examples"))),
             ("trainable parameters", summary.get("trainable_parameters", start.get("trainable_parameters"))),
             ("tokens seen", summary.get("tokens_seen")), ("trained (assistant) tokens", summary.get("trained_tokens")),
             ("padding fraction", summary.get("padding_fraction")), ("tokens / s", summary.get("tokens_per_second")),
             ("peak memory (MB)", summary.get("peak_memory_mb")), ("wall time (s)", summary.get("wall_time_s"))]
    return table(["", "value"], [[e(k), num(v)] for k, v in facts if v is not None], id="data")


def fragments(src: JobSource, job: dict, records: list[dict], s: dict) -> dict:
    return {"diagnosis": diagnosis_html(records, job["hyperparameters"]), "checkpoints": checkpoints_html(job, src.checkpoints(job), s["best_step"]),
            "events": events_html(src.events(job)), "data": data_html(records, summary_of(job))}


def upload_form_html() -> str:
    return """<form method="post" action="/upload" enctype="multipart/form-data">
<input type="file" name="file" accept=".jsonl,.json,.txt" required> <button>Validate</button></form>
<p><small>The file is validated only; create jobs with the API (files.create + fine_tuning.jobs.create) or `tunejob run`.</small></p>"""


def report_html(r: dict, name: str) -> str:
    cls = "ok" if r["ok"] else "error"
    head = (f'<p class="{cls}" id="summary"><b>{e(name)}</b>: {r["examples"]} examples in {r["lines"]} lines; '
            f'{r["error_count"]} error(s), {r["warning_count"]} warning(s) — {"ready to train" if r["ok"] else "fix the errors below"}</p>')
    rows = []
    for severity in ("errors", "warnings"):
        for group in r[severity]:
            for p in group["problems"]:
                rows.append([f'<span class="{"error" if severity == "errors" else "warn"}">{severity[:-1]}</span>',
                             f'line {p["line"]}' if p["line"] else "", e(group["kind"]), e(p["message"]), e(group["fix"])])
    return head + (table(["severity", "line", "kind", "problem", "fix"], rows, id="problems") if rows else "")
