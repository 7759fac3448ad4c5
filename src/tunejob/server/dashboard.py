"""The web dashboard: jobs, live loss charts, diagnosis, checkpoints (with chat), upload, compare.

One set of server-rendered pages over two job sources:
  - `tunejob serve` mounts it at `/` over its job store (ServerJobs), behind a login with the
    server's API keys. Logging in gives an HTTP-only, SameSite=Strict session cookie holding a
    random token; the server maps the token to the key's owner digest (store.owner_of), so the key
    itself is never stored, logged or sent back, and each session sees only its owner's jobs.
  - `tunejob dashboard RUN_DIR...` serves local run directories (RunDirs) on 127.0.0.1, no login:
    the runs are the user's own files, readable by anyone on the machine who could open them anyway.

Both read a job's metrics.jsonl (the trainer's stream), so a chart, a diagnosis and a report
of the same run agree. Charts are drawn by plotly.js, served from the installed `plotly` package
(nothing is fetched from the internet). A job page polls /jobs/<id>/metrics.json while the job
trains; the answer carries the chart series and the re-rendered diagnosis, checkpoints and events.
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
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from tunejob.metrics import read_metrics

COOKIE = "tunejob_session"
SESSION_S = 12 * 3600
STATIC = Path(__file__).parent / "static"
POLL_MS = 1500
ACTIVE = ("queued", "running", "validating_files")
e = html.escape


def plotly_js() -> Path | None:
    """plotly.min.js as shipped in the plotly wheel (plotly/package_data/), without importing plotly."""
    spec = find_spec("plotly")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / "package_data" / "plotly.min.js"
        if path.is_file():
            return path
    return None


# ---------------------------------------------------------------- what a page shows of a job

def series(records: list[dict], status: str, total_steps: int | None = None, best_step: int | None = None) -> dict:
    """A run's metric records as chart series, progress, the best checkpoint and the early stop."""
    train = [[r["step"], r["train_loss"]] for r in records if r.get("kind") == "train" and r.get("train_loss") is not None]
    valid = [[r["step"], r["valid_loss"]] for r in records if r.get("kind") == "eval" and r.get("valid_loss") is not None]
    start = [r for r in records if r.get("kind") == "start"]
    end = next((r for r in reversed(records) if r.get("kind") == "end"), None)
    total = total_steps or (start[-1].get("total_steps") if start else None)
    if best_step is None and end is not None:
        best_step = end.get("best_step")
    if best_step is None and valid:  # while training: the lowest validation loss so far
        best_step = min(valid, key=lambda p: p[1])[0]
    best_loss = next((v for s, v in valid if s == best_step), None)
    early = end["step"] if end is not None and end.get("stop_reason") == "early_stopping" else None
    return {"status": status, "train": train, "valid": valid, "best_step": best_step if best_loss is not None else None,
            "best_valid_loss": best_loss, "early_stop_step": early, "steps_done": max((s for s, _ in train), default=0),
            "total_steps": total}


class JobSource(Protocol):
    """Where the dashboard's jobs come from; every method sees only what the viewer may see."""

    backend: str

    def list(self) -> list[dict]: ...                    # summaries: id, status, model, created_at, trained_tokens
    def get(self, job_id: str) -> dict | None: ...       # a summary plus run_dir, hyperparameters, error, fine_tuned_model
    def checkpoints(self, job: dict) -> list[dict]: ...  # step, model (what chat takes), train_loss, valid_loss
    def events(self, job: dict) -> list[tuple[float, str, str]]: ...  # (time, level, message), newest first
    async def chat(self, model: str, message: str) -> str: ...  # raises ValueError with a message to show


def _records(job: dict) -> list[dict]:
    path = Path(job["run_dir"]) / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def _summary(job: dict) -> dict:
    try:
        return json.loads((Path(job["run_dir"]) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


class ServerJobs:
    """The jobs of one API key's owner in `tunejob serve`'s store."""

    backend = "local"

    def __init__(self, app: FastAPI, owner: str):
        self.app, self.owner = app, owner
        self.store, self.worker = app.state.store, app.state.worker

    def _view(self, job: dict) -> dict:
        model = job["model"] if job["_spec"]["model"] == job["model"] else f'{job["model"]} ({job["_spec"]["model"]})'
        return {"id": job["id"], "status": job["status"], "model": model, "created_at": job["created_at"],
                "trained_tokens": job.get("trained_tokens"), "fine_tuned_model": job.get("fine_tuned_model"),
                "error": (job.get("error") or {}).get("message"), "run_dir": str(self.worker.job_dir(job["id"]) / "run"),
                "hyperparameters": {**job["hyperparameters"], **{f"spec.{k}": v for k, v in job["_spec"].get("hyperparameters", {}).items()},
                                    **{k: job["_spec"][k] for k in ("lora", "quantization", "checkpointing") if k in job["_spec"]}}}

    def list(self) -> list[dict]:
        return [self._view(j) for j in self.store.list_jobs(self.owner)]

    def get(self, job_id: str) -> dict | None:
        job = self.store.get_job(self.owner, job_id)
        return self._view(job) if job else None

    def checkpoints(self, job: dict) -> list[dict]:
        return [{"step": c["step_number"], "model": c["fine_tuned_model_checkpoint"], "train_loss": (c.get("metrics") or {}).get("train_loss"),
                 "valid_loss": (c.get("metrics") or {}).get("valid_loss")} for c in self.store.list_checkpoints(job["id"])]

    def events(self, job: dict) -> list[tuple[float, str, str]]:
        return [(ev["created_at"], ev["level"], ev["message"]) for ev in self.store.list_events(job["id"])[:50]]

    async def chat(self, model: str, message: str) -> str:
        answer = await _chat_in_process(self.app, self.owner, model, message)
        if "error" in answer:
            raise ValueError(answer["error"]["message"])
        return answer["choices"][0]["message"]["content"] or ""


class RunDirs:
    """Local run directories (what `tunejob run` writes); ids are the directories' names."""

    backend = "local (run directory)"
    STALE_S = 120  # no metrics written for this long and no summary: the run was stopped or killed

    def __init__(self, run_dirs: list[Path]):
        self.dirs: dict[str, Path] = {}
        for d in run_dirs:
            name, n = d.name or "run", 2
            while name in self.dirs:
                name, n = f"{d.name}-{n}", n + 1
            self.dirs[name] = d
        self._cache = None  # inference.ModelCache, made at the first chat

    def _view(self, name: str, d: Path) -> dict:
        import yaml

        metrics, summary = d / "metrics.jsonl", d / "summary.json"
        records = read_metrics(metrics) if metrics.is_file() else []
        end = next((r for r in reversed(records) if r.get("kind") == "end"), None)
        try:
            done = json.loads(summary.read_text())
        except (OSError, ValueError):  # absent while the run trains
            done = None
        if done is not None or end is not None:
            status = (end or {}).get("stop_reason") or (done or {}).get("stop_reason", "finished")
            status = {"completed": "succeeded", "early_stopping": "succeeded (early stop)"}.get(status, status)
        elif metrics.is_file() and time.time() - metrics.stat().st_mtime < self.STALE_S:
            status = "running"
        else:
            status = "interrupted" if metrics.is_file() else "not started"
        try:
            spec = yaml.safe_load((d / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            spec = {}
        hp = {**(spec.get("hyperparameters") or {}), **{k: spec[k] for k in ("lora", "quantization", "checkpointing") if k in spec}}
        created = metrics.stat().st_mtime if metrics.is_file() else d.stat().st_mtime
        return {"id": name, "status": status, "model": str(spec.get("model", "?")), "created_at": created,
                "trained_tokens": (done or {}).get("trained_tokens"),
                "fine_tuned_model": None, "error": None, "run_dir": str(d), "hyperparameters": hp, "_records": records}

    def list(self) -> list[dict]:
        return [self._view(n, d) for n, d in self.dirs.items()]

    def get(self, job_id: str) -> dict | None:
        d = self.dirs.get(job_id)
        return self._view(job_id, d) if d is not None else None

    def checkpoints(self, job: dict) -> list[dict]:
        from tunejob import checkpoint as ckpt

        evals = {r["step"]: r.get("valid_loss") for r in job["_records"] if r.get("kind") == "eval"}
        trains = {r["step"]: r.get("train_loss") for r in job["_records"] if r.get("kind") == "train"}
        return [{"step": step, "model": f'{job["id"]}/{path.name}', "train_loss": trains.get(step), "valid_loss": evals.get(step)}
                for step, path in reversed(ckpt.list_checkpoints(Path(job["run_dir"])))]

    def events(self, job: dict) -> list[tuple[float, str, str]]:
        return [(job["created_at"], "info", f'step {r["step"]}: {r["message"]}') for r in reversed(job["_records"])
                if r.get("kind") not in ("train", "eval") and r.get("message")][:50]

    async def chat(self, model: str, message: str) -> str:
        """Base model + the checkpoint's adapter in this process (cached), greedy, 64 tokens."""
        import asyncio

        from tunejob.chat import base_model_of
        from tunejob.server import inference

        name, _, step_dir = model.partition("/")
        run = self.dirs.get(name)
        ckpt_dir = run / "checkpoints" / step_dir if run is not None and re.fullmatch(r"step-\d{6,}", step_dir) else None
        if ckpt_dir is None or not (ckpt_dir / "adapter_config.json").is_file():
            raise ValueError(f"no checkpoint {model!r} among these runs")
        self._cache = self._cache or inference.ModelCache()

        def run_chat() -> str:
            m, tok = self._cache.get(base_model_of(ckpt_dir), ckpt_dir)
            out = inference.complete(m, tok, [{"role": "user", "content": message}], model, max_tokens=64)
            return out["choices"][0]["message"]["content"] or ""

        return await asyncio.get_running_loop().run_in_executor(None, run_chat)


# ---------------------------------------------------------------- HTML

def _page(title: str, body: str, nav: bool = True, logout: bool = False, scripts: bool = False) -> HTMLResponse:
    links = '<a href="/">Jobs</a><a href="/upload">Upload</a><a href="/compare">Compare</a>' if nav else ""
    if logout:
        links += '<form method="post" action="/logout"><button>Log out</button></form>'
    js = '<script src="/static/plotly.min.js"></script><script src="/static/dashboard.js"></script>' if scripts else ""
    return HTMLResponse(f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(title)} - tunejob</title>
<link rel="stylesheet" href="/static/dashboard.css">{js}</head>
<body><header><b>tunejob</b>{links}</header><main><h1>{e(title)}</h1>{body}</main></body></html>""")


def _table(head: list[str], rows: list[list[str]], id: str = "") -> str:
    """Cells are HTML already (escape before)."""
    th = "".join(f"<th>{h}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table{f" id={id!r}" if id else ""}><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'


def _num(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else ("–" if v is None else e(f"{v:,}" if isinstance(v, int) else str(v)))


def diagnosis_html(records: list[dict], hyperparameters: dict) -> str:
    from tunejob.diagnose import diagnose

    if not any(r.get("kind") == "train" for r in records):
        return "<p>No metrics yet; the diagnosis appears here once the job has trained a few steps.</p>"
    lr = hyperparameters.get("spec.learning_rate", hyperparameters.get("learning_rate"))
    epochs = hyperparameters.get("spec.epochs", hyperparameters.get("epochs"))
    d = diagnose(records, learning_rate=lr if isinstance(lr, (int, float)) else None, epochs=epochs if isinstance(epochs, int) else None)
    rows = [[e(f["kind"]), e(f["message"]), e(f["advice"])] for f in d["findings"]]
    return f'<p class="verdict" id="verdict">Verdict: {e(d["verdict"])}</p>' + _table(["finding", "what", "what to do"], rows)


def checkpoints_html(job: dict, ckpts: list[dict], best_step: int | None) -> str:
    rows = []
    for c in ckpts:
        star = " ★ best" if c["step"] == best_step else ""
        rows.append([f'{c["step"]}{star}', f'<code>{e(c["model"])}</code>', _num(c["train_loss"]), _num(c["valid_loss"]),
                     f'<form method="post" action="/jobs/{e(job["id"])}/chat"><input type="hidden" name="model" value="{e(c["model"])}">'
                     '<input type="text" name="message" placeholder="Say something" required> <button>Chat</button></form>'])
    return _table(["step", "model id", "train loss", "valid loss", "chat with this checkpoint"], rows, id="checkpoints")


def events_html(events: list[tuple[float, str, str]]) -> str:
    rows = [[time.strftime("%H:%M:%S", time.gmtime(t)), e(level), e(msg)] for t, level, msg in events]
    return _table(["time (UTC)", "level", "message"], rows, id="events")


def data_html(records: list[dict], summary: dict) -> str:
    start = next((r for r in reversed(records) if r.get("kind") == "start"), {})
    facts = [("training examples", summary.get("train_examples", start.get("train_examples"))),
             ("validation examples", summary.get("validation_examples", start.get("validation_examples"))),
             ("trainable parameters", summary.get("trainable_parameters", start.get("trainable_parameters"))),
             ("tokens seen", summary.get("tokens_seen")), ("trained (assistant) tokens", summary.get("trained_tokens")),
             ("padding fraction", summary.get("padding_fraction")), ("tokens / s", summary.get("tokens_per_second")),
             ("peak memory (MB)", summary.get("peak_memory_mb")), ("wall time (s)", summary.get("wall_time_s"))]
    return _table(["", "value"], [[e(k), _num(v)] for k, v in facts if v is not None], id="data")


def _fragments(src: JobSource, job: dict, records: list[dict], s: dict) -> dict:
    return {"diagnosis": diagnosis_html(records, job["hyperparameters"]), "checkpoints": checkpoints_html(job, src.checkpoints(job), s["best_step"]),
            "events": events_html(src.events(job)), "data": data_html(records, _summary(job))}


def _upload_form() -> str:
    return """<form method="post" action="/upload" enctype="multipart/form-data">
<input type="file" name="file" accept=".jsonl,.json,.txt" required> <button>Validate</button></form>
<p><small>The file is validated only; create jobs with the API (files.create + fine_tuning.jobs.create) or `tunejob run`.</small></p>"""


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


async def _chat_in_process(app: FastAPI, owner: str, model: str, message: str) -> dict:
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


# ---------------------------------------------------------------- routes

class _NotFound(Exception):
    pass


class _NeedLogin(Exception):
    pass


def add_pages(app: FastAPI, source_for, max_upload_bytes: int, logout: bool) -> None:
    """The dashboard's routes; `source_for(request)` returns the viewer's JobSource or raises _NeedLogin."""

    @app.exception_handler(_NeedLogin)
    async def _need_login(request: Request, exc: _NeedLogin):
        if request.url.path.endswith(".json"):
            return JSONResponse({"error": "not logged in"}, status_code=401)
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(_NotFound)
    async def _not_found(request: Request, exc: _NotFound):
        return HTMLResponse(f"<p>No such job: {e(str(exc))}</p>", status_code=404)

    def page(title: str, body: str, scripts: bool = False) -> HTMLResponse:
        return _page(title, body, logout=logout, scripts=scripts)

    def job_or_404(src: JobSource, job_id: str) -> dict:
        job = src.get(job_id)
        if job is None:
            raise _NotFound(job_id)
        return job

    def job_series(job: dict) -> tuple[list[dict], dict]:
        records = job.get("_records") if job.get("_records") is not None else _records(job)
        best = _summary(job).get("best_step")
        return records, series(records, job["status"], best_step=best)

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

    @app.get("/", include_in_schema=False)
    def jobs_page(request: Request):
        src = source_for(request)
        rows = []
        for job in src.list():
            _, s = job_series(job)
            rows.append([f'<a href="/jobs/{e(job["id"])}">{e(job["id"])}</a>', e(job["status"]), e(src.backend), e(job["model"]),
                         f'{s["steps_done"]} / {s["total_steps"] if s["total_steps"] is not None else "?"}',
                         _num(job.get("trained_tokens")), time.strftime("%Y-%m-%d %H:%M", time.gmtime(job["created_at"]))])
        body = _table(["job", "status", "backend", "base model", "progress (steps)", "trained tokens", "created (UTC)"], rows, id="jobs")
        if not rows:
            body += "<p>No jobs yet. Create one with the OpenAI SDK against this server's /v1, or `tunejob run`.</p>"
        return page("Fine-tuning jobs", body)

    @app.get("/jobs/{job_id}/metrics.json", include_in_schema=False)
    def job_metrics(request: Request, job_id: str):
        src = source_for(request)
        job = job_or_404(src, job_id)
        records, s = job_series(job)
        return {**s, "html": _fragments(src, job, records, s)}

    @app.get("/jobs/{job_id}", include_in_schema=False)
    def job_page(request: Request, job_id: str):
        src = source_for(request)
        job = job_or_404(src, job_id)
        records, s = job_series(job)
        f = _fragments(src, job, records, s)
        hp_rows = [[e(k), f"<code>{e(json.dumps(v))}</code>"] for k, v in job["hyperparameters"].items()]
        error = f'<p class="error">{e(job["error"])}</p>' if job.get("error") else ""
        ftm = f' · fine-tuned model <code>{e(job["fine_tuned_model"])}</code>' if job.get("fine_tuned_model") else ""
        body = f"""<p>Status: <b id="status">{e(job["status"])}</b> · progress: <span id="progress">{s["steps_done"]} / {s["total_steps"] or "?"} steps</span>
· backend {e(src.backend)} · base model <code>{e(job["model"])}</code> · trained tokens {_num(job.get("trained_tokens"))}{ftm}</p>{error}
<h2>Loss</h2><div id="chart" class="chart"></div>
<script>tjLiveChart("chart", {json.dumps(f"/jobs/{job_id}/metrics.json")}, {POLL_MS}, {json.dumps(s["status"] in ACTIVE or s["status"] == "running")});</script>
<h2 id="diagnosis">Diagnosis</h2><div id="diagnosis-box">{f["diagnosis"]}</div>
<h2>Checkpoints</h2><div id="checkpoints-box">{f["checkpoints"]}</div>
<h2>Data and compute</h2><div id="data-box">{f["data"]}</div>
<h2>Hyperparameters</h2>{_table(["name", "value"], hp_rows, id="hyperparameters")}
<h2>Events</h2><div id="events-box">{f["events"]}</div>"""
        return page(f"Job {job_id}", body, scripts=True)

    @app.post("/jobs/{job_id}/chat", include_in_schema=False)
    async def job_chat(request: Request, job_id: str):
        src = source_for(request)
        job_or_404(src, job_id)
        form = await request.form()
        model, message = str(form.get("model") or ""), str(form.get("message") or "")
        try:
            out = f'<pre id="answer">{e(await src.chat(model, message))}</pre>'
        except ValueError as exc:
            out = f'<p class="error">{e(str(exc))}</p>'
        body = f"""<p>Model <code>{e(model)}</code></p><p><b>You:</b> {e(message)}</p><p><b>Answer:</b></p>{out}
<p><a href="/jobs/{e(job_id)}">Back to the job</a></p>"""
        return page("Chat", body)

    @app.get("/upload", include_in_schema=False)
    def upload_form(request: Request):
        source_for(request)
        return page("Upload a dataset", _upload_form())

    @app.post("/upload", include_in_schema=False)
    async def upload(request: Request):
        from tunejob.validate import validate_file

        source_for(request)
        form = await request.form()
        f = form.get("file")
        if f is None or isinstance(f, str):
            return page("Upload a dataset", '<p class="error">Choose a JSONL file.</p>' + _upload_form())
        data = await f.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            return page("Upload a dataset", f'<p class="error">File too large: over {max_upload_bytes:,} bytes.</p>' + _upload_form())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "upload.jsonl"
            path.write_bytes(data)
            report = validate_file(path, min_examples=1).to_dict()
        return page("Validation report", _report_html(report, f.filename or "upload.jsonl") + _upload_form())

    @app.get("/compare", include_in_schema=False)
    def compare(request: Request, a: str = "", b: str = ""):
        src = source_for(request)
        jobs = src.list()
        options = lambda sel: "".join(f'<option value="{e(j["id"])}"{" selected" if j["id"] == sel else ""}>{e(j["id"])} ({e(j["status"])})</option>' for j in jobs)
        body = f"""<form method="get" action="/compare"><select name="a">{options(a)}</select> vs <select name="b">{options(b)}</select>
<button>Compare</button></form>"""
        if a and b:
            (_, sa), (_, sb) = job_series(job_or_404(src, a)), job_series(job_or_404(src, b))
            da, db = {"label": a, "valid": sa["valid"]}, {"label": b, "valid": sb["valid"]}
            body += f"""<h2>Validation loss</h2><div id="chart" class="chart"></div>
<script>tjCompareChart("chart", {json.dumps(da)}, {json.dumps(db)});</script>"""
        return page("Compare validation curves", body, scripts=True)


def mount_dashboard(app: FastAPI, config) -> None:
    """The dashboard of `tunejob serve`, behind a login with the server's API keys."""
    from tunejob.server.store import owner_of

    sessions: dict[str, tuple[str, float]] = {}  # token -> (owner digest, expiry); never the key

    def source_for(request: Request) -> ServerJobs:
        token = request.cookies.get(COOKIE, "")
        hit = sessions.get(token)
        if hit is None or hit[1] < time.time():
            sessions.pop(token, None)
            raise _NeedLogin()
        return ServerJobs(app, hit[0])

    @app.get("/login", include_in_schema=False)
    def login_form(error: str = ""):
        msg = '<p class="error" id="login-error">That key is not accepted by this server.</p>' if error else ""
        return _page("Log in", f"""{msg}<form method="post" action="/login">
<label>API key <input type="password" name="key" autocomplete="off" autofocus></label> <button>Log in</button></form>""", nav=False)

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

    add_pages(app, source_for, config.max_upload_bytes, logout=True)


def local_dashboard(run_dirs: list[Path], max_upload_mb: int = 100) -> FastAPI:
    """`tunejob dashboard RUN_DIR...`: the same pages over local run directories, no login."""
    app = FastAPI(title="tunejob dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    source = RunDirs(run_dirs)
    add_pages(app, lambda request: source, max_upload_mb * 1024 * 1024, logout=False)
    return app
