"""Answers in the calling thread: requests decoded together on one model by the batched engine
(batch.py), to their end. `tunejob chat`, eval, the demo's facts, the dashboard's chat form,
migrate's comparison and reinforcement fine-tuning's rollouts answer through it; serve feeds the
same Batch from its chat thread (server/inference/generation.py). One engine, so an answer's stop tokens,
stop strings, sampling, tool calls and last character are the same wherever it is generated.

Why batched here too: `tunejob eval` answers each prompt twice (base and fine-tuned); one row at a
time, every token reads all the weights for one row, and on CPU that read is the cost (batch.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tunejob.engine import ROWS
from tunejob.data.templates import stop_token_ids
from tunejob.engine.batch import Batch, Row
from tunejob.engine.chat import ChatRequest, ChatResult, prompt_inputs, to_result


@dataclass(frozen=True)
class Fixed:
    """batch.Target and batch.Weights for one model as it stands (its active adapter, if any)."""

    model: object
    tokenizer: object
    adapter: str | None = None
    key: tuple = ("fixed",)

    def forward_model(self, target, adapters):
        return self.model, None


def decode(model, rows: list[Row], batch_rows: int = ROWS) -> list[Row]:
    """Decode `rows` (whose target is Fixed(model, ...)) to their end, at most `batch_rows` at once;
    each row gets `seconds`, from its batch's start to its last token. Dropout is off while
    decoding and the model's mode is restored after (a training loop calls this mid-step)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_rows):
                chunk = rows[start : start + batch_rows]
                began = time.perf_counter()
                batch = Batch(chunk[0].target, chunk[0].target.key, batch_rows)
                batch.join(chunk)
                while True:
                    for row in batch.finished():
                        row.seconds = time.perf_counter() - began
                    if not batch.rows:
                        break
                    batch.step()
    finally:
        model.train(was_training)
    return rows


def answer_all(model, tokenizer, requests: list[ChatRequest], batch_rows: int = ROWS) -> list[list[ChatResult]]:
    """Each request's choices (n of them, choice i seeded seed + i as serve does), decoded together."""
    target, eos = Fixed(model, tokenizer), stop_token_ids(tokenizer, model)
    rows = []
    for i, request in enumerate(requests):
        prompt = prompt_inputs(tokenizer, request, "cpu")["input_ids"][0].tolist()
        rows += [Row(prompt, request.choice(j), target, eos, owner=(i, j)) for j in range(request.n)]
    results: list[list[ChatResult]] = [[] for _ in requests]
    for row in decode(model, rows, batch_rows):
        result = to_result(tokenizer, row.request, len(row.prompt), row.tokens, eos, False,
                           row.decoding.logprobs if row.request.logprobs is not None else None)
        result.index, result.seconds = row.owner[1], row.seconds
        results[row.owner[0]].append(result)
    return results


def greedy(model, tokenizer, conversations: list[list[dict]], max_tokens: int = 160, batch_rows: int = ROWS) -> list[ChatResult]:
    """The most likely answer to each conversation: no sampling and no penalty, as serve's
    temperature 0 (deterministic, so base and fine-tuned compare fairly)."""
    requests = [ChatRequest(messages=c, max_tokens=max_tokens, temperature=0.0) for c in conversations]
    return [choices[0] for choices in answer_all(model, tokenizer, requests, batch_rows)]
