"""`tunejob grade GRADER.json DATA.jsonl --samples FILE`: an RFT grader over a data file and one
sample per line, as a table (line, score, sub-scores, errors) and the mean, or --json. A thin
map onto tunejob.graders.batch.grade_files; its errors (DataError, GraderError) print as one line
with file:line and exit 2, through cli.main."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer



def grade(
    grader: Annotated[Path, typer.Argument(metavar="GRADER.json", help="An OpenAI grader object (string_check, text_similarity, python, score_model, multi).")],
    data: Annotated[Path, typer.Argument(metavar="DATA.jsonl", help="OpenAI RFT data: each line is the grader's `item` (messages and any other fields).")],
    samples: Annotated[Optional[Path], typer.Option("--samples", metavar="FILE", help='One answer per data line: a JSON string or {"output_text": "..."} a line.')] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The results as JSON on stdout.")] = False,
    model: Annotated[str, typer.Option(help="Without --samples: the model whose greedy answers are graded ('default', a folder, or RUN_DIR/best).")] = "default",
    max_tokens: Annotated[int, typer.Option(help="Without --samples: most tokens per answer.")] = 64,
) -> None:
    """Score answers with an RFT grader: each line's reward, its sub-scores and why it is 0 when it is.
    Without --samples, a model answers each prompt first (greedy), so a grader is checked on the
    answers training starts from. score_model graders call $OPENAI_BASE_URL (else OpenAI) with $OPENAI_API_KEY."""
    import tempfile

    from tunejob.graders.batch import grade_files, load_grader

    load_grader(grader)  # a broken grader is reported before any model loads
    with tempfile.TemporaryDirectory() as scratch:
        if samples is None:
            samples = answer_prompts(model, data, max_tokens, Path(scratch) / "answers.jsonl")
        result = grade_files(grader, data, samples)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    render(result)


def answer_prompts(model: str, data: Path, max_tokens: int, out: Path) -> Path:
    """The model's greedy answer to each line's prompt, one JSON string per line (what --samples takes)."""
    from tunejob.data.dataset import load_examples, write_jsonl
    from tunejob.data.reinforcement import encode_prompts
    from tunejob.data.validate import require_valid
    from tunejob.evaluate.chat import load_for_chat
    from tunejob.train.models import resolve_model_path
    from tunejob.train.rollout import Draw, sample

    require_valid(data, method="reinforcement")
    lines = load_examples(data, whole_lines=True)
    is_base = not Path(model).is_dir() or (Path(model) / "config.json").is_file()  # else a run or one of its checkpoints
    loaded, tokenizer = load_for_chat(None, base=resolve_model_path(model)) if is_base else load_for_chat(model)
    prompts = encode_prompts(tokenizer, lines, 1 << 20, max_tokens)[0]
    answers = sample(loaded, tokenizer, [p.input_ids for p in prompts], 1, Draw(max_tokens, 0.0), None, bf16=False)
    write_jsonl(out, [tokenizer.decode(a.tokens, skip_special_tokens=True) for a in answers])
    return out


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
