"""OpenAI's chat.completion object for answers of the engine (engine/chat.py's ChatResult): the
message, usage, logprobs and choices; and one completion in the calling thread (the dashboard's
chat form, benchmarks), answered by engine/answers.py."""

from __future__ import annotations

import threading
import time

from tunejob.engine.chat import ChatRequest, ChatResult
from tunejob.server.jobs.store import new_id


def message(result: ChatResult) -> dict:
    msg = {"role": "assistant", "content": result.content, "refusal": None}
    if result.tool_calls:
        msg["tool_calls"] = result.tool_calls
    return msg


def usage(results: ChatResult | list[ChatResult]) -> dict:
    """One request's usage: its prompt once, the tokens of all its choices (as OpenAI counts n > 1),
    and how many prompt tokens the prompt cache held (OpenAI's prompt_tokens_details.cached_tokens:
    the first choice's, as the prompt is counted once)."""
    results = results if isinstance(results, list) else [results]
    done = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": results[0].prompt_tokens, "completion_tokens": done, "total_tokens": results[0].prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": results[0].cached_tokens}}


def logprobs_field(entries: list[dict] | None) -> dict | None:
    return None if entries is None else {"content": entries, "refusal": None}


def completion(results: ChatResult | list[ChatResult], model_name: str) -> dict:
    """OpenAI's chat.completion object, one choice per result."""
    results = results if isinstance(results, list) else [results]
    choices = [{"index": r.index, "message": message(r), "finish_reason": r.finish_reason, "logprobs": logprobs_field(r.logprobs)}
               for r in results]
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": choices, "usage": usage(results)}


def complete(model, tokenizer, messages: list[dict], model_name: str, max_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> dict:
    """One chat.completion, generated in the calling thread (tunejob dashboard's chat, benchmarks);
    one at a time, as on serve's chat thread: two decodes at once on 2 cores are slower than one after the other."""
    from tunejob.engine.answers import answer_all

    request = ChatRequest(messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    with _direct_lock:
        return completion(answer_all(model, tokenizer, [request])[0], model_name)


_direct_lock = threading.Lock()
