"""The web dashboard of `tunejob serve`: server-rendered pages at `/` plus a little JS.

Logging in with an API key gives an HTTP-only, SameSite=Strict session cookie holding a random
token; the server maps the token to the key's owner digest (store.owner_of), so the key itself is
never stored, logged or sent back. Each session sees only its owner's jobs and files.

Charts are drawn by plotly.js, served from the installed `plotly` package (nothing is fetched from
the internet); the job page polls /jobs/<id>/metrics.json every 1.5 s while the job trains.
"""

from __future__ import annotations

import hmac
import html
import json
import re
import secrets
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from tunejob.server.store import owner_of

COOKIE = "tunejob_session"
SESSION_S = 12 * 3600
STATIC = Path(__file__).parent / "static"
POLL_MS = 1500
e = html.escape


def plotly_js() -> Path | None:
    """plotly.min.js as shipped in the plotly wheel (plotly/package_data/), without importing plotly."""
    spec = find_spec("plotly")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / "package_data" / "plotly.min.js"
        if path.is_file():
            return path
    return None


def _page(title: str, body: str, owner: str | None = None, scripts: bool = False) -> HTMLResponse:
    nav = ""
    if owner:
        nav = ('<a href="/">Jobs</a><a href="/upload">Upload</a><a href="/compare">Compare</a>'
               '<form method="post" action="/logout"><button>Log out</button></form>')
    js = '<script src="/static/plotly.min.js"></script><script src="/static/dashboard.js"></script>' if scripts else ""
    return HTMLResponse(f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(title)} - tunejob</title>
<link rel="stylesheet" href="/static/dashboard.css">{js}</head>
<body><header><b>tunejob</b>{nav}</header><main><h1>{e(title)}</h1>{body}</main></body></html>""")


def _table(head: list[str], rows: list[list[str]], id: str = "") -> str:
    """Cells are HTML already (escape before)."""
    th = "".join(f"<th>{h}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table{f" id={id!r}" if id else ""}><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'


def _num(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else ("–" if v is None else e(f"{v:,}" if isinstance(v, int) else str(v)))


def mount_dashboard(app: FastAPI, config) -> None:
    store, worker = app.state.store, app.state.worker
    sessions: dict[str, tuple[str, float]] = {}  # token -> (owner digest, expiry); never the key

    def session_owner(request: Request) -> str | None:
        token = request.cookies.get(COOKIE, "")
        hit = sessions.get(token)
        if hit is None or hit[1] < time.time():
            sessions.pop(token, None)
            return None
        return hit[0]

    class NeedLogin(Exception):
        pass

    @app.exception_handler(NeedLogin)
    async def _need_login(request: Request, exc: NeedLogin):
        if request.url.path.endswith(".json"):
            return JSONResponse({"error": "not logged in"}, status_code=401)
        return RedirectResponse("/login", status_code=303)

    def who(request: Request) -> str:
        owner = session_owner(request)
        if owner is None:
            raise NeedLogin()
        return owner

    def job_or_404(owner: str, job_id: str) -> dict:
        job = store.get_job(owner, job_id)
        if job is None:
            raise _NotFound(job_id)
        return job

    @app.exception_handler(_NotFound)
    async def _not_found(request: Request, exc: _NotFound):
        return HTMLResponse(f"<p>No such job: {e(str(exc))}</p>", status_code=404)

    # ------------------------------------------------------------ static

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def _plotly():
        path = plotly_js()
        if path is None:
            return Response("// plotly is not installed: pip install 'tunejob[serve]'", media_type="text/javascript", status_code=404)
        return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    @app.get("/static/{name}", include_in_schema=False)
    def _static(name: str):
        if name not in ("dashboard.js", "dashboard.css"):
            return Response(status_code=404)
        return FileResponse(STATIC / name, media_type="text/javascript" if name.endswith(".js") else "text/css")

    # ------------------------------------------------------------ login

    @app.get("/login", include_in_schema=False)
    def login_form(error: str = ""):
        msg = '<p class="error" id="login-error">That key is not accepted by this server.</p>' if error else ""
        return _page("Log in", f"""{msg}<form method="post" action="/login">
<label>API key <input type="password" name="key" autocomplete="off" autofocus></label> <button>Log in</button></form>""")

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        form = await request.form()
        key = str(form.get("key") or "")
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in config.api_keys):
            return RedirectResponse("/login?error=1", status_code=303)
        token = secrets.token_urlsafe(32)
        sessions[token] = (owner_of(key), time.time() + SESSION_S)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, max_age=SESSION_S, httponly=True, samesite="strict", path="/")
        return response

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request):
        sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # ------------------------------------------------------------ jobs

    def run_dir(job_id: str) -> Path:
        return worker.job_dir(job_id) / "run"

    def series(job: dict) -> dict:
        """The job's metric events as chart series, plus progress and the best checkpoint."""
        events = [ev["data"] for ev in reversed(store.list_events(job["id"])) if ev["type"] == "metrics" and ev["data"]]
        train = [[d["step"], d["train_loss"]] for d in events if "train_loss" in d]
        valid = [[d["step"], d["valid_loss"]] for d in events if "valid_loss" in d]
        best = job.get("_best_step")
        best_info = run_dir(job["id"]) / "best.json"
        if best is None and best_info.is_file():
            try:
                best = json.loads(best_info.read_text()).get("step")
            except (OSError, ValueError):
                pass
        best_loss = next((v for s, v in valid if s == best), None)
        return {"status": job["status"], "train": train, "valid": valid, "best_step": best if best_loss is not None else None,
                "best_valid_loss": best_loss, "steps_done": max((s for s, _ in train), default=0), "total_steps": total_steps(job)}

    def total_steps(job: dict) -> int | None:
        summary = run_dir(job["id"]) / "summary.json"
        if summary.is_file():
            try:
                return json.loads(summary.read_text()).get("total_steps")
            except (OSError, ValueError):
                pass
        log = worker.job_dir(job["id"]) / "train.log"
        found = re.search(r": (\d+) steps of ", log.read_text(errors="replace")) if log.is_file() else None
        return int(found.group(1)) if found else None

    @app.get("/", include_in_schema=False)
    def jobs_page(request: Request):
        owner = who(request)
        rows = []
        for job in store.list_jobs(owner):
            s = series(job)
            rows.append([f'<a href="/jobs/{e(job["id"])}">{e(job["id"])}</a>', e(job["status"]), "local",
                         e(job["model"]) + (f' <small>({e(str(job["_spec"]["model"]))})</small>' if job["_spec"]["model"] != job["model"] else ""),
                         f'{s["steps_done"]} / {s["total_steps"] if s["total_steps"] is not None else "?"}',
                         _num(job.get("trained_tokens")), time.strftime("%Y-%m-%d %H:%M", time.gmtime(job["created_at"]))])
        body = _table(["job", "status", "backend", "base model", "progress (steps)", "trained tokens", "created (UTC)"], rows, id="jobs")
        if not rows:
            body += "<p>No jobs yet. Create one with the OpenAI SDK against this server's /v1.</p>"
        return _page("Fine-tuning jobs", body, owner)

    @app.get("/jobs/{job_id}/metrics.json", include_in_schema=False)
    def job_metrics(request: Request, job_id: str):
        return series(job_or_404(who(request), job_id))

    def diagnosis_html(job: dict) -> str:
        from tunejob.diagnose import diagnose
        from tunejob.metrics import read_metrics

        path = run_dir(job["id"]) / "metrics.jsonl"
        records = read_metrics(path) if path.is_file() else []
        if not records:
            return "<p>No metrics yet; the diagnosis appears here once the job has trained a few steps (reload the page).</p>"
        hp = job["_spec"].get("hyperparameters", {})
        d = diagnose(records, learning_rate=hp.get("learning_rate"), epochs=hp.get("epochs"))
        rows = [[e(f["kind"]), e(f["message"]), e(f["advice"])] for f in d["findings"]]
        return f'<p class="verdict" id="verdict">Verdict: {e(d["verdict"])}</p>' + _table(["finding", "what", "what to do"], rows)

    @app.get("/jobs/{job_id}", include_in_schema=False)
    def job_page(request: Request, job_id: str):
        owner = who(request)
        job = job_or_404(owner, job_id)
        s = series(job)
        ckpts = store.list_checkpoints(job_id)
        ck_rows = []
        for c in ckpts:
            m = c.get("metrics") or {}
            name = c["fine_tuned_model_checkpoint"]
            star = " ★ best" if c["step_number"] == s["best_step"] else ""
            ck_rows.append([f'{c["step_number"]}{star}', f"<code>{e(name)}</code>", _num(m.get("train_loss")), _num(m.get("valid_loss")),
                            f'<form method="post" action="/jobs/{e(job_id)}/chat"><input type="hidden" name="model" value="{e(name)}">'
                            '<input type="text" name="message" placeholder="Say something" required> <button>Chat</button></form>'])
        events = [[time.strftime("%H:%M:%S", time.gmtime(ev["created_at"])), e(ev["level"]), e(ev["message"])] for ev in store.list_events(job_id)[:200]]
        hp = {**job["hyperparameters"], **{f"spec.{k}": v for k, v in job["_spec"].get("hyperparameters", {}).items()}}
        for section in ("lora", "quantization", "checkpointing"):
            if section in job["_spec"]:
                hp[section] = job["_spec"][section]
        hp_rows = [[e(k), f"<code>{e(json.dumps(v))}</code>"] for k, v in hp.items()]
        error = f'<p class="error">{e(job["error"]["message"])}</p>' if job.get("error") else ""
        body = f"""<p>Status: <b id="status">{e(job["status"])}</b> · progress: <span id="progress">{s["steps_done"]} / {s["total_steps"] or "?"} steps</span>
· base model <code>{e(job["model"])}</code> · trained tokens {_num(job.get("trained_tokens"))}
{f' · fine-tuned model <code>{e(job["fine_tuned_model"])}</code>' if job.get("fine_tuned_model") else ""}</p>{error}
<h2>Loss</h2><div id="chart" class="chart"></div>
<script>tjLiveChart("chart", {json.dumps(f"/jobs/{job_id}/metrics.json")}, {POLL_MS});</script>
<h2 id="diagnosis">Diagnosis</h2>{diagnosis_html(job)}
<h2>Checkpoints</h2>{_table(["step", "model id", "train loss", "valid loss", "chat with this checkpoint"], ck_rows, id="checkpoints")}
<h2>Hyperparameters</h2>{_table(["name", "value"], hp_rows, id="hyperparameters")}
<h2>Events</h2>{_table(["time (UTC)", "level", "message"], events, id="events")}"""
        return _page(f"Job {job_id}", body, owner, scripts=True)

    @app.post("/jobs/{job_id}/chat", include_in_schema=False)
    async def job_chat(request: Request, job_id: str):
        owner = who(request)
        job_or_404(owner, job_id)
        form = await request.form()
        model, message = str(form.get("model") or ""), str(form.get("message") or "")
        answer = await _chat(app, owner, model, message)
        if "error" in answer:
            out = f'<p class="error">{e(answer["error"]["message"])}</p>'
        else:
            out = f'<pre id="answer">{e(answer["choices"][0]["message"]["content"] or "")}</pre>'
        body = f"""<p>Model <code>{e(model)}</code></p><p><b>You:</b> {e(message)}</p><p><b>Answer:</b></p>{out}
<p><a href="/jobs/{e(job_id)}">Back to the job</a></p>"""
        return _page("Chat", body, owner)

    # ------------------------------------------------------------ upload and validation

    @app.get("/upload", include_in_schema=False)
    def upload_form(request: Request):
        owner = who(request)
        return _page("Upload a dataset", _upload_form(), owner)

    @app.post("/upload", include_in_schema=False)
    async def upload(request: Request):
        from tunejob.validate import validate_file

        owner = who(request)
        form = await request.form()
        f = form.get("file")
        if f is None or isinstance(f, str):
            return _page("Upload a dataset", '<p class="error">Choose a JSONL file.</p>' + _upload_form(), owner)
        data = await f.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            return _page("Upload a dataset", f'<p class="error">File too large: over {config.max_upload_bytes:,} bytes.</p>' + _upload_form(), owner)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "upload.jsonl"
            path.write_bytes(data)
            report = validate_file(path, min_examples=1).to_dict()
        return _page("Validation report", _report_html(report, f.filename or "upload.jsonl") + _upload_form(), owner)

    # ------------------------------------------------------------ compare

    @app.get("/compare", include_in_schema=False)
    def compare(request: Request, a: str = "", b: str = ""):
        owner = who(request)
        jobs = store.list_jobs(owner)
        options = lambda sel: "".join(f'<option value="{e(j["id"])}"{" selected" if j["id"] == sel else ""}>{e(j["id"])} ({e(j["status"])})</option>' for j in jobs)
        body = f"""<form method="get" action="/compare"><select name="a">{options(a)}</select> vs <select name="b">{options(b)}</select>
<button>Compare</button></form>"""
        if a and b:
            sa, sb = series(job_or_404(owner, a)), series(job_or_404(owner, b))
            da, db = {"label": a, "valid": sa["valid"]}, {"label": b, "valid": sb["valid"]}
            body += f"""<h2>Validation loss</h2><div id="chart" class="chart"></div>
<script>tjCompareChart("chart", {json.dumps(da)}, {json.dumps(db)});</script>"""
        return _page("Compare validation curves", body, owner, scripts=True)


class _NotFound(Exception):
    pass


def _upload_form() -> str:
    return """<form method="post" action="/upload" enctype="multipart/form-data">
<input type="file" name="file" accept=".jsonl,.json,.txt" required> <button>Validate</button></form>
<p><small>The file is validated only; create jobs with the API (files.create + fine_tuning.jobs.create).</small></p>"""


def _report_html(r: dict, name: str) -> str:
    cls = "ok" if r["ok"] else "error"
    head = (f'<p class="{cls}" id="summary"><b>{e(name)}</b>: {r["examples"]} examples in {r["lines"]} lines; '
            f'{r["error_count"]} error(s), {r["warning_count"]} warning(s) — {"ready to train" if r["ok"] else "fix the errors below"}</p>')
    rows = []
    for severity in ("errors", "warnings"):
        for group in r[severity]:
            for p in group["problems"]:
                rows.append([f'<span class="{"error" if severity == "errors" else "warn"}">{severity[:-1]}</span>',
                             f'line {p["line"]}' if p["line"] else "", e(group["kind"]), e(p["message"]), e(group["fix"])])
    return head + (_table(["severity", "line", "kind", "problem", "fix"], rows, id="problems") if rows else "")


async def _chat(app: FastAPI, owner: str, model: str, message: str) -> dict:
    """The same code path as POST /v1/chat/completions, called in-process with the session's owner."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": message}], "max_tokens": 64}).encode()

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [(b"content-type", b"application/json")],
             "query_string": b"", "state": {"owner": owner}, "app": app}
    request = Request(scope, receive)
    request.state.owner = owner
    try:
        return await app.state.chat_completions(request)
    except Exception as exc:  # ApiError and friends: show the message on the page
        return {"error": {"message": getattr(exc, "message", None) or f"{exc.__class__.__name__}: {exc}"}}
