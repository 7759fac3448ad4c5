"""Grading: a grader object, samples and their items in; a GradeResult per sample out.

`grade_many` is what the training loop calls each step (16-64 samples): python graders share one
worker process per call (sandbox.py), model graders run their calls concurrently
(model_grader.py), cosine embeds the whole batch in one request, and a multi grades each
sub-grader over the whole batch before combining the scores per sample. Any failure scores that
sample 0 and says why in `errors` (one line each) and in RunGraderResponse's flags; a multi with a
failed sub-grader scores 0 too, so a broken part never passes as a partial reward.
"""

from __future__ import annotations

from tunejob.graders import formula, template
from tunejob.graders.context import DEFAULT_EMBEDDINGS_MODEL, GraderContext
from tunejob.graders.model_grader import model_grades
from tunejob.graders.result import GradeResult, add_usage, failed, merge_flags, scored
from tunejob.graders.sandbox import run_python
from tunejob.graders.schema import check_grader, sub_graders
from tunejob.graders.similarity import cosine_scores, similarity
from tunejob.graders.string_check import string_check


def grade(grader: dict, sample: dict, item: dict, context: GraderContext | None = None) -> GradeResult:
    """One sample (see make_sample) against its item (the dataset line)."""
    return grade_many(grader, [sample], [item], context)[0]


def grade_many(grader: dict, samples: list[dict], items: list[dict], context: GraderContext | None = None) -> list[GradeResult]:
    """samples[i] graded against items[i]; GraderError (before any work) if the grader is invalid."""
    if len(samples) != len(items):
        raise ValueError(f"grade_many: {len(samples)} samples but {len(items)} items; pass one item per sample")
    context = context or GraderContext()
    check_grader(grader, context)
    return _batch(grader, list(zip(samples, items)), context)


def _batch(grader: dict, pairs: list[tuple[dict, dict]], context: GraderContext) -> list[GradeResult]:
    kind = grader["type"]
    if kind == "multi":
        return _multi(grader, pairs, context)
    if kind in ("score_model", "label_model"):
        return model_grades(grader, pairs, context)
    if kind == "python":
        return _python(grader, pairs, context)
    if kind == "text_similarity" and grader["evaluation_metric"] == "cosine":
        return _cosine(grader, pairs, context)
    return [_text(grader, sample, item) for sample, item in pairs]


def _rendered(grader: dict, sample: dict, item: dict) -> tuple[str, str]:
    return template.render(grader["input"], sample, item), template.render(grader["reference"], sample, item)


def _text(grader: dict, sample: dict, item: dict) -> GradeResult:
    """string_check and text_similarity (but cosine)."""
    name = grader["name"]
    try:
        text, reference = _rendered(grader, sample, item)
        if grader["type"] == "string_check":
            return scored(name, string_check(grader["operation"], text, reference))
        return scored(name, similarity(grader["evaluation_metric"], text, reference))
    except template.RenderError as exc:
        return failed(name, str(exc), exc.flag)
    except Exception as exc:  # a metric library failing on odd text: this sample's 0, not the batch's crash
        return failed(name, f"{grader['type']} failed: {exc.__class__.__name__}: {exc}")


def _cosine(grader: dict, pairs: list[tuple[dict, dict]], context: GraderContext) -> list[GradeResult]:
    name, results, texts = grader["name"], [None] * len(pairs), {}
    for i, (sample, item) in enumerate(pairs):
        try:
            texts[i] = _rendered(grader, sample, item)
        except template.RenderError as exc:
            results[i] = failed(name, str(exc), exc.flag)
    if texts:
        try:
            scores = cosine_scores(list(texts.values()), context.embeddings_base_url, context.api_key,
                                   context.embeddings_model or DEFAULT_EMBEDDINGS_MODEL)
            for i, score in zip(texts, scores):
                results[i] = scored(name, score)
        except Exception as exc:  # the embeddings endpoint failed: every rendered sample of the batch
            why = f"embeddings at {context.embeddings_base_url}: {exc.__class__.__name__}: {exc}"
            for i in texts:
                results[i] = failed(name, why, "model_grader_server_error", why, "model_grader_server_error_details")
    return results


def _python(grader: dict, pairs: list[tuple[dict, dict]], context: GraderContext) -> list[GradeResult]:
    # image_tag names the image OpenAI runs graders in (its packages, e.g. numpy 2.2.4 for
    # 2025-05-08); here the grader runs in this Python with what it has installed, so it is ignored.
    name, results = grader["name"], []
    for outcome in run_python(grader["source"], pairs, context.python_timeout_s, context.python_memory_mb):
        if outcome.server_error:
            results.append(failed(name, f"python grader: {outcome.server_error}", "python_grader_server_error",
                                  "worker_start_failed", "python_grader_server_error_type"))
        elif outcome.error is not None or outcome.score is None:
            error = outcome.error or "grade returned nothing"
            result = failed(name, f"python grader: {error}", "python_grader_runtime_error", error, "python_grader_runtime_error_details")
            result.error_flags["unresponsive_reward_error"] = outcome.timed_out  # the spec's flag for a reward that never came
            results.append(result)
        else:
            results.append(scored(name, outcome.score))
    return results


def _multi(grader: dict, pairs: list[tuple[dict, dict]], context: GraderContext) -> list[GradeResult]:
    subs = sub_graders(grader)
    per_key = {key: _batch(sub, pairs, context) for key, sub in subs.items()}
    try:
        tree = formula.parse(grader["calculate_output"], set(subs))
    except formula.FormulaError as exc:  # check_grader refuses it first; kept for a grader changed in between
        tree, parse_error = None, f"calculate_output: {exc}"
    results = []
    for i in range(len(pairs)):
        parts = {key: per_key[key][i] for key in subs}
        sub_scores = {key: r.score for key, r in parts.items()}
        errors = [f"graders.{key}: {e}" for key, r in parts.items() for e in r.errors]
        flags = merge_flags(list(parts.values()))
        usage = None
        for r in parts.values():
            usage = add_usage(usage, r.token_usage)
        score = 0.0
        if tree is None:
            errors.append(parse_error)
            flags["formula_parse_error"] = True
        elif not errors:
            try:
                score = formula.evaluate(tree, sub_scores)
            except formula.FormulaError as exc:  # division by zero, log(0), overflow: this sample's 0
                errors.append(f"calculate_output: {exc}")
                flags["other_error"] = True
        results.append(GradeResult(score, sub_scores, errors, flags, usage))
    return results
