"""Chat completions for base models and fine-tuned ones (base + LoRA adapter), loaded on demand.

Models stay cached (the last few used) so a conversation does not reload weights per request.
Generation runs under a lock: one generate() at a time on a 2-core CPU is faster than two.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

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


_generate_lock = threading.Lock()


def _inputs(tokenizer, messages: list[dict], model_device):
    plain = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
    return tokenizer.apply_chat_template(plain, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(model_device)


def _gen_kwargs(tokenizer, max_tokens: int, temperature: float | None, top_p: float | None, seed: int | None) -> dict:
    kwargs = {"max_new_tokens": max_tokens, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if temperature is not None and temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p if top_p is not None else 1.0)
        if seed is not None:
            torch.manual_seed(seed)
    else:
        kwargs["do_sample"] = False
    return kwargs


def complete(model, tokenizer, messages: list[dict], model_name: str, max_tokens: int = 256,
             temperature: float | None = None, top_p: float | None = None, seed: int | None = None) -> dict:
    inputs = _inputs(tokenizer, messages, model.device)
    with _generate_lock, torch.no_grad():
        out = model.generate(**inputs, **_gen_kwargs(tokenizer, max_tokens, temperature, top_p, seed))
    new = out[0, inputs["input_ids"].shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    finish = "stop" if len(new) < max_tokens or (len(new) and int(new[-1]) == tokenizer.eos_token_id) else "length"
    prompt_tokens = int(inputs["input_ids"].shape[1])
    return {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "finish_reason": finish, "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": int(len(new)), "total_tokens": prompt_tokens + int(len(new))},
    }


def stream(model, tokenizer, messages: list[dict], model_name: str, max_tokens: int = 256,
           temperature: float | None = None, top_p: float | None = None, seed: int | None = None):
    """chat.completion.chunk dicts, as OpenAI streams them (role first, then content pieces, then finish)."""
    from transformers import TextIteratorStreamer

    inputs = _inputs(tokenizer, messages, model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cid, created = new_id("chatcmpl"), int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def run() -> None:
        with _generate_lock, torch.no_grad():
            model.generate(**inputs, streamer=streamer, **_gen_kwargs(tokenizer, max_tokens, temperature, top_p, seed))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield chunk({"role": "assistant", "content": ""})
    for piece in streamer:
        if piece:
            yield chunk({"content": piece})
    thread.join()
    yield chunk({}, "stop")
