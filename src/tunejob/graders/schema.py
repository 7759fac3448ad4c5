"""What a grader object must be, checked before any sample is graded: OpenAI's schemas
(GraderStringCheck, GraderTextSimilarity, GraderPython, GraderScoreModel, GraderMulti, and
GraderLabelModel as a multi's sub-grader), the graders guide's rules (no multi inside a multi,
python source under 256 kB defining grade(sample, item)), well-formed templates and formulas.

Every problem is one line, `grader.<key path>: what is wrong; the fix`, and all of them are
collected before GraderError is raised, so one fix-and-retry fixes them all.

Unknown keys are refused with the nearest known one: the spec's schemas allow extra keys, but a
misspelt `sampling_parameters` (as some third-party docs spell it) would otherwise be dropped
without a word and the grader would run with default sampling.
"""

from __future__ import annotations

import ast
import difflib

from tunejob.errors import SpecError
from tunejob.graders import formula, template
from tunejob.graders.context import GraderContext

TOP_TYPES = ("string_check", "text_similarity", "python", "score_model", "multi")
SUB_TYPES = ("string_check", "text_similarity", "python", "score_model", "label_model")  # GraderMulti.graders
OPERATIONS = ("eq", "ne", "like", "ilike")
METRICS = ("cosine", "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
ROLES = ("user", "assistant", "system", "developer")
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
MAX_SOURCE_BYTES = 256 * 1024  # the guide: "Your uploaded code must be less than 256kB"
# Each type's keys: required first, then optional. pass_threshold is metadata (the guide's and the
# evals API's graders carry it); image_tag names OpenAI's sandbox image and is ignored here.
KEYS = {
    "string_check": (("input", "reference", "operation"), ()),
    "text_similarity": (("input", "reference", "evaluation_metric"), ("pass_threshold",)),
    "python": (("source",), ("image_tag", "pass_threshold")),
    "score_model": (("input", "model"), ("sampling_params", "range", "pass_threshold")),
    "label_model": (("input", "model", "labels", "passing_labels"), ()),
    "multi": (("graders", "calculate_output"), ()),
}
SAMPLING = {"seed": "an integer", "top_p": "a number", "temperature": "a number",
            "max_completions_tokens": "an integer of 1 or more", "reasoning_effort": "one of " + ", ".join(EFFORTS)}


class GraderError(SpecError):
    """A grader object that is invalid: one line per problem, `grader.<key path>: what is wrong; the fix`."""

    def __init__(self, problems: list[tuple[str, str]] | str):
        if isinstance(problems, str):  # one line already written, "grader.key: what; fix"
            path, _, text = problems.partition(": ")
            problems = [(path, text)] if text else [("grader", problems)]
        self.problems = problems
        self.param = problems[0][0] if problems else None  # the first key path (an API error's `param`)
        super().__init__("\n".join(f"{path}: {text}" for path, text in problems))


def check_grader(grader: dict, context: GraderContext | None = None) -> None:
    """Raise GraderError listing every problem of `grader`; return None when it can be graded.
    `context` matters for one thing: text_similarity's cosine needs an embeddings endpoint."""
    problems: list[tuple[str, str]] = []
    _check(grader, "grader", TOP_TYPES, context or GraderContext(), problems)
    if problems:
        raise GraderError(problems)


def sub_graders(grader: dict) -> dict[str, dict]:
    """A multi's graders by key. The guide sends a map {key: grader}; the spec and the SDK type
    `graders` as one grader object, taken here as a map of one, keyed by its name."""
    graders = grader.get("graders")
    if isinstance(graders, dict) and isinstance(graders.get("type"), str):
        return {str(graders.get("name")): graders}
    return graders if isinstance(graders, dict) else {}


def referenced_item_fields(grader: dict) -> set[str]:
    """The item paths the grader's templates use, as written after `item.`: 'reference_answer',
    'answer.city', 'choices[0].text'. Sub-graders included; a python grader's item[...] is not."""
    fields = set()
    for _, text in template_strings(grader, "grader"):
        try:
            found = template.variables(text)
        except template.TemplateError:
            continue
        fields |= {template.dotted(steps) for namespace, steps in found if namespace == "item"}
    return fields


def template_strings(grader: dict, path: str):
    """(key path, text) of every string of `grader` that may hold templates."""
    kind = grader.get("type") if isinstance(grader, dict) else None
    if kind in ("string_check", "text_similarity"):
        yield from ((f"{path}.{k}", grader[k]) for k in ("input", "reference") if isinstance(grader.get(k), str))
    elif kind in ("score_model", "label_model") and isinstance(grader.get("input"), list):
        for i, message in enumerate(grader["input"]):
            if isinstance(message, dict):
                yield from _content_strings(message.get("content"), f"{path}.input[{i}].content")
    elif kind == "multi":
        for key, sub in sub_graders(grader).items():
            yield from template_strings(sub, f"{path}.graders.{key}")


def _content_strings(content, path: str):
    if isinstance(content, str):
        yield path, content
    elif isinstance(content, list):
        for i, part in enumerate(content):
            yield from _content_strings(part, f"{path}[{i}]")
    elif isinstance(content, dict):
        for key in ("text", "image_url"):
            if isinstance(content.get(key), str):
                yield f"{path}.{key}", content[key]
        audio = content.get("input_audio")
        if isinstance(audio, dict) and isinstance(audio.get("data"), str):
            yield f"{path}.input_audio.data", audio["data"]


def _one_of(value, choices) -> str:
    return f"{value!r} is not one of {', '.join(choices)}"


def _check(grader, path: str, types: tuple[str, ...], context: GraderContext, problems: list) -> None:
    if not isinstance(grader, dict):
        problems.append((path, f"a grader is a JSON object with a 'type' ({', '.join(types)}), not {type(grader).__name__}"))
        return
    kind = grader.get("type")
    if kind not in types:
        nested = kind == "multi" and "multi" not in types
        problems.append((f"{path}.type", "a multi grader cannot hold another multi; list its graders here directly" if nested
                         else "missing; give one of " + ", ".join(types) if kind is None else _one_of(kind, types)))
        return
    required, optional = KEYS[kind]
    for key in ("name", *required):
        if key not in grader:
            problems.append((f"{path}.{key}", f"missing; a {kind} grader needs {', '.join(('type', 'name', *required))}"))
    known = ("type", "name", *required, *optional)
    for key in grader:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {near[0]}?" if near else "remove it"
            problems.append((f"{path}.{key}", f"unknown key for a {kind} grader; {hint} (keys: {', '.join(known)})"))
    if "name" in grader and not isinstance(grader["name"], str):
        problems.append((f"{path}.name", "must be a string"))
    if "pass_threshold" in grader and not _is_number(grader["pass_threshold"]):
        problems.append((f"{path}.pass_threshold", "must be a number"))
    CHECKS[kind](grader, path, context, problems)
    for where, text in template_strings(grader, path) if kind != "multi" else ():
        try:
            template.variables(text)
        except template.TemplateError as exc:
            problems.append((where, str(exc)))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _strings(grader: dict, path: str, keys: tuple[str, ...], problems: list) -> None:
    for key in keys:
        if key in grader and not isinstance(grader[key], str):
            problems.append((f"{path}.{key}", "must be a string (it may use {{{{item.FIELD}}}} and {{{{sample.output_text}}}})"))


def _check_string_check(grader: dict, path: str, context: GraderContext, problems: list) -> None:
    _strings(grader, path, ("input", "reference"), problems)
    if "operation" in grader and grader["operation"] not in OPERATIONS:
        problems.append((f"{path}.operation", _one_of(grader["operation"], OPERATIONS)))


def _check_text_similarity(grader: dict, path: str, context: GraderContext, problems: list) -> None:
    _strings(grader, path, ("input", "reference"), problems)
    metric = grader.get("evaluation_metric")
    if "evaluation_metric" in grader and metric not in METRICS:
        problems.append((f"{path}.evaluation_metric", _one_of(metric, METRICS)))
    if metric == "cosine" and not context.embeddings_base_url:
        problems.append((f"{path}.evaluation_metric", "cosine compares embeddings, and no embeddings endpoint is configured; "
                         "pass GraderContext(embeddings_base_url=...) or pick another metric (OpenAI offers cosine for evals only)"))


def _check_python(grader: dict, path: str, context: GraderContext, problems: list) -> None:
    if "image_tag" in grader and not isinstance(grader["image_tag"], str):
        problems.append((f"{path}.image_tag", "must be a string (it names OpenAI's sandbox image; ignored here)"))
    source = grader.get("source")
    if "source" not in grader:
        return
    if not isinstance(source, str):
        problems.append((f"{path}.source", "must be a string of Python code defining grade(sample, item)"))
        return
    if len(source.encode()) >= MAX_SOURCE_BYTES:
        problems.append((f"{path}.source", f"{len(source.encode()):,} bytes; OpenAI takes less than 256 kB"))
        return
    try:
        tree = ast.parse(source, filename="grader.py")
        compile(tree, "grader.py", "exec")
    except SyntaxError as exc:
        problems.append((f"{path}.source", f"line {exc.lineno}: {exc.msg}; the source must be valid Python"))
        return
    problem = _grade_function_problem(tree)
    if problem:
        problems.append((f"{path}.source", problem))


def _grade_function_problem(tree: ast.Module) -> str | None:
    """Why the module's grade cannot be called as grade(sample, item), or None."""
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "grade"]
    bound = any(isinstance(n, (ast.Assign, ast.Import, ast.ImportFrom)) and "grade" in _bound_names(n) for n in tree.body)
    if not defs:
        return None if bound else "defines no function grade; define def grade(sample, item) -> float at the top level"
    fn = defs[-1]
    if isinstance(fn, ast.AsyncFunctionDef):
        return "grade is async; make it a plain def grade(sample, item) -> float"
    params = fn.args.posonlyargs + fn.args.args
    required = len(params) - len(fn.args.defaults)
    kw_required = [a.arg for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is None]
    if required > 2 or kw_required or (len(params) < 2 and fn.args.vararg is None):
        return f"grade({', '.join(a.arg for a in params)}) cannot be called as grade(sample, item); it takes exactly two arguments"
    return None


def _bound_names(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    return {(a.asname or a.name).split(".")[0] for a in node.names}


def _check_model_input(grader: dict, path: str, problems: list) -> None:
    if "model" in grader and not (isinstance(grader["model"], str) and grader["model"]):
        problems.append((f"{path}.model", "must be a model name, e.g. one of the server's models or gpt-4o-2024-08-06"))
    messages = grader.get("input")
    if "input" in grader and not (isinstance(messages, list) and messages):
        problems.append((f"{path}.input", 'must be a list of messages, e.g. [{"role": "user", "content": "Grade {{sample.output_text}}"}]'))
        return
    for i, message in enumerate(messages or []):
        where = f"{path}.input[{i}]"
        if not isinstance(message, dict):
            problems.append((where, 'a message is an object {"role": ..., "content": ...}'))
            continue
        if message.get("role") not in ROLES:
            problems.append((f"{where}.role", _one_of(message.get("role"), ROLES)))
        if message.get("type", "message") != "message":
            problems.append((f"{where}.type", "must be 'message' (or left out)"))
        problem = _content_problem(message.get("content"))
        if problem:
            problems.append((f"{where}.content", problem))


def _content_problem(content, nested: bool = False) -> str | None:
    """EvalItemContent: a string, a content item, or (at the top) a list of them."""
    if isinstance(content, str):
        return None
    if isinstance(content, list) and not nested:
        return next((p for p in (_content_problem(part, True) for part in content) if p), None)
    if not isinstance(content, dict):
        return "must be a string, a content item or a list of them"
    kind = content.get("type")
    if kind in ("input_text", "output_text"):
        return None if isinstance(content.get("text"), str) else f"an {kind} item needs 'text' (a string)"
    if kind == "input_image":
        return None if isinstance(content.get("image_url"), str) else "an input_image item needs 'image_url' (a string)"
    if kind == "input_audio":
        audio = content.get("input_audio")
        ok = isinstance(audio, dict) and isinstance(audio.get("data"), str) and audio.get("format") in ("mp3", "wav")
        return None if ok else "an input_audio item needs input_audio {data (base64), format (mp3 or wav)}"
    return _one_of(kind, ("input_text", "output_text", "input_image", "input_audio"))


def _check_score_model(grader: dict, path: str, context: GraderContext, problems: list) -> None:
    _check_model_input(grader, path, problems)
    params = grader.get("sampling_params")
    if params is not None and not isinstance(params, dict):
        problems.append((f"{path}.sampling_params", "must be an object, e.g. {\"temperature\": 0, \"seed\": 42}"))
    for key, value in (params or {}).items() if isinstance(params, dict) else ():
        if key not in SAMPLING:
            near = difflib.get_close_matches(key, SAMPLING, n=1)
            problems.append((f"{path}.sampling_params.{key}", f"unknown; {'did you mean ' + near[0] + '?' if near else 'remove it'} "
                             f"(keys: {', '.join(SAMPLING)})"))
        elif value is not None and not _sampling_ok(key, value):
            problems.append((f"{path}.sampling_params.{key}", f"{value!r} is not {SAMPLING[key]}"))
    if "range" in grader:
        r = grader["range"]
        if not (isinstance(r, list) and len(r) == 2 and all(map(_is_number, r)) and r[0] < r[1]):
            problems.append((f"{path}.range", f"{r!r} is not two numbers [low, high] with low < high, e.g. [0, 1]"))


def _sampling_ok(key: str, value) -> bool:
    if key == "reasoning_effort":
        return value in EFFORTS
    if key in ("seed", "max_completions_tokens"):
        return isinstance(value, int) and not isinstance(value, bool) and (key == "seed" or value >= 1)
    return _is_number(value)


def _check_label_model(grader: dict, path: str, context: GraderContext, problems: list) -> None:
    _check_model_input(grader, path, problems)
    labels = grader.get("labels")
    for key in ("labels", "passing_labels"):
        value = grader.get(key)
        if key in grader and not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            problems.append((f"{path}.{key}", "must be a non-empty list of strings"))
    passing = grader.get("passing_labels")
    if isinstance(labels, list) and isinstance(passing, list) and not set(map(str, passing)) <= set(map(str, labels)):
        problems.append((f"{path}.passing_labels", "must be a subset of labels"))


def _check_multi(grader: dict, path: str, context: GraderContext, problems: list) -> None:
    graders = grader.get("graders")
    if "graders" in grader and not (isinstance(graders, dict) and graders):
        problems.append((f"{path}.graders", 'must be a map of key -> grader, e.g. {"name": {...}, "email": {...}}'))
        return
    subs = sub_graders(grader)
    for key, sub in subs.items():
        if not key.isidentifier():
            problems.append((f"{path}.graders.{key}", "a key calculate_output can name: letters, digits and _, not starting with a digit"))
        _check(sub, f"{path}.graders.{key}", SUB_TYPES, context, problems)
    text = grader.get("calculate_output")
    if "calculate_output" in grader and not isinstance(text, str):
        problems.append((f"{path}.calculate_output", 'must be a string, e.g. "(name + email) / 2"'))
    elif isinstance(text, str) and subs:
        try:
            formula.parse(text, set(subs))
        except formula.FormulaError as exc:
            problems.append((f"{path}.calculate_output", str(exc)))


CHECKS = {"string_check": _check_string_check, "text_similarity": _check_text_similarity, "python": _check_python,
          "score_model": _check_score_model, "label_model": _check_label_model, "multi": _check_multi}
