"""Reading a job spec: YAML with a key -> line map, `--set` overrides, and pydantic's errors
turned into one line each (file:line, key, value, fix), all problems at once."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunejob.errors import SpecError
from tunejob.spec.job import SECRET_KEYS, JobSpec


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read a YAML job spec, apply `key.sub=value` overrides, validate, resolve data paths."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such job spec file; check the path (examples/ has samples)") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory; pass the job spec YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the job spec ({exc.__class__.__name__}: {exc})") from None
    return parse_spec(text, source=str(path), base_dir=path.parent, overrides=overrides, default_name=path.stem)


def parse_spec(
    text: str,
    source: str = "<spec>",
    base_dir: Path | None = None,
    overrides: list[str] | None = None,
    default_name: str | None = None,
) -> JobSpec:
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{where}: invalid YAML: {problem}; fix the syntax at that line") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{source}:1: a job spec is a YAML mapping (key: value), got {type(raw).__name__}")
    lines = _key_lines(node)
    for item in overrides or []:
        apply_override(raw, item)
        # a bad value given with --set is reported against the --set, not the file's line for that key
        lines[tuple(item.partition("=")[0].strip().split("."))] = f"--set {item}"
    if default_name and "name" not in raw:
        raw["name"] = _safe_name(default_name)
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, source, lines, raw)) from None
    if base_dir is not None:
        spec.data.train = _resolve(base_dir, spec.data.train)
        if spec.data.validation is not None:
            spec.data.validation = _resolve(base_dir, spec.data.validation)
        template = _resolve(base_dir, Path(spec.chat_template).expanduser()) if spec.chat_template else None
        if template is not None and template.is_file():  # else a packaged name (chatml, gemma, llama3) or an error at load
            spec.chat_template = str(template)
    return spec


def _safe_name(stem: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).lstrip("._-")
    return cleaned[:64] or "job"


def _resolve(base: Path, p: Path) -> Path:
    return p if p.is_absolute() else base / p


def apply_override(raw: dict, item: str) -> None:
    """`key.sub=value` (value read as YAML) into a raw spec dict."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {item!r}: write it as key.sub=value, e.g. --set hyperparameters.epochs=2")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"--set {item!r}: '{part}' is a value, not a section; set '{part}' itself")
        node = child
    node[parts[-1]] = parsed


def _key_lines(node: Any, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each key path of the YAML document to its 1-based line, for error messages."""
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            out[path] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = item.start_mark.line + 1
            out.update(_key_lines(item, prefix + (i,)))
    return out


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _trim_loc(loc: tuple) -> tuple:
    """Cut pydantic's union-member parts ('int', "literal['auto']") off an error location."""
    model: type[BaseModel] | None = JobSpec
    out: list = []
    for part in loc:
        if model is None:
            if isinstance(part, int):  # list index, e.g. target_modules.0
                out.append(part)
                continue
            break
        field = model.model_fields.get(str(part))
        if field is None:
            out.append(part)  # an unknown key: keep it, it is the subject of the error
            break
        out.append(part)
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return tuple(out)


def format_validation_error(exc: ValidationError, source: str, lines: dict[tuple, int], raw: dict) -> str:
    problems: list[str] = []
    invalid: dict[tuple, tuple[str, str, list[str]]] = {}  # key -> (where, input, messages)
    for err in exc.errors():
        loc = _trim_loc(err["loc"])
        key = ".".join(str(p) for p in loc)
        where = _where(source, lines, loc)
        kind, msg = err["type"], err["msg"]
        if kind == "extra_forbidden" and str(loc[-1]).lower() in SECRET_KEYS:
            problems.append(f"{where}: {key}: secrets never go in a job spec; put the key in an environment variable "
                            "(openai.api_key_env names it, OPENAI_API_KEY by default; AWS credentials via the AWS environment)")
        elif kind == "extra_forbidden":
            allowed = _allowed_keys(loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(f"{where}: {key}: unknown key; {hint}allowed here: {', '.join(allowed)}")
        elif kind == "missing":
            problems.append(f"{where}: {key}: required key is missing; add it (see examples/)")
        elif kind == "value_error":
            # Cross-field checks arrive joined by ' | '; each names its own key.
            for part in msg.removeprefix("Value error, ").split(" | "):
                full = f"{key}.{part}" if key and not part.startswith(key) else part
                sub = tuple(full.split(":", 1)[0].split("."))
                problems.append(f"{_where(source, lines, sub)}: {full}")
        else:
            entry = invalid.setdefault(loc, (where, repr(err.get("input")), []))
            entry[2].append(msg[0].lower() + msg[1:] if msg else msg)
    for loc, (where, shown, msgs) in invalid.items():
        key = ".".join(str(p) for p in loc)
        problems.append(f"{where}: {key}: {shown} is invalid: {' or '.join(dict.fromkeys(msgs))}{_fix_hint(loc)}")
    unique = list(dict.fromkeys(problems))
    head = f"{source}: {len(unique)} problem{'s' if len(unique) != 1 else ''} in the job spec:"
    return "\n".join([head] + [f"  - {p}" for p in unique])


def _where(source: str, lines: dict[tuple, int | str], loc: tuple) -> str:
    """'job.yaml:13' for a key from the file, '--set key=value' for one given on the command line."""
    while loc:
        if loc in lines:
            line = lines[loc]
            return line if isinstance(line, str) else f"{source}:{line}"
        loc = loc[:-1]
    return source


def _fix_hint(loc: tuple) -> str:
    model: type[BaseModel] = JobSpec
    field = None
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        if field is None:
            break
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    if field is not None and field.description:
        return f" (expected: {field.description})"
    return ""
