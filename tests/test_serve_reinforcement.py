"""Reinforcement fine-tuning through tunejob serve from the official openai SDK: a job with a grader
trains, echoes `method` (checked against OpenAI's schema), and streams its rewards in events,
checkpoints and the result file; score_model graders reach the server's own models; bad graders
and data that does not fit the grader are 400s in OpenAI's error shape."""

from __future__ import annotations

import json

import openai
import pytest

from conftest import WORDS
from test_serve import Server, client, wait_status
from test_serve_conformance import _validators

# one grader, not a multi: OpenAI's published schema types multi's `graders` as one grader where its
# guide (and tunejob) take a map, so a map-form multi would fail the FineTuningJob schema check below
GRADER = {"type": "text_similarity", "name": "near", "input": "{{sample.output_text}}", "reference": "{{item.word}}",
          "evaluation_metric": "fuzzy_match"}
METHOD = {"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {
    "n_epochs": 1, "batch_size": 2, "compute_multiplier": 0.5, "eval_interval": 3, "eval_samples": 2}}}
SMALL = {"tunejob": {"method": {"completion_tokens": 4}, "hyperparameters": {"max_seq_len": 64}}}


def write_prompts(path, n: int, field: str = "word"):
    with open(path, "w") as f:
        for w in WORDS[:n]:
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."}], field: w}) + "\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    s = Server(tmp_path_factory.mktemp("serve-rl") / "data", tiny_model).start()
    yield s
    s.stop()


def test_sdk_reinforcement_job_trains_and_reports_rewards(server, tmp_path):
    c = client(server)
    f = c.files.create(file=open(write_prompts(tmp_path / "p.jsonl", 12), "rb"), purpose="fine-tune")
    assert f.status == "processed"  # prompts without answers are a valid fine-tune file
    job = c.fine_tuning.jobs.create(training_file=f.id, model="gpt-4o-mini-2024-07-18", method=METHOD, seed=3, extra_body=SMALL)
    assert job.method.type == "reinforcement" and job.method.reinforcement.grader.type == "text_similarity"
    assert job.method.reinforcement.hyperparameters.compute_multiplier == 0.5
    done = wait_status(c, job.id, ("succeeded",), timeout=300)
    _validators()("FineTuningJob", done.model_dump(exclude_unset=True))
    metrics = [e.data for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"]
    train = [d for d in metrics if "train_reward_mean" in d]
    assert train and all({"kl", "completion_tokens_mean", "train_score_near"} <= set(d) for d in train)
    assert all(0 <= d["train_reward_mean"] <= 1 for d in train)
    assert any("valid_reward_mean" in d for d in metrics)
    checkpoint = c.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    assert "train_reward_mean" in checkpoint.metrics.model_dump()
    header = c.files.content(done.result_files[0]).text.splitlines()[0]
    assert header.endswith("train_reward_mean,valid_reward_mean")
    answer = c.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "Say alpha."}], max_tokens=4)
    assert answer.choices[0].message.content is not None


def test_score_model_graders_ask_the_servers_own_models(server, tmp_path):
    """The job's subprocess grades through this server's chat with the owner's key: the tiny
    model's answer is no score, so every answer scores 0 with a parse error, not a connection error."""
    c = client(server)
    f = c.files.create(file=open(write_prompts(tmp_path / "p.jsonl", 6), "rb"), purpose="fine-tune")
    judge = {"type": "score_model", "name": "judge", "model": "default", "range": [0, 1], "sampling_params": {"max_completions_tokens": 4},
             "input": [{"role": "user", "content": "Score 0-1 how well '{{sample.output_text}}' says {{item.word}}."}]}
    method = {"type": "reinforcement", "reinforcement": {"grader": judge, "hyperparameters": {"n_epochs": 1, "batch_size": 2, "compute_multiplier": 0.25}}}
    job = c.fine_tuning.jobs.create(training_file=f.id, model="default", method=method, extra_body=SMALL)
    wait_status(c, job.id, ("succeeded",), timeout=300)
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data]
    grader_lines = [m for m in messages if m.startswith("grader:")]
    assert grader_lines, messages
    assert not any("connect" in m.lower() or "401" in m or "api key" in m.lower() for m in grader_lines), grader_lines


def test_bad_graders_and_data_are_400s(server, tmp_path):
    c = client(server)
    good = c.files.create(file=open(write_prompts(tmp_path / "p.jsonl", 6), "rb"), purpose="fine-tune")
    other = c.files.create(file=open(write_prompts(tmp_path / "q.jsonl", 6, field="name"), "rb"), purpose="fine-tune")
    bad_formula = {"type": "multi", "name": "m", "calculate_output": "near.__class__", "graders": {"near": GRADER}}
    cases = [
        (good.id, {"type": "reinforcement", "reinforcement": {"grader": bad_formula}}, "method.reinforcement.grader", "calculate_output"),
        (good.id, {"type": "reinforcement", "reinforcement": {"grader": {**GRADER, "type": "nope"}}}, "method.reinforcement.grader", "nope"),
        (other.id, METHOD, "training_file", f"{other.id}:1: no 'word'"),  # the grader reads item.word, the lines have name
        (good.id, {"type": "reinforcement"}, "method", "grader"),
        (good.id, {"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": {"compute_multiplier": 11}}},
         "method.reinforcement.hyperparameters.compute_multiplier", "compute_multiplier"),
    ]
    for fid, method, param, words in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            c.fine_tuning.jobs.create(model="default", training_file=fid, method=method)
        err = exc.value.body
        assert err["param"] == param and words in err["message"], (method, err)
