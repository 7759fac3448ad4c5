"""The pairwise judge: an LLM behind any OpenAI-compatible chat endpoint says which of two answers
(base vs fine-tuned) is better; the tally is the fine-tuned model's win rate with a 95% interval.

    settings = JudgeSettings(base_url="http://127.0.0.1:8000/v1", model="judge")
    result = judge_pairs(settings, [PairToJudge(prompt, reference, base_answer, tuned_answer), ...])
    result["win_rate"], result["ci95"]

LLM judges favour the answer shown first (Zheng et al. 2023, "Judging LLM-as-a-judge", measured
a position preference in most judges), so which answer is "A" is drawn per example from a seeded
RNG: half the fine-tuned answers come first, and the same seed gives the same order. A tie counts
as half a win, as in MT-Bench's win rate. The statistics are pure functions; only `ask` talks to
the network.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass

from tunejob.errors import TunejobError

Z_95 = 1.959964  # two-sided 95% normal quantile

RUBRIC = (
    "You compare two answers from AI assistants to the same conversation. A reference answer shows "
    "what a good answer contains. Judge, in this order: correctness against the reference and the "
    "conversation, then completeness, then clarity and concision. Do not prefer an answer for its "
    "length or its position; a tie is fine when neither is better.\n"
    'Reply with JSON only: {"winner": "A" | "B" | "tie", "reason": "<one sentence>"}'
)


class JudgeError(TunejobError):
    """The judge endpoint cannot be reached, refuses the request, or the settings are incomplete."""


@dataclass(frozen=True)
class JudgeSettings:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    seed: int = 0
    timeout_s: float = 60.0


@dataclass(frozen=True)
class PairToJudge:
    prompt: list[dict]  # the conversation up to the answer
    reference: str
    base: str
    finetuned: str


# ---------------------------------------------------------------- pure parts


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion; unlike p +/- z*se it stays inside [0, 1] and is
    usable at the small n an eval set has (8 wins of 10 -> 0.490..0.943, not 0.552..1.048)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def positions(n: int, seed: int) -> list[bool]:
    """For each example, True when the fine-tuned answer is shown as A."""
    rng = random.Random(seed)
    return [rng.random() < 0.5 for _ in range(n)]


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from the judge's reply (JSON as asked, or a bare word); None if unclear."""
    match = re.search(r"\{.*\}", text or "", re.S)
    if match:
        try:
            winner = str(json.loads(match.group(0)).get("winner", "")).strip()
        except (json.JSONDecodeError, AttributeError):
            winner = ""
    else:
        winner = (text or "").strip().strip(".\"'")
    winner = winner.lower()
    return {"a": "A", "b": "B", "tie": "tie"}.get(winner)


def outcome(verdict: str | None, finetuned_is_a: bool) -> str | None:
    """The judge's letter mapped back to the models: 'finetuned', 'base', 'tie' or None."""
    if verdict is None:
        return None
    if verdict == "tie":
        return "tie"
    return "finetuned" if (verdict == "A") == finetuned_is_a else "base"


def tally(outcomes: list[str | None]) -> dict:
    """Wins, losses and ties of the fine-tuned model; win rate = (wins + ties / 2) / judged."""
    wins, losses, ties = (sum(1 for o in outcomes if o == k) for k in ("finetuned", "base", "tie"))
    judged = wins + losses + ties
    score = wins + ties / 2
    lo, hi = wilson_interval(score, judged)
    return {
        "wins": wins, "losses": losses, "ties": ties, "unparsed": len(outcomes) - judged, "judged": judged,
        "win_rate": score / judged if judged else None, "ci95": [lo, hi],
    }


def render_conversation(messages: list[dict]) -> str:
    return "\n".join(f"{m.get('role', '?')}: {m.get('content') or ''}" for m in messages)


def judge_messages(pair: PairToJudge, finetuned_is_a: bool) -> list[dict]:
    a, b = (pair.finetuned, pair.base) if finetuned_is_a else (pair.base, pair.finetuned)
    user = (
        f"Conversation:\n{render_conversation(pair.prompt)}\n\n"
        f"Reference answer:\n{pair.reference}\n\n"
        f"Answer A:\n{a}\n\nAnswer B:\n{b}"
    )
    return [{"role": "system", "content": RUBRIC}, {"role": "user", "content": user}]


# ---------------------------------------------------------------- the endpoint


def make_client(settings: JudgeSettings):
    """An OpenAI SDK client for the endpoint; the key comes from the environment variable named."""
    from openai import OpenAI

    key = os.environ.get(settings.api_key_env)
    if not key:
        raise JudgeError(
            f"judge: environment variable {settings.api_key_env} is not set; export the endpoint's API key there "
            "(any value for a server that needs none), or name another variable with --judge-api-key-env"
        )
    return OpenAI(base_url=settings.base_url, api_key=key, timeout=settings.timeout_s, max_retries=2)


def ask(client, model: str, messages: list[dict]) -> str:
    """One judgement, deterministic as the endpoint allows (temperature 0)."""
    import openai

    try:
        reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=200)
    except openai.APIConnectionError as exc:
        raise JudgeError(f"judge: cannot reach {client.base_url} ({exc.__class__.__name__}); check --judge-base-url and that the server runs") from None
    except openai.APIStatusError as exc:
        raise JudgeError(f"judge: {client.base_url} answered HTTP {exc.status_code} for model {model!r}: {_short(exc.message)}; check --judge-model and the API key") from None
    if not reply.choices:
        raise JudgeError(f"judge: {client.base_url} returned no choices for model {model!r}")
    return reply.choices[0].message.content or ""


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def judge_pairs(settings: JudgeSettings, pairs: list[PairToJudge], client=None) -> dict:
    """Ask the judge about every pair (randomised order) and tally the fine-tuned model's wins."""
    client = client or make_client(settings)
    order = positions(len(pairs), settings.seed)
    verdicts = []
    for pair, finetuned_is_a in zip(pairs, order):
        reply = ask(client, settings.model, judge_messages(pair, finetuned_is_a))
        letter = parse_verdict(reply)
        verdicts.append({"finetuned_shown_as": "A" if finetuned_is_a else "B", "verdict": letter,
                         "outcome": outcome(letter, finetuned_is_a), "reply": _short(reply, 500)})
    result = tally([v["outcome"] for v in verdicts])
    result.update(model=settings.model, base_url=settings.base_url, seed=settings.seed, verdicts=verdicts)
    return result
