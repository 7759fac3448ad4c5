"""The validation report: problem kinds with their severity and fix, counts, and the text rendering.

The error kinds of OpenAI's data-preparation cookbook keep their names (data_type,
missing_messages_list, message_missing_key, message_unrecognized_key, unrecognized_role,
missing_content, example_missing_assistant_message); the others are tunejob's.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

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
    "mixed_formats": ("error", "use one format in a file: chat (messages), prompt/completion, or preference pairs"),
    "duplicate_example": ("error", "remove the repeated example: duplicates can land in both train and validation and hide overfitting"),
    "too_many_tokens": ("error", "shorten the example or pick a model with a longer context; it would be truncated"),
    "too_few_examples": ("error", "add examples: 50-100 good ones is a sensible start"),
    "bedrock_unrecognized_key": ("error", "Bedrock allows only \"system\" and \"messages\" at the top level and role/content in messages"),
    "bedrock_too_few_messages": ("error", "Bedrock needs at least one user and one assistant message"),
    "bedrock_first_not_user": ("error", "start the conversation with a user message (the system prompt goes in \"system\")"),
    "bedrock_last_not_assistant": ("error", "end the conversation with an assistant message"),
    "bedrock_not_alternating": ("error", "alternate user and assistant strictly; merge consecutive messages of one role"),
    "bedrock_system_misplaced": ("error", "only the first message may be a system message (it becomes Bedrock's \"system\" field)"),
    "not_preference": ("error", "with --format preference each line is {\"input\": {\"messages\": [...]}, \"preferred_output\": [...], \"non_preferred_output\": [...]}"),
    "preference_unrecognized_key": ("error", "remove the key; a preference pair has input (messages, tools, parallel_tool_calls), preferred_output, non_preferred_output"),
    "preference_missing_input": ("error", "give the pair \"input\": {\"messages\": [...]}, the conversation both outputs answer"),
    "preference_input_ends_with_assistant": ("error", "end the input with the user (or tool) turn that the two outputs answer"),
    "preference_missing_output": ("error", "give both preferred_output and non_preferred_output as non-empty lists of assistant messages"),
    "preference_output_not_assistant": ("error", "outputs hold only assistant messages: role \"assistant\""),
    "preference_identical_outputs": ("error", "make the non-preferred output differ from the preferred one: identical pairs teach nothing"),
    "prompt_ends_with_answer": ("error", "end each reinforcement example with the user (or tool) turn the model answers: the answers are sampled and graded, not given"),
    "missing_item_field": ("error", "give every line the fields the grader reads as {{item.<field>}}, or change the grader"),
    "utf8_bom": ("warning", "save without a byte-order mark; tunejob ignores it"),
    "missing_system_message": ("warning", "a consistent system prompt helps the model learn one persona"),
    "missing_user_message": ("warning", "most chat examples have a user turn to answer"),
    "short_assistant_answer": ("warning", "check the answer: very short targets teach little"),
}

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
    data_kind: str | None = None  # "chat", "prompt_completion" or "preference": the file's first example's
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
            "data_kind": self.data_kind,
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
