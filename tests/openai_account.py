"""A fake OpenAI account behind httpx.MockTransport, for the shapes `tunejob serve` does not have:
more than 100 jobs (pagination), a deleted training file, a model already shut down, a 429 with
Retry-After. OpenAI itself cannot run here; this stands in for it, and is held to OpenAI's
published spec: every response it builds and every request body it receives is validated
against ../shared/reference/openai-openapi.yaml (tests/openai_schema.py), and every path and
query parameter must be one the spec declares. The official SDK parses each response."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

import httpx2 as httpx  # the HTTP library openai 3.x is built on

from openai_schema import errors, openapi

BASE = "https://api.example.test/v1"


def declared_properties(component: str) -> set[str]:
    """Every property a component declares, through its allOf / $ref parts."""
    schemas = openapi()["components"]["schemas"]

    def walk(node: dict) -> set[str]:
        if "$ref" in node:
            return walk(schemas[node["$ref"].rsplit("/", 1)[1]])
        out = set(node.get("properties", {}))
        for part in node.get("allOf", []):
            out |= walk(part)
        return out

    return walk(schemas[component])


def job_object(i: int, model: str = "gpt-4o-mini-2024-07-18", status: str = "succeeded", method: str = "supervised",
               training_file: str | None = None, validation_file: str | None = None) -> dict:
    hp = {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8}
    if method == "dpo":
        hp["beta"] = 0.1
    section = {"hyperparameters": hp}
    if method == "reinforcement":  # o4-mini's RFT: a grader, and its own hyperparameters
        hp.update(compute_multiplier=2.0, eval_interval=5, eval_samples=3, reasoning_effort="medium")
        section["grader"] = {"type": "string_check", "name": "city", "input": "{{sample.output_text}}", "reference": "{{item.city}}",
                             "operation": "eq"}
    return {"object": "fine_tuning.job", "id": f"ftjob-{i:05d}", "model": model, "created_at": 1_750_000_000 + i,
            "finished_at": 1_750_000_500 + i if status == "succeeded" else None,
            "fine_tuned_model": f"ft:{model}:acme::m{i:05d}" if status == "succeeded" else None,
            "organization_id": "org-acme", "result_files": [f"file-result-{i}"] if status == "succeeded" else [],
            "status": status, "validation_file": validation_file, "training_file": training_file or f"file-train-{i}",
            "hyperparameters": hp, "trained_tokens": 12345 if status == "succeeded" else None, "error": None, "seed": 42,
            "method": {"type": method, method: section}, "metadata": None, "suffix": None}


@dataclass
class Account:
    jobs: list[dict] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # id -> content; absent = deleted
    gone_models: set[str] = field(default_factory=set)  # chat answers 404 model_not_found
    rate_limit: list[dict] = field(default_factory=list)  # headers of 429s to send before answering
    chats: list[dict] = field(default_factory=list)  # every chat request body received
    sleeps: list[float] = field(default_factory=list)  # when each chat arrived (time.monotonic)
    requests: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # spec violations found (asserted empty by the tests)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def client(self, max_retries: int = 0):
        from openai import OpenAI

        return OpenAI(base_url=BASE, api_key="sk-test", max_retries=max_retries, http_client=httpx.Client(transport=self.transport()))

    # ------------------------------------------------------------ spec checks

    def _check_path(self, request: httpx.Request) -> None:
        path = request.url.path.removeprefix("/v1")
        for template, ops in openapi()["paths"].items():
            pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
            op = ops.get(request.method.lower()) if re.match(pattern, path) else None
            if op is not None:
                declared = {p["name"] for p in op.get("parameters", []) if p.get("in") == "query"}
                extra = set(request.url.params.keys()) - declared
                if extra:
                    self.problems.append(f"{request.method} {template}: query {sorted(extra)} not in the spec")
                return
        self.problems.append(f"{request.method} {path}: no such operation in the spec")

    def _reply(self, component: str, body: dict, status: int = 200, headers: dict | None = None) -> httpx.Response:
        self.problems += [f"{component}: {e}" for e in errors(component, body)]
        return httpx.Response(status, json=body, headers=headers)

    def _error(self, status: int, message: str, code: str | None, headers: dict | None = None) -> httpx.Response:
        return self._reply("ErrorResponse", {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}, status, headers)

    # ------------------------------------------------------------ routes

    def handle(self, request: httpx.Request) -> httpx.Response:
        self._check_path(request)
        path = request.url.path.removeprefix("/v1")
        self.requests.append(f"{request.method} {path}")
        if path == "/fine_tuning/jobs":
            return self._page("ListPaginatedFineTuningJobsResponse", self.jobs, request)
        if m := re.fullmatch(r"/fine_tuning/jobs/([^/]+)", path):
            job = next((j for j in self.jobs if j["id"] == m[1]), None)
            return self._reply("FineTuningJob", job) if job else self._error(404, f"No such job {m[1]}", "fine_tuning_job_not_found")
        if m := re.fullmatch(r"/fine_tuning/jobs/([^/]+)/events", path):
            events = [{"object": "fine_tuning.job.event", "id": f"ev-{m[1]}-{s}", "created_at": 1_750_000_000 + s, "level": "info",
                       "message": f"Step {s}/3: training loss={1.0 / s:.3f}", "type": "metrics",
                       "data": {"step": s, "train_loss": 1.0 / s, "valid_loss": 1.1 / s, "train_mean_token_accuracy": 0.5}} for s in (3, 2, 1)]
            return self._page("ListFineTuningJobEventsResponse", events, request, has_more_key=True)
        if m := re.fullmatch(r"/fine_tuning/jobs/([^/]+)/checkpoints", path):
            job = next(j for j in self.jobs if j["id"] == m[1])
            ckpts = [{"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{m[1]}", "created_at": job["created_at"],
                      "fine_tuned_model_checkpoint": f"{job['fine_tuned_model']}:ckpt-step-3", "step_number": 3,
                      "metrics": {"step": 3, "train_loss": 0.3}, "fine_tuning_job_id": m[1]}] if job["fine_tuned_model"] else []
            return self._page("ListFineTuningJobCheckpointsResponse", ckpts, request)
        if m := re.fullmatch(r"/files/([^/]+)/content", path):
            if m[1] not in self.files:
                return self._error(404, f"No such File object: {m[1]}", None)
            return httpx.Response(200, content=self.files[m[1]])
        if path == "/models":
            models = [{"id": j["fine_tuned_model"], "object": "model", "created": j["created_at"], "owned_by": "org-acme"}
                      for j in self.jobs if j["fine_tuned_model"]]
            return self._reply("ListModelsResponse", {"object": "list", "data": models})
        if path == "/chat/completions":
            return self._chat(json.loads(request.content))
        return self._error(404, f"unrouted {path}", None)

    def _page(self, component: str, items: list[dict], request: httpx.Request, has_more_key: bool = True) -> httpx.Response:
        limit = int(request.url.params.get("limit", 20))
        after = request.url.params.get("after")
        start = next((i + 1 for i, it in enumerate(items) if it["id"] == after), 0) if after else 0
        chunk = items[start:start + limit]
        body = {"object": "list", "data": chunk, "has_more": start + limit < len(items)}
        if component == "ListFineTuningJobCheckpointsResponse":
            body.update(first_id=chunk[0]["id"] if chunk else None, last_id=chunk[-1]["id"] if chunk else None)
        return self._reply(component, body)

    def _chat(self, body: dict) -> httpx.Response:
        self.problems += [f"CreateChatCompletionRequest: {e}" for e in errors("CreateChatCompletionRequest", body)]
        unknown = set(body) - declared_properties("CreateChatCompletionRequest")  # the schema allows extra keys; OpenAI refuses them
        self.problems += [f"CreateChatCompletionRequest: {k!r} is not a declared property" for k in sorted(unknown)]
        self.chats.append(body)
        self.sleeps.append(time.monotonic())
        if body["model"] in self.gone_models:
            return self._error(404, f"The model `{body['model']}` has been deprecated, learn more here: "
                                    "https://platform.openai.com/docs/deprecations", "model_not_found")
        if self.rate_limit:
            return self._error(429, "Rate limit reached for requests", "rate_limit_exceeded", self.rate_limit.pop(0))
        question = body["messages"][-1]["content"]
        if body.get("tools"):  # a tool conversation: the model calls its first tool
            name = body["tools"][0]["function"]["name"]
            call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps({"q": question})}}
            return self._reply("CreateChatCompletionResponse", {
                "id": "chatcmpl-2", "object": "chat.completion", "created": 1_750_000_000, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None,
                             "message": {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}}],
                "usage": {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}})
        return self._reply("CreateChatCompletionResponse", {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1_750_000_000, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": f"answer to {question}", "refusal": None}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}})
