"""/v1/chat/completions: a base model, or a fine-tuned model or checkpoint (base + its adapter)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from tunejob.server.api import ApiError, ServerState, json_body, owner
from tunejob.server.models import resolve_chat_model

ROLES = ("system", "user", "assistant", "developer")


def router(state: ServerState) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from tunejob.server import inference

        body = await json_body(request)
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and m.get("role") in ROLES for m in messages):
            raise ApiError(400, "messages: a non-empty list of {role, content}", param="messages")
        messages = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
        name = body.get("model")
        if not isinstance(name, str):
            raise ApiError(400, "Missing required parameter: 'model'", param="model")
        base_path, adapter = resolve_chat_model(state, owner(request), name)
        state.model_cache = state.model_cache or inference.ModelCache()
        model, tokenizer = state.model_cache.get(base_path, adapter)
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

    api.chat_completions = chat_completions  # the dashboard's chat box calls it in-process
    return api
