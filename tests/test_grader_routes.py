"""tunejob serve's grader endpoints, /v1/fine_tuning/alpha/graders/run and /validate, on a started
server over real HTTP, driven by the official openai SDK (client.fine_tuning.alpha.graders), with
responses checked against OpenAI's published RunGraderResponse / ValidateGraderResponse schemas.

The server runs `--engine vllm` in front of tests/vllm_stub.py, so a score_model grader naming the
server's own model ("default") goes the whole way: the grader route calls the server's own
/v1/chat/completions with the caller's key, which resolves the model for that key and forwards
the chat to the stub, whose answer is fixed by the test. No model is loaded (seconds of CPU on
this machine, and a tiny model's answer would be noise)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from openai_schema import errors
from test_graders_model import answer_from_prompt
from test_serve import KEY_A, Server, client
from vllm_stub import BASE, VllmStub

STRING_CHECK = {"type": "string_check", "name": "city", "input": "{{sample.output_text}}", "reference": "{{item.city}}", "operation": "eq"}
PYTHON = {"type": "python", "name": "length", "source": "def grade(sample, item):\n    return min(1.0, len(sample['output_text']) / 10)\n"}
OWN_JUDGE = {"type": "score_model", "name": "judge", "model": "default", "input": [{"role": "user", "content": "Reply <<{{item.reply}}>>"}]}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("graders-serve")
    model = tmp / "model"  # a base model folder the vLLM engine never loads: chat goes to the stub
    model.mkdir()
    (model / "config.json").write_text("{}")
    stub = VllmStub(answer=answer_from_prompt).start()
    server = Server(tmp / "data", model, ("--engine", "vllm", "--vllm-url", stub.url)).start()
    yield server, stub
    server.stop()
    stub.stop()


def raw_run(c: openai.OpenAI, **body) -> dict:
    """The endpoint's JSON as sent (the SDK's typed object renames model_grader_* fields)."""
    return c.fine_tuning.alpha.graders.with_raw_response.run(**body).http_response.json()


def test_validate_through_the_sdk(served):
    server, _ = served
    c = client(server)
    raw = c.fine_tuning.alpha.graders.with_raw_response.validate(grader=STRING_CHECK).http_response.json()
    assert raw == {"grader": STRING_CHECK} and errors("ValidateGraderResponse", raw) == []
    assert c.fine_tuning.alpha.graders.validate(grader=PYTHON).grader.name == "length"
    with pytest.raises(openai.BadRequestError) as err:
        c.fine_tuning.alpha.graders.validate(grader={**STRING_CHECK, "operation": "contains"})
    assert err.value.param == "grader.operation" and "'contains' is not one of eq, ne, like, ilike" in err.value.message


def test_run_through_the_sdk_with_the_servers_own_model_as_judge(served):
    server, stub = served
    c = client(server)
    result = c.fine_tuning.alpha.graders.run(grader=STRING_CHECK, model_sample="Paris", item={"city": "Paris"})
    assert result.reward == 1.0 and result.metadata.type == "string_check" and not result.metadata.errors.other_error
    judged = raw_run(c, grader=OWN_JUDGE, model_sample="x", item={"reply": '{"result": 0.6, "steps": []}'})
    assert errors("RunGraderResponse", judged) == [] and judged["reward"] == 0.6, judged
    assert judged["metadata"]["sampled_model_name"] == "default" and judged["metadata"]["token_usage"] == 7
    assert stub.chats[-1]["model"] == BASE and stub.chats[-1]["messages"][0]["content"].startswith("Reply <<")
    other = raw_run(c, grader={**OWN_JUDGE, "model": "ft:not-this-keys-model"}, model_sample="x", item={"reply": "1"})
    assert other["reward"] == 0.0 and other["metadata"]["errors"]["model_grader_server_error_details"].startswith("HTTP 404")


def test_concurrent_runs(served):
    server, _ = served
    c = client(server)
    jobs = []
    for i in range(16):
        grader, sample, item, expected = [(STRING_CHECK, "Rome", {"city": "Rome"}, 1.0),
                                           (PYTHON, "x" * i, None, min(1.0, i / 10)),
                                           (OWN_JUDGE, "x", {"reply": f'{{"result": {i / 16}}}'}, i / 16),
                                           (STRING_CHECK, "Rome", {"city": "Paris"}, 0.0)][i % 4]
        jobs.append((dict(grader=grader, model_sample=sample, **({"item": item} if item is not None else {})), expected))
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda job: raw_run(c, **job[0]), jobs))
    for (body, expected), answer in zip(jobs, answers):
        assert errors("RunGraderResponse", answer) == [] and answer["reward"] == pytest.approx(expected), (body, answer)


def post(server: Server, path: str, data: bytes, key: str | None = KEY_A) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"{server.url}{path}", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


BAD_RUNS = [
    (b"{not json", 400, None), (b"[1, 2]", 400, None), (b'{"model_sample": "x"}', 400, "grader"),
    (json.dumps({"grader": STRING_CHECK}).encode(), 400, "model_sample"),
    (json.dumps({"grader": STRING_CHECK, "model_sample": 3}).encode(), 400, "model_sample"),
    (json.dumps({"grader": STRING_CHECK, "model_sample": "x", "item": [1]}).encode(), 400, "item"),
    (json.dumps({"grader": STRING_CHECK, "model_sample": "x", "samples": 2}).encode(), 400, "samples"),
    (json.dumps({"grader": "string_check", "model_sample": "x"}).encode(), 400, "grader"),
    (json.dumps({"grader": {**STRING_CHECK, "operation": "contains"}, "model_sample": "x"}).encode(), 400, "grader.operation"),
    (json.dumps({"grader": {**PYTHON, "source": "def grade(:"}, "model_sample": "x"}).encode(), 400, "grader.source"),
    (json.dumps({"grader": {"type": "multi", "name": "m", "graders": {"a": STRING_CHECK}, "calculate_output": "__import__('os')"},
                 "model_sample": "x"}).encode(), 400, "grader.calculate_output"),
]


@pytest.mark.parametrize("data,status,param", BAD_RUNS)
def test_bad_run_bodies_are_openai_shaped_4xx(served, data, status, param):
    server, _ = served
    code, body = post(server, "/fine_tuning/alpha/graders/run", data)
    assert code == status and set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param and body["error"]["message"]


def test_bad_validate_bodies_and_a_missing_key(served):
    server, _ = served
    for data, param in ((b"{}", "grader"), (b'{"grader": {}, "x": 1}', "x"), (b'{"grader": {"type": "multi", "name": "m"}}', "grader.graders")):
        code, body = post(server, "/fine_tuning/alpha/graders/validate", data)
        assert code == 400 and body["error"]["param"] == param, body
    code, body = post(server, "/fine_tuning/alpha/graders/run", json.dumps({"grader": STRING_CHECK, "model_sample": "x"}).encode(), key=None)
    assert code == 401 and body["error"]["code"] == "invalid_api_key"
