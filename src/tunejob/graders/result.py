"""A grade: the reward, the sub-scores, and why it is 0 when it is, with RunGraderResponse's flags."""

from __future__ import annotations

from dataclasses import dataclass, field

# RunGraderResponse.metadata.errors, in the spec's order: booleans, and three details (str or null).
FLAGS = ("formula_parse_error", "sample_parse_error", "truncated_observation_error", "unresponsive_reward_error",
         "invalid_variable_error", "other_error", "python_grader_server_error", "python_grader_server_error_type",
         "python_grader_runtime_error", "python_grader_runtime_error_details", "model_grader_server_error",
         "model_grader_refusal_error", "model_grader_parse_error", "model_grader_server_error_details")
DETAILS = {"python_grader_server_error_type", "python_grader_runtime_error_details", "model_grader_server_error_details"}


def no_errors() -> dict:
    return {flag: None if flag in DETAILS else False for flag in FLAGS}


@dataclass
class GradeResult:
    score: float  # the reward (0 on any failure)
    sub_scores: dict[str, float]  # multi: each sub-grader's key -> score; others: {grader name: score}
    errors: list[str]  # why it scored 0 / what went wrong (one line each), empty when fine
    error_flags: dict = field(default_factory=no_errors)  # RunGraderResponse.metadata.errors
    # model graders: usage per model that answered, {model: {prompt_tokens, completion_tokens,
    # total_tokens, cached_tokens}}, as RunGraderResponse's model_grader_token_usage_per_model
    token_usage: dict | None = None


def scored(name: str, score: float) -> GradeResult:
    return GradeResult(float(score), {name: float(score)}, [])


def failed(name: str, message: str, flag: str = "other_error", detail: str | None = None, detail_flag: str | None = None) -> GradeResult:
    """A zero with its reason; `flag` is raised, and `detail_flag` (one of DETAILS) gets `detail`."""
    flags = no_errors()
    flags[flag] = True
    if detail_flag:
        flags[detail_flag] = detail
    return GradeResult(0.0, {name: 0.0}, [message], flags)


def merge_flags(results: list[GradeResult]) -> dict:
    """The flags of several grades as one: any raised flag, the first detail given."""
    flags = no_errors()
    for r in results:
        for flag, value in r.error_flags.items():
            if value and not flags[flag]:
                flags[flag] = value
    return flags


def add_usage(total: dict | None, more: dict | None) -> dict | None:
    """Per-model token usage added up (multi: several model graders, maybe the same model)."""
    if not more:
        return total
    out = {m: dict(u) for m, u in (total or {}).items()}
    for model, usage in more.items():
        mine = out.setdefault(model, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cached_tokens": 0})
        for k, v in usage.items():
            mine[k] = mine.get(k, 0) + v
    return out
