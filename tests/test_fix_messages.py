"""Every fix an error message suggests in spec syntax works as typed: each `key: value` or
`key.sub: value` that follows "use" / "set" in a string of src/tunejob parses as a spec field
(issue 35: "use train_on: all" named a key that exists only as hyperparameters.train_on)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tunejob"
FIX = re.compile(r"\b(?:use|set|add)\s+`?([a-z_]+(?:\.[a-z_]+)*):\s*([A-Za-z0-9_'\"\-\.]+)`?")


def suggested_fixes() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for key, value in FIX.findall(node.value):
                    found.append((f"{path.relative_to(SRC)}:{node.lineno}", key, value.rstrip(".")))
    return found


def test_the_scan_finds_the_fixes_it_is_meant_to_check():
    keys = {key for _, key, _ in suggested_fixes()}
    assert "hyperparameters.train_on" in keys  # sequences.py's advice for templates that cannot be cut


def _model_of(annotation):
    """The pydantic model inside an annotation (`Section`, `Section | None`), else None."""
    import typing

    from pydantic import BaseModel

    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def spec_field_names() -> set[str]:
    from tunejob.spec import JobSpec

    names, todo = set(), [JobSpec]
    while todo:
        for name, field in todo.pop().model_fields.items():
            names.add(name)
            if (inner := _model_of(field.annotation)) is not None:
                todo.append(inner)
    return names


def spec_fixes() -> list[tuple[str, str, str]]:
    """The fixes written in spec syntax: a dotted key, or one named like a field of the spec
    (`weight: 0` is a data line's key, `examples: 50-100` prose)."""
    names = spec_field_names()
    return [f for f in suggested_fixes() if "." in f[1] or f[1] in names]


@pytest.mark.parametrize("where,key,value", spec_fixes())
def test_each_suggested_fix_parses_as_a_spec_field(where, key, value):
    """The key is a path from the top of the spec, as typed, and the value is valid for it."""
    import yaml
    from pydantic import TypeAdapter

    from tunejob.spec import JobSpec

    model, parts = JobSpec, key.split(".")
    for i, part in enumerate(parts):
        assert model is not None and part in model.model_fields, f"{where}: {key!r} is not a spec key from the top ({part!r})"
        field = model.model_fields[part]
        model = _model_of(field.annotation)
    TypeAdapter(field.annotation).validate_python(yaml.safe_load(value))
