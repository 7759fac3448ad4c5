"""OpenAI's chat parameters through `tunejob serve` over real HTTP: answers parsed by the official
openai SDK and checked against OpenAI's published spec (stop, n, logprobs, penalties,
response_format, streamed with each choice's index); and the same requests refused, with the same
400, by both engines (the vLLM engine never sees them), or forwarded whole to vLLM."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from openai_schema import errors
from test_serve import KEY_A, Server, client
from test_serve_conformance import _validators
from vllm_stub import VllmStub

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "ok"],
          "properties": {"answer": {"enum": ["yes", "no"]}, "ok": {"type": "boolean"}}}
ASK = {"model": "default", "messages": [{"role": "user", "content": "alpha"}], "max_tokens": 6}
EVERYTHING = {"n": 2, "temperature": 0.8, "seed": 4, "stop": ["\n\n", "zz"], "presence_penalty": 0.5, "frequency_penalty": 0.5,
              "logprobs": True, "top_logprobs": 3, "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA}}}
REFUSED = [  # (body change, param the 400 names, text its message has)
    ({"n": 9}, "n", "8"),
    ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "4"),
    ({"presence_penalty": 2.5}, "presence_penalty", "2"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": {"type": "object", "properties": 5}}}},
     "response_format.json_schema.schema", "properties"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_object"),
    ({"logit_bias": {"50": 5}}, "logit_bias", "Unrecognized"),
]


def _post(server: Server, body: dict) -> tuple[int, dict | list]:
    req = urllib.request.Request(f"{server.url}/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            raw = res.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    if not body.get("stream"):
        return 200, json.loads(raw)
    return 200, [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def _refusals(server: Server) -> None:
    for change, param, says in REFUSED:
        status, out = _post(server, {**ASK, **change})
        assert status == 400 and out["error"]["param"] == param and says in out["error"]["message"], (change, out)
        assert not errors("ErrorResponse", out)


def test_every_chat_parameter_works_or_is_refused(tmp_path, tiny_model):
    validate = _validators()  # OpenAI's spec, its `nullable: true` read as OpenAPI 3.0 means it
    server = Server(tmp_path / "data", tiny_model).start()
    try:
        status, raw = _post(server, {**ASK, **EVERYTHING, "max_tokens": 30})
        assert status == 200
        validate("CreateChatCompletionResponse", raw)
        answer = client(server).chat.completions.create(**{**ASK, **EVERYTHING, "max_tokens": 30})
        assert [c.index for c in answer.choices] == [0, 1]
        for choice in answer.choices:
            assert choice.finish_reason == "stop" and set(json.loads(choice.message.content)) == {"answer", "ok"}
            tokens = choice.logprobs.content
            assert tokens and all(len(t.top_logprobs) <= 3 and t.logprob <= 0 for t in tokens)
            assert b"".join(bytes(t.bytes) for t in tokens).decode().strip() == choice.message.content
        assert answer.usage.completion_tokens == sum(len(c.logprobs.content) + 1 for c in answer.choices)  # and each one's end token

        stream = {**ASK, **EVERYTHING, "max_tokens": 30, "stream": True, "stream_options": {"include_usage": True}}
        status, chunks = _post(server, stream)
        assert status == 200 and {c["choices"][0]["index"] for c in chunks if c["choices"]} == {0, 1}
        for chunk in chunks:
            validate("CreateChatCompletionStreamResponse", chunk)
        pieces = list(client(server).chat.completions.create(**stream))
        for choice in answer.choices:  # the same seed: the stream's choice i is the answer's choice i
            mine = [p.choices[0] for p in pieces if p.choices and p.choices[0].index == choice.index]
            assert "".join(c.delta.content or "" for c in mine).strip() == choice.message.content
            assert [t.logprob for c in mine if c.logprobs for t in c.logprobs.content] == [t.logprob for t in choice.logprobs.content]
            assert [c.finish_reason for c in mine][-1] == "stop"
        assert pieces[-1].usage.completion_tokens == answer.usage.completion_tokens
        _refusals(server)
    finally:
        server.stop()


def test_the_vllm_engine_gets_the_parameters_and_refuses_the_same(tmp_path, tiny_model):
    stub = VllmStub().start()
    server = Server(tmp_path / "data", tiny_model, ("--engine", "vllm", "--vllm-url", stub.url)).start()
    try:
        answer = client(server).chat.completions.create(**{**ASK, **EVERYTHING})
        assert answer.model == "default"
        sent = stub.chats[-1]
        assert {k: sent[k] for k in EVERYTHING} == EVERYTHING  # forwarded whole: vLLM does each itself
        before = len(stub.chats)
        _refusals(server)
        assert len(stub.chats) == before
        with pytest.raises(openai.BadRequestError):
            client(server).chat.completions.create(**{**ASK, "n": 9})
    finally:
        server.stop()
        stub.stop()
