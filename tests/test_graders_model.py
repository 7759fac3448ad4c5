"""Model graders (score_model, label_model) and text_similarity's cosine, over real HTTP on
127.0.0.1 against tests/vllm_stub.py's OpenAI-compatible stand-in, which checks every chat and
embeddings body against OpenAI's published schemas and answers what the test asks for. Not
`tunejob serve` itself: its models answer whatever a tiny model generates, after seconds of CPU
on this 2-core machine, and these tests need fixed answers (test_grader_routes.py grades with
the server's own models, through its forwarding engine)."""

from __future__ import annotations

import json
import math
import re
import time

import pytest

from openai_schema import errors, openapi
from test_graders import PAIRS, curl_body, score_model, similar
from tunejob.graders import GraderContext, GraderError, check_grader, grade, grade_many, make_sample, run_grader_response
from vllm_stub import BASE, VllmStub, letter_counts

RUN = "/fine_tuning/alpha/graders/run"


def answer_from_prompt(body: dict) -> str:
    """The judge's fixed answer: whatever the prompt holds between << and >>, else a JSON 1.0."""
    text = " ".join(m["content"] if isinstance(m["content"], str) else " ".join(p.get("text", "") for p in m["content"])
                    for m in body["messages"])
    found = re.search(r"<<(.*?)>>", text, re.S)
    return found.group(1) if found else '{"result": 1.0, "steps": [{"description": "same", "conclusion": "equal"}]}'


@pytest.fixture(scope="module")
def judge():
    stub = VllmStub(answer=answer_from_prompt).start()
    stub.adapters.update({"gpt-5-mini": "-", "gpt-audio": "-"})  # the spec examples' model names answer too
    yield stub
    stub.stop()


def judged(judge: VllmStub) -> GraderContext:
    return GraderContext(base_url=f"{judge.url}/v1", api_key="sk-test")



def test_every_run_example_request_grades_into_a_run_grader_response(judge):
    examples = openapi()["paths"][RUN]["post"]["x-oaiMeta"]["examples"]
    assert len(examples) == 3  # text alignment, image caption, audio
    for example in examples:
        body = curl_body(example["request"]["curl"])
        assert errors("RunGraderRequest", body) == [], example["title"]
        response = run_grader_response(body["grader"], body["model_sample"], body.get("item"), judged(judge))
        assert errors("RunGraderResponse", response) == [], example["title"]
        assert response["reward"] == 1.0 and not any(response["metadata"]["errors"].values()), (example["title"], response)
        documented = example.get("response")
        if documented:
            documented = json.loads(documented)
            assert response["reward"] == documented["reward"]
            assert set(response) == set(documented) and set(response["metadata"]) == set(documented["metadata"])
            assert set(response["metadata"]["errors"]) == set(documented["metadata"]["errors"])
    sent = judge.chats[-3:]
    assert sent[1]["messages"][0]["content"][1] == {"type": "image_url", "image_url": {"url": "https://example.com/dog-catching-ball.png", "detail": "high"}}
    assert sent[2]["messages"][0]["content"][1]["input_audio"] == {"data": "<base64-encoded mp3>", "format": "mp3"}  # a template in audio data


def test_the_documented_run_response_differs_from_its_schema_only_in_token_usage(judge):
    # The example's metadata.token_usage is an object; the schema (and the SDK) say integer or
    # null. Ours follows the schema: the total tokens; the object goes per model, as the example has it.
    example = openapi()["paths"][RUN]["post"]["x-oaiMeta"]["examples"][0]
    documented = json.loads(example["response"])
    assert [e.split(":")[0] for e in errors("RunGraderResponse", documented)] == ["metadata/token_usage"]
    body = curl_body(example["request"]["curl"])
    ours = run_grader_response(body["grader"], body["model_sample"], body["item"], judged(judge))
    assert ours["metadata"]["token_usage"] == 7 and ours["metadata"]["sampled_model_name"] == "gpt-5-mini"
    assert ours["model_grader_token_usage_per_model"] == {"gpt-5-mini": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "cached_tokens": 0}}
    assert judge.chats[-1]["temperature"] == 1 and judge.chats[-1]["seed"] == 42 and judge.chats[-1]["top_p"] == 1


def test_cosine_needs_an_embeddings_endpoint_and_uses_it(judge):
    with pytest.raises(GraderError, match="grader.evaluation_metric: cosine compares embeddings, and no embeddings endpoint"):
        check_grader(similar("cosine"))
    context = GraderContext(embeddings_base_url=f"{judge.url}/v1", embeddings_model="stub-embed", api_key="sk-test")
    results = grade_many(similar("cosine"), [make_sample(t) for t, _ in PAIRS], [{"reference": r} for _, r in PAIRS], context)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    assert [r.score for r in results] == pytest.approx([cos(letter_counts(t), letter_counts(r)) for t, r in PAIRS])


def test_score_model_reads_json_results_and_bare_numbers_clamped_to_the_range(judge):
    cases = [('{"result": 0.7, "steps": []}', None, 0.7), ("0.4", None, 0.4), ("```json\n{\"result\": 0.25}\n```", None, 0.25),
             ('{"result": 7}', None, 1.0), ('{"result": -3}', None, 0.0), ('{"result": 7}', [0, 10], 7.0)]
    for answer, span, expected in cases:
        grader = score_model("Reply <<{{item.reply}}>>", **({"range": span} if span else {}))
        result = grade(grader, make_sample("x"), {"reply": answer}, judged(judge))
        assert result.score == expected and not result.errors, (answer, result)
        assert result.token_usage == {BASE: {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "cached_tokens": 0}}


def test_score_model_sends_the_guides_response_format_and_the_sampling_params(judge):
    grader = score_model("Grade {{sample.output_text}} against {{item.ref}}",
                         sampling_params={"temperature": 0.2, "top_p": 0.9, "seed": 7, "max_completions_tokens": 64, "reasoning_effort": None})
    grade(grader, make_sample("Paris"), {"ref": "Paris"}, judged(judge))
    sent = judge.chats[-1]
    assert sent["messages"] == [{"role": "user", "content": "Grade Paris against Paris"}]
    assert (sent["temperature"], sent["top_p"], sent["seed"], sent["max_completion_tokens"]) == (0.2, 0.9, 7, 64)
    assert "reasoning_effort" not in sent and "max_completions_tokens" not in sent
    schema = sent["response_format"]["json_schema"]["schema"]
    assert sent["response_format"]["type"] == "json_schema" and schema["required"] == ["result", "steps"]
    assert schema["properties"]["steps"]["items"]["required"] == ["description", "conclusion"]


def test_score_model_parse_and_server_errors_score_0_with_their_flags(judge):
    bad = grade(score_model("<<I think it is pretty good>>"), make_sample("x"), {}, judged(judge))
    assert bad.score == 0.0 and bad.error_flags["model_grader_parse_error"] and "not a number" in bad.errors[0]
    gone = grade({**score_model("hi"), "model": "no-such-model"}, make_sample("x"), {}, judged(judge))
    assert gone.score == 0.0 and gone.error_flags["model_grader_server_error"]
    assert gone.error_flags["model_grader_server_error_details"].startswith("HTTP 404")
    unreachable = grade(score_model("hi"), make_sample("x"), {}, GraderContext(base_url="http://127.0.0.1:9/v1", api_key="k"))
    assert unreachable.error_flags["model_grader_server_error"] and "APIConnectionError" in unreachable.errors[0]
    missing = grade(score_model("{{item.nope}}"), make_sample("x"), {}, judged(judge))
    assert missing.error_flags["invalid_variable_error"] and not missing.error_flags["model_grader_server_error"]


def test_score_model_grades_a_training_step_concurrently(judge):
    answers = [f'{{"result": {i / 32}}}' for i in range(32)]
    started = time.monotonic()
    results = grade_many(score_model("<<{{item.reply}}>>"), [make_sample("x")] * 32, [{"reply": a} for a in answers], judged(judge))
    assert [r.score for r in results] == [i / 32 for i in range(32)]
    assert time.monotonic() - started < 20


def test_label_model_in_a_multi(judge):
    label = {"type": "label_model", "name": "mood", "model": BASE, "labels": ["positive", "neutral", "negative"], "passing_labels": ["positive"],
             "input": [{"role": "user", "content": "<<{{item.verdict}}>>"}]}
    grader = {"type": "multi", "name": "m", "graders": {"mood": label}, "calculate_output": "mood"}
    scores = [grade(grader, make_sample("x"), {"verdict": v}, judged(judge)) for v in ('{"result": "positive"}', "negative", "angry")]
    assert [s.score for s in scores] == [1.0, 0.0, 0.0] and scores[2].error_flags["model_grader_parse_error"]
    assert judge.chats[-1]["response_format"]["json_schema"]["schema"]["properties"]["result"]["enum"] == label["labels"]
