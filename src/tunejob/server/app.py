"""`tunejob serve`: OpenAI's fine-tuning API on open models (FastAPI).

Paths, request fields, response objects, list pagination and error shapes follow OpenAI's API, so
code written for it runs unchanged with another base_url:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    f = client.files.create(file=open("train.jsonl", "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=f.id, model="gpt-4o-mini-2024-07-18")

OpenAI model ids are served by the server's default open model (say so in the job's events);
tunejob's own options travel in an extra body field, `"tunejob": {"lora": {...}, "quantization": ...}`.
This module is the factory: the API-key dependency, the error handlers, and one router per
resource (api/: files.py, jobs.py, models.py, chat.py, graders.py) plus the dashboard.

The key check is a dependency of every API router, not middleware matching paths: a route added
to a router cannot be public by mistake (tests/test_server_security.py walks app.routes). There is
no /docs or /openapi.json: OpenAI's published spec documents this API, and a schema endpoint would
be one more route to guard.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunejob.errors import ModelError, TunejobError
from tunejob.server.api import chat, files, graders, jobs, models
from tunejob.server.errors import ApiError, error_response
from tunejob.server.config import ServerConfig
from tunejob.server.api.common import ServerState
from tunejob.server.api.requests import param_of
from tunejob.server.jobs.store import Store
from tunejob.server.api.throttle import Throttle
from tunejob.server.jobs.worker import Worker
from tunejob.train.threads import yield_to_training

__all__ = ["ServerConfig", "create_app"]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        response = error_response(exc.status, exc.message, exc.type, exc.param, exc.code)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(TunejobError)
    async def _tunejob_error(request: Request, exc: TunejobError):
        # e.g. a base model folder that cannot be loaded: the request names something unusable here
        code = "model_not_available" if isinstance(exc, ModelError) else "invalid_request"
        return error_response(400, str(exc), "invalid_request_error", "model" if isinstance(exc, ModelError) else None, code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        param = param_of(tuple(err["loc"])[1:])  # loc starts with 'query' / 'path' / 'body'
        return error_response(400, f"Invalid value for '{param}': {err['msg']}", "invalid_request_error", param, None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        # unmatched routes and wrong methods: OpenAI's error object, not FastAPI's {"detail": ...}
        message = {404: "Invalid URL", 405: "Method not allowed"}.get(exc.status_code, str(exc.detail))
        message = f"{message} ({request.method} {request.url.path})"
        return error_response(exc.status_code, message, "invalid_request_error", None, None)


def key_check(config: ServerConfig, store: Store, throttle: Throttle):
    """The dependency every API router carries: a Bearer key the server accepts, or OpenAI's 401.
    Keys are compared as HMAC digests (the owner ids), so no comparison runs over the key itself.
    A wrong key counts against its address (throttle.py), which past the limit gets OpenAI's 429
    whatever key it sends: were a right key let through, a 200 among 429s would still tell a
    guesser when it had found one. A request without a key is no guess, and is not counted."""
    accepted = {store.owner_of(k) for k in config.api_keys}

    async def check(request: Request) -> str:  # on the event loop: an HMAC is cheaper than a hop to the threadpool
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else ""
        client = request.client.host if request.client else "?"
        wait = throttle.retry_after(client)
        if wait is not None:
            raise ApiError(429, f"Too many requests with a wrong API key from {client}: retry after {wait} s.", "requests", None,
                           "rate_limit_exceeded", headers={"Retry-After": str(wait)})
        who = store.owner_of(key) if key else None
        if who not in accepted:
            if key:
                throttle.fail(client)
            shown = f"{key[:3]}...{key[-4:]}" if len(key) > 8 else "(none)"
            raise ApiError(401, f"Incorrect API key provided: {shown}. Pass a key the server was started with.",
                           "invalid_request_error", None, "invalid_api_key")
        request.state.owner = who
        request.state.api_key = key  # the grader routes call this server's own models with it
        return who

    return check


def _executor(config: ServerConfig):
    """The executor `--executor` names: local children share the training threads (executor.py)."""
    if config.executor == "ray":
        from tunejob.server.jobs.ray_cluster import RayExecutor  # imports Ray's job client: only when asked for

        return RayExecutor(config.ray_address or "auto")
    if config.executor != "local":
        raise TunejobError(f"--executor {config.executor!r}: use local (child processes on this machine) or ray (a Ray cluster)")
    from tunejob.server.jobs.executor import LocalExecutor
    from tunejob.train.threads import budget

    return LocalExecutor(config.slots, budget(config.train_threads, config.chat_threads).train)


def _grader_env(config: ServerConfig, store: Store, owner: str | None) -> dict[str, str]:
    """A reinforcement job's score_model graders ask this server's models, with the job owner's key
    (in the run's environment only: keys never reach the database or the log)."""
    key = next((k for k in config.api_keys if store.owner_of(k) == owner), None)
    if not config.self_url or key is None:
        return {}
    return {"TUNEJOB_GRADER_BASE_URL": config.self_url, "TUNEJOB_GRADER_API_KEY": key}


def create_app(config: ServerConfig) -> FastAPI:
    store = Store(config.data_dir)
    for key in config.api_keys:
        store.adopt_legacy_owner(key)
    base_models = {"default": config.default_model, "smollm2-135m-instruct": config.default_model, **config.models}
    worker = Worker(store, base_models, train_threads=config.train_threads, chat_threads=config.chat_threads,
                    executor=_executor(config), node_retries=config.node_retries, grader_env=lambda owner: _grader_env(config, store, owner))
    state = ServerState(config, store, worker, base_models)

    app = FastAPI(title="tunejob", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.worker = store, worker
    app.state.max_body_bytes = config.max_body_bytes  # read by api.json_body, for every JSON body
    app.state.key_throttle = Throttle()  # wrong keys at /v1 and at the dashboard's login, counted together
    def start_worker_then_yield() -> None:
        worker.start()  # first: its thread, and the training children it starts, keep the server's priority
        yield_to_training()  # then the event loop, and every thread it starts from here on (HTTP, chat), yields to them

    app.router.on_startup.append(start_worker_then_yield)
    app.router.on_shutdown.append(worker.stop)
    _add_error_handlers(app)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    needs_key = [Depends(key_check(config, store, app.state.key_throttle))]
    for resource in (files, jobs, models, graders):
        app.include_router(resource.router(state), dependencies=needs_key)
    chat_router = chat.router(state)
    app.include_router(chat_router, dependencies=needs_key)

    # The web dashboard at / (server-rendered pages); its chat form calls chat_completions in-process.
    from tunejob.server.dashboard.views import mount_dashboard

    app.state.chat_completions = chat_router.chat_completions
    app.state.chat_engine = chat_router.engine  # run.py answers its generations at SIGTERM
    mount_dashboard(app, config)
    return app
