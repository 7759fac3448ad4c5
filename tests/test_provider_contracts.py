"""backend: openai against OpenAI's own published contract: every request body tunejob builds is
validated against CreateFineTuningJobRequest of OpenAI's OpenAPI spec; the documented errors
(400 invalid file, 403 training_not_available, 429, a job that fails with an error object) each
become one clear line; checkpoints reach the run directory; Azure OpenAI's paths, api-version and
api-key header are used. The service is a stub (httpx.MockTransport inside the official SDK): it
answers like OpenAI, enforcing the spec's request schema, and stands in for a service we cannot
reach from here."""

from __future__ import annotations

import json

import httpx2 as httpx  # the HTTP client openai 3.x is built on
import pytest

from conftest import write_chat_data
from openai_schema import errors
from tunejob.backends import openai_api
from tunejob.backends.jobstore import JobStore
from tunejob.errors import BackendError
from tunejob.spec import parse_spec


def spec_text(data, out, extra: str = "", openai: str = "") -> str:
    return (f"name: api-job\nbackend: openai\nmodel: gpt-4o-mini-2024-07-18\ndata: {{train: {data}, val_fraction: 0.2}}\n"
            f"output_dir: {out}\n{extra}openai: {{api_key_env: TJ_TEST_KEY, poll_interval: 0.01, max_retries: 0{openai}}}\n")


class FakeOpenAI:
    """What the SDK sees of OpenAI's fine-tuning API: files, jobs, events, checkpoints, chat."""

    def __init__(self, azure: bool = False, create_error: tuple[int, dict] | None = None, fail_job: dict | None = None,
                 extra_metrics: dict | None = None):
        self.azure, self.create_error, self.fail_job = azure, create_error, fail_job
        self.extra_metrics = extra_metrics or {}  # more fields in the step-2 metrics event
        self.requests: list[httpx.Request] = []
        self.bodies: list[dict] = []
        self.job: dict | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if self.azure:  # Azure's data plane: /openai/<path>?api-version=..., key in the api-key header
            assert path.startswith("/openai/") and request.url.params.get("api-version") and request.headers.get("api-key") == "k"
            path = path[len("/openai"):]
        else:
            assert request.headers["authorization"] == "Bearer k"
        method = request.method
        if method == "POST" and path.endswith("/files"):
            return httpx.Response(200, json={"id": f"file-{len(self.requests)}", "object": "file", "bytes": 1, "created_at": 1,
                                             "filename": "x.jsonl", "purpose": "fine-tune", "status": "processed"})
        if method == "GET" and path.endswith("/fine_tuning/jobs"):
            return httpx.Response(200, json={"object": "list", "data": [self.job] if self.job else [], "has_more": False})
        if method == "POST" and path.endswith("/fine_tuning/jobs"):
            body = json.loads(request.content)
            self.bodies.append(body)
            problems = errors("CreateFineTuningJobRequest", body)
            if problems:
                return httpx.Response(400, json={"error": {"message": "; ".join(problems), "type": "invalid_request_error", "param": None, "code": None}})
            if self.create_error:
                return httpx.Response(self.create_error[0], json={"error": self.create_error[1]})
            self.job = self._job(body, "running")
            return httpx.Response(200, json=self.job)
        if method == "GET" and "/fine_tuning/jobs/" in path and path.endswith("/events"):
            data = [{"id": "ev-2", "object": "fine_tuning.job.event", "created_at": 2, "level": "info", "type": "metrics", "message": "Step 2/2",
                     "data": {"step": 2, "train_loss": 1.5, "valid_loss": 1.7, "full_valid_loss": 1.6, **self.extra_metrics}},
                    {"id": "ev-1", "object": "fine_tuning.job.event", "created_at": 1, "level": "info", "type": "metrics", "message": "Step 1/2",
                     "data": {"step": 1, "train_loss": 2.0}}]
            return httpx.Response(200, json={"object": "list", "data": data, "has_more": False})
        if method == "GET" and path.endswith("/checkpoints"):
            name = self.job["fine_tuned_model"]
            data = [{"id": f"ftckpt-{s}", "object": "fine_tuning.job.checkpoint", "created_at": s, "fine_tuning_job_id": self.job["id"],
                     "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{s}", "step_number": s,
                     "metrics": {"step": s, "train_loss": 2.0 / s, "valid_loss": 1.8 / s}} for s in (2, 1)]
            return httpx.Response(200, json={"object": "list", "data": data, "has_more": False})
        if method == "POST" and path.endswith("/chat/completions"):
            return httpx.Response(200, json={"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}]})
        if method == "GET" and "/fine_tuning/jobs/" in path:
            final = "failed" if self.fail_job else "succeeded"
            self.job = {**self.job, "status": final, "error": self.fail_job, "trained_tokens": 100,
                        "fine_tuned_model": None if self.fail_job else "ft:gpt-4o-mini-2024-07-18:org::abc123"}
            return httpx.Response(200, json=self.job)
        raise AssertionError(f"unexpected {method} {request.url}")

    @staticmethod
    def _job(body: dict, status: str) -> dict:
        return {"id": "ftjob-abc", "object": "fine_tuning.job", "created_at": 1, "model": body["model"], "fine_tuned_model": None,
                "organization_id": "org", "status": status, "hyperparameters": {"n_epochs": "auto"}, "training_file": body["training_file"],
                "validation_file": body.get("validation_file"), "result_files": [], "trained_tokens": None, "error": None,
                "finished_at": None, "seed": body.get("seed", 0), "metadata": body.get("metadata"), "method": body.get("method")}


@pytest.fixture
def service(monkeypatch, tmp_path):
    monkeypatch.setenv("TJ_TEST_KEY", "k")
    monkeypatch.setenv("TUNEJOB_HOME", str(tmp_path / "home"))
    made = {}

    def install(fake: FakeOpenAI):
        real = openai_api.make_client
        monkeypatch.setattr(openai_api, "make_client", lambda settings, max_retries=None: real(settings, max_retries).with_options(
            http_client=httpx.Client(transport=httpx.MockTransport(fake))))
        made["fake"] = fake
        return fake
    return install


def run_job(tmp_path, extra: str = "", openai: str = "", data=None) -> tuple[dict, JobStore]:
    data = data or write_chat_data(tmp_path / "d.jsonl", 20)
    spec = parse_spec(spec_text(data, tmp_path / "run", extra, openai))
    store = JobStore(tmp_path / "home" / "jobs.sqlite3")
    backend = openai_api.OpenAIBackend()
    record = backend.submit(spec, store)
    return backend.watch(record, store), store


def test_request_bodies_match_openais_published_schema(tmp_path, service):
    fake = service(FakeOpenAI())
    summary, _ = run_job(tmp_path, "hyperparameters: {epochs: 3, learning_rate_multiplier: 0.5}\n",
                         ", suffix: sales, metadata: {team: growth, ticket: FT-12}, wandb: {project: sales-ft, tags: [v1]}")
    body = fake.bodies[0]
    assert errors("CreateFineTuningJobRequest", body) == []
    assert body["metadata"]["team"] == "growth" and body["metadata"]["ticket"] == "FT-12" and "tunejob_tag" in body["metadata"]
    assert body["integrations"] == [{"type": "wandb", "wandb": {"project": "sales-ft", "tags": ["v1"]}}]
    # unset means OpenAI's own choice, not tunejob's local default of 8
    assert body["method"] == {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": 0.5}}}
    assert "hyperparameters" not in body  # deprecated at top level in favour of method
    assert summary["status"] == "succeeded"
    # a body the schema refuses is refused (the check can fail): n_epochs 0, and no training_file
    assert errors("CreateFineTuningJobRequest", {**body, "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}})
    assert errors("CreateFineTuningJobRequest", {k: v for k, v in body.items() if k != "training_file"})


def test_checkpoints_reach_the_run_directory_and_chat_finds_them(tmp_path, service):
    from tunejob import runner

    service(FakeOpenAI())
    summary, store = run_job(tmp_path)
    saved = json.loads((tmp_path / "run" / "checkpoints.json").read_text())
    assert [c["step"] for c in saved] == [1, 2] and saved[1]["model"].endswith(":ckpt-step-2")
    assert saved[0]["metrics"] == {"step": 1, "train_loss": 2.0, "valid_loss": 1.8}
    record = store.list()[0]
    assert saved[0]["model"] in record.detail["checkpoints"]
    found = next(r for r in store.list() if saved[0]["model"] in r.detail.get("checkpoints", []))
    assert found.id == record.id and callable(runner.chat_api)


@pytest.mark.parametrize("status, error, expected", [
    (400, {"message": "File file-2 is not a valid JSONL training file", "type": "invalid_request_error", "param": "training_file", "code": "invalid_file"},
     "rejected the training_file"),
    (403, {"message": "Fine-tuning is not available", "type": "invalid_request_error", "param": None, "code": "training_not_available"},
     "training_not_available"),
    (429, {"message": "Rate limit reached for requests", "type": "requests", "param": None, "code": "rate_limit_exceeded"},
     "rate limited (429)"),
])
def test_documented_errors_are_one_clear_line(tmp_path, service, status, error, expected):
    service(FakeOpenAI(create_error=(status, error)))
    with pytest.raises(BackendError) as err:
        run_job(tmp_path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_failed_job_reports_its_error_object(tmp_path, service):
    service(FakeOpenAI(fail_job={"code": "invalid_training_file", "message": "Example 3 has no assistant message", "param": "training_file"}))
    with pytest.raises(BackendError, match="Example 3 has no assistant message.*invalid_training_file"):
        run_job(tmp_path)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_azure_uses_its_paths_api_version_and_key_header(tmp_path, service):
    fake = service(FakeOpenAI(azure=True))
    summary, _ = run_job(tmp_path, openai=", azure_endpoint: 'https://res.openai.azure.com', api_version: 2024-10-21")
    assert summary["status"] == "succeeded"
    paths = {(r.method, r.url.path) for r in fake.requests}
    assert ("POST", "/openai/files") in paths and ("POST", "/openai/fine_tuning/jobs") in paths
    assert {r.url.params["api-version"] for r in fake.requests} == {"2024-10-21"}
    assert all(r.url.host == "res.openai.azure.com" for r in fake.requests)
    # a fine-tuned model answers through its deployment: /openai/deployments/<name>/chat/completions
    settings = parse_spec(spec_text("x.jsonl", tmp_path / "run", openai=", azure_endpoint: 'https://res.openai.azure.com'")).openai
    reply = openai_api.make_client(settings).chat.completions.create(model="sales-ft-deployment", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "hi"
    assert fake.requests[-1].url.path == "/openai/deployments/sales-ft-deployment/chat/completions"


def test_metadata_limits_fail_in_the_spec(tmp_path):
    from tunejob.errors import SpecError

    data = write_chat_data(tmp_path / "d.jsonl", 20)
    many = ", ".join(f"k{i}: v" for i in range(16))
    with pytest.raises(SpecError, match="openai.metadata: up to 15 pairs"):
        parse_spec(spec_text(data, tmp_path / "run", openai=f", metadata: {{{many}}}"))


def test_dpo_sends_openais_method_and_its_metrics_reach_the_run(tmp_path, service):
    from test_dpo_train import DPO_FIELDS, write_pairs
    from tunejob.monitor.metrics import read_metrics

    rewards = {"rewards_chosen": 0.4, "rewards_rejected": -0.2, "rewards_margin": 0.6, "rewards_accuracy": 0.75,
               "valid_rewards_chosen": 0.3, "valid_rewards_rejected": -0.1, "valid_rewards_margin": 0.4, "valid_rewards_accuracy": 0.7}
    fake = service(FakeOpenAI(extra_metrics=rewards))
    summary, _ = run_job(tmp_path, "method: {type: dpo, beta: 0.25}\nhyperparameters: {epochs: 2}\n", data=write_pairs(tmp_path / "p.jsonl", 20))
    body = fake.bodies[0]
    assert errors("CreateFineTuningJobRequest", body) == []
    assert body["method"] == {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto", "beta": 0.25}}}
    assert errors("CreateFineTuningJobRequest", {**body, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}})  # the schema can refuse
    uploaded = [json.loads(line) for line in (tmp_path / "run" / "data" / "train.jsonl").read_text().splitlines()]
    assert uploaded and all(set(r) == {"input", "preferred_output", "non_preferred_output"} for r in uploaded)  # OpenAI's format, verbatim
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train = next(r for r in records if r["kind"] == "train" and r["step"] == 2)
    valid = next(r for r in records if r["kind"] == "eval")
    assert all(train[k] == rewards[k] for k in DPO_FIELDS) and all(valid[f"valid_{k}"] == rewards[f"valid_{k}"] for k in DPO_FIELDS)
    assert summary["status"] == "succeeded"


def test_dpo_spec_with_chat_data_fails_before_any_upload(tmp_path, service):
    from tunejob.errors import DataError

    fake = service(FakeOpenAI())
    with pytest.raises(DataError, match="method dpo trains on preference pairs"):
        run_job(tmp_path, "method: dpo\n")
    assert not fake.requests
