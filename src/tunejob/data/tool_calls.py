"""Function calling in training and serving: OpenAI's tool formats in one form, rendered through
the chat template's own tool support or one fixed fallback, and parsed back from generated text.

Rendering. The model's own chat template renders the conversation. Function calling (an example's
`tools`, assistant `tool_calls`, `tool` turns; legacy `functions`, `function_call` and role
`function` are converted to those first) goes through the template's own tool support when it has
one: `tool_rendering(tokenizer) == "template"`. A template without it (SmolLM2's) gets one fixed
fallback, the Hermes / Qwen2.5 convention (`fallback_messages`): the tool list in the system turn
inside <tools></tools>, each call as <tool_call>{"name": ..., "arguments": {...}}</tool_call> in the
assistant text, tool results as a user turn of <tool_response> blocks. `parse_tool_calls` turns
generated text back into OpenAI tool calls, so a server can return them.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Literal

from tunejob.data.dataset import text_of

Rendering = Literal["template", "fallback"]


# ---------------------------------------------------------------- OpenAI messages, one form


def _call(name: str, arguments: object, call_id: str) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def _arguments_value(arguments: str) -> object:
    """OpenAI sends arguments as a JSON string; templates (and the fallback) show them as JSON
    objects. Text that is not JSON stays text rather than failing the example."""
    try:
        return json.loads(arguments)
    except (TypeError, json.JSONDecodeError):
        return arguments


def normalize(messages: list[dict], tools: list | None = None, functions: list | None = None) -> tuple[list[dict], list[dict]]:
    """Messages and tool list in OpenAI's current format: legacy `functions` become tools, an
    assistant `function_call` one tool call, a `function` turn a `tool` turn answering that call.
    Idempotent, so every entry point can call it."""
    tools = [dict(t) for t in tools or []] + [{"type": "function", "function": f} for f in functions or []]
    out: list[dict] = []
    pending: dict[str, str] = {}  # function name -> id given to its latest legacy call
    for n, m in enumerate(messages):
        role = "tool" if m.get("role") == "function" else m.get("role")
        msg: dict = {"role": role, "content": text_of(m.get("content"))}
        calls = [_call(c["function"]["name"], c["function"].get("arguments", "{}"), c.get("id") or f"call_{n}_{k}")
                 for k, c in enumerate(m.get("tool_calls") or [])]
        legacy = m.get("function_call")
        if isinstance(legacy, dict) and legacy.get("name"):
            pending[legacy["name"]] = f"call_{n}"
            calls.append(_call(legacy["name"], legacy.get("arguments", "{}"), f"call_{n}"))
        if calls:
            msg["tool_calls"] = calls
            msg["content"] = msg["content"] or None  # OpenAI's "call only" turn
        call_id = m.get("tool_call_id") or (pending.get(m.get("name", "")) if m.get("role") == "function" else None)
        if role == "tool" and call_id:
            msg["tool_call_id"] = call_id
        if role == "tool" and m.get("name"):
            msg["name"] = m["name"]
        if "weight" in m:
            msg["weight"] = m["weight"]
        out.append(msg)
    return out, tools


def uses_tools(example: dict) -> bool:
    """Whether an example (as load_examples returns it) has tools or any tool-call turn."""
    return bool(example.get("tools") or example.get("functions")) or any(
        m.get("tool_calls") or m.get("function_call") or m.get("role") in ("tool", "function") for m in example["messages"])


# ---------------------------------------------------------------- fallback rendering (Hermes / Qwen2.5)

_TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")
_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def _call_block(call: dict) -> str:
    fn = call["function"]
    body = json.dumps({"name": fn["name"], "arguments": _arguments_value(fn["arguments"])}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def fallback_messages(messages: list[dict], tools: list | None = None) -> list[dict]:
    """Tool use as plain role/content messages, for templates without tool support.

    The tool list is appended to the system message (or becomes one: a template's default system
    prompt is then not shown, the same way at training and at serving). An assistant turn is its
    text, then one <tool_call> block per call. Consecutive tool results become one user turn of
    <tool_response> blocks, as Qwen2.5 renders them, since most templates have no `tool` role.
    `weight` is kept on assistant turns so the caller knows which to train."""
    messages, tools = normalize(messages, tools)
    out: list[dict] = []
    previous_tool = False
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content'] or ''}\n</tool_response>"
            if previous_tool:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            previous_tool = True
            continue
        previous_tool = False
        parts = [m["content"]] if m["content"] else []
        msg = {"role": m["role"], "content": "\n".join(parts + [_call_block(c) for c in m.get("tool_calls", [])])}
        if "weight" in m:
            msg["weight"] = m["weight"]
        out.append(msg)
    if tools:
        listing = _TOOLS_INTRO + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + _TOOLS_OUTRO
        if out and out[0]["role"] == "system":
            out[0]["content"] = (out[0]["content"] + "\n\n" + listing) if out[0]["content"] else listing
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(content, OpenAI tool_calls) from text in the fallback's format. A block that is not a JSON
    object with a "name" stays in the content: the model wrote it, the client should see it."""
    calls, kept, last = [], [], 0
    for match in _CALL_RE.finditer(text):
        try:
            obj = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        calls.append(_call(obj["name"], obj.get("arguments", {}), f"call_{uuid.uuid4().hex[:24]}"))
        kept.append(text[last:match.start()])
        last = match.end()
    kept.append(text[last:])
    return "".join(kept).strip(), calls


# ---------------------------------------------------------------- the template's own tool support

_PROBE_TOOL = {"type": "function", "function": {"name": "probe_lookup_q7", "description": "probe_describe_q7",
               "parameters": {"type": "object", "properties": {"probe_key": {"type": "string"}}}}}
# The call id is 9 alphanumerics because Mistral-style templates reject any other shape.
_PROBE = [
    {"role": "system", "content": "probe system"},
    {"role": "user", "content": "probe question"},
    {"role": "assistant", "tool_calls": [{"id": "pr0beC4ll", "type": "function",
                                          "function": {"name": "probe_lookup_q7", "arguments": {"probe_key": "probe_value_q7"}}}]},
    {"role": "tool", "tool_call_id": "pr0beC4ll", "name": "probe_lookup_q7", "content": "probe_result_q7"},
    {"role": "assistant", "content": "probe answer"},
]
_TOOL_SUPPORT: dict[str, bool] = {}  # template source -> whether it renders tools, calls and results


def template_source(tokenizer, tools: list | None) -> str:
    try:
        return tokenizer.get_chat_template(None, tools) or ""
    except (ValueError, TypeError, AttributeError):  # no template: rendering reports it
        return ""


def tool_rendering(tokenizer) -> Rendering:
    """"template" when the chat template itself renders a tool list, calls (name and arguments)
    and tool results; else "fallback". A template merely naming `tools` is not enough: some accept
    the variable and ignore it, which would train calls the model was never shown tools for."""
    source = template_source(tokenizer, [_PROBE_TOOL])
    if source not in _TOOL_SUPPORT:
        _TOOL_SUPPORT[source] = "tool" in source and _probe_renders_tools(tokenizer)
    return "template" if _TOOL_SUPPORT[source] else "fallback"


def _probe_renders_tools(tokenizer) -> bool:
    try:
        text = tokenizer.apply_chat_template(_PROBE, tools=[_PROBE_TOOL], tokenize=False)
    except Exception:  # jinja raises many types; a template that cannot render tool use lacks it
        return False
    shown = ("probe_describe_q7", "probe_key", "probe_value_q7", "probe_result_q7", "probe answer")
    return text.count("probe_lookup_q7") >= 2 and all(s in text for s in shown)


def _template_message(m: dict) -> dict:
    """A message as tool-aware templates expect it: no null keys, arguments as objects."""
    msg = {k: v for k, v in m.items() if v is not None}
    if "tool_calls" in msg:
        msg["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments_value(c["function"]["arguments"])}}
                             for c in msg["tool_calls"]]
    return msg


def template_inputs(tokenizer, messages: list[dict], tools, functions) -> tuple[list[dict], list | None]:
    messages, tools = normalize(messages, tools, functions)
    if tool_rendering(tokenizer) == "fallback":
        return fallback_messages(messages, tools), None
    return [_template_message(m) for m in messages], tools or None


def render_inputs(tokenizer, messages: list[dict], tools: list | None = None, functions: list | None = None) -> tuple[list[dict], list | None]:
    """(messages, tools) to pass to this tokenizer's apply_chat_template, the same way training
    rendered them: for prompts at evaluation and serving time."""
    msgs, tools = template_inputs(tokenizer, messages, tools, functions)
    return [{k: v for k, v in m.items() if k != "weight"} for m in msgs], tools
