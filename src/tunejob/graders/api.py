"""OpenAI's two grader endpoints as functions: POST /v1/fine_tuning/alpha/graders/run answers a
RunGraderResponse, /validate a ValidateGraderResponse (the spec's shapes, key for key). tunejob
serve's routes call these; so can anyone checking a grader without a server.

Where the spec and its own example disagree, the schema wins: the example's metadata.token_usage
is an object, the schema (and the openai SDK's GraderRunResponse) an integer, so it is the total
tokens here, and the per-model object goes in model_grader_token_usage_per_model as the example
shows. `scores` and `sub_rewards` hold a multi's sub-grader scores by key, and are empty for the
other graders, as in the example.
"""

from __future__ import annotations

import time

from tunejob.graders.context import GraderContext
from tunejob.graders.grade import grade
from tunejob.graders.schema import GraderError, check_grader
from tunejob.graders.template import make_sample


def run_grader_response(grader: dict, model_sample: str, item: dict | None, context: GraderContext | None = None) -> dict:
    """RunGraderResponse for one model sample; GraderError if the grader or the request is invalid."""
    if not isinstance(model_sample, str):
        raise GraderError([("model_sample", f"must be a string (the model's answer), not {type(model_sample).__name__}")])
    if item is not None and not isinstance(item, dict):
        raise GraderError([("item", f"must be an object (the dataset line's fields), not {type(item).__name__}")])
    check_grader(grader, context)
    start = time.perf_counter()
    result = grade(grader, make_sample(model_sample), item or {}, context)
    usage = result.token_usage or {}
    scores = dict(result.sub_scores) if grader["type"] == "multi" else {}
    return {
        "reward": result.score,
        "metadata": {
            "name": grader["name"],
            "type": grader["type"],
            "errors": dict(result.error_flags),
            "execution_time": time.perf_counter() - start,
            "scores": scores,
            "token_usage": sum(u["total_tokens"] for u in usage.values()) if usage else None,
            "sampled_model_name": next(iter(usage)) if len(usage) == 1 else None,
        },
        "sub_rewards": dict(scores),
        "model_grader_token_usage_per_model": usage,
    }


def validate_grader_response(body: dict) -> dict:
    """ValidateGraderResponse for a ValidateGraderRequest body: the grader, as sent, when it is
    valid; GraderError naming every problem when it is not."""
    if not isinstance(body, dict):
        raise GraderError([("body", 'must be a JSON object, {"grader": {...}}')])
    unknown = sorted(set(body) - {"grader"})
    if unknown:
        raise GraderError([(key, "unknown request field; the body holds only grader") for key in unknown])
    if "grader" not in body:
        raise GraderError([("grader", 'missing; send {"grader": {"type": ..., "name": ..., ...}}')])
    check_grader(body["grader"])
    return {"grader": body["grader"]}
