"""The web dashboard: jobs, live loss charts, diagnosis, checkpoints (with chat), upload, compare.

One set of server-rendered pages over two job sources:
  - `tunejob serve` mounts it at `/` over its job store (ServerJobs), behind a login with the
    server's API keys. Logging in gives an HTTP-only, SameSite=Strict session cookie holding a
    random token; the server maps the token to the key's owner digest (store.owner_of), so the key
    itself is never stored, logged or sent back, and each session sees only its owner's jobs.
    Failed logins are limited per client address (server/api/throttle.py: 5 a minute, counted together
    with the /v1 key check's, then 429), and every POST form carries the session's CSRF token,
    checked before the form is acted on.
  - `tunejob dashboard RUN_DIR...` serves local run directories (RunDirs) on 127.0.0.1, no login:
    the runs are the user's own files, readable by anyone on the machine who could open them anyway.
    It answers only Host 127.0.0.1:PORT / localhost:PORT (DNS rebinding), and its forms carry a
    per-process CSRF token.

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

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from tunejob.server.errors import ApiError
from tunejob.server.dashboard.job_sources import JobSource, RunDirs, ServerJobs, records_of, series, summary_of
from tunejob.server.dashboard.pages import fragments, frame, num, report_html, table, upload_form_html

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


# ---------------------------------------------------------------- HTML


# ---------------------------------------------------------------- routes

class _NotFound(Exception):
    pass


class _NeedLogin(Exception):
    pass


class _BadCsrf(Exception):
    pass


_POST_FORM = re.compile(r'(<form method="post"[^>]*>)')


def with_csrf(html_text: str, token: str) -> str:
    """Every POST form of a page carries the session's CSRF token: another site can make a
    logged-in browser send a form here (the cookie goes along), but cannot read this token."""
    return _POST_FORM.sub(lambda m: m.group(1) + f'<input type="hidden" name="csrf" value="{e(token)}">', html_text)


class _Viewer:
    """What every dashboard route needs: the viewer's job source, the page frame, a job or 404."""

    def __init__(self, source_for, csrf_for, logout: bool):
        self.source_for, self.csrf_for, self.logout = source_for, csrf_for, logout

    def page(self, request: Request, title: str, body: str, scripts: bool = False) -> HTMLResponse:
        response = frame(title, body, logout=self.logout, scripts=scripts)
        response.body = with_csrf(response.body.decode(), self.csrf_for(request)).encode()
        response.headers["content-length"] = str(len(response.body))
        return response

    async def form(self, request: Request, max_bytes: int = 1 << 20):
        """The POSTed form of a logged-in viewer, once its CSRF token is the session's."""
        from tunejob.server.api.files import read_form

        try:
            form = await read_form(request, max_bytes)
        except ApiError as exc:
            if exc.status == 413:
                raise
            raise _BadCsrf() from None  # not a form: it carries no token either
        if not hmac.compare_digest(str(form.get("csrf") or "").encode(), self.csrf_for(request).encode()):
            raise _BadCsrf()
        return form

    @staticmethod
    def job_or_404(src: JobSource, job_id: str) -> dict:
        job = src.get(job_id)
        if job is None:
            raise _NotFound(job_id)
        return job

    @staticmethod
    def job_series(job: dict) -> tuple[list[dict], dict]:
        records = job.get("_records") if job.get("_records") is not None else records_of(job)
        best = summary_of(job).get("best_step")
        return records, series(records, job["status"], best_step=best)


def add_pages(app: FastAPI, source_for, csrf_for, max_upload_bytes: int, logout: bool):
    """The dashboard's routes; `source_for(request)` returns the viewer's JobSource or raises
    _NeedLogin; `csrf_for(request)` is the token its POST forms must carry."""

    @app.exception_handler(_NeedLogin)
    async def _need_login(request: Request, exc: _NeedLogin):
        if request.url.path.endswith(".json"):
            return JSONResponse({"error": "not logged in"}, status_code=401)
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(_NotFound)
    async def _not_found(request: Request, exc: _NotFound):
        return HTMLResponse(f"<p>No such job: {e(str(exc))}</p>", status_code=404)

    @app.exception_handler(_BadCsrf)
    async def _bad_csrf(request: Request, exc: _BadCsrf):
        return HTMLResponse("<p>This form is out of date or came from another site (no valid CSRF token). Reload the page and send it again.</p>", status_code=403)

    viewer = _Viewer(source_for, csrf_for, logout)
    _add_static(app)
    _add_job_pages(app, viewer)
    _add_data_pages(app, viewer, max_upload_bytes)
    return viewer.form


def _add_static(app: FastAPI) -> None:
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


def _add_job_pages(app: FastAPI, v: _Viewer) -> None:
    @app.get("/", include_in_schema=False)
    def jobs_page(request: Request):
        src = v.source_for(request)
        rows = []
        for job in src.list():
            _, s = v.job_series(job)
            rows.append([f'<a href="/jobs/{e(job["id"])}">{e(job["id"])}</a>', e(job["status"]), e(src.backend), e(job["model"]),
                         f'{s["steps_done"]} / {s["total_steps"] if s["total_steps"] is not None else "?"}',
                         num(job.get("trained_tokens")), time.strftime("%Y-%m-%d %H:%M", time.gmtime(job["created_at"]))])
        body = table(["job", "status", "backend", "base model", "progress (steps)", "trained tokens", "created (UTC)"], rows, id="jobs")
        if not rows:
            body += "<p>No jobs yet. Create one with the OpenAI SDK against this server's /v1, or `tunejob run`.</p>"
        return v.page(request, "Fine-tuning jobs", body)

    @app.get("/jobs/{job_id}/metrics.json", include_in_schema=False)
    def job_metrics(request: Request, job_id: str):
        src = v.source_for(request)
        job = v.job_or_404(src, job_id)
        records, s = v.job_series(job)
        return {**s, "html": {k: with_csrf(h, v.csrf_for(request)) for k, h in fragments(src, job, records, s).items()}}

    @app.get("/jobs/{job_id}", include_in_schema=False)
    def job_page(request: Request, job_id: str):
        src = v.source_for(request)
        job = v.job_or_404(src, job_id)
        records, s = v.job_series(job)
        f = fragments(src, job, records, s)
        hp_rows = [[e(k), f"<code>{e(json.dumps(v))}</code>"] for k, v in job["hyperparameters"].items()]
        error = f'<p class="error">{e(job["error"])}</p>' if job.get("error") else ""
        ftm = f' · fine-tuned model <code>{e(job["fine_tuned_model"])}</code>' if job.get("fine_tuned_model") else ""
        body = f"""<p>Status: <b id="status">{e(job["status"])}</b> · progress: <span id="progress">{s["steps_done"]} / {s["total_steps"] or "?"} steps</span>
· backend {e(src.backend)} · base model <code>{e(job["model"])}</code> · trained tokens {num(job.get("trained_tokens"))}{ftm}</p>{error}
<h2>Loss</h2><div id="chart" class="chart"></div>
<script>tjLiveChart("chart", {json.dumps(f"/jobs/{job_id}/metrics.json")}, {POLL_MS}, {json.dumps(s["status"] in ACTIVE or s["status"] == "running")});</script>
<h2 id="diagnosis">Diagnosis</h2><div id="diagnosis-box">{f["diagnosis"]}</div>
<h2>Checkpoints</h2><div id="checkpoints-box">{f["checkpoints"]}</div>
<h2>Data and compute</h2><div id="data-box">{f["data"]}</div>
<h2>Hyperparameters</h2>{table(["name", "value"], hp_rows, id="hyperparameters")}
<h2>Events</h2><div id="events-box">{f["events"]}</div>"""
        return v.page(request, f"Job {job_id}", body, scripts=True)

    @app.post("/jobs/{job_id}/chat", include_in_schema=False)
    async def job_chat(request: Request, job_id: str):
        src = v.source_for(request)
        v.job_or_404(src, job_id)
        form = await v.form(request)
        model, message = str(form.get("model") or ""), str(form.get("message") or "")
        try:
            out = f'<pre id="answer">{e(await src.chat(model, message))}</pre>'
        except ValueError as exc:
            out = f'<p class="error">{e(str(exc))}</p>'
        body = f"""<p>Model <code>{e(model)}</code></p><p><b>You:</b> {e(message)}</p><p><b>Answer:</b></p>{out}
<p><a href="/jobs/{e(job_id)}">Back to the job</a></p>"""
        return v.page(request, "Chat", body)


def _add_data_pages(app: FastAPI, v: _Viewer, max_upload_bytes: int) -> None:
    @app.get("/upload", include_in_schema=False)
    def upload_form(request: Request):
        v.source_for(request)
        return v.page(request, "Upload a dataset", upload_form_html())

    @app.post("/upload", include_in_schema=False)
    async def upload(request: Request):
        from tunejob.data.validate import validate_file

        v.source_for(request)
        form = await v.form(request, max_upload_bytes)
        f = form.get("file")
        if f is None or isinstance(f, str):
            return v.page(request, "Upload a dataset", '<p class="error">Choose a JSONL file.</p>' + upload_form_html())
        data = await f.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            return v.page(request, "Upload a dataset", f'<p class="error">File too large: over {max_upload_bytes:,} bytes.</p>' + upload_form_html())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "upload.jsonl"
            path.write_bytes(data)
            report = validate_file(path, min_examples=1).to_dict()
        return v.page(request, "Validation report", report_html(report, f.filename or "upload.jsonl") + upload_form_html())

    @app.get("/compare", include_in_schema=False)
    def compare(request: Request, a: str = "", b: str = ""):
        src = v.source_for(request)
        jobs = src.list()
        options = lambda sel: "".join(f'<option value="{e(j["id"])}"{" selected" if j["id"] == sel else ""}>{e(j["id"])} ({e(j["status"])})</option>' for j in jobs)
        body = f"""<form method="get" action="/compare"><select name="a">{options(a)}</select> vs <select name="b">{options(b)}</select>
<button>Compare</button></form>"""
        if a and b:
            (_, sa), (_, sb) = v.job_series(v.job_or_404(src, a)), v.job_series(v.job_or_404(src, b))
            da, db = {"label": a, "valid": sa["valid"]}, {"label": b, "valid": sb["valid"]}
            body += f"""<h2>Validation loss</h2><div id="chart" class="chart"></div>
<script>tjCompareChart("chart", {json.dumps(da)}, {json.dumps(db)});</script>"""
        return v.page(request, "Compare validation curves", body, scripts=True)


class _Sessions:
    """Logged-in browsers: random token -> (owner digest, expiry, CSRF token); never the key."""

    def __init__(self):
        self._by_token: dict[str, tuple[str, float, str]] = {}

    def new(self, owner: str) -> str:
        token = secrets.token_urlsafe(32)
        self._by_token[token] = (owner, time.time() + SESSION_S, secrets.token_urlsafe(32))
        return token

    def get(self, request: Request) -> tuple[str, float, str]:
        token = request.cookies.get(COOKIE, "")
        hit = self._by_token.get(token)
        if hit is None or hit[1] < time.time():
            self._by_token.pop(token, None)
            raise _NeedLogin()
        return hit

    def end(self, request: Request) -> None:
        self._by_token.pop(request.cookies.get(COOKIE, ""), None)


def mount_dashboard(app: FastAPI, config) -> None:
    """The dashboard of `tunejob serve`, behind a login with the server's API keys."""
    store, sessions, throttle = app.state.store, _Sessions(), app.state.key_throttle  # shared with /v1's key check
    accepted = {store.owner_of(k) for k in config.api_keys}

    def source_for(request: Request) -> ServerJobs:
        return ServerJobs(app, sessions.get(request)[0])

    @app.get("/login", include_in_schema=False)
    def login_form(error: str = ""):
        msg = '<p class="error" id="login-error">That key is not accepted by this server.</p>' if error else ""
        return frame("Log in", f"""{msg}<form method="post" action="/login">
<label>API key <input type="password" name="key" autocomplete="off" autofocus></label> <button>Log in</button></form>""", nav=False)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        from tunejob.server.api.files import read_form

        client = request.client.host if request.client else "?"
        wait = throttle.retry_after(client)
        if wait is not None:
            return HTMLResponse(f"<p>Too many failed logins from {e(client)}: wait {wait} s, then try again.</p>",
                                status_code=429, headers={"Retry-After": str(wait)})
        try:
            key = str((await read_form(request, 64 * 1024)).get("key") or "")
        except ApiError:  # not a form at all: the same answer as a wrong key
            key = ""
        if not key or store.owner_of(key) not in accepted:
            throttle.fail(client)
            return RedirectResponse("/login?error=1", status_code=303)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, sessions.new(store.owner_of(key)), max_age=SESSION_S, httponly=True, samesite="strict", path="/")
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request):
        sessions.get(request)
        await viewer_form(request)
        sessions.end(request)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    viewer_form = add_pages(app, source_for, lambda request: sessions.get(request)[2], config.max_upload_bytes, logout=True)


def local_dashboard(run_dirs: list[Path], port: int, max_upload_mb: int = 100) -> FastAPI:
    """`tunejob dashboard RUN_DIR...`: the same pages over local run directories, no login, on
    127.0.0.1 only. A request whose Host is not 127.0.0.1:PORT or localhost:PORT is refused: a
    page on another site that rebinds its own name to 127.0.0.1 (DNS rebinding) sends its name."""
    app = FastAPI(title="tunejob dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    source, token = RunDirs(run_dirs), secrets.token_urlsafe(32)  # no session: one CSRF token per process
    hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}

    @app.middleware("http")
    async def _local_host_only(request: Request, call_next):
        if request.headers.get("host", "").lower() not in hosts:
            return Response(f"Host must be one of {sorted(hosts)}: this dashboard answers local requests only", status_code=421)
        return await call_next(request)

    add_pages(app, lambda request: source, lambda request: token, max_upload_mb * 1024 * 1024, logout=False)
    return app
