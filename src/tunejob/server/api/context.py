"""A model's context window, and OpenAI's 400 `context_length_exceeded` for a chat that does not
fit in it (issue 31, finding 8): past `max_position_embeddings` a model answers garbage, and one
100k-token prompt held the engine thread, and so every stream, for its whole prefill.

Checked in the request handler before the chat is queued, so a stream gets the 400 too (as
OpenAI's does), not an error event after its first chunk. As OpenAI decides: with max_tokens
given, the prompt plus max_tokens must fit; without, the prompt must leave room for one token,
and the answer is cut to the room left (else 256 tokens after a prompt near the end would run past it).
"""

from __future__ import annotations

import dataclasses
import threading
from functools import lru_cache

from tunejob.server.errors import ApiError
from tunejob.engine.chat import ChatRequest, prompt_inputs

SANE_MAX = 10_000_000  # transformers' "no limit" model_max_length is 1e30; nothing real is past 10M tokens
# One request at a time loads and tokenizes here: a fast tokenizer used from two threads at once
# can fail with "Already borrowed", and two threads importing transformers for the first time at
# once failed with "cannot import name 'AutoConfig'" (its package swaps itself for a lazy module
# at the end of its import, so a second thread sees the half-imported one: 8 concurrent first chats).
loading = threading.Lock()  # chat.py reads the engine's model checks under it too


def window(config, tokenizer) -> int | None:
    """The context length: max_position_embeddings, or the tokenizer's model_max_length where that
    is smaller and set to a real number; None when neither says."""
    sizes = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    sizes = [int(n) for n in sizes if isinstance(n, (int, float)) and 0 < n < SANE_MAX]
    return min(sizes) if sizes else None


@lru_cache(maxsize=8)
def _model(base_path: str) -> tuple:
    """(tokenizer, context length) of a base model: its config and tokenizer, not its weights."""
    from transformers import AutoConfig

    from tunejob.train.models import load_tokenizer

    tokenizer = load_tokenizer(base_path)
    return tokenizer, window(AutoConfig.from_pretrained(base_path), tokenizer)


def exceeded(limit: int, prompt: int, completion: int | None) -> ApiError:
    """OpenAI's error, in its words."""
    if completion is None:
        said = f"your messages resulted in {prompt} tokens. Please reduce the length of the messages."
    else:
        said = (f"you requested {prompt + completion} tokens ({prompt} in the messages, {completion} in the completion). "
                "Please reduce the length of the messages or completion.")
    return ApiError(400, f"This model's maximum context length is {limit} tokens. However, {said}", param="messages",
                    code="context_length_exceeded")


def fit(base_path: str, chat: ChatRequest, body: dict, cells: int | None = None) -> ChatRequest:
    """`chat` if it fits the model's context (its max_tokens cut to the room left when the body
    gave none), else the 400. `cells`: an engine's own smaller limit (llama.cpp's KV cells, which
    a row alone must fit). Tokenizes the whole prompt: call it off the event loop."""
    with loading:
        tokenizer, limit = _model(base_path)
        if cells is not None:
            limit = cells if limit is None else min(limit, cells)
        if limit is None:
            return chat
        prompt = int(prompt_inputs(tokenizer, chat, "cpu")["input_ids"].shape[1])
    asked = body.get("max_completion_tokens") is not None or body.get("max_tokens") is not None
    if asked and prompt + chat.max_tokens > limit:
        raise exceeded(limit, prompt, chat.max_tokens)
    if prompt >= limit:
        raise exceeded(limit, prompt, None)
    return chat if prompt + chat.max_tokens <= limit else dataclasses.replace(chat, max_tokens=limit - prompt)
