"""A running batch: the chat rows that share forward passes (one base model, any mix of its
adapters; or one merged copy), their KV cache, and one decoding step at a time.

Why step-level batching: one stream on CPU is bound by reading the weights once per token (0.54 GB
of SmolLM2-135M in fp32), and that read is shared by every row of a forward pass. Rows join at any
step (their prompts are prefilled as a batch of their own, and the caches are joined, left-padded)
and leave the step they finish, so a long answer never holds a short one back.

Why not `generate()`: it cannot add or drop rows mid-flight. Why not transformers' continuous
batching (`generate_batch`): it runs on CPU and matched generate() on a tiny Llama, but takes one
model per manager, not peft's per-row adapters. Each row's tokens are those generate() would pick
alone: greedy is argmax of the same last-position logits (left padding is masked, positions count
real tokens only); sampling is temperature then top-p, as generate() orders them, with the row's
own torch.Generator, so a seed gives the same answer whatever else runs in the batch. How a row
turns logits into a token (penalties, a response_format's grammar, logprobs) is logits.py's; where
its text ends (stop strings) is text.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from tunejob.engine import text
from tunejob.engine.logits import Decoding


class Sampling(Protocol):
    """How a row decodes (serve's ChatRequest; reinforcement fine-tuning's rollout settings). A
    request may also carry OpenAI's `stop`, `presence_penalty`, `frequency_penalty`, `logprobs`
    (None, or how many top_logprobs) and `response_format`; without them a row has none."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


class Target(Protocol):
    """What a row runs on: rows with the same key share forward passes (server/inference/weights.py's Target)."""

    tokenizer: object
    adapter: str | None
    key: tuple


class Weights(Protocol):
    def forward_model(self, target: Target, adapters: list[str | None]) -> tuple[object, list[str] | None]:
        """(model, per-row adapter names or None) for one forward pass over rows of one target."""


@dataclass
class Row:
    prompt: list[int]
    request: Sampling
    target: Target
    eos: set[int]
    cancelled: Callable[[], bool] = lambda: False
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop", "length" or "cancelled" once done
    generator: torch.Generator | None = None
    owner: object = None  # the engine's handle for this row (its Generation and choice index)
    seconds: float | None = None  # answers.decode: from its batch's start to its last token
    cached: int = 0  # prompt tokens whose KV came from the engine's prompt cache (llama.cpp's: prompt_cache.py)
    decoding: Decoding = field(init=False)

    def __post_init__(self) -> None:
        if self.request.temperature > 0 and self.request.seed is not None:
            self.generator = torch.Generator().manual_seed(self.request.seed)
        self.stops = tuple(getattr(self.request, "stop", ()) or ())
        self.decoding = Decoding(self.request, self.target.tokenizer, self.eos, self.generator)

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if self.cancelled():
            self.finish = "cancelled"
        elif token in self.eos or text.stopped(self.target.tokenizer, self.tokens, self.stops):
            self.finish = "stop"
        elif len(self.tokens) >= self.request.max_tokens:
            self.finish = "length"


def _joinable(cache) -> bool:
    """Caches that are plain per-layer (batch, heads, length, dim) tensors can be padded and
    joined; sliding-window or other layers cannot, and their batch takes no rows mid-flight."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Batch:
    def __init__(self, weights: Weights, key: tuple, limit: int):
        self.weights, self.key, self.limit = weights, key, limit
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (rows, cached length): 1 real token, 0 padding

    def room(self) -> int:
        if self.rows and not _joinable(self.cache):
            return 0
        return self.limit - len(self.rows)

    def admits(self, rows: list[Row]) -> bool:
        """Whether `rows` may join now besides the rows in the batch: always, as the KV cache grows with
        them (a fixed pool of cells, as llama.cpp's in server/inference/llama.py, may say no)."""
        return True

    def _forward(self, rows: list[Row], ids, mask, cache):
        model, names = self.weights.forward_model(rows[0].target, [r.target.adapter for r in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        extra = {"adapter_names": names} if names else {}
        device = model.device  # the rows' bookkeeping stays on the CPU; a GPU model gets its inputs moved
        with torch.inference_mode():
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                        past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
        return out.logits[:, -1, :].float().cpu(), out.past_key_values

    def join(self, rows: list[Row]) -> None:
        """Prefill `rows` (left-padded together) and add them: each gets its first token."""
        pad = rows[0].target.tokenizer.pad_token_id or 0
        length = max(len(r.prompt) for r in rows)
        ids = torch.tensor([[pad] * (length - len(r.prompt)) + r.prompt for r in rows])
        mask = torch.tensor([[0] * (length - len(r.prompt)) + [1] * len(r.prompt) for r in rows])
        logits, cache = self._forward(rows, ids, mask, None)
        for i, row in enumerate(rows):
            row.add(row.decoding.pick(logits[i]))
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        total = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, total, 2), _left_pad(new.keys, total, 2)])
            old.values = torch.cat([_left_pad(old.values, total, 2), _left_pad(new.values, total, 2)])
        self.mask = torch.cat([_left_pad(self.mask, total, 1), _left_pad(mask, total, 1)])
        self.rows += rows

    def step(self) -> None:
        """One token for every row (rows that finished were dropped by `finished()`)."""
        ids = torch.tensor([[r.tokens[-1]] for r in self.rows])
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits, self.cache = self._forward(self.rows, ids, self.mask, self.cache)
        for i, row in enumerate(self.rows):
            row.add(row.decoding.pick(logits[i]))

    def finished(self) -> list[Row]:
        """Drop and return the rows that are done; trim padding no remaining row needs."""
        done = [r for r in self.rows if r.finish]
        if not done:
            return []
        keep = [i for i, r in enumerate(self.rows) if not r.finish]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return done
        index = torch.tensor(keep)
        self.mask = self.mask[index]
        if not _joinable(self.cache):
            self.cache.batch_select_indices(index)
            return done
        first = int(self.mask.any(0).nonzero()[0])  # columns before it are padding in every remaining row
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]
        return done
