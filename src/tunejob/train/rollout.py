"""Rollouts: a group of sampled answers per prompt, decoded by serve's batched engine
(engine/answers.py) on the model being trained, so training samples by the same rules (temperature,
top-p, per-row seeds, stop tokens) that serve answers with.

Every answer has its own seed, a pure function of (run seed, step, prompt, answer): a resumed run
samples the same answers as the run it continues, without saving any RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunejob.data.templates import stop_token_ids
from tunejob.engine.answers import Fixed, decode
from tunejob.engine.batch import Row
from tunejob.train.batches import autocast


@dataclass
class Draw:
    """How one answer is sampled (engine.batch.Sampling)."""

    max_tokens: int
    temperature: float
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Answer:
    prompt: int  # index into the prompts given
    tokens: list[int]  # with the stop token when it stopped
    finish: str  # "stop" or "length"


def seed_of(run_seed: int, step: int, prompt: int, answer: int) -> int:
    return (run_seed * 1_000_003 + step * 10_007 + prompt * 101 + answer) % (2**63)


def sample(model, tokenizer, prompts: list[list[int]], group: int, draw: Draw, seeds: list[list[int]] | None, bf16: bool,
           batch_rows: int = 64) -> list[Answer]:
    """`group` answers to each prompt (prompt-major order), at most `batch_rows` decoding at once.
    Greedy when draw.temperature is 0; dropout off while sampling, the model's mode restored after."""
    target = Fixed(model, tokenizer)
    eos = stop_token_ids(tokenizer, model)
    rows = [Row(list(p), Draw(draw.max_tokens, draw.temperature, draw.top_p, seeds[i][j] if seeds else None), target, eos,
                owner=(i, j)) for i, p in enumerate(prompts) for j in range(group)]
    with autocast(next(model.parameters()).device, bf16):
        decode(model, rows, batch_rows)
    return [Answer(r.owner[0], r.tokens, r.finish) for r in rows]
