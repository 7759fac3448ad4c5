"""`tunejob grade GRADER.json DATA.jsonl --samples FILE`: an RFT grader over a data file and one
sample per line, as a table (line, score, sub-scores, errors) and the mean, or --json. A thin
map onto tunejob.graders.batch.grade_files; its errors (DataError, GraderError) print as one line
with file:line and exit 2, through cli.main."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunejob.errors import TunejobError


def grade(
    grader: Annotated[Path, typer.Argument(metavar="GRADER.json", help="An OpenAI grader object (string_check, text_similarity, python, score_model, multi).")],
    data: Annotated[Path, typer.Argument(metavar="DATA.jsonl", help="OpenAI RFT data: each line is the grader's `item` (messages and any other fields).")],
    samples: Annotated[Optional[Path], typer.Option("--samples", metavar="FILE", help='One answer per data line: a JSON string or {"output_text": "..."} a line.')] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The results as JSON on stdout.")] = False,
) -> None:
    """Score answers with an RFT grader: each line's reward, its sub-scores and why it is 0 when it is.
    score_model graders call $OPENAI_BASE_URL (else OpenAI) with $OPENAI_API_KEY."""
    from tunejob.graders.batch import grade_files

    if samples is None:
        raise TunejobError("grade: pass --samples FILE (one answer per data line); sampling the model itself is not there yet")
    result = grade_files(grader, data, samples)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    render(result)


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['grader']} ({result['type']})")
    for column, justify in (("line", "right"), ("score", "right"), ("sub-scores", "left"), ("errors", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for row in result["rows"]:
        subs = ", ".join(f"{k} {v:.3f}" for k, v in row["sub_scores"].items()) if len(row["sub_scores"]) > 1 else ""
        table.add_row(str(row["line"]), f"{row['score']:.3f}", subs, "\n".join(row["errors"]))
    console = Console()
    console.print(table)
    console.print(f"mean {result['mean']:.4f} over {result['count']} samples")
