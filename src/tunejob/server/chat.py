"""/v1/chat/completions: a base model, or a fine-tuned model or checkpoint (base + its adapter)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tunejob.server.api import ServerState, json_body, owner
from tunejob.server.models import resolve_chat_model
from tunejob.server.requests import ChatCompletionRequest, parse


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from tunejob.server import inference

        req = parse(ChatCompletionRequest, await json_body(request))
        messages, name = req.plain_messages(), req.model
        base_path, adapter = resolve_chat_model(state, owner(request), name)
        state.model_cache = state.model_cache or inference.ModelCache()
        model, tokenizer = state.model_cache.get(base_path, adapter)
        args = req.sampling()
        if req.stream:
            def events():
                for chunk in inference.stream(model, tokenizer, messages, name, **args):
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return inference.complete(model, tokenizer, messages, name, **args)

    api.chat_completions = chat_completions  # the dashboard's chat box calls it in-process
    return api
