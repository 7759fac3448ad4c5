"""The rules one example is checked against: its shape, each message, tool calls, Bedrock's turns."""

from __future__ import annotations

import json
from typing import Literal

from tunejob.data.dataset import text_of
from tunejob.data.problems import Report

Format = Literal["openai", "bedrock", "preference", "reinforcement"]


CHAT_TOP_KEYS = {"messages", "tools", "functions", "parallel_tool_calls"}

MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call", "refusal"}

ROLES = {"system", "user", "assistant", "tool", "function"}

# OpenAI's preference (DPO) format: {"input": {"messages", "tools", ...}, "preferred_output": [...],
# "non_preferred_output": [...]}
PREFERENCE_TOP_KEYS = {"input", "preferred_output", "non_preferred_output"}
PREFERENCE_INPUT_KEYS = {"messages", "tools", "functions", "parallel_tool_calls"}

def example_kind(obj: object) -> str:
    if not isinstance(obj, dict):
        return "invalid"
    if PREFERENCE_TOP_KEYS & set(obj):
        return "preference"
    if "messages" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    return "invalid"

def check_example(obj: object, kind: str, fmt: Format, line: int, report: Report) -> bool:
    """Add this example's problems to the report; True when it is usable."""
    before = report.errors
    if not isinstance(obj, dict):
        report.add("data_type", line, f"expected a JSON object, got {type(obj).__name__}")
        return False
    if fmt == "reinforcement" and kind != "chat":
        report.add("missing_messages_list", line, "a reinforcement example is {\"messages\": [...], ...}: the prompt, plus the fields its grader reads")
        return False
    if kind == "preference":
        return _check_preference(obj, line, report)
    if fmt == "preference":
        report.add("not_preference", line, f"a {kind.replace('_', '/')} example where a preference pair was expected")
        return False
    if kind == "invalid":
        report.add("missing_messages_list", line, f"no \"messages\" key (keys: {', '.join(_show(k) for k in sorted(obj)) or 'none'})")
        return False
    if kind == "prompt_completion":
        extra = set(obj) - {"prompt", "completion"}
        bad = [k for k in ("prompt", "completion") if not isinstance(obj.get(k), str)]
        if bad or extra:
            what = f"{' and '.join(bad)} missing or not a string" if bad else f"unexpected key(s) {', '.join(_show(k) for k in sorted(extra))}"
            report.add("prompt_completion_invalid", line, what)
        elif not obj["completion"].strip():
            report.add("missing_content", line, "completion is empty")
        return report.errors == before
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        report.add("missing_messages_list", line, "\"messages\" must be a non-empty list")
        return False
    if fmt == "reinforcement":
        return _check_prompt(obj, messages, line, report)
    allowed_top = {"system", "messages"} if fmt == "bedrock" else CHAT_TOP_KEYS
    for key in set(obj) - allowed_top:
        report.add("bedrock_unrecognized_key" if fmt == "bedrock" else "example_unrecognized_key", line, f"unrecognized top-level key {_show(key)}")
    if fmt == "bedrock" and "system" in obj and not isinstance(obj["system"], str):
        report.add("bedrock_unrecognized_key", line, "\"system\" must be a string")
    for i, msg in enumerate(messages, 1):
        _check_message(msg, i, fmt, line, report)
    if report.errors != before:
        return False
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        report.add("example_missing_assistant_message", line, "no assistant message")
    if fmt == "bedrock":
        _check_bedrock_turns(roles, obj, line, report)
    if report.errors != before:
        return False
    if "system" not in roles and not obj.get("system"):
        report.add("missing_system_message", line, "no system message")
    if "user" not in roles:
        report.add("missing_user_message", line, "no user message")
    return True

def _check_prompt(obj: dict, messages: list, line: int, report: Report) -> bool:
    """OpenAI's reinforcement format: the conversation up to the turn the model answers, plus any
    other keys, which reach the grader as `item.*` (data/reinforcement.py checks those)."""
    before = report.errors
    for i, msg in enumerate(messages, 1):
        role = msg.get("role") if isinstance(msg, dict) else None
        # developer is OpenAI's name for the system turn of its reasoning models, which RFT trained
        _check_message({**msg, "role": "system"} if role == "developer" else msg, i, "openai", line, report)
    if report.errors != before:
        return False
    if messages[-1]["role"] not in ("user", "tool"):
        report.add("prompt_ends_with_answer", line, f"the last message is the {_show(messages[-1]['role'])}'s")
    return report.errors == before


def _check_message(msg: object, i: int, fmt: Format, line: int, report: Report) -> None:
    where = f"message {i}"
    if not isinstance(msg, dict):
        report.add("data_type", line, f"{where} is a {type(msg).__name__}, not an object")
        return
    for key in ("role", "content"):
        if key not in msg and not (key == "content" and ("tool_calls" in msg or "function_call" in msg)):
            report.add("message_missing_key", line, f"{where} has no \"{key}\"")
    allowed = {"role", "content"} if fmt == "bedrock" else MESSAGE_KEYS
    for key in set(msg) - allowed:
        report.add("bedrock_unrecognized_key" if fmt == "bedrock" else "message_unrecognized_key", line, f"{where} has unrecognized key {_show(key)}")
    role = msg.get("role")
    if "role" in msg and not (isinstance(role, str) and role in ROLES):
        report.add("unrecognized_role", line, f"{where} has role {_show(role)}")
    has_calls = bool(msg.get("tool_calls") or msg.get("function_call"))
    content = msg.get("content")
    # An assistant turn that only calls a tool has content null; anything else needs text.
    if "content" in msg and not (content is None and has_calls) and not text_of(content).strip():
        report.add("missing_content", line, f"{where} ({_show(role)}) has empty or non-text content")
    if "weight" in msg and (msg["weight"] not in (0, 1) or isinstance(msg["weight"], bool) or role != "assistant"):
        report.add("invalid_weight", line, f"{where} has weight {_show(msg['weight'])} on a {_show(role)} message")
    if "tool_calls" in msg and not _valid_tool_calls(msg["tool_calls"]):
        report.add("invalid_tool_calls", line, f"{where} has malformed tool_calls")

def _show(value: object) -> str:
    """A value from the file, safe to print: JSON-escaped, so control characters (terminal
    escapes) and lone surrogates cannot reach the terminal raw; long values are cut."""
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."

def _valid_tool_calls(calls: object) -> bool:
    if not isinstance(calls, list) or not calls:
        return False
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), str)):
            return False
    return True

def _check_bedrock_turns(roles: list[str], obj: dict, line: int, report: Report) -> None:
    turns = roles[1:] if roles and roles[0] == "system" else roles
    if "system" in turns:
        report.add("bedrock_system_misplaced", line, f"system message at position {roles.index('system', 1) + 1}")
        return
    if len(turns) < 2:
        report.add("bedrock_too_few_messages", line, f"{len(turns)} user/assistant message(s)")
        return
    if turns[0] != "user":
        report.add("bedrock_first_not_user", line, f"first message is from {turns[0]}")
    if turns[-1] != "assistant":
        report.add("bedrock_last_not_assistant", line, f"last message is from {turns[-1]}")
    for a, b in zip(turns, turns[1:]):
        if a == b or {a, b} - {"user", "assistant"}:
            report.add("bedrock_not_alternating", line, f"{a} followed by {b}")
            break


def _check_preference(obj: dict, line: int, report: Report) -> bool:
    """One preference pair: the input conversation, then one or more assistant turns on each side."""
    before = report.errors
    for key in sorted(set(obj) - PREFERENCE_TOP_KEYS):
        report.add("preference_unrecognized_key", line, f"unrecognized top-level key {_show(key)}")
    inp = obj.get("input")
    messages = inp.get("messages") if isinstance(inp, dict) else None
    if not isinstance(messages, list) or not messages:
        report.add("preference_missing_input", line, "\"input\" must be an object with a non-empty \"messages\" list")
    else:
        for key in sorted(set(inp) - PREFERENCE_INPUT_KEYS):
            report.add("preference_unrecognized_key", line, f"unrecognized key {_show(key)} in \"input\"")
        for i, msg in enumerate(messages, 1):
            _check_message(msg, i, "openai", line, report)
        if report.errors == before and messages[-1]["role"] == "assistant":
            report.add("preference_input_ends_with_assistant", line, f"input message {len(messages)} (the last) is from the assistant")
    outputs = {}
    for key in ("preferred_output", "non_preferred_output"):
        out = obj.get(key)
        if not isinstance(out, list) or not out:
            report.add("preference_missing_output", line, f"{_show(key)} is {'missing' if key not in obj else 'empty or not a list'}")
            continue
        mark = report.errors
        for i, msg in enumerate(out, 1):
            _check_message(msg, i, "openai", line, report)
            if isinstance(msg, dict) and msg.get("role") not in (None, "assistant"):
                report.add("preference_output_not_assistant", line, f"{key} message {i} has role {_show(msg.get('role'))}")
        if report.errors == mark:
            outputs[key] = out
    if len(outputs) == 2 and _same(outputs["preferred_output"], outputs["non_preferred_output"]):
        report.add("preference_identical_outputs", line, "preferred_output and non_preferred_output are the same")
    return report.errors == before

def _same(a: list, b: list) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
