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
from starlette.concurrency import run_in_threadpool

from tunejob.engine.chat import ChatRequest, ChatResult
from tunejob.server.api import context
from tunejob.server.api.common import ServerState, json_body, owner
from tunejob.server.api.models import resolve_chat_model
from tunejob.server.api.requests import ChatCompletionRequest, parse
from tunejob.server.errors import ApiError, error_response
from tunejob.server.inference import completion
from tunejob.server.inference.generation import Busy, Engine, EngineOptions, Generation
from tunejob.server.jobs.store import new_id
from tunejob.train import threads

POLL_S = 1.0  # how often a waiting request checks that its client is still there


def parse_request(body: object) -> tuple[str, ChatRequest, bool, bool]:
    """(model name, request, stream, include_usage). The body is checked by requests.py's model of
    OpenAI's CreateChatCompletionRequest (a 400 naming the field otherwise); tool turns keep their
    tool_calls / tool_call_id, since prompts are rendered with tools as training rendered them."""
    req = parse(ChatCompletionRequest, body)
    messages = []
    for m in req.messages:
        msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text() if m.content is not None else None}
        calls = [c.model_dump() for c in m.tool_calls] if m.tool_calls else None
        msg.update({k: v for k, v in (("name", m.name), ("tool_calls", calls), ("tool_call_id", m.tool_call_id)) if v is not None})
        messages.append(msg)
    if req.tool_choice not in (None, "auto", "none"):
        raise ApiError(400, "tool_choice: this server supports 'auto' and 'none'", param="tool_choice")
    if req.top_logprobs is not None and not req.logprobs:  # as OpenAI (and vLLM) refuse it
        raise ApiError(400, "Invalid value for 'top_logprobs': it needs logprobs: true", param="top_logprobs")
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    sampling = req.sampling()  # a temperature under 1e-4 is taken as 0 (greedy): 1e-300 overflowed the logits
    chat = ChatRequest(
        messages=messages, tools=tools, tool_choice=req.tool_choice or "auto", max_tokens=sampling["max_tokens"],
        seed=sampling["seed"], temperature=1.0 if sampling["temperature"] is None else sampling["temperature"],
        top_p=1.0 if sampling["top_p"] is None else sampling["top_p"], n=req.n or 1, stop=req.stops(),
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        response_format=req.response_format.plain() if req.response_format else None)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return req.model, chat, bool(req.stream), include_usage


def busy_response(exc: Busy) -> JSONResponse:
    response = error_response(429, f"The server is busy: {exc.pending} chat requests are waiting or generating. "
                              f"Retry after {exc.retry_after} s.", "requests", None, "rate_limit_exceeded")
    response.headers["Retry-After"] = str(exc.retry_after)
    return response


async def _results(gen: Generation, request: Request) -> list[ChatResult]:
    """The finished choices, by index; cancels the generation if the client leaves (or this task is cancelled)."""
    results: list[ChatResult] = []
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
                results.append(value)
                if len(results) == gen.request.n:
                    return sorted(results, key=lambda r: r.index)
    finally:
        gen.cancel()  # no-op once done


def _chunks(gen: Generation, request: Request, name: str, include_usage: bool):
    cid, created = new_id("chatcmpl"), int(time.time())

    def chunk(delta: dict | None, finish: str | None = None, usage: dict | None = None, index: int = 0, logprobs=None) -> str:
        choices = [] if delta is None else [{"index": index, "delta": delta, "finish_reason": finish,
                                             "logprobs": completion.logprobs_field(logprobs)}]
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": choices}
        if include_usage:
            out["usage"] = usage  # null on every chunk but the last, as OpenAI sends it
        return f"data: {json.dumps(out)}\n\n"

    async def events():
        results: list[ChatResult] = []
        try:
            for index in range(gen.request.n):
                yield chunk({"role": "assistant", "content": ""}, index=index)
            while True:
                event = await gen.next_event(POLL_S)
                if event is None:
                    if await request.is_disconnected():
                        return
                    continue
                kind, value = event
                if kind == "text":
                    yield chunk({"content": value.text}, index=value.index, logprobs=value.logprobs)
                    continue
                if kind == "error":
                    err = {"message": str(value) or value.__class__.__name__, "type": getattr(value, "type", "server_error"),
                           "param": None, "code": getattr(value, "code", None)}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    return
                results.append(value)
                for piece in _ending(gen, value, chunk):
                    yield piece
                if len(results) < gen.request.n:
                    continue
                if include_usage:
                    yield chunk(None, usage=completion.usage(results))
                yield "data: [DONE]\n\n"
                return
        finally:
            gen.cancel()  # the client closed the stream (or it ended): stop within one token

    return events()


def _ending(gen: Generation, result: ChatResult, chunk) -> list[str]:
    """A finished choice's last chunks: with tools, its buffered content and each call (the first
    carrying the logprobs, which were held with the text); then its finish reason."""
    out, i, logprobs = [], result.index, result.logprobs
    if result.tool_calls:
        if result.content:
            out.append(chunk({"content": result.content}, index=i, logprobs=logprobs))
            logprobs = None
        for k, call in enumerate(result.tool_calls):
            out.append(chunk({"tool_calls": [{"index": k, **call}]}, index=i, logprobs=logprobs))
            logprobs = None
    elif gen.request.parses_calls and (result.content or logprobs):  # buffered text that held no call
        out.append(chunk({"content": result.content or ""}, index=i, logprobs=logprobs))
    out.append(chunk({}, result.finish_reason, index=i))
    return out


def _forward_passes(config, options: EngineOptions, log) -> dict:
    """The Engine's weights and batch: llama.cpp's for --engine llama.cpp, both engines' for auto
    where llama.cpp can run here (inference/engine_choice.py), torch's (the Engine's own) otherwise."""
    if config.engine not in ("llama.cpp", "auto"):
        return {}
    from tunejob.server.inference import engine_choice
    from tunejob.server.inference.gguf_files import GgufFiles
    from tunejob.server.inference.generation import torch_weights
    from tunejob.server.inference.llama import LlamaBatch, LlamaWeights

    if config.engine == "auto" and (why := engine_choice.torch_only()):
        log(f"chat: --engine auto runs chat in torch: {why}")
        return {}
    files = GgufFiles(config.data_dir / "gguf", config.chat_gguf_type, log=log)
    llama = LlamaWeights(files, config.chat_batch, log=log, kv_tokens=config.chat_kv_tokens)
    if config.engine == "llama.cpp":
        return {"weights": llama, "batch": LlamaBatch}
    log(f"chat: --engine auto runs chat in llama.cpp ({config.chat_gguf_type} GGUF, converted once), "
        "and in torch what llama.cpp cannot run")
    return {"weights": engine_choice.AutoWeights(llama, torch_weights(options, log), log), "batch": engine_choice.auto_batch}


def _fits(weights, base_path: str, adapter, chat: ChatRequest, body: dict) -> ChatRequest:
    """The chat, or the 400 of --engine llama.cpp for a model it cannot run, or OpenAI's 400
    context_length_exceeded (the engine's KV cells where it has a fixed pool). Reads configs: off the
    loop, and under context's lock, as two threads importing transformers at once can fail (context.py)."""
    with context.loading:
        weights.check(base_path, adapter)
        cells = weights.context_cells(base_path, adapter)
    return context.fit(base_path, chat, body, cells)


def router(state: ServerState) -> APIRouter:
    api = APIRouter()
    config = state.config
    budget = threads.budget(config.train_threads, config.chat_threads)
    options = EngineOptions(max_batch=config.chat_batch, dtype=config.chat_dtype, merged_copies=config.chat_merged_copies,
                            merge_mb=config.chat_merge_mb, compile=config.chat_compile)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    engine = Engine(budget, training=lambda: state.worker.training, max_pending=config.chat_queue, log=log, options=options,
                    **_forward_passes(config, options, log))
    api.add_event_handler("shutdown", engine.stop)
    forward = None
    if config.engine == "vllm":
        from tunejob.server.inference.vllm import VllmEngine

        forward = VllmEngine(config.vllm_url, log=engine.log)
        state.worker.on_succeeded.append(lambda job_id, adapter: forward.load_now(adapter))

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        name, chat, stream, include_usage = parse_request(body)
        base_path, adapter = resolve_chat_model(state, owner(request), name)
        if forward is not None:  # the vLLM engine: the model is resolved for this key here, generated there
            return await forward.chat(body, name, adapter)
        chat = await run_in_threadpool(_fits, engine.weights, base_path, adapter, chat, body)
        gen = Generation(base_path, adapter, chat, stream, asyncio.get_running_loop())
        try:
            engine.submit(gen)  # raises the shutdown's 503 once the server is stopping
        except Busy as exc:
            return busy_response(exc)
        if stream:
            return StreamingResponse(_chunks(gen, request, name, include_usage), media_type="text/event-stream")
        return completion.completion(await _results(gen, request), name)

    api.chat_completions = chat_completions  # the dashboard's chat box calls it in-process
    api.engine = engine
    return api
