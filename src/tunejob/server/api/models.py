"""/v1/models: the base models, and each fine-tuned model and checkpoint its owner may chat with.

A chat's model name resolves the caller's own fine-tuned models and checkpoints first. Only then
does a plain name map to a base model: `catalog.lookup` strips `ft:` (it prices fine-tuned
models), so asking it first turned every `ft:gpt-4o-mini-...` name, the caller's or anyone's,
into the untrained base. An `ft:` name that is not the caller's is OpenAI's 404 model_not_found.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request

from tunejob.errors import TunejobError
from tunejob.server.api.aliases import alias_chat_model
from tunejob.server.errors import ApiError
from tunejob.server.api.common import ServerState, owner
def not_found(name: str) -> ApiError:
    return ApiError(404, f"The model '{name}' does not exist or you do not have access to it.", param="model", code="model_not_found")


def model_objects(state: ServerState, who: str) -> list[dict]:
    out = [{"id": name, "object": "model", "created": 0, "owned_by": "tunejob"} for name in sorted(state.base_models)]
    out += [{"id": name, "object": "model", "created": 0, "owned_by": "tunejob-alias"} for name in sorted(state.config.aliases)]
    for job in state.store.list_jobs(who):
        if job.get("fine_tuned_model") and not job.get("_model_deleted"):
            out.append({"id": job["fine_tuned_model"], "object": "model", "created": job["finished_at"] or job["created_at"], "owned_by": "user"})
        for c in state.store.list_checkpoints(job["id"]):
            out.append({"id": c["fine_tuned_model_checkpoint"], "object": "model", "created": c["created_at"], "owned_by": "user"})
    return out


def own_model(state: ServerState, who: str, name: str) -> tuple[dict, Path] | None:
    """(job, adapter directory) when `name` is one of `who`'s fine-tuned models or checkpoints."""
    for job in state.store.list_jobs(who):
        run = state.worker.job_dir(job["id"]) / "run"
        if name == job.get("fine_tuned_model") and not job.get("_model_deleted"):
            return job, run / "best"
        for c in state.store.list_checkpoints(job["id"]):
            if c["fine_tuned_model_checkpoint"] == name and (run / c["_path"]).is_dir():
                return job, run / c["_path"]
    return None


def resolve_chat_model(state: ServerState, who: str, name: str) -> tuple[str, Path | None]:
    """(base model path, adapter directory or None) for a model id in a chat request."""
    from tunejob.train.models import resolve_model_path

    own = own_model(state, who, name)
    if own is not None:
        job, adapter = own
        return resolve_model_path(job["_spec"]["model"]), adapter
    try:
        aliased = alias_chat_model(state.config.aliases, name)
    except TunejobError:  # the aliased run was removed after the server started: as gone as any model
        raise not_found(name) from None
    if aliased is not None:
        return aliased
    base = state.base_for(name)
    if base is None:
        raise not_found(name)
    return resolve_model_path(state.base_models[base]), None


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/models")
    def list_models(request: Request):
        return {"object": "list", "data": model_objects(state, owner(request))}

    @api.get("/v1/models/{model_id:path}")
    def get_model(request: Request, model_id: str):
        for m in model_objects(state, owner(request)):
            if m["id"] == model_id:
                return m
        raise not_found(model_id)

    @api.delete("/v1/models/{model_id:path}")
    def delete_model(request: Request, model_id: str):
        # OpenAI deletes only a fine-tuned model its owner made; the job keeps its record and its
        # checkpoints stay models of their own.
        job = next((j for j in state.store.list_jobs(owner(request))
                    if j.get("fine_tuned_model") == model_id and not j.get("_model_deleted")), None)
        if job is None:
            raise not_found(model_id)
        state.store.update_job(job["id"], _model_deleted=True)
        return {"id": model_id, "object": "model", "deleted": True}

    return api
