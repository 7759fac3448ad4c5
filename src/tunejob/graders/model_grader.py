"""Model graders: score_model (a number from a judge model) and label_model (a label from it, as a
multi's sub-grader), through the openai SDK's chat.completions.create on any OpenAI-compatible
endpoint: OpenAI, tunejob serve's own models, vLLM.

As OpenAI's graders guide describes: the grader's `input` messages, templates rendered, go to the
grader's `model` with its `sampling_params`, asking for a response in a fixed format,
{"result": float, "steps": [{"description", "conclusion"}]} (a label instead of a float for
label_model), so the judge has room to reason before the number. An endpoint that ignores
response_format (tunejob serve's local engine does) may answer with a bare number: that is read
too. The score is clamped to `range` (default [0, 1]); anything else scores 0 with
model_grader_parse_error. `pass_threshold` is metadata, not used for the reward.

A batch's calls run concurrently on a few threads: a training step grades 16-64 samples and a
judge answers in seconds, so one at a time would make grading the slowest part of a step.
"""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor

from tunejob.graders import template
from tunejob.graders.context import GraderContext, openai_client
from tunejob.graders.result import GradeResult, failed

CONCURRENCY = 8  # calls in flight per batch: enough to hide a judge's latency, few enough not to trip rate limits
_STEPS = {"type": "array", "items": {"type": "object", "additionalProperties": False, "required": ["description", "conclusion"],
                                     "properties": {"description": {"type": "string"}, "conclusion": {"type": "string"}}}}
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def response_format(result_schema: dict) -> dict:
    """The guide's grader output format as a strict json_schema response_format."""
    schema = {"type": "object", "additionalProperties": False, "required": ["result", "steps"],
              "properties": {"result": result_schema, "steps": _STEPS}}
    return {"type": "json_schema", "json_schema": {"name": "grader_output", "strict": True, "schema": schema}}


def sampling(params: dict | None) -> dict:
    """sampling_params as chat.completions arguments. The chat API takes all five (only the name
    max_completions_tokens differs: max_completion_tokens there). OpenAI's own limits, no
    temperature for reasoning models and no reasoning_effort for the others, are the endpoint's
    to enforce; its 400 comes back as model_grader_server_error with its message."""
    names = {"temperature": "temperature", "top_p": "top_p", "seed": "seed",
             "max_completions_tokens": "max_completion_tokens", "reasoning_effort": "reasoning_effort"}
    return {names[k]: v for k, v in (params or {}).items() if k in names and v is not None}


def chat_messages(messages: list[dict], sample: dict, item: dict) -> list[dict]:
    """The grader's EvalItem messages, rendered, as chat.completions messages."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            out.append({"role": message["role"], "content": template.render(content, sample, item)})
        else:
            parts = content if isinstance(content, list) else [content]
            out.append({"role": message["role"], "content": [_part(p, sample, item) for p in parts]})
    return out


def _part(part, sample: dict, item: dict) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": template.render(part, sample, item)}
    if part["type"] in ("input_text", "output_text"):
        return {"type": "text", "text": template.render(part["text"], sample, item)}
    if part["type"] == "input_image":
        return {"type": "image_url", "image_url": {"url": template.render(part["image_url"], sample, item), "detail": part.get("detail") or "auto"}}
    audio = part["input_audio"]
    return {"type": "input_audio", "input_audio": {"data": template.render(audio["data"], sample, item), "format": audio["format"]}}


def _answer(text: str):
    """The `result` of a JSON answer (fenced in ``` or not), or the bare answer itself."""
    text = text.strip()
    fenced = _FENCE.match(text)
    text = fenced.group(1) if fenced else text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value.get("result") if isinstance(value, dict) else value


def parse_score(text: str) -> float | None:
    value = _answer(text)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def parse_label(text: str, labels: list[str]) -> str | None:
    value = _answer(text)
    return value.strip() if isinstance(value, str) and value.strip() in labels else None


def model_grades(grader: dict, pairs: list[tuple[dict, dict]], context: GraderContext) -> list[GradeResult]:
    """score_model or label_model over (sample, item) pairs, CONCURRENCY calls at a time."""
    name = grader["name"]
    try:
        client = openai_client(context.base_url, context.api_key)
    except Exception as exc:  # the SDK's "api_key must be set": the same for every sample
        why = f"no model endpoint: {exc}; set OPENAI_API_KEY, or GraderContext(base_url=..., api_key=...)"
        return [failed(name, why, "model_grader_server_error", why, "model_grader_server_error_details") for _ in pairs]
    with ThreadPoolExecutor(max_workers=max(1, min(CONCURRENCY, len(pairs)))) as pool:
        return list(pool.map(lambda pair: _grade_one(client, grader, *pair), pairs))


def _grade_one(client, grader: dict, sample: dict, item: dict) -> GradeResult:
    name, labels = grader["name"], grader.get("labels")
    try:
        messages = chat_messages(grader["input"], sample, item)
    except template.RenderError as exc:
        return failed(name, str(exc), exc.flag)
    fmt = response_format({"type": "string", "enum": labels} if labels else {"type": "number"})
    try:
        response = client.chat.completions.create(model=grader["model"], messages=messages, response_format=fmt,
                                                  **sampling(grader.get("sampling_params")))
    except Exception as exc:  # openai.APIError and its kin, whatever the endpoint said
        why = _server_error(exc)
        return failed(name, f"{grader['model']}: {why}", "model_grader_server_error", why, "model_grader_server_error_details")
    usage = {response.model or grader["model"]: _usage(response.usage)}
    message = response.choices[0].message if response.choices else None
    if message is not None and getattr(message, "refusal", None):
        result = failed(name, f"{grader['model']} refused: {message.refusal}", "model_grader_refusal_error")
    else:
        result = _read_answer(grader, (message.content if message else None) or "")
    result.token_usage = usage
    return result


def _read_answer(grader: dict, text: str) -> GradeResult:
    name, labels = grader["name"], grader.get("labels")
    if labels:
        label = parse_label(text, labels)
        if label is None:
            return failed(name, f"{grader['model']} answered {text[:80]!r}, not one of the labels {', '.join(labels)}", "model_grader_parse_error")
        score = 1.0 if label in grader["passing_labels"] else 0.0
        return GradeResult(score, {name: score}, [])
    value = parse_score(text)
    if value is None:
        return failed(name, f"{grader['model']} answered {text[:80]!r}, not a number or {{\"result\": number}}", "model_grader_parse_error")
    low, high = grader.get("range") or (0, 1)
    score = min(max(value, float(low)), float(high))  # the guide: "truncated to the given range"
    return GradeResult(score, {name: score}, [])


def _server_error(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    text = str(message or exc).splitlines()[0] if str(message or exc) else exc.__class__.__name__
    return f"HTTP {status}: {text}" if status else f"{exc.__class__.__name__}: {text}"


def _usage(usage) -> dict:
    if usage is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cached_tokens": 0}
    details = getattr(usage, "prompt_tokens_details", None)
    return {"prompt_tokens": usage.prompt_tokens or 0, "completion_tokens": usage.completion_tokens or 0,
            "total_tokens": usage.total_tokens or 0, "cached_tokens": getattr(details, "cached_tokens", None) or 0}
