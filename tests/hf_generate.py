"""transformers' own generate(), one request at a time: the reference the batched engine
(engine/batch.py, answers.py, server/inference/generation.py) is checked against. It lives in the tests
because src/ answers through one engine only (issue 32)."""

from __future__ import annotations

import torch

from tunejob.data.templates import stop_token_ids
from tunejob.engine.chat import ChatRequest, ChatResult, prompt_inputs, to_result


def _gen_kwargs(tokenizer, request: ChatRequest, eos: set[int]) -> dict:
    kwargs = {"max_new_tokens": request.max_tokens, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": sorted(eos)}
    if request.temperature > 0:
        kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p, top_k=0)
        if request.seed is not None:
            torch.manual_seed(request.seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def generate(model, tokenizer, request: ChatRequest) -> ChatResult:
    """One completion by model.generate(), through the same prompt rendering and result parsing."""
    inputs = prompt_inputs(tokenizer, request, model.device)
    eos = stop_token_ids(tokenizer, model)
    with torch.no_grad():
        out = model.generate(**inputs, **_gen_kwargs(tokenizer, request, eos))
    new = out[0, inputs["input_ids"].shape[1]:]
    return to_result(tokenizer, request, int(inputs["input_ids"].shape[1]), [int(t) for t in new], eos, False)
