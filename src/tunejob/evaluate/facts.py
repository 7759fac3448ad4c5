"""Fact recall: did fine-tuning teach what the base model cannot know?

A facts file holds questions whose answers the training data states (and the validation split
does not), worded differently from the training examples, each with the string(s) a right answer
contains:

    {"question": "Who holds the CFO role at Globex?", "expect": "Whitaker", "system": "You are ..."}

Both sides answer greedily on one loaded model (the adapter switched off for the base), so the
only difference is the adapter. A string match is crude but cannot be argued with: a model that
names Dan Whitaker knows the CFO; one that names nobody does not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunejob.errors import DataError


@dataclass(frozen=True)
class Fact:
    question: str
    expect: tuple[str, ...]  # any one of these, case-insensitive, makes the answer right
    system: str | None = None

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": self.question}]


def load_facts(path: str | Path) -> list[Fact]:
    facts = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the facts file ({exc.strerror or exc})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            expect = obj["expect"] if isinstance(obj["expect"], list) else [obj["expect"]]
            facts.append(Fact(str(obj["question"]), tuple(str(e) for e in expect), obj.get("system")))
        except (ValueError, KeyError, TypeError):
            raise DataError(f'{path}:{n}: a fact is {{"question": "...", "expect": "text a right answer contains"}} (optional "system")') from None
    if not facts:
        raise DataError(f"{path}: no facts in the file")
    return facts


def is_right(answer: str, fact: Fact) -> bool:
    return any(e.lower() in answer.lower() for e in fact.expect)


def recall(model, tokenizer, facts: list[Fact], max_new_tokens: int = 60) -> dict:
    """Each fact asked of the base (adapter off) and the fine-tuned model: answers and the score."""
    import contextlib

    from tunejob.engine.answers import greedy

    rows = [{"question": f.question, "expect": list(f.expect)} for f in facts]
    for side, context in (("base", model.disable_adapter), ("finetuned", contextlib.nullcontext)):
        with context():
            results = greedy(model, tokenizer, [f.messages() for f in facts], max_new_tokens)
        for row, fact, result in zip(rows, facts, results):
            row[side] = {"answer": result.content or "", "right": is_right(result.content or "", fact)}
    score = {side: sum(r[side]["right"] for r in rows) for side in ("base", "finetuned")}
    return {"facts": len(facts), "base_right": score["base"], "finetuned_right": score["finetuned"], "rows": rows}


def verdict(result: dict) -> str:
    n, b, f = result["facts"], result["base_right"], result["finetuned_right"]
    if f > b:
        return f"fine-tuning taught it: the fine-tuned model got {f} of {n} facts right, the base model {b}"
    return f"no sign of learning: the fine-tuned model got {f} of {n} facts right, the base model {b}"
