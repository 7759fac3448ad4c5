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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tunejob.data import tool_calls
from tunejob.engine.batch import eos_ids
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
    temperature 0 asks for greedy decoding."""

    messages: list[dict]
    tools: list[dict] = field(default_factory=list)
    tool_choice: str = "auto"  # "auto" or "none"
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

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


def _stopping(cancelled: Callable[[], bool], counter: list[int]):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancel(StoppingCriteria):
        """Checked after every generated token: a client that went away stops the generation
        within one token instead of holding the one generation slot for max_tokens."""

        def __call__(self, input_ids, scores, **kwargs):
            counter[0] += 1
            return torch.full((input_ids.shape[0],), bool(cancelled()), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Cancel()])


def _streamer(tokenizer, on_text: Callable[[str], None]):
    from transformers import TextStreamer

    class Pieces(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return Pieces(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate(model, tokenizer, request: ChatRequest, on_text: Callable[[str], None] | None = None,
             cancelled: Callable[[], bool] = lambda: False) -> ChatResult:
    """One completion. `on_text` gets the text as it is decoded (not when calls are parsed: those
    are known only at the end); `cancelled` is polled after every token."""
    inputs = prompt_inputs(tokenizer, request, model.device)
    eos, counter = eos_ids(model, tokenizer), [0]
    streamer = _streamer(tokenizer, on_text) if on_text is not None and not request.parses_calls else None
    with torch.no_grad():
        out = model.generate(**inputs, **_gen_kwargs(tokenizer, request, eos), streamer=streamer,
                             stopping_criteria=_stopping(cancelled, counter))
    new = out[0, inputs["input_ids"].shape[1]:]
    return to_result(tokenizer, request, int(inputs["input_ids"].shape[1]), [int(t) for t in new], eos, cancelled())


def to_result(tokenizer, request: ChatRequest, prompt_tokens: int, new: list[int], eos: set[int], cancelled: bool) -> ChatResult:
    """The generated tokens as OpenAI's content or tool calls, finish reason and usage."""
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    ended = len(new) > 0 and new[-1] in eos
    finish = "cancelled" if cancelled else "length" if len(new) >= request.max_tokens and not ended else "stop"
    content, calls = tool_calls.parse_tool_calls(text) if request.parses_calls else (text, [])
    if calls and finish != "cancelled":
        finish = "tool_calls"
    return ChatResult(content=content or (None if calls else ""), tool_calls=calls, finish_reason=finish,
                      prompt_tokens=prompt_tokens, completion_tokens=len(new))


def message(result: ChatResult) -> dict:
    msg = {"role": "assistant", "content": result.content, "refusal": None}
    if result.tool_calls:
        msg["tool_calls"] = result.tool_calls
    return msg


def usage(result: ChatResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def completion(result: ChatResult, model_name: str) -> dict:
    """OpenAI's chat.completion object."""
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": message(result), "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": usage(result)}


def complete(model, tokenizer, messages: list[dict], model_name: str, max_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None) -> dict:
    """One chat.completion, generated in the calling thread (tunejob dashboard's chat, benchmarks);
    one at a time, as in generation.py: two generate() calls on 2 cores are slower than one after the other."""
    request = ChatRequest(messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    with _direct_lock:
        return completion(generate(model, tokenizer, request), model_name)


_direct_lock = threading.Lock()
