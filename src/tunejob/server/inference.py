"""Chat completions for base models and fine-tuned ones (base + LoRA adapter): the models, cached,
and one generation from a conversation (with tools) to OpenAI's message, finish reason and usage.

Models stay cached (the last few used) so a conversation does not reload weights per request.
Prompts are rendered exactly as training rendered them (data.tool_calls.render_inputs: the
template's own tool support, or the Hermes-style fallback), and generated <tool_call> blocks are
parsed back into OpenAI tool calls. generation.py runs these calls on its one worker thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tunejob.data import tool_calls
from tunejob.engine import text
from tunejob.data.templates import stop_token_ids
from tunejob.server.store import new_id

CACHE_SIZE = 3


class ModelCache:
    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._models: OrderedDict[tuple, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, base_path: str, adapter: Path | None):
        key = (base_path, str(adapter) if adapter else None)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        from transformers import AutoModelForCausalLM

        from tunejob.train.models import load_tokenizer

        tokenizer = load_tokenizer(base_path)
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        model.eval()
        with self._lock:
            self._models[key] = (model, tokenizer)
            while len(self._models) > self.size:
                self._models.popitem(last=False)
        return model, tokenizer


@dataclass
class ChatRequest:
    """What one completion needs. Sampling defaults are OpenAI's (temperature 1, top_p 1);
    temperature 0 asks for greedy decoding. The engine (engine/batch.py) reads the rest: stop
    strings, penalties, logprobs (None, or how many top_logprobs), response_format."""

    messages: list[dict]
    tools: list[dict] = field(default_factory=list)
    tool_choice: str = "auto"  # "auto" or "none"
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    response_format: dict | None = None

    def choice(self, index: int) -> "ChatRequest":
        """The request for choice `index` of n: its own seed stream (seed + index), so choices differ
        and each is reproducible alone."""
        seed = None if self.seed is None else (self.seed + index + 2**63) % 2**64 - 2**63
        return replace(self, seed=seed, n=1)

    @property
    def parses_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


@dataclass
class ChatResult:
    content: str | None
    tool_calls: list[dict]
    finish_reason: str  # "stop" (the model ended), "length" (max_tokens), "tool_calls", "cancelled"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[dict] | None = None  # OpenAI's choices[].logprobs.content, when asked
    index: int = 0


def prompt_inputs(tokenizer, request: ChatRequest, device):
    messages, tools = tool_calls.render_inputs(tokenizer, request.messages, request.tools or None)
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True).to(device)


def _gen_kwargs(tokenizer, request: ChatRequest, eos: set[int]) -> dict:
    kwargs = {"max_new_tokens": request.max_tokens, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": sorted(eos)}
    if request.temperature > 0:
        kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p, top_k=0)
        if request.seed is not None:
            torch.manual_seed(request.seed)  # one generation at a time (generation.py), so the seed holds
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def generate(model, tokenizer, request: ChatRequest) -> ChatResult:
    """One completion with transformers' generate(), one request at a time (the in-process paths:
    the dashboard's chat form, migrate's comparison; serve answers through engine/batch.py)."""
    inputs = prompt_inputs(tokenizer, request, model.device)
    eos = stop_token_ids(tokenizer, model)
    with torch.no_grad():
        out = model.generate(**inputs, **_gen_kwargs(tokenizer, request, eos))
    new = out[0, inputs["input_ids"].shape[1]:]
    return to_result(tokenizer, request, int(inputs["input_ids"].shape[1]), [int(t) for t in new], eos, False)


def to_result(tokenizer, request: ChatRequest, prompt_tokens: int, new: list[int], eos: set[int], cancelled: bool,
              logprobs: list | None = None) -> ChatResult:
    """The generated tokens as OpenAI's content or tool calls, finish reason, logprobs and usage.
    A stop string ends the content where it begins (finish "stop", even at max_tokens)."""
    answer = tokenizer.decode(new, skip_special_tokens=True)
    cut = text.first_stop(answer, request.stop)
    ended = (len(new) > 0 and new[-1] in eos) or cut is not None
    finish = "cancelled" if cancelled else "length" if len(new) >= request.max_tokens and not ended else "stop"
    answer = answer if cut is None else answer[:cut]
    content, calls = tool_calls.parse_tool_calls(answer.strip()) if request.parses_calls else (answer.strip(), [])
    if calls and finish != "cancelled":
        finish = "tool_calls"
    shown = None
    if logprobs is not None:  # the tokens that carry the content: not the end-of-text token, none past a stop string
        count = text.visible_tokens(tokenizer, new, cut) if cut is not None else len(new) - (1 if ended else 0)
        shown = openai_logprobs(tokenizer, logprobs[:count])
    return ChatResult(content=content or (None if calls else ""), tool_calls=calls, finish_reason=finish,
                      prompt_tokens=prompt_tokens, completion_tokens=len(new), logprobs=shown)


def openai_logprobs(tokenizer, entries: list) -> list[dict]:
    """engine.logits.TokenLogprob entries as OpenAI's ChatCompletionTokenLogprob: the token's text
    (U+FFFD for part of a character, as vLLM writes it), its logprob, its bytes, and the top ones."""
    def one(token: int, logprob: float) -> dict:
        raw = text.token_bytes(tokenizer, token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]


def message(result: ChatResult) -> dict:
    msg = {"role": "assistant", "content": result.content, "refusal": None}
    if result.tool_calls:
        msg["tool_calls"] = result.tool_calls
    return msg


def usage(results: ChatResult | list[ChatResult]) -> dict:
    """One request's usage: its prompt once, the tokens of all its choices (as OpenAI counts n > 1)."""
    results = results if isinstance(results, list) else [results]
    done = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": results[0].prompt_tokens, "completion_tokens": done, "total_tokens": results[0].prompt_tokens + done}


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
    one at a time, as in generation.py: two generate() calls on 2 cores are slower than one after the other."""
    request = ChatRequest(messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    with _direct_lock:
        return completion(generate(model, tokenizer, request), model_name)


_direct_lock = threading.Lock()
