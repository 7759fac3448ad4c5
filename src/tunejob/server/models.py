"""/v1/models: the base models, and each fine-tuned model and checkpoint its owner may chat with."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request

from tunejob.server.api import ApiError, ServerState, owner


def model_objects(state: ServerState, who: str) -> list[dict]:
    out = [{"id": name, "object": "model", "created": 0, "owned_by": "tunejob"} for name in sorted(state.base_models)]
    for job in state.store.list_jobs(who):
        if job.get("fine_tuned_model"):
            out.append({"id": job["fine_tuned_model"], "object": "model", "created": job["finished_at"] or job["created_at"], "owned_by": "user"})
        for c in state.store.list_checkpoints(job["id"]):
            out.append({"id": c["fine_tuned_model_checkpoint"], "object": "model", "created": c["created_at"], "owned_by": "user"})
    return out


def resolve_chat_model(state: ServerState, who: str, name: str) -> tuple[str, Path | None]:
    """(base model path, adapter directory or None) for a model id in a chat request."""
    from tunejob.train.models import resolve_model_path

    base = state.base_for(name)
    if base is not None:
        return resolve_model_path(state.base_models[base]), None
    for job in state.store.list_jobs(who):
        run = state.worker.job_dir(job["id"]) / "run"
        spec_model = job["_spec"]["model"]
        if name == job.get("fine_tuned_model"):
            return resolve_model_path(spec_model), run / "best"
        for c in state.store.list_checkpoints(job["id"]):
            if c["fine_tuned_model_checkpoint"] == name and (run / c["_path"]).is_dir():
                return resolve_model_path(spec_model), run / c["_path"]
    raise ApiError(404, f"The model '{name}' does not exist or you do not have access to it.", param="model", code="model_not_found")


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
        raise ApiError(404, f"The model '{model_id}' does not exist or you do not have access to it.", param="model", code="model_not_found")

    return api
