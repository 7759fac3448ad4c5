"""A grader over files, for `tunejob grade GRADER.json DATA.jsonl --samples FILE`: the grader
object, OpenAI's RFT data (each line is the `item`, all of it: messages and any other fields,
as the graders guide says "keys from each training data row") and one sample per data line.

A sample line is a JSON string (the output text) or {"output_text": "..."}. Problems come back
as one line with file:line (DataError, GraderError), never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunejob.errors import DataError
from tunejob.graders.context import GraderContext
from tunejob.graders.grade import grade_many
from tunejob.graders.schema import GraderError, check_grader
from tunejob.graders.template import make_sample


def _text(path: Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (the {what})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the {what} ({exc})") from None


def load_grader(path: Path, context: GraderContext | None = None) -> dict:
    """The grader object in a JSON file, checked (GraderError lines start with the file's name)."""
    try:
        grader = json.loads(_text(path, "grader file"))
    except json.JSONDecodeError as exc:
        raise GraderError([(f"{path}:{exc.lineno}", f"not valid JSON ({exc.msg} at column {exc.colno}); the file holds one grader object")]) from None
    try:
        check_grader(grader, context)
    except GraderError as exc:
        raise GraderError([(f"{path}: {where}", text) for where, text in exc.problems]) from None
    return grader


def read_jsonl(path: Path, what: str) -> list[tuple[int, object]]:
    """(line number, value) of each non-blank line; DataError at the first line that is not JSON."""
    rows = []
    for number, line in enumerate(_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); fix the line or remove it") from None
    if not rows:
        raise DataError(f"{path}: no lines; the {what} needs one JSON value a line")
    return rows


def read_items(path: Path) -> list[tuple[int, dict]]:
    rows = read_jsonl(path, "data file")
    for number, value in rows:
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: a data line is a JSON object (messages and the fields the grader uses), not {type(value).__name__}")
    return rows


def read_samples(path: Path) -> list[tuple[int, str]]:
    out = []
    for number, value in read_jsonl(path, "samples file"):
        text = value.get("output_text") if isinstance(value, dict) else value
        if not isinstance(text, str):
            raise DataError(f'{path}:{number}: a sample line is a JSON string or {{"output_text": "..."}}, not {json.dumps(value)[:60]}')
        out.append((number, text))
    return out


def grade_files(grader_path: Path, data_path: Path, samples_path: Path, context: GraderContext | None = None) -> dict:
    """{"grader", "type", "count", "mean", "rows": [{"line", "score", "sub_scores", "errors"}]};
    row i is data line i's item with samples line i's answer."""
    grader = load_grader(grader_path, context)
    items, samples = read_items(data_path), read_samples(samples_path)
    if len(items) != len(samples):
        raise DataError(f"{samples_path}: {len(samples)} samples for {len(items)} data lines in {data_path}; give one sample per data line, in order")
    results = grade_many(grader, [make_sample(text) for _, text in samples], [item for _, item in items], context)
    rows = [{"line": number, "score": r.score, "sub_scores": r.sub_scores, "errors": r.errors}
            for (number, _), r in zip(items, results)]
    return {"grader": grader["name"], "type": grader["type"], "count": len(rows),
            "mean": sum(r["score"] for r in rows) / len(rows), "rows": rows}
