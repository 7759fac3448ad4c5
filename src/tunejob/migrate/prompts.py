"""The prompts a golden set asks (pure): which conversations, cut where, in what order.

    items = golden_prompts(train_rows, validation_rows, extra_rows, samples=20, seed=0)

- each validation conversation, up to (not including) its last assistant turn;
- each line of --prompts (a trailing assistant turn is cut the same way; a line without one is
  asked as it is);
- N training conversations drawn with a seeded RNG (the same seed draws the same prompts, so a
  resumed record asks the same set);
- a preference pair (DPO) contributes its `input`.

Tool conversations keep their `tools` (and `parallel_tool_calls`). Each prompt's id is a hash of
what is sent, so one prompt from two sources is asked once, and a resumed run knows what it has.
"""

from __future__ import annotations

import hashlib
import json
import random

# What OpenAI's chat API takes in a message; training-only keys (weight) are dropped.
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal")


def _message(m: dict) -> dict:
    return {k: m[k] for k in MESSAGE_KEYS if k in m}


def prompt_id(messages: list[dict], tools: list | None, functions: list | None = None) -> str:
    canonical = json.dumps({"messages": messages, "tools": tools or None, "functions": functions or None}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]


def _reference(message: dict) -> dict:
    return {k: message.get(k) for k in ("content", "tool_calls", "function_call") if message.get(k) is not None}


def item_of(row: dict, source: str) -> dict | None:
    """One prompt from a dataset line (chat, or a preference pair); None when nothing is left to ask."""
    if "input" in row and "preferred_output" in row:  # DPO: the pair's input is the prompt
        inner = row.get("input") or {}
        messages, tools, functions = inner.get("messages") or [], inner.get("tools"), inner.get("functions")
        preferred = (row.get("preferred_output") or [{}])[0]
        reference = _reference(preferred) if isinstance(preferred, dict) else None
        extra = {k: inner[k] for k in ("parallel_tool_calls",) if k in inner}
    else:
        messages, tools, functions = row.get("messages") or [], row.get("tools"), row.get("functions")
        last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"), default=None)
        reference = None
        if last is not None and last == len(messages) - 1:
            reference, messages = _reference(messages[last]), messages[:last]
        elif last is not None:
            messages = messages[:last]  # an assistant turn followed by more: the prompt ends before it
            reference = None
        extra = {k: row[k] for k in ("parallel_tool_calls",) if k in row}
    messages = [_message(m) for m in messages if isinstance(m, dict)]
    if not messages or messages[-1]["role"] == "assistant":
        return None
    item = {"id": prompt_id(messages, tools, functions), "source": source, "messages": messages, **extra}
    if tools:
        item["tools"] = tools
    if functions:
        item["functions"] = functions
    if reference:
        item["reference"] = reference
    return item


def golden_prompts(train: list[dict], validation: list[dict], extra: list[dict], samples: int, seed: int) -> list[dict]:
    """Validation prompts, then --prompts, then `samples` drawn training prompts; each id once."""
    drawn = random.Random(seed).sample(range(len(train)), min(samples, len(train))) if samples > 0 else []
    out, seen = [], set()
    for rows, source in ((validation, "validation"), (extra, "prompts"), ([train[i] for i in sorted(drawn)], "training")):
        for row in rows:
            item = item_of(row, source)
            if item is not None and item["id"] not in seen:
                seen.add(item["id"])
                out.append(item)
    return out


def training_ids(train: list[dict]) -> set[str]:
    """The ids of every training conversation's prompt (distillation skips what training already teaches)."""
    return {item["id"] for item in (item_of(row, "training") for row in train) if item is not None}
