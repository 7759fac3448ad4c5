"""`tunejob serve`: OpenAI's fine-tuning API on open models (FastAPI).

Paths, request fields, response objects, list pagination and error shapes follow OpenAI's API, so
code written for it runs unchanged with another base_url:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    f = client.files.create(file=open("train.jsonl", "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=f.id, model="gpt-4o-mini-2024-07-18")

OpenAI model ids are served by the server's default open model (say so in the job's events);
tunejob's own options travel in an extra body field, `"tunejob": {"lora": {...}, "quantization": ...}`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from tunejob import catalog
from tunejob.errors import ModelError, TunejobError
from tunejob.server.store import Store, new_id, owner_of, safe_filename
from tunejob.server.worker import ACTIVE, Worker

DEFAULT_LR = 2e-4  # learning_rate_multiplier 1.0 = the LoRA default of the local backend


@dataclass
class ServerConfig:
    data_dir: Path
    api_keys: set[str]
    default_model: str = "default"
    models: dict[str, str] = field(default_factory=dict)  # extra base models: name -> path
    max_upload_bytes: int = 512 * 2**20


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def _error(status: int, message: str, type: str, param: str | None, code: str | None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


def _page(items: list[dict], after: str | None, limit: int | None) -> dict:
    limit = max(1, min(int(limit or 20), 100))
    start = 0
    if after:
        ids = [i["id"] for i in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    page = items[start : start + limit]
    return {"object": "list", "data": page, "has_more": start + limit < len(items),
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


def _public(job: dict) -> dict:
    return {k: v for k, v in job.items() if not k.startswith("_") and k != "control"}


def create_app(config: ServerConfig) -> FastAPI:
    store = Store(config.data_dir)
    base_models = {"default": config.default_model, "smollm2-135m-instruct": config.default_model, **config.models}
    worker = Worker(store, base_models)
    cache = None

    app = FastAPI(title="tunejob", docs_url=None, redoc_url=None)
    app.state.store, app.state.worker = store, worker

    @app.on_event("startup")
    def _start() -> None:
        worker.start()

    @app.on_event("shutdown")
    def _stop() -> None:
        worker.stop()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(TunejobError)
    async def _tunejob_error(request: Request, exc: TunejobError):
        # e.g. a base model folder that cannot be loaded: the request names something unusable here
        code = "model_not_available" if isinstance(exc, ModelError) else "invalid_request"
        return _error(400, str(exc), "invalid_request_error", "model" if isinstance(exc, ModelError) else None, code)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            key = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if key not in config.api_keys:
                shown = f"{key[:3]}...{key[-4:]}" if len(key) > 8 else "(none)"
                return _error(401, f"Incorrect API key provided: {shown}. Pass the key the server was started with.",
                              "invalid_request_error", None, "invalid_api_key")
            request.state.owner = owner_of(key)
        return await call_next(request)

    def owner(request: Request) -> str:
        return request.state.owner

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    # ------------------------------------------------------------ files

    @app.post("/v1/files")
    async def upload(request: Request):
        length = int(request.headers.get("content-length") or 0)
        if length > config.max_upload_bytes + 64 * 1024:
            raise ApiError(413, f"File too large: {length:,} bytes; this server accepts up to {config.max_upload_bytes:,}", code="file_too_large")
        form = await request.form()
        purpose, upload_file = form.get("purpose"), form.get("file")
        if purpose not in ("fine-tune", "fine-tune-results", "assistants", "batch", "user_data"):
            raise ApiError(400, f"Invalid purpose {purpose!r}; use 'fine-tune'", param="purpose")
        if upload_file is None or isinstance(upload_file, str):
            raise ApiError(400, "Missing file: send it as multipart field 'file'", param="file")
        file_id = new_id("file")
        path = store.file_path(file_id)
        size, tmp = 0, path.with_name(f".{file_id}.part")
        with tmp.open("wb") as out:
            while chunk := await upload_file.read(1024 * 1024):
                size += len(chunk)
                if size > config.max_upload_bytes:
                    out.close()
                    tmp.unlink(missing_ok=True)
                    raise ApiError(413, f"File too large: over {config.max_upload_bytes:,} bytes", code="file_too_large")
                out.write(chunk)
        tmp.replace(path)
        status, details = "processed", None
        if purpose == "fine-tune":
            from tunejob.validate import validate_file

            report = validate_file(path, min_examples=1)
            if not report.ok:
                status = "error"
                first = [f"line {p.line}: {p.kind}: {p.message}" if p.line else f"{p.kind}: {p.message}"
                         for ps in report.problems.values() for p in ps if p.severity == "error"][:5]
                details = f"{report.errors} error(s): " + "; ".join(first)
        return store.add_file(owner(request), safe_filename(upload_file.filename), purpose, size, status, details, file_id)

    @app.get("/v1/files")
    def list_files(request: Request, purpose: str | None = None, after: str | None = None, limit: int | None = None):
        return _page(store.list_files(owner(request), purpose), after, limit or 100)

    def _file_or_404(request: Request, file_id: str) -> dict:
        f = store.get_file(owner(request), file_id)
        if f is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
        return f

    @app.get("/v1/files/{file_id}")
    def get_file(request: Request, file_id: str):
        return _file_or_404(request, file_id)

    @app.get("/v1/files/{file_id}/content")
    def file_content(request: Request, file_id: str):
        _file_or_404(request, file_id)
        return Response(store.file_path(file_id).read_bytes(), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(request: Request, file_id: str):
        _file_or_404(request, file_id)
        store.delete_file(owner(request), file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # ------------------------------------------------------------ jobs

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "The request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object")
        return _create_job(owner(request), body)

    def _create_job(who: str, body: dict) -> dict:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "Missing required parameter: 'model'", param="model")
        base = _base_for(model)
        if base is None:
            known = ", ".join(sorted(base_models))
            raise ApiError(400, f"Model {model!r} is not available for fine-tuning here; use {known} or an OpenAI model id", param="model", code="model_not_available")
        files = {}
        for key in ("training_file", "validation_file"):
            fid = body.get(key)
            if fid is None and key == "validation_file":
                continue
            if not isinstance(fid, str):
                raise ApiError(400, f"Missing required parameter: '{key}'", param=key)
            f = store.get_file(who, fid)
            if f is None:
                raise ApiError(400, f"invalid {key}: no such file {fid}", param=key, code="invalid_file")
            if f["status"] != "processed":
                raise ApiError(400, f"invalid {key}: file {fid} failed validation: {f['status_details']}", param=key, code="invalid_file")
            files[key] = fid
        hp = _hyperparameters(body)
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 64 or ":" in suffix):
            raise ApiError(400, "suffix: up to 64 characters, no ':'", param="suffix")
        metadata = body.get("metadata")
        if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or not all(isinstance(v, str) for v in metadata.values())):
            raise ApiError(400, "metadata: up to 16 string key/value pairs", param="metadata")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ApiError(400, "seed must be an integer", param="seed")
        seed = seed if seed is not None else int(time.time()) % 2**31
        spec = _spec(base, hp, body.get("tunejob") or {}, seed)
        job_id = new_id("ftjob")
        ft_name = f"ft:{model}:tunejob:{suffix or ''}:{job_id[-8:]}"
        job = {
            "id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "model": model, "fine_tuned_model": None,
            "organization_id": "org-tunejob", "status": "queued", "hyperparameters": hp,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
            "training_file": files["training_file"], "validation_file": files.get("validation_file"), "result_files": [],
            "trained_tokens": None, "error": None, "finished_at": None, "seed": seed, "suffix": suffix,
            "user_provided_suffix": suffix, "metadata": metadata, "estimated_finish": None, "integrations": [],
            "_spec": spec, "_ft_name": ft_name,
        }
        store.add_job(who, job)
        store.add_event(job_id, "Validating training file: " + files["training_file"])
        if base != model:
            store.add_event(job_id, f"{model} is served by the open model '{base}' on this tunejob server")
        store.add_event(job_id, "Files validated; fine-tuning job queued")
        return _public(job)

    def _base_for(model: str) -> str | None:
        if model in base_models:
            return model
        info = catalog.lookup(model)
        if info is not None and info.provider == "openai":
            return "default"
        return None

    def _hyperparameters(body: dict) -> dict:
        method = body.get("method")
        hp = body.get("hyperparameters") or {}
        if isinstance(method, dict):
            if method.get("type", "supervised") != "supervised":
                raise ApiError(400, f"method.type {method.get('type')!r} is not supported here; use 'supervised'", param="method.type")
            hp = {**hp, **((method.get("supervised") or {}).get("hyperparameters") or {})}
        if not isinstance(hp, dict):
            raise ApiError(400, "hyperparameters must be an object", param="hyperparameters")
        out = {}
        for key, kind, lo, hi in (("n_epochs", int, 1, 50), ("batch_size", int, 1, 256), ("learning_rate_multiplier", float, 0.001, 100.0)):
            value = hp.get(key, "auto")
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)) or not lo <= value <= hi):
                raise ApiError(400, f"hyperparameters.{key} must be 'auto' or a number in {lo}..{hi}, got {value!r}", param=f"hyperparameters.{key}")
            out[key] = value
        unknown = set(hp) - {"n_epochs", "batch_size", "learning_rate_multiplier"}
        if unknown:
            raise ApiError(400, f"unknown hyperparameter(s): {', '.join(sorted(unknown))}", param="hyperparameters")
        return out

    def _spec(base: str, hp: dict, extra: dict, seed: int) -> dict:
        from tunejob.spec import JobSpec

        lr = DEFAULT_LR * (1.0 if hp["learning_rate_multiplier"] == "auto" else float(hp["learning_rate_multiplier"]))
        hyper = {"epochs": 3 if hp["n_epochs"] == "auto" else int(hp["n_epochs"]),
                 "batch_size": 4 if hp["batch_size"] == "auto" else int(hp["batch_size"]), "learning_rate": lr, "seed": seed}
        if not isinstance(extra, dict):
            raise ApiError(400, "tunejob: must be an object of tunejob job-spec sections", param="tunejob")
        hyper.update(extra.get("hyperparameters") or {})
        spec = {"name": "job", "backend": "local", "model": base_models[base], "data": {"train": "x.jsonl", "seed": seed},
                "hyperparameters": hyper}
        for section in ("lora", "quantization", "checkpointing"):
            if section in extra:
                spec[section] = extra[section]
        spec.setdefault("checkpointing", {"eval_steps": 10, "save_steps": 10})
        try:
            JobSpec.model_validate(spec)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ApiError(400, f"invalid tunejob options: {'.'.join(map(str, first['loc']))}: {first['msg']}", param="tunejob") from None
        return spec

    def _job_or_404(request: Request, job_id: str) -> dict:
        job = store.get_job(owner(request), job_id)
        if job is None:
            raise ApiError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="fine_tuning_job_not_found")
        return job

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(request: Request, after: str | None = None, limit: int | None = None):
        return _page([_public(j) for j in store.list_jobs(owner(request))], after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(request: Request, job_id: str):
        return _public(_job_or_404(request, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(request: Request, job_id: str):
        job = _job_or_404(request, job_id)
        if job["status"] not in (*ACTIVE, "paused"):
            raise ApiError(400, f"Job {job_id} is {job['status']} and cannot be cancelled", code="invalid_state")
        if job["status"] == "running":
            job = store.update_job(job_id, control="cancel")
        else:
            job = store.update_job(job_id, status="cancelled", finished_at=int(time.time()))
            store.add_event(job_id, "Fine-tuning job cancelled")
        return _public(job)

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause_job(request: Request, job_id: str):
        job = _job_or_404(request, job_id)
        if job["status"] == "running":
            return _public(store.update_job(job_id, control="pause"))
        if job["status"] == "queued":
            store.add_event(job_id, "Fine-tuning job paused")
            return _public(store.update_job(job_id, status="paused"))
        raise ApiError(400, f"Job {job_id} is {job['status']} and cannot be paused", code="invalid_state")

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume_job(request: Request, job_id: str):
        job = _job_or_404(request, job_id)
        if job["status"] != "paused":
            raise ApiError(400, f"Job {job_id} is {job['status']}; only a paused job can be resumed", code="invalid_state")
        store.add_event(job_id, "Fine-tuning job resumed")
        return _public(store.update_job(job_id, status="queued"))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def job_events(request: Request, job_id: str, after: str | None = None, limit: int | None = None):
        _job_or_404(request, job_id)
        return _page(store.list_events(job_id), after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def job_checkpoints(request: Request, job_id: str, after: str | None = None, limit: int | None = None):
        _job_or_404(request, job_id)
        items = [{k: v for k, v in c.items() if not k.startswith("_")} for c in store.list_checkpoints(job_id)]
        return _page(items, after, limit or 10)

    # ------------------------------------------------------------ models and chat

    def _model_objects(who: str) -> list[dict]:
        out = [{"id": name, "object": "model", "created": 0, "owned_by": "tunejob"} for name in sorted(base_models)]
        for job in store.list_jobs(who):
            if job.get("fine_tuned_model"):
                out.append({"id": job["fine_tuned_model"], "object": "model", "created": job["finished_at"] or job["created_at"], "owned_by": "user"})
            for c in store.list_checkpoints(job["id"]):
                out.append({"id": c["fine_tuned_model_checkpoint"], "object": "model", "created": c["created_at"], "owned_by": "user"})
        return out

    @app.get("/v1/models")
    def list_models(request: Request):
        return {"object": "list", "data": _model_objects(owner(request))}

    @app.get("/v1/models/{model_id:path}")
    def get_model(request: Request, model_id: str):
        for m in _model_objects(owner(request)):
            if m["id"] == model_id:
                return m
        raise ApiError(404, f"The model '{model_id}' does not exist or you do not have access to it.", param="model", code="model_not_found")

    def _resolve_chat_model(who: str, name: str) -> tuple[str, Path | None]:
        from tunejob.models import resolve_model_path

        base = _base_for(name)
        if base is not None:
            return resolve_model_path(base_models[base]), None
        for job in store.list_jobs(who):
            run = worker.job_dir(job["id"]) / "run"
            spec_model = job["_spec"]["model"]
            if name == job.get("fine_tuned_model"):
                return resolve_model_path(spec_model), run / "best"
            for c in store.list_checkpoints(job["id"]):
                if c["fine_tuned_model_checkpoint"] == name and (run / c["_path"]).is_dir():
                    return resolve_model_path(spec_model), run / c["_path"]
        raise ApiError(404, f"The model '{name}' does not exist or you do not have access to it.", param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        nonlocal cache
        from tunejob.server import inference

        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "The request body is not valid JSON") from None
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant", "developer") for m in messages):
            raise ApiError(400, "messages: a non-empty list of {role, content}", param="messages")
        messages = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
        name = body.get("model")
        if not isinstance(name, str):
            raise ApiError(400, "Missing required parameter: 'model'", param="model")
        base_path, adapter = _resolve_chat_model(owner(request), name)
        cache = cache or inference.ModelCache()
        model, tokenizer = cache.get(base_path, adapter)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
            raise ApiError(400, "max_tokens must be an integer in 1..4096", param="max_tokens")
        args = dict(max_tokens=max_tokens, temperature=body.get("temperature"), top_p=body.get("top_p"), seed=body.get("seed"))
        if body.get("stream"):
            def events():
                for chunk in inference.stream(model, tokenizer, messages, name, **args):
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return inference.complete(model, tokenizer, messages, name, **args)

    # The web dashboard at / (server-rendered pages); its chat form calls chat_completions in-process.
    from tunejob.server.dashboard import mount_dashboard

    app.state.chat_completions = chat_completions
    mount_dashboard(app, config)
    return app
