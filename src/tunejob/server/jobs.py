"""/v1/fine_tuning/jobs: create (OpenAI's fields and limits, tunejob's extras as a job spec),
list, retrieve, cancel, pause, resume, events and checkpoints."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from pydantic import ValidationError

from tunejob.server.api import DEFAULT_LR, ApiError, ServerState, json_object, owner, page, public
from tunejob.server.store import new_id
from tunejob.server.worker import ACTIVE

HYPERPARAMETERS = (("n_epochs", int, 1, 50), ("batch_size", int, 1, 256), ("learning_rate_multiplier", float, 0.001, 100.0))


def hyperparameters(body: dict) -> dict:
    """OpenAI's hyperparameters (top level, or under method.supervised), each 'auto' or in range."""
    method = body.get("method")
    hp = body.get("hyperparameters") or {}
    if isinstance(method, dict):
        if method.get("type", "supervised") != "supervised":
            raise ApiError(400, f"method.type {method.get('type')!r} is not supported here; use 'supervised'", param="method.type")
        hp = {**hp, **((method.get("supervised") or {}).get("hyperparameters") or {})}
    if not isinstance(hp, dict):
        raise ApiError(400, "hyperparameters must be an object", param="hyperparameters")
    out = {}
    for key, kind, lo, hi in HYPERPARAMETERS:
        value = hp.get(key, "auto")
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)) or not lo <= value <= hi):
            raise ApiError(400, f"hyperparameters.{key} must be 'auto' or a number in {lo}..{hi}, got {value!r}", param=f"hyperparameters.{key}")
        out[key] = value
    unknown = set(hp) - {"n_epochs", "batch_size", "learning_rate_multiplier"}
    if unknown:
        raise ApiError(400, f"unknown hyperparameter(s): {', '.join(sorted(unknown))}", param="hyperparameters")
    return out


def job_spec(state: ServerState, base: str, hp: dict, extra: dict, seed: int) -> dict:
    """The local job spec a server job runs: OpenAI's 'auto' is OpenAI's meaning (batch 4, 3 epochs)."""
    from tunejob.spec import JobSpec

    lr = DEFAULT_LR * (1.0 if hp["learning_rate_multiplier"] == "auto" else float(hp["learning_rate_multiplier"]))
    hyper = {"epochs": 3 if hp["n_epochs"] == "auto" else int(hp["n_epochs"]),
             "batch_size": 4 if hp["batch_size"] == "auto" else int(hp["batch_size"]), "learning_rate": lr, "seed": seed}
    if not isinstance(extra, dict):
        raise ApiError(400, "tunejob: must be an object of tunejob job-spec sections", param="tunejob")
    hyper.update(extra.get("hyperparameters") or {})
    spec = {"name": "job", "backend": "local", "model": state.base_models[base], "data": {"train": "x.jsonl", "seed": seed},
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


def _training_files(state: ServerState, who: str, body: dict) -> dict:
    files = {}
    for key in ("training_file", "validation_file"):
        fid = body.get(key)
        if fid is None and key == "validation_file":
            continue
        if not isinstance(fid, str):
            raise ApiError(400, f"Missing required parameter: '{key}'", param=key)
        f = state.store.get_file(who, fid)
        if f is None:
            raise ApiError(400, f"invalid {key}: no such file {fid}", param=key, code="invalid_file")
        if f["status"] != "processed":
            raise ApiError(400, f"invalid {key}: file {fid} failed validation: {f['status_details']}", param=key, code="invalid_file")
        files[key] = fid
    return files


def _options(body: dict) -> tuple[str | None, dict | None, int]:
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 64 or ":" in suffix):
        raise ApiError(400, "suffix: up to 64 characters, no ':'", param="suffix")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or not all(isinstance(v, str) for v in metadata.values())):
        raise ApiError(400, "metadata: up to 16 string key/value pairs", param="metadata")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, "seed must be an integer", param="seed")
    return suffix, metadata, seed if seed is not None else int(time.time()) % 2**31


def create_job(state: ServerState, who: str, body: dict) -> dict:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "Missing required parameter: 'model'", param="model")
    base = state.base_for(model)
    if base is None:
        known = ", ".join(sorted(state.base_models))
        raise ApiError(400, f"Model {model!r} is not available for fine-tuning here; use {known} or an OpenAI model id", param="model", code="model_not_available")
    files = _training_files(state, who, body)
    hp = hyperparameters(body)
    suffix, metadata, seed = _options(body)
    spec = job_spec(state, base, hp, body.get("tunejob") or {}, seed)
    job_id = new_id("ftjob")
    job = {
        "id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "model": model, "fine_tuned_model": None,
        "organization_id": "org-tunejob", "status": "queued", "hyperparameters": hp,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
        "training_file": files["training_file"], "validation_file": files.get("validation_file"), "result_files": [],
        "trained_tokens": None, "error": None, "finished_at": None, "seed": seed, "suffix": suffix,
        "user_provided_suffix": suffix, "metadata": metadata, "estimated_finish": None, "integrations": [],
        "_spec": spec, "_ft_name": f"ft:{model}:tunejob:{suffix or ''}:{job_id[-8:]}",
    }
    state.store.add_job(who, job)
    state.store.add_event(job_id, "Validating training file: " + files["training_file"])
    if base != model:
        state.store.add_event(job_id, f"{model} is served by the open model '{base}' on this tunejob server")
    state.store.add_event(job_id, "Files validated; fine-tuning job queued")
    return public(job)


def router(state: ServerState) -> APIRouter:
    api, store = APIRouter(), state.store

    @api.post("/v1/fine_tuning/jobs")
    async def create(request: Request):
        return create_job(state, owner(request), await json_object(request))

    @api.get("/v1/fine_tuning/jobs")
    def list_jobs(request: Request, after: str | None = None, limit: int | None = None):
        return page([public(j) for j in store.list_jobs(owner(request))], after, limit)

    @api.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(request: Request, job_id: str):
        return public(state.job_or_404(owner(request), job_id))

    @api.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(request: Request, job_id: str):
        job = state.job_or_404(owner(request), job_id)
        if job["status"] not in (*ACTIVE, "paused"):
            raise ApiError(400, f"Job {job_id} is {job['status']} and cannot be cancelled", code="invalid_state")
        if job["status"] == "running":
            job = store.update_job(job_id, control="cancel")
        else:
            job = store.update_job(job_id, status="cancelled", finished_at=int(time.time()))
            store.add_event(job_id, "Fine-tuning job cancelled")
        return public(job)

    @api.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause_job(request: Request, job_id: str):
        job = state.job_or_404(owner(request), job_id)
        if job["status"] == "running":
            return public(store.update_job(job_id, control="pause"))
        if job["status"] == "queued":
            store.add_event(job_id, "Fine-tuning job paused")
            return public(store.update_job(job_id, status="paused"))
        raise ApiError(400, f"Job {job_id} is {job['status']} and cannot be paused", code="invalid_state")

    @api.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume_job(request: Request, job_id: str):
        job = state.job_or_404(owner(request), job_id)
        if job["status"] != "paused":
            raise ApiError(400, f"Job {job_id} is {job['status']}; only a paused job can be resumed", code="invalid_state")
        store.add_event(job_id, "Fine-tuning job resumed")
        return public(store.update_job(job_id, status="queued"))

    @api.get("/v1/fine_tuning/jobs/{job_id}/events")
    def job_events(request: Request, job_id: str, after: str | None = None, limit: int | None = None):
        state.job_or_404(owner(request), job_id)
        return page(store.list_events(job_id), after, limit)

    @api.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def job_checkpoints(request: Request, job_id: str, after: str | None = None, limit: int | None = None):
        state.job_or_404(owner(request), job_id)
        items = [{k: v for k, v in c.items() if not k.startswith("_")} for c in store.list_checkpoints(job_id)]
        return page(items, after, limit or 10)

    return api
