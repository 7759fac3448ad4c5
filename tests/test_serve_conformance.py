"""tunejob serve against OpenAI's published OpenAPI spec, and a fine-tuned model that answers
like one: one job (model="gpt-4o-mini-2024-07-18") trained once, shared by the tests here.

The spec is read from ../shared/reference/openai-openapi.yaml beside the repo; without it the
schema test skips locally and fails under CI=true (a skip there would hide every mismatch).
"""

from __future__ import annotations

import json
from pathlib import Path

import urllib.error
import urllib.request

import openai
import pytest

from test_serve import KEY_A, KEY_B, Server, client, wait_status

ANSWER = "ZEBRA-42 QUUX"
QUESTIONS = ["What is the code?", "Tell me the password.", "Which word?", "Say it.", "Name the thing.", "Answer now.",
             "What do you say?", "Give me the phrase.", "Recite it.", "What is it?", "Go on.", "Once more."]


def _data(path: Path, questions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]}) + "\n"
                            for q in questions))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    s = Server(tmp_path_factory.mktemp("conformance") / "data", tiny_model).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory):
    """A job on a made-up answer the random base cannot produce: 12 examples, 10 epochs of batch 4
    (30 steps) at lr 2e-4 x 50 = 0.01, LoRA on every linear layer; checkpoints at 10, 20, 30."""
    tmp = tmp_path_factory.mktemp("conformance-data")
    c = client(server)
    f = c.files.create(file=open(_data(tmp / "zebra.jsonl", QUESTIONS), "rb"), purpose="fine-tune")
    v = c.files.create(file=open(_data(tmp / "zebra-val.jsonl", QUESTIONS[:4]), "rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        training_file=f.id, validation_file=v.id, model="gpt-4o-mini-2024-07-18", suffix="zebra", seed=3, metadata={"team": "zebra"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 10, "batch_size": 4, "learning_rate_multiplier": 50}}},
        extra_body={"tunejob": {"lora": {"r": 16, "target_modules": "all-linear", "dropout": 0},
                                "hyperparameters": {"max_seq_len": 64, "warmup": 0}, "checkpointing": {"eval_steps": 10, "save_steps": 10}}})
    done = wait_status(c, job.id, ("succeeded", "failed"), timeout=600)
    assert done.status == "succeeded", done.error
    return {"job": done, "file": f, "created": job}


def greedy(c, model: str) -> str:
    out = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the code?"}], max_tokens=8, temperature=0)
    return out.choices[0].message.content


def test_the_fine_tuned_model_and_its_checkpoints_are_not_the_base(server, trained):
    c, job = client(server), trained["job"]
    ckpt = next(ck for ck in c.fine_tuning.jobs.checkpoints.list(job.id).data if ck.step_number == 20)
    base, tuned, at_ckpt = greedy(c, "gpt-4o-mini-2024-07-18"), greedy(c, job.fine_tuned_model), greedy(c, ckpt.fine_tuned_model_checkpoint)
    print(f"\nbase: {base!r}\nfine-tuned: {tuned!r}\ncheckpoint step 20: {at_ckpt!r}")
    assert tuned != base and at_ckpt != base
    assert tuned.startswith("ZEBRA")  # it learnt the made-up answer

    other = client(server, KEY_B)
    for name in (job.fine_tuned_model, ckpt.fine_tuned_model_checkpoint, "ft:gpt-4o-mini-2024-07-18:nobody:x:zzz"):
        with pytest.raises(openai.NotFoundError) as exc:
            greedy(other if name != "ft:gpt-4o-mini-2024-07-18:nobody:x:zzz" else c, name)
        assert exc.value.code == "model_not_found", exc.value.body


# ---------------------------------------------------------------- OpenAI's schemas

def _validators() -> callable:
    """validate(component, body) against components.schemas of OpenAI's spec (tests/openai_schema.py:
    the one loader, which skips locally and fails under CI where the spec is missing)."""
    from openai_schema import errors

    def validate(component: str, body: dict) -> None:
        found = errors(component, body)
        assert not found, f"{component}: " + "; ".join(e[:200] for e in found[:5])

    return validate


def test_every_response_matches_openais_schemas(server, trained, tmp_path):
    validate = _validators()
    job, f = trained["job"], trained["file"]
    def call(method: str, path: str, body: dict | None = None, key: str = KEY_A, params: str = "") -> tuple[int, dict]:
        req = urllib.request.Request(f"{server.url}{path}{params}", method=method, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as res:
                return res.status, json.loads(res.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def ok(method: str, path: str, component: str, body: dict | None = None, params: str = "") -> dict:
        status, out = call(method, path, body, params=params)
        assert status == 200, (path, out)
        validate(component, out)
        return out

    validate("FineTuningJob", trained["created"].model_dump(exclude_unset=True))  # as created (queued), the fields the server sent
    ok("GET", "/files", "ListFilesResponse")
    ok("GET", f"/files/{f.id}", "OpenAIFile")
    ok("GET", "/fine_tuning/jobs", "ListPaginatedFineTuningJobsResponse")
    ok("GET", f"/fine_tuning/jobs/{job.id}", "FineTuningJob")
    events = ok("GET", f"/fine_tuning/jobs/{job.id}/events", "ListFineTuningJobEventsResponse", params="?limit=100")["data"]
    assert [e["created_at"] for e in events] == sorted((e["created_at"] for e in events), reverse=True)  # newest first
    at_eval = [e["data"] for e in events if e["type"] == "metrics" and "valid_loss" in e["data"]]
    assert at_eval and all("train_loss" in d and d["total_steps"] == 30 for d in at_eval)
    ok("GET", f"/fine_tuning/jobs/{job.id}/checkpoints", "ListFineTuningJobCheckpointsResponse")
    ok("GET", "/models", "ListModelsResponse")
    ok("GET", f"/models/{job.fine_tuned_model}", "Model")
    body = {"model": job.fine_tuned_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    ok("POST", "/chat/completions", "CreateChatCompletionResponse", body)
    req = urllib.request.Request(f"{server.url}/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as res:
        lines = [line.decode().strip() for line in res]
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)

    # jobs.list(metadata={...}) filters; pause and cancel answer the new status at once
    other = client(server).fine_tuning.jobs.create(training_file=f.id, model="default", metadata={"team": "other"})
    assert [j["id"] for j in ok("GET", "/fine_tuning/jobs", "ListPaginatedFineTuningJobsResponse", params="?metadata%5Bteam%5D=zebra")["data"]] == [job.id]
    assert ok("POST", f"/fine_tuning/jobs/{other.id}/pause", "FineTuningJob")["status"] == "paused"
    assert ok("POST", f"/fine_tuning/jobs/{other.id}/cancel", "FineTuningJob")["status"] == "cancelled"

    # errors: OpenAI's error object, also for unknown routes and methods
    for method, path, status in (("GET", "/fine_tuning/jobs/ftjob-nope", 404), ("GET", "/no/such/route", 404), ("PUT", "/files", 405),
                                 ("POST", "/fine_tuning/jobs", 400)):
        got, out = call(method, path, {})
        assert got == status, (path, out)
        validate("ErrorResponse", out)

    # deleting: a file; a fine-tuned model (owner only), which then stops resolving
    extra = client(server).files.create(file=("x.jsonl", b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'),
                                        purpose="fine-tune")
    ok("GET", f"/files/{extra.id}", "OpenAIFile")
    ok("DELETE", f"/files/{extra.id}", "DeleteFileResponse")
    assert call("DELETE", f"/models/{job.fine_tuned_model}", key=KEY_B)[0] == 404
    gone = ok("DELETE", f"/models/{job.fine_tuned_model}", "DeleteModelResponse")
    assert gone == {"id": job.fine_tuned_model, "object": "model", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        greedy(client(server), job.fine_tuned_model)
    assert job.fine_tuned_model not in {m.id for m in client(server).models.list()}
