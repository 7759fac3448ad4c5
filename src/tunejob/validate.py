"""Dataset validation: every line checked, every problem with its line number, and statistics.

    tunejob validate examples/data/sales_companion.jsonl [--format bedrock] [--model gpt-4.1-mini] [--json]

The error kinds of OpenAI's data-preparation cookbook keep their names (data_type,
missing_messages_list, message_missing_key, message_unrecognized_key, unrecognized_role,
missing_content, example_missing_assistant_message); the others are tunejob's. Errors make the file
unusable for training (exit 2); warnings are worth a look but do not stop a job.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tunejob import catalog
from tunejob.dataset import MAX_LINE_BYTES, as_messages, iter_raw_lines, text_of
from tunejob.tokens import TokenCounter, counter_for

Format = Literal["openai", "bedrock"]
MIN_EXAMPLES = 10  # OpenAI rejects training files with fewer than 10 examples
SHORT_ANSWER_TOKENS = 3
MAX_LISTED = 1000  # problems kept per kind; the count stays exact

# kind -> (severity, how to fix). The message of each problem says what is wrong on that line.
KINDS: dict[str, tuple[str, str]] = {
    "empty_file": ("error", "add examples, one JSON object per line"),
    "invalid_utf8": ("error", "save the file as UTF-8"),
    "line_too_long": ("error", "shorten or split this example"),
    "blank_line": ("error", "remove the empty line"),
    "invalid_json": ("error", "make the line one complete JSON object (no trailing commas, double quotes only)"),
    "data_type": ("error", "each line must be a JSON object, e.g. {\"messages\": [...]}"),
    "missing_messages_list": ("error", "give the example a \"messages\" list (or \"prompt\" and \"completion\" strings)"),
    "message_missing_key": ("error", "every message needs \"role\" and \"content\""),
    "message_unrecognized_key": ("error", "remove the key; allowed: role, content, name, weight, tool_calls, tool_call_id, function_call"),
    "unrecognized_role": ("error", "use one of system, user, assistant, tool (or function)"),
    "missing_content": ("error", "give the message a non-empty string content (assistant messages may carry tool_calls instead)"),
    "example_missing_assistant_message": ("error", "add at least one assistant message: that is what the model learns"),
    "example_unrecognized_key": ("error", "remove the key; allowed at the top level: messages, tools, functions, parallel_tool_calls"),
    "invalid_weight": ("error", "weight is 0 (do not train on this message) or 1, and only on assistant messages"),
    "invalid_tool_calls": ("error", "tool_calls is a list of {\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}"),
    "prompt_completion_invalid": ("error", "give both \"prompt\" and \"completion\" as strings, and no other keys"),
    "mixed_formats": ("error", "use one format in a file: chat (messages) or prompt/completion"),
    "duplicate_example": ("error", "remove the repeated example: duplicates can land in both train and validation and hide overfitting"),
    "too_many_tokens": ("error", "shorten the example or pick a model with a longer context; it would be truncated"),
    "too_few_examples": ("error", "add examples: OpenAI requires at least 10, and 50-100 good ones is a sensible start"),
    "bedrock_unrecognized_key": ("error", "Bedrock allows only \"system\" and \"messages\" at the top level and role/content in messages"),
    "bedrock_too_few_messages": ("error", "Bedrock needs at least one user and one assistant message"),
    "bedrock_first_not_user": ("error", "start the conversation with a user message (the system prompt goes in \"system\")"),
    "bedrock_last_not_assistant": ("error", "end the conversation with an assistant message"),
    "bedrock_not_alternating": ("error", "alternate user and assistant strictly; merge consecutive messages of one role"),
    "bedrock_system_misplaced": ("error", "only the first message may be a system message (it becomes Bedrock's \"system\" field)"),
    "utf8_bom": ("warning", "save without a byte-order mark; tunejob ignores it"),
    "missing_system_message": ("warning", "a consistent system prompt helps the model learn one persona"),
    "missing_user_message": ("warning", "most chat examples have a user turn to answer"),
    "short_assistant_answer": ("warning", "check the answer: very short targets teach little"),
}

CHAT_TOP_KEYS = {"messages", "tools", "functions", "parallel_tool_calls"}
MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call", "refusal"}
ROLES = {"system", "user", "assistant", "tool", "function"}


@dataclass
class Problem:
    kind: str
    line: int | None
    message: str

    @property
    def severity(self) -> str:
        return KINDS[self.kind][0]


@dataclass
class Report:
    path: str
    format: str
    model: str | None
    token_counter: str
    tokens_approximate: bool
    lines: int = 0
    examples: int = 0
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    problems: dict[str, list[Problem]] = field(default_factory=lambda: defaultdict(list))
    stats: dict = field(default_factory=dict)

    def add(self, kind: str, line: int | None, message: str) -> None:
        self.counts[kind] += 1
        if len(self.problems[kind]) < MAX_LISTED:
            self.problems[kind].append(Problem(kind, line, message))

    @property
    def errors(self) -> int:
        return sum(n for k, n in self.counts.items() if KINDS[k][0] == "error")

    @property
    def warnings(self) -> int:
        return sum(n for k, n in self.counts.items() if KINDS[k][0] == "warning")

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def to_dict(self) -> dict:
        def group(severity: str) -> list[dict]:
            return [
                {
                    "kind": kind,
                    "count": self.counts[kind],
                    "fix": KINDS[kind][1],
                    "problems": [{"line": p.line, "message": p.message} for p in self.problems[kind]],
                }
                for kind in KINDS
                if self.counts.get(kind) and KINDS[kind][0] == severity
            ]

        return {
            "path": self.path,
            "format": self.format,
            "model": self.model,
            "ok": self.ok,
            "lines": self.lines,
            "examples": self.examples,
            "error_count": self.errors,
            "warning_count": self.warnings,
            "errors": group("error"),
            "warnings": group("warning"),
            "token_counter": self.token_counter,
            "tokens_approximate": self.tokens_approximate,
            "stats": self.stats,
        }


def validate_file(
    path: str | Path,
    format: Format = "openai",
    model: str | None = None,
    counter: TokenCounter | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    min_examples: int = MIN_EXAMPLES,
) -> Report:
    """Check every line of a JSONL dataset; raise DataError only when the file cannot be opened."""
    info = catalog.lookup(model) if model else None
    counter = counter or counter_for(model)
    limit = (info.max_example_tokens if info else None) or counter.context_limit
    report = Report(str(path), format, model, counter.name, counter.approximate)
    seen: dict[bytes, int] = {}
    good: list[tuple[int, list[dict]]] = []  # (line, messages) awaiting token counts
    totals: list[int] = []
    assistant: list[int] = []
    per_example_messages: list[int] = []
    detected: str | None = None  # "chat" or "prompt_completion", from the first valid example

    def flush() -> None:
        if not good:
            return
        counts = counter.count([m for _, m in good])
        for (line, _), (total, answer) in zip(good, counts):
            totals.append(total)
            assistant.append(answer)
            if limit and total > limit:
                report.add("too_many_tokens", line, f"{total:,} tokens, over the {limit:,}-token limit of {model or counter.name}")
            elif answer <= SHORT_ANSWER_TOKENS:
                report.add("short_assistant_answer", line, f"assistant answer has {answer} token(s)")
        good.clear()

    for raw in iter_raw_lines(path, max_line_bytes):
        report.lines = raw.number
        if raw.data is None:
            report.add("line_too_long", raw.number, f"line is {raw.size:,} bytes, over the {max_line_bytes:,}-byte limit for one example")
            continue
        data = raw.data
        if raw.number == 1 and data.startswith(b"\xef\xbb\xbf"):
            report.add("utf8_bom", 1, "file starts with a UTF-8 byte-order mark")
            data = data[3:]
        if not data.strip():
            report.add("blank_line", raw.number, "empty line")
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.add("invalid_utf8", raw.number, f"byte {exc.start + 1} (0x{data[exc.start]:02x}) is not valid UTF-8")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            report.add("invalid_json", raw.number, f"{exc.msg} at column {exc.colno}")
            continue
        except ValueError as exc:  # e.g. an integer over Python's 4,300-digit limit
            report.add("invalid_json", raw.number, str(exc).split(";")[0])
            continue
        except RecursionError:
            report.add("invalid_json", raw.number, "JSON nested too deeply")
            continue
        kind = _example_kind(obj)
        if detected is None and kind in ("chat", "prompt_completion"):
            detected = kind
        elif kind in ("chat", "prompt_completion") and kind != detected:
            report.add("mixed_formats", raw.number, f"a {kind.replace('_', '/')} example in a {detected.replace('_', '/')} file")
            continue
        digest = hashlib.blake2b(data.strip(), digest_size=16).digest()
        if digest in seen:
            report.add("duplicate_example", raw.number, f"same as line {seen[digest]}")
            continue
        if not _check_example(obj, kind, format, raw.number, report):
            continue
        seen[digest] = raw.number
        report.examples += 1
        messages = as_messages(obj)
        per_example_messages.append(len(messages))
        good.append((raw.number, messages))
        if len(good) >= 2048:
            flush()
    flush()

    if report.lines == 0 or (report.examples == 0 and report.counts.get("blank_line", 0) == report.lines):
        report.add("empty_file", None, "the file has no examples")
    elif report.examples < min_examples and report.ok:
        report.add("too_few_examples", None, f"{report.examples} valid example(s); at least {min_examples} are needed")
    report.stats = _stats(per_example_messages, totals, assistant)
    return report


def require_valid(path: str | Path, format: Format = "openai", model: str | None = None, min_examples: int = 1) -> Report:
    """Validate before work starts; a file with errors becomes one DataError naming the first
    problem (file:line), the count by kind, and the command that lists them all."""
    from tunejob.errors import DataError

    report = validate_file(path, format=format, model=model, min_examples=min_examples)
    if not report.ok:
        first = next(p for ps in report.problems.values() for p in ps if p.severity == "error")
        kinds = ", ".join(f"{k} x{n}" for k, n in report.counts.items() if n and KINDS[k][0] == "error")
        flags = (f" --format {format}" if format != "openai" else "") + (f" --model {model}" if model else "")
        where = f"{path}:{first.line}" if first.line else str(path)
        # The command is named when there is more to see, or when plain `tunejob validate` would not
        # reproduce the check (Bedrock's rules, a model's context limit).
        if report.errors > 1 or flags:
            more = f"; run `tunejob validate {path}{flags}` " + ("for all of them" if report.errors > 1 else "to check again")
        else:
            more = ""
        raise DataError(f"{where}: {first.message} ({report.errors} error(s): {kinds}); {KINDS[first.kind][1]}{more}")
    return report


def _example_kind(obj: object) -> str:
    if not isinstance(obj, dict):
        return "invalid"
    if "messages" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    return "invalid"


def _check_example(obj: object, kind: str, fmt: Format, line: int, report: Report) -> bool:
    """Add this example's problems to the report; True when it is usable."""
    before = report.errors
    if not isinstance(obj, dict):
        report.add("data_type", line, f"expected a JSON object, got {type(obj).__name__}")
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


def _dist(values: list[int]) -> dict | None:
    if not values:
        return None
    ordered = sorted(values)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 1),
        "median": pct(0.5),
        "p90": pct(0.9),
        "max": ordered[-1],
        "total": sum(ordered),
    }


def _stats(messages: list[int], totals: list[int], assistant: list[int]) -> dict:
    return {
        "messages_per_example": _dist(messages),
        "tokens_per_example": _dist(totals),
        "assistant_tokens_per_example": _dist(assistant),
    }


def render_text(report: Report, max_per_kind: int = 10) -> str:
    """The report for people: errors grouped by kind, then warnings, then statistics."""
    out = []
    name = report.path
    for severity in ("error", "warning"):
        kinds = [k for k in KINDS if report.counts.get(k) and KINDS[k][0] == severity]
        for kind in kinds:
            n = report.counts[kind]
            out.append(f"{severity} {kind} ({n}): fix: {KINDS[kind][1]}")
            for p in report.problems[kind][:max_per_kind]:
                where = f"{name}:{p.line}" if p.line else name
                out.append(f"  {where}: {p.message}")
            if n > max_per_kind:
                out.append(f"  ... and {n - max_per_kind} more")
    s = report.stats
    approx = " (approximate)" if report.tokens_approximate else ""
    out.append(
        f"{name}: {report.examples} examples in {report.lines} lines; "
        f"{report.errors} error(s), {report.warnings} warning(s); tokens by {report.token_counter}{approx}"
    )
    for label, key in (("messages/example", "messages_per_example"), ("tokens/example", "tokens_per_example"), ("assistant tokens/example", "assistant_tokens_per_example")):
        d = s.get(key)
        if d:
            out.append(f"  {label:<25} min {d['min']}  median {d['median']}  mean {d['mean']}  p90 {d['p90']}  max {d['max']}  total {d['total']:,}")
    out.append("OK: ready to train" if report.ok else "FAILED: fix the errors above")
    return "\n".join(out)
