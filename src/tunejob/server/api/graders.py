"""POST /v1/fine_tuning/alpha/graders/run and /v1/fine_tuning/alpha/graders/validate: OpenAI's
grader endpoints (RunGraderRequest -> RunGraderResponse, ValidateGraderRequest ->
ValidateGraderResponse), answered by tunejob.graders.

Grading runs on a worker thread, never on the event loop: a python grader may take its whole
time limit, and a score_model grader waits on a model. A score_model grader is asked of this
server itself (its own models, fine-tuned ones included, with the caller's own key, so a caller
grades only with the models that key may use) when the server knows its address (ServerConfig.
self_url, set by `tunejob serve`); otherwise the openai SDK's defaults ($OPENAI_BASE_URL and
$OPENAI_API_KEY of the server's environment) apply, and the caller's key is never sent elsewhere.

Python graders run the caller's code on this machine as the server's user, in the sandbox of
tunejob.graders.sandbox (own process, memory and time limits, no sockets, scratch directory, no
secrets in its environment): best-effort isolation, so give keys only to people you would let
run code here.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict

from tunejob.graders import GraderContext, GraderError, run_grader_response, validate_grader_response
from tunejob.server.errors import ApiError
from tunejob.server.api.common import ServerState, json_object
from tunejob.server.api.requests import parse


class RunGraderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    grader: dict
    model_sample: str
    item: dict | None = None


class ValidateGraderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    grader: dict


def _invalid(exc: GraderError) -> ApiError:
    return ApiError(400, str(exc), param=exc.param)


def router(state: ServerState) -> APIRouter:
    api = APIRouter()
    self_url = state.config.self_url

    def context(request: Request) -> GraderContext:
        if self_url:
            return GraderContext(base_url=self_url, api_key=request.state.api_key)
        return GraderContext()

    @api.post("/v1/fine_tuning/alpha/graders/run")
    async def run_grader(request: Request):
        req = parse(RunGraderRequest, await json_object(request))
        try:
            return await run_in_threadpool(run_grader_response, req.grader, req.model_sample, req.item, context(request))
        except GraderError as exc:
            raise _invalid(exc) from None

    @api.post("/v1/fine_tuning/alpha/graders/validate")
    async def validate_grader(request: Request):
        body = await json_object(request)
        parse(ValidateGraderRequest, body)
        try:
            return await run_in_threadpool(validate_grader_response, body)  # compiles python sources: off the loop too
        except GraderError as exc:
            raise _invalid(exc) from None

    return api
