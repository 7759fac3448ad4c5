"""`tunejob validate` and `tunejob split`: the data commands (cli.py registers them)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

DataFormat = Enum("DataFormat", {"openai": "openai", "bedrock": "bedrock", "preference": "preference", "reinforcement": "reinforcement"}, type=str)


def validate(
    path: Annotated[Path, typer.Argument(help="JSONL dataset (chat messages or prompt/completion).")],
    format: Annotated[DataFormat, typer.Option("--format", help="Rules to check: openai (chat, prompt/completion or preference pairs, recognised), bedrock's stricter ones, preference pairs only, or reinforcement's prompts.")] = DataFormat.openai,
    model: Annotated[Optional[str], typer.Option(help="Model whose tokenizer and context limit apply (default: gpt-4o family's o200k_base).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    min_examples: Annotated[int, typer.Option(help="Fewer valid examples than this is an error.")] = 10,
    grader: Annotated[Optional[Path], typer.Option(help="Reinforcement: an OpenAI grader (JSON) whose {{item.x}} fields every line must have.")] = None,
) -> None:
    """Check every line of a dataset; list problems with line numbers. Exit 0 clean, 2 on errors."""
    from tunejob.data.validate import render_text, validate_file

    fields = frozenset()
    if grader is not None:
        from tunejob.graders import referenced_item_fields
        from tunejob.graders.batch import load_grader

        fields = frozenset(referenced_item_fields(load_grader(grader)))
        format = DataFormat.reinforcement
    report = validate_file(path, format=format.value, model=model, min_examples=min_examples, item_fields=fields)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render_text(report))
    raise typer.Exit(0 if report.ok else 2)


def split(
    path: Annotated[Path, typer.Argument(help="JSONL dataset to split.")],
    val_fraction: Annotated[float, typer.Option(help="Share held out for validation.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same split.")] = 42,
    out_dir: Annotated[Optional[Path], typer.Option(help="Where to write (default: beside the input).")] = None,
) -> None:
    """Write a deterministic train/validation split: NAME.train.jsonl and NAME.val.jsonl."""
    from tunejob.data.dataset import split_file

    train, val, n_train, n_val = split_file(path, out_dir, val_fraction, seed)
    print(f"{train}\t{n_train}")
    print(f"{val}\t{n_val}")
