"""Templates in grader strings: `{{ item.reference_answer }}`, `{{sample.output_json.name}}`,
`{{ sample.output_tools[0].function.name }}`, as OpenAI's graders guide describes them.

- The only namespaces are `item` (a line of the dataset, all its keys) and `sample` (the model's
  answer: see `make_sample`). A variable must name one of them and a path below it.
- Paths are "JSON path like": `.key` steps and `[N]` list indexes (negative ones count from the
  end, as in Python); white space inside the braces is allowed, as in the guide's own examples.
- A string renders as it is; any other value (a number, a list, an object, true/false, null)
  renders as JSON. The guide is silent here; JSON is what its examples need: a grader compares
  `{{sample.output_tools[0].function.arguments}}` (already a JSON string) and prompts a judge with
  `{{sample.output_json}}` (an object).
- A path that is not there is an error the grade reports (invalid_variable_error), never an
  empty string: an empty string would score a sample against nothing and say nothing.
"""

from __future__ import annotations

import json
import re

OPEN, CLOSE = "{{", "}}"
NAMESPACES = ("item", "sample")
_STEP = re.compile(r"\.([^.\[\]\s{}]+)|\[(-?\d+)\]")
_HEAD = re.compile(r"([A-Za-z_]\w*)")


class TemplateError(ValueError):
    """A template that cannot be parsed (check time: a GraderError names the key)."""


class RenderError(LookupError):
    """A variable the sample or item does not have; `flag` is the RunGraderResponse error flag."""

    def __init__(self, message: str, flag: str):
        super().__init__(message)
        self.flag = flag


def _spans(text: str):
    """(start, end, (namespace, steps)) of each `{{ ... }}` in `text`, in order."""
    pos = 0
    while (start := text.find(OPEN, pos)) != -1:
        end = text.find(CLOSE, start + 2)
        if end == -1:
            raise TemplateError(f"'{{{{' at character {start} is never closed with '}}}}'")
        yield start, end + 2, parse_variable(text[start + 2:end])
        pos = end + 2


def variables(text: str) -> list[tuple[str, list[str | int]]]:
    """Every `{{ ... }}` in `text` as (namespace, path steps); TemplateError if one is malformed."""
    return [variable for _, _, variable in _spans(text)]


def parse_variable(inner: str) -> tuple[str, list[str | int]]:
    """'item.a.b[0]' -> ('item', ['a', 'b', 0])."""
    inner = inner.strip()
    head = _HEAD.match(inner)
    if head is None or head.group(1) not in NAMESPACES:
        raise TemplateError(f"{{{{ {inner} }}}} names no namespace; write {{{{ item.FIELD }}}} or {{{{ sample.output_text }}}} "
                            "(the only namespaces are item and sample)")
    steps: list[str | int] = []
    pos = head.end()
    while pos < len(inner):
        step = _STEP.match(inner, pos)
        if step is None:
            raise TemplateError(f"{{{{ {inner} }}}}: cannot read the path from {inner[pos:]!r}; write .key and [N] steps")
        steps.append(step.group(1) if step.group(1) is not None else int(step.group(2)))
        pos = step.end()
    if not steps:
        raise TemplateError(f"{{{{ {inner} }}}} names a namespace but no variable; write {{{{ {inner}.FIELD }}}}")
    return head.group(1), steps


def dotted(steps: list[str | int]) -> str:
    """['a', 'b', 0, 'c'] -> 'a.b[0].c', the path as a person writes it."""
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")


def lookup(namespace: str, steps: list[str | int], sample: dict, item: dict):
    """The value at namespace.steps; RenderError (with its flag) when it is not there."""
    value = sample if namespace == "sample" else item
    if namespace == "sample" and steps[0] == "output_json" and sample.get("output_json") is None:
        raise RenderError(f"{{{{sample.{dotted(steps)}}}}}: the sample is not a JSON object, so it has no output_json", "sample_parse_error")
    for i, step in enumerate(steps):
        if isinstance(step, int) and isinstance(value, list) and -len(value) <= step < len(value):
            value = value[step]
        elif isinstance(step, str) and isinstance(value, dict) and step in value:
            value = value[step]
        else:
            where = f"{namespace}.{dotted(steps[:i])}" if i else namespace
            raise RenderError(f"{{{{{namespace}.{dotted(steps)}}}}}: {where} has no {dotted([step])!r}", "invalid_variable_error")
    return value


def as_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(text: str, sample: dict, item: dict) -> str:
    """`text` with each variable replaced by its value (see the module docstring for the rules)."""
    out, pos = [], 0
    for start, end, (namespace, steps) in _spans(text):
        out += [text[pos:start], as_text(lookup(namespace, steps, sample, item))]
        pos = end
    return "".join(out) + text[pos:]


def make_sample(output_text: str) -> dict:
    """OpenAI's `sample` namespace for a plain text answer. output_json is the answer parsed when
    it is a JSON object, else None: the guide calls it "the model output content as a JSON object"
    (structured outputs always are), so a bare `0.9` or `"yes"` stays text. output_tools is empty
    (no tool calls), choices is the one chat-completions choice that carried the answer."""
    try:
        parsed = json.loads(output_text)
    except (ValueError, RecursionError):
        parsed = None
    return {
        "output_text": output_text,
        "output_json": parsed if isinstance(parsed, dict) else None,
        "output_tools": [],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": output_text}, "finish_reason": "stop"}],
        "output_audio": None,
    }
