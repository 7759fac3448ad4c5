"""`tunejob serve`: OpenAI's fine-tuning API on open models (FastAPI).

Paths, request fields, response objects, list pagination and error shapes follow OpenAI's API, so
code written for it runs unchanged with another base_url:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    f = client.files.create(file=open("train.jsonl", "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=f.id, model="gpt-4o-mini-2024-07-18")

OpenAI model ids are served by the server's default open model (say so in the job's events);
tunejob's own options travel in an extra body field, `"tunejob": {"lora": {...}, "quantization": ...}`.
This module is the factory: the API-key check, the error handlers, and one router per resource
(files.py, jobs.py, models.py, chat.py) plus the dashboard.
"""

from __future__ import annotations

from fastapi import FastAPI, Request

from tunejob.errors import ModelError, TunejobError
from tunejob.server import chat, files, jobs, models
from tunejob.server.api import ApiError, ServerConfig, ServerState, error_response
from tunejob.server.store import Store, owner_of
from tunejob.server.worker import Worker

__all__ = ["ServerConfig", "create_app"]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(TunejobError)
    async def _tunejob_error(request: Request, exc: TunejobError):
        # e.g. a base model folder that cannot be loaded: the request names something unusable here
        code = "model_not_available" if isinstance(exc, ModelError) else "invalid_request"
        return error_response(400, str(exc), "invalid_request_error", "model" if isinstance(exc, ModelError) else None, code)


def _add_key_check(app: FastAPI, config: ServerConfig) -> None:
    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            key = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if key not in config.api_keys:
                shown = f"{key[:3]}...{key[-4:]}" if len(key) > 8 else "(none)"
                return error_response(401, f"Incorrect API key provided: {shown}. Pass the key the server was started with.",
                                      "invalid_request_error", None, "invalid_api_key")
            request.state.owner = owner_of(key)
        return await call_next(request)


def create_app(config: ServerConfig) -> FastAPI:
    store = Store(config.data_dir)
    base_models = {"default": config.default_model, "smollm2-135m-instruct": config.default_model, **config.models}
    worker = Worker(store, base_models, train_threads=config.train_threads, chat_threads=config.chat_threads)
    state = ServerState(config, store, worker, base_models)

    app = FastAPI(title="tunejob", docs_url=None, redoc_url=None)
    app.state.store, app.state.worker = store, worker
    app.router.on_startup.append(worker.start)
    app.router.on_shutdown.append(worker.stop)
    _add_error_handlers(app)
    _add_key_check(app, config)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    for resource in (files, jobs, models):
        app.include_router(resource.router(state))
    chat_router = chat.router(state)
    app.include_router(chat_router)

    # The web dashboard at / (server-rendered pages); its chat form calls chat_completions in-process.
    from tunejob.server.dashboard import mount_dashboard

    app.state.chat_completions = chat_router.chat_completions
    mount_dashboard(app, config)
    return app
