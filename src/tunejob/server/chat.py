"""/v1/chat/completions: a base model, or a fine-tuned model or checkpoint (base + its adapter).

The handler only parses, queues and awaits: loading and generation run on generation.py's worker
thread. Streams follow OpenAI's chunks: the role first, content pieces, the finish reason, then
(with stream_options.include_usage) one chunk with `choices: []` and the usage, then [DONE].
With tools (tool_choice "auto"), the answer is generated whole before it is sent, since whether
text is a call is known only once its </tool_call> closes: the stream then carries the content (if
any) and each call as one tool_calls delta, then finish_reason "tool_calls".
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tunejob.server import inference
from tunejob.server.api import ApiError, ServerState, error_response, json_body, owner
from tunejob.server.generation import Busy, Engine, Generation
from tunejob.server.models import resolve_chat_model
from tunejob.server.store import new_id
from tunejob.train import threads

ROLES = ("system", "user", "assistant", "developer", "tool")
POLL_S = 1.0  # how often a waiting request checks that its client is still there


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ApiError(400, f"{key} must be a number in {lo}..{hi}", param=key)
    return float(value)


def parse_request(body: object) -> tuple[str, inference.ChatRequest, bool, bool]:
    """(model name, request, stream, include_usage) from the body, or a 400 in OpenAI's shape."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and m.get("role") in ROLES for m in messages):
        raise ApiError(400, "messages: a non-empty list of {role, content}", param="messages")
    messages = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
    name = body.get("model")
    if not isinstance(name, str):
        raise ApiError(400, "Missing required parameter: 'model'", param="model")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
        raise ApiError(400, "max_tokens must be an integer in 1..4096", param="max_tokens")
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance((t.get("function") or {}).get("name"), str) for t in tools):
        raise ApiError(400, "tools: a list of {type: function, function: {name, parameters}}", param="tools")
    tool_choice = body.get("tool_choice") or "auto"
    if tool_choice not in ("auto", "none"):
        raise ApiError(400, "tool_choice: this server supports 'auto' and 'none'", param="tool_choice")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "seed must be an integer", param="seed")
    request = inference.ChatRequest(messages=messages, tools=tools, tool_choice=tool_choice, max_tokens=max_tokens, seed=seed,
                                    temperature=_number(body, "temperature", 1.0, 0, 2), top_p=_number(body, "top_p", 1.0, 0, 1))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if isinstance(body.get("stream_options"), dict) else False
    return name, request, bool(body.get("stream")), include_usage


def busy_response(exc: Busy) -> JSONResponse:
    response = error_response(429, f"The server is busy: {exc.pending} chat requests are waiting or generating. "
                              f"Retry after {exc.retry_after} s.", "requests", None, "rate_limit_exceeded")
    response.headers["Retry-After"] = str(exc.retry_after)
    return response


async def _result(gen: Generation, request: Request) -> inference.ChatResult:
    """The finished result; cancels the generation if the client leaves (or this task is cancelled)."""
    try:
        while True:
            event = await gen.next_event(POLL_S)
            if event is None:
                if await request.is_disconnected():  # nobody reads the answer: 499 as nginx logs it
                    raise ApiError(499, "the client closed the request", code="client_closed_request")
                continue
            kind, value = event
            if kind == "error":
                raise value
            if kind == "done":
                return value
    finally:
        gen.cancel()  # no-op once done


def _chunks(gen: Generation, request: Request, name: str, include_usage: bool):
    cid, created = new_id("chatcmpl"), int(time.time())

    def chunk(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
               "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if include_usage:
            out["usage"] = usage  # null on every chunk but the last, as OpenAI sends it
        return f"data: {json.dumps(out)}\n\n"

    async def events():
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await gen.next_event(POLL_S)
                if event is None:
                    if await request.is_disconnected():
                        return
                    continue
                kind, value = event
                if kind == "text":
                    yield chunk({"content": value})
                    continue
                if kind == "error":
                    err = {"message": str(value) or value.__class__.__name__, "type": "server_error", "param": None, "code": None}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    return
                result: inference.ChatResult = value
                if result.tool_calls:
                    if result.content:
                        yield chunk({"content": result.content})
                    for i, call in enumerate(result.tool_calls):
                        yield chunk({"tool_calls": [{"index": i, **call}]})
                elif gen.request.parses_calls and result.content:  # buffered text that held no call
                    yield chunk({"content": result.content})
                yield chunk({}, result.finish_reason)
                if include_usage:
                    yield chunk(None, usage=inference.usage(result))
                yield "data: [DONE]\n\n"
                return
        finally:
            gen.cancel()  # the client closed the stream (or it ended): stop within one token

    return events()


def router(state: ServerState) -> APIRouter:
    api = APIRouter()
    config = state.config
    budget = threads.budget(config.train_threads, config.chat_threads)
    engine = Engine(budget, training=lambda: state.worker.training, max_pending=config.chat_queue,
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    api.add_event_handler("shutdown", engine.stop)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        name, chat, stream, include_usage = parse_request(await json_body(request))
        base_path, adapter = resolve_chat_model(state, owner(request), name)
        gen = Generation(base_path, adapter, chat, stream, asyncio.get_running_loop())
        try:
            engine.submit(gen)
        except Busy as exc:
            return busy_response(exc)
        if stream:
            return StreamingResponse(_chunks(gen, request, name, include_usage), media_type="text/event-stream")
        return inference.completion(await _result(gen, request), name)

    api.chat_completions = chat_completions  # the dashboard's chat box calls it in-process
    api.engine = engine
    return api
