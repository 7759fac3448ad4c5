"""/v1/fine_tuning/jobs: create (OpenAI's fields and limits, tunejob's extras as a job spec),
list, retrieve, cancel, pause, resume, events and checkpoints."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from tunejob.server.jobs import lifecycle

from tunejob.server.api import quota
from tunejob.server.errors import ApiError
from tunejob.server.api.common import ServerState, json_body, owner, page, public
from tunejob.server.api.requests import CheckpointQuery, CreateFineTuningJob, ListQuery, TunejobOptions, parse
from tunejob.server.jobs.store import new_id
from tunejob.spec import LOCAL_AUTO_EPOCHS, LORA_DEFAULT_LR, OPENAI_AUTO_BATCH_SIZE


def _reinforcement_method(hp: dict, grader: dict | None, spec: dict) -> dict:
    """The spec's method section: n_epochs, batch_size and the learning rate multiplier are already
    in the job's hyperparameters; eval_interval sets the checkpointing (spec/reinforcement.py)."""
    if hp.get("eval_interval", "auto") != "auto":
        spec["checkpointing"] = {"eval_steps": hp["eval_interval"], "save_steps": hp["eval_interval"]}
    keep = ("compute_multiplier", "eval_samples", "reasoning_effort")
    return {"type": "reinforcement", "grader": grader, "hyperparameters": {k: hp[k] for k in keep if k in hp}}


def job_spec(state: ServerState, base: str, hp: dict, extra: TunejobOptions | None, seed: int, method: str = "supervised",
             grader: dict | None = None) -> dict:
    """The local job spec a server job runs: OpenAI's 'auto' is OpenAI's meaning (batch 4, 3 epochs;
    DPO's beta: the local default); tunejob's extras are checked by the job spec's own models, then
    against the server's caps."""
    from tunejob.spec import JobSpec

    lr = LORA_DEFAULT_LR * (1.0 if hp["learning_rate_multiplier"] == "auto" else float(hp["learning_rate_multiplier"]))
    hyper = {"epochs": LOCAL_AUTO_EPOCHS if hp["n_epochs"] == "auto" else hp["n_epochs"],
             "batch_size": OPENAI_AUTO_BATCH_SIZE if hp["batch_size"] == "auto" else hp["batch_size"], "learning_rate": lr, "seed": seed}
    extra = extra or TunejobOptions()
    hyper.update(extra.hyperparameters or {})
    spec = {"name": "job", "backend": "local", "model": state.base_models[base], "data": {"train": "x.jsonl", "seed": seed},
            "hyperparameters": hyper, "checkpointing": {"eval_steps": 10, "save_steps": 10}}
    if method == "dpo":
        spec["method"] = {"type": "dpo", **({} if hp.get("beta", "auto") == "auto" else {"beta": hp["beta"]})}
    if method == "reinforcement":
        spec["method"] = _reinforcement_method(hp, grader, spec)
    spec.update(extra.model_dump(exclude_none=True, exclude={"hyperparameters", "resources", "method"}))
    if extra.method:  # local settings of the method (completion_tokens, temperature, beta), checked by the spec below
        spec["method"] = {**spec.get("method", {"type": method}), **extra.method}
    nodes = (extra.distributed or {}).get("nodes", 1)
    if nodes != 1:
        raise ApiError(400, f"tunejob.distributed.nodes={nodes!r}: a server job runs on one node; ask for more processes "
                            "(one per GPU) instead", param="tunejob.distributed.nodes")
    try:
        checked = JobSpec.model_validate(spec)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = "tunejob." + ".".join(map(str, err["loc"]))
        raise ApiError(400, f"Invalid value for '{param}': {err['msg']} (got {repr(err.get('input'))[:80]})", param=param) from None
    quota.check_spec(state.config, checked, extra.hyperparameters or {})
    spec["hyperparameters"].setdefault("max_steps", state.config.max_steps)
    return spec


def _training_files(state: ServerState, who: str, req: CreateFineTuningJob) -> None:
    for key in ("training_file", "validation_file"):
        fid = getattr(req, key)
        if fid is None:
            continue
        f = state.store.get_file(who, fid)
        if f is None:
            raise ApiError(400, f"invalid {key}: no such file {fid}", param=key, code="invalid_file")
        if f["status"] != "processed":
            raise ApiError(400, f"invalid {key}: file {fid} failed validation: {f['status_details']}", param=key, code="invalid_file")
        kind, method = _file_kind(state.store.file_path(fid)), req.method_type
        if kind != METHOD_DATA[method][0]:
            raise ApiError(400, f"invalid {key}: method {method} trains on {METHOD_DATA[method][1]}, and file {fid} holds "
                                f"{dict(METHOD_DATA.values())[kind]}", param=key, code="invalid_file")
        if method == "reinforcement":
            _check_prompts(state.store.file_path(fid), req.method.reinforcement.grader, key, fid)


# method -> (the kind of file it trains on, as said in an error)
METHOD_DATA = {"supervised": ("chat", "chat examples"), "dpo": ("preference", "preference pairs (input, preferred_output, non_preferred_output)"),
               "reinforcement": ("prompt", "prompts (messages ending with the user's turn, plus the fields the grader reads)")}


def _file_kind(path) -> str:
    """"chat", "preference" or "prompt" (a chat line without an assistant turn: reinforcement's):
    upload validation accepts one kind per file, so the first line says."""
    import json

    from tunejob.data.dataset import iter_raw_lines
    from tunejob.data.example_rules import example_kind

    for raw in iter_raw_lines(path):
        if raw.data and raw.data.strip():
            obj = json.loads(raw.data.decode("utf-8-sig"))
            kind = example_kind(obj)
            if kind == "chat" and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in obj["messages"]):
                return "prompt"
            return kind if kind in ("chat", "preference") else "chat"
    return "chat"


def _check_prompts(path, grader: dict, key: str, fid: str) -> None:
    """The grader, then every line against it (the fields it reads), before the job is queued."""
    from tunejob.data.validate import require_valid
    from tunejob.errors import DataError
    from tunejob.graders import GraderError

    try:
        require_valid(path, method="reinforcement", grader=grader)
    except GraderError as exc:
        raise ApiError(400, f"Invalid method.reinforcement.grader: {exc}", param="method.reinforcement.grader", code="invalid_grader") from None
    except DataError as exc:
        said = str(exc).replace(str(path), fid).split("; run `tunejob validate")[0]  # the CLI hint means nothing to an API client
        raise ApiError(400, f"invalid {key}: {said}", param=key, code="invalid_file") from None


def create_job(state: ServerState, who: str, body: object) -> dict:
    req = parse(CreateFineTuningJob, body)
    base = state.base_for(req.model)
    if base is None:
        known = ", ".join(sorted(state.base_models))
        raise ApiError(400, f"Model {req.model!r} is not available for fine-tuning here; use {known} or an OpenAI model id", param="model", code="model_not_available")
    _training_files(state, who, req)
    hp = req.openai_hyperparameters()
    seed = req.seed if req.seed is not None else int(time.time()) % 2**31
    grader = req.method.reinforcement.grader if req.method_type == "reinforcement" else None
    spec = job_spec(state, base, hp, req.tunejob, seed, req.method_type, grader)
    resources = quota.job_resources(state.config, spec, req.tunejob.resources if req.tunejob else None,
                                    getattr(state.worker.executor, "default_cpus", None))  # local: a slot's share of the threads
    model, suffix, metadata = req.model, req.suffix, req.metadata
    job_id = new_id("ftjob")
    job = {
        "id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "model": model, "fine_tuned_model": None,
        "organization_id": "org-tunejob", "status": "queued", "hyperparameters": {k: hp[k] for k in ("batch_size", "learning_rate_multiplier", "n_epochs")},
        "method": {"type": req.method_type, req.method_type: {"hyperparameters": hp, **({"grader": grader} if grader else {})}},
        "training_file": req.training_file, "validation_file": req.validation_file, "result_files": [],
        "trained_tokens": None, "error": None, "finished_at": None, "seed": seed, "suffix": suffix,
        "user_provided_suffix": suffix, "metadata": metadata, "estimated_finish": None, "integrations": [],
        "_spec": spec, "_ft_name": f"ft:{model}:tunejob:{suffix or ''}:{job_id[-8:]}",
        "_queued_at": time.time(),  # the queue's order: created_at has whole seconds, ids are random
        "_resources": resources.to_dict(),
    }
    state.store.add_job(who, job)
    state.store.add_event(job_id, "Validating training file: " + req.training_file)
    if base != model:
        state.store.add_event(job_id, f"{model} is served by the open model '{base}' on this tunejob server")
    state.store.add_event(job_id, "Files validated; fine-tuning job queued")
    return public(job)


def metadata_filter(request: Request) -> dict[str, str] | None:
    """OpenAI's `metadata[k]=v` query filter (a deepObject, which FastAPI does not parse)."""
    pairs = {k[9:-1]: v for k, v in request.query_params.multi_items() if k.startswith("metadata[") and k.endswith("]")}
    return pairs or None


def router(state: ServerState) -> APIRouter:
    api, store = APIRouter(), state.store

    @api.post("/v1/fine_tuning/jobs")
    async def create(request: Request):
        # off the event loop: a reinforcement job's check reads its whole file and compiles python graders
        return await run_in_threadpool(create_job, state, owner(request), await json_body(request))

    @api.get("/v1/fine_tuning/jobs")
    def list_jobs(request: Request, q: Annotated[ListQuery, Query()]):
        wanted = metadata_filter(request)
        jobs = [public(j) for j in store.list_jobs(owner(request))]
        if wanted:
            jobs = [j for j in jobs if all((j.get("metadata") or {}).get(k) == v for k, v in wanted.items())]
        return page(jobs, q.after, q.limit)

    @api.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(request: Request, job_id: str):
        return public(state.job_or_404(owner(request), job_id))

    def move(request: Request, job_id: str, how) -> dict:
        state.job_or_404(owner(request), job_id)
        try:
            return public(how(store, job_id))  # one conditional update (server/jobs/lifecycle.py)
        except lifecycle.InvalidState as exc:
            raise ApiError(400, str(exc), code="invalid_state") from None

    @api.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(request: Request, job_id: str):
        return move(request, job_id, lifecycle.cancel)

    @api.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause_job(request: Request, job_id: str):
        return move(request, job_id, lifecycle.pause)

    @api.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume_job(request: Request, job_id: str):
        return move(request, job_id, lifecycle.resume)

    @api.get("/v1/fine_tuning/jobs/{job_id}/events")
    def job_events(request: Request, job_id: str, q: Annotated[ListQuery, Query()]):
        # Newest first, as OpenAI lists them; `after` is the last id of the previous page, so the
        # next page holds older events.
        state.job_or_404(owner(request), job_id)
        return page(store.list_events(job_id), q.after, q.limit)

    @api.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def job_checkpoints(request: Request, job_id: str, q: Annotated[CheckpointQuery, Query()]):
        state.job_or_404(owner(request), job_id)
        items = [{k: v for k, v in c.items() if not k.startswith("_")} for c in store.list_checkpoints(job_id)]
        return page(items, q.after, q.limit)

    return api
