"""tunejob serve's `method`: dpo trained from the official openai SDK over real HTTP, the job
object echoing `method` against OpenAI's OpenAPI schema, and files that do not fit a method refused with a 400."""

from __future__ import annotations

import openai
import pytest

from conftest import write_chat_data
from test_dpo_train import DPO_FIELDS, write_pairs
from test_serve import Server, client, wait_status
from test_serve_conformance import _validators


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    s = Server(tmp_path_factory.mktemp("serve-dpo") / "data", tiny_model).start()
    yield s
    s.stop()


def test_sdk_dpo_job_trains_echoes_method_and_streams_rewards(server, tmp_path):
    c = client(server)
    f = c.files.create(file=open(write_pairs(tmp_path / "pairs.jsonl", 24), "rb"), purpose="fine-tune")
    assert f.status == "processed"
    method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 50}}}
    job = c.fine_tuning.jobs.create(training_file=f.id, model="gpt-4o-mini-2024-07-18", method=method, seed=1,
                                    extra_body={"tunejob": {"hyperparameters": {"max_seq_len": 64},
                                                            "checkpointing": {"eval_steps": 5, "save_steps": 5}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.method.dpo.hyperparameters.n_epochs == 2 and job.method.supervised is None
    done = wait_status(c, job.id, ("succeeded",), timeout=300)
    assert done.method.type == "dpo" and done.fine_tuned_model
    validate = _validators()
    validate("FineTuningJob", done.model_dump(exclude_unset=True))
    events = c.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e.data for e in events if e.type == "metrics"]
    assert any(all(k in d for k in DPO_FIELDS) for d in metrics)
    assert any(all(f"valid_{k}" in d for k in DPO_FIELDS) for d in metrics)
    checkpoint = c.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    assert "rewards_margin" in checkpoint.metrics.model_dump()
    # the worker ran the spec with method dpo and the beta asked for
    config = (server.data_dir / "jobs" / job.id / "run" / "config.yaml").read_text()
    assert "type: dpo" in config and "beta: 0.2" in config


def test_method_errors_are_400s_in_openais_shape(server, tmp_path):
    c = client(server)
    chat = c.files.create(file=open(write_chat_data(tmp_path / "chat.jsonl", 12), "rb"), purpose="fine-tune")
    pairs = c.files.create(file=open(write_pairs(tmp_path / "pairs.jsonl", 12), "rb"), purpose="fine-tune")
    cases = [
        (dict(training_file=chat.id, method={"type": "reinforcement", "reinforcement": {"grader": {
            "type": "string_check", "name": "s", "input": "{{sample.output_text}}", "reference": "x", "operation": "eq"}}}),
         "training_file", "method reinforcement trains on prompts"),
        (dict(training_file=chat.id, method={"type": "dpo", "dpo": {}}), "training_file", "method dpo trains on preference pairs"),
        (dict(training_file=pairs.id, method={"type": "supervised"}), "training_file", "method supervised trains on chat examples"),
        (dict(training_file=pairs.id), "training_file", "method supervised trains on chat examples"),
        (dict(training_file=pairs.id, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 3}}}), "method.dpo.hyperparameters.beta", "beta"),
        (dict(training_file=pairs.id, method={"type": "dpo", "supervised": {}}), "method", "method.supervised is given but method.type is 'dpo'"),
    ]
    for kwargs, param, words in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            c.fine_tuning.jobs.create(model="gpt-4o-mini-2024-07-18", **kwargs)
        err = exc.value.body
        assert err["param"] == param and words in err["message"], (kwargs, err)
        assert set(err) >= {"message", "type", "param", "code"}
