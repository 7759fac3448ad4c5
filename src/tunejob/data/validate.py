"""Dataset validation: every line checked, every problem with its line number, and statistics.

    tunejob validate examples/data/sales_companion.jsonl [--format bedrock|preference] [--model gpt-4.1-mini] [--json]

A file of preference pairs (OpenAI's DPO format) is recognised by its keys; `--format preference`
also refuses any other kind of line. A pair's tokens are both of its conversations.

The error kinds of OpenAI's data-preparation cookbook keep their names (data_type,
missing_messages_list, message_missing_key, message_unrecognized_key, unrecognized_role,
missing_content, example_missing_assistant_message); the others are tunejob's. Errors make the file
unusable for training (exit 2); warnings are worth a look but do not stop a job.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

from tunejob import catalog
from tunejob.data.dataset import MAX_LINE_BYTES, as_messages, iter_raw_lines
from tunejob.data.example_rules import Format, check_example, example_kind
from tunejob.data.preference import conversations
from tunejob.data.problems import KINDS, Report, render_text
from tunejob.data.tokens import TokenCounter, counter_for

__all__ = ["KINDS", "Format", "Report", "render_text", "require_valid", "validate_file"]
MIN_EXAMPLES = 10  # OpenAI rejects training files with fewer than 10 examples
SHORT_ANSWER_TOKENS = 3


def validate_file(
    path: str | Path,
    format: Format = "openai",
    model: str | None = None,
    counter: TokenCounter | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    min_examples: int = MIN_EXAMPLES,
    item_fields: frozenset[str] = frozenset(),
) -> Report:
    """Check every line of a JSONL dataset; raise DataError only when the file cannot be opened.
    `item_fields`: the dotted fields a reinforcement grader reads from each line ({{item.x.y}})."""
    info = catalog.lookup(model) if model else None
    counter = counter or counter_for(model)
    limit = (info.max_example_tokens if info else None) or counter.context_limit
    report = Report(str(path), format, model, counter.name, counter.approximate)
    seen: dict[bytes, int] = {}
    good: list[tuple[int, list[list[dict]]]] = []  # (line, its conversations: 1, or 2 for a pair) awaiting token counts
    totals: list[int] = []
    assistant: list[int] = []
    per_example_messages: list[int] = []
    detected: str | None = None  # "chat", "prompt_completion" or "preference", from the first example

    def flush() -> None:
        if not good:
            return
        counts = iter(counter.count([c for _, convs in good for c in convs]))
        for line, convs in good:
            sides = [next(counts) for _ in convs]
            totals.append(sum(t for t, _ in sides))
            assistant.append(sum(a for _, a in sides))
            longest, answer = max(t for t, _ in sides), min(a for _, a in sides)
            if limit and longest > limit:
                report.add("too_many_tokens", line, f"{longest:,} tokens, over the {limit:,}-token limit of {model or counter.name}")
            elif answer <= SHORT_ANSWER_TOKENS and format != "reinforcement":  # prompts have no answer to check
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
        obj = _decode(data, raw.number, report)
        if obj is _UNREADABLE:
            continue
        kind = example_kind(obj)
        if detected is None and kind in _KINDS:
            detected = report.data_kind = kind
        elif kind in _KINDS and kind != detected and format != "preference":
            report.add("mixed_formats", raw.number, f"a {kind.replace('_', '/')} example in a {detected.replace('_', '/')} file")
            continue
        digest = hashlib.blake2b(data.strip(), digest_size=16).digest()
        if digest in seen:
            report.add("duplicate_example", raw.number, f"same as line {seen[digest]}")
            continue
        if not check_example(obj, kind, format, raw.number, report):
            continue
        seen[digest] = raw.number
        for field in sorted(f for f in item_fields if not has_field(obj, f)):
            report.add("missing_item_field", raw.number, f"no {field!r}, which the grader reads as {{{{item.{field}}}}}")
        report.examples += 1
        convs = conversations(obj) if kind == "preference" else [as_messages(obj)]
        per_example_messages.append(len(convs[0]))
        good.append((raw.number, convs))
        if len(good) >= 2048:
            flush()
    flush()

    if report.lines == 0 or (report.examples == 0 and report.counts.get("blank_line", 0) == report.lines):
        report.add("empty_file", None, "the file has no examples")
    elif report.examples < min_examples:  # said with the other errors, not only once they are fixed
        whose = " (OpenAI's minimum)" if format == "openai" and min_examples == MIN_EXAMPLES else ""
        report.add("too_few_examples", None, f"{report.examples} valid example(s); at least {min_examples} are needed{whose}")
    report.stats = _stats(per_example_messages, totals, assistant)
    return report


_UNREADABLE = object()
_KINDS = ("chat", "prompt_completion", "preference")


def _decode(data: bytes, line: int, report: Report) -> object:
    """One line's bytes -> its JSON value, or _UNREADABLE with the reason added to the report."""
    if not data.strip():
        report.add("blank_line", line, "empty line")
        return _UNREADABLE
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        report.add("invalid_utf8", line, f"byte {exc.start + 1} (0x{data[exc.start]:02x}) is not valid UTF-8")
        return _UNREADABLE
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        report.add("invalid_json", line, f"{exc.msg} at column {exc.colno}")
    except ValueError as exc:  # e.g. an integer over Python's 4,300-digit limit
        report.add("invalid_json", line, str(exc).split(";")[0])
    except RecursionError:
        report.add("invalid_json", line, "JSON nested too deeply")
    return _UNREADABLE


def has_field(obj: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return False
        obj = obj[part]
    return True


def require_valid(path: str | Path, format: Format = "openai", model: str | None = None, min_examples: int = 1,
                  method: str | None = None, grader: dict | None = None) -> Report:
    """Validate before work starts; a file with errors becomes one DataError naming the first
    problem (file:line), the count by kind, and the command that lists them all. With `method`
    (the spec's "supervised" or "dpo"), a file of the other kind is one DataError too. With a
    reinforcement `grader`, the grader is checked first (GraderError) and every line must have the
    fields it reads as {{item.x}}."""
    from tunejob.errors import DataError

    item_fields: frozenset[str] = frozenset()
    if grader is not None:
        from tunejob.graders import check_grader, referenced_item_fields

        check_grader(grader)
        item_fields = frozenset(referenced_item_fields(grader))
    if method == "reinforcement":
        format = "reinforcement"
    report = validate_file(path, format=format, model=model, min_examples=min_examples, item_fields=item_fields)
    pairs = report.data_kind == "preference"
    if method == "dpo" and report.data_kind and not pairs:
        raise DataError(f"{path}: method dpo trains on preference pairs, but this file holds {report.data_kind.replace('_', '/')} "
                        "examples; give a file of {\"input\", \"preferred_output\", \"non_preferred_output\"} lines or set method: supervised")
    if method == "supervised" and pairs:
        raise DataError(f"{path}: this file holds preference pairs, which method supervised cannot train; set method: {{type: dpo}} "
                        "or give a chat file")
    if not report.ok:
        first = next(p for ps in report.problems.values() for p in ps if p.severity == "error")
        kinds = ", ".join(f"{k} x{n}" for k, n in report.counts.items() if n and KINDS[k][0] == "error")
        flags = (f" --format {format}" if format != "openai" else "") + (f" --model {model}" if model else "")
        flags += " --grader GRADER.json" if item_fields else ""
        where = f"{path}:{first.line}" if first.line else str(path)
        # The command is named when there is more to see, or when plain `tunejob validate` would not
        # reproduce the check (Bedrock's rules, a model's context limit).
        if report.errors > 1 or flags:
            more = f"; run `tunejob validate {path}{flags}` " + ("for all of them" if report.errors > 1 else "to check again")
        else:
            more = ""
        raise DataError(f"{where}: {first.message} ({report.errors} error(s): {kinds}); {KINDS[first.kind][1]}{more}")
    return report


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


