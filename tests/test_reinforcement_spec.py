"""Reinforcement's spec and data: OpenAI's hyperparameters mapped onto local settings (and said),
conflicts in one line, the openai backend's request body against OpenAI's schema, and RFT data
validated with line numbers, including the item fields its grader reads."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from tunejob.data.validate import validate_file
from tunejob.spec import JobSpec
from tunejob.spec.reinforcement import group_size

GRADER = {"type": "string_check", "name": "city", "input": "{{sample.output_text}}", "reference": "{{item.answer.city}}", "operation": "ilike"}


def spec(method: dict, **top) -> JobSpec:
    return JobSpec.model_validate({"data": {"train": "x.jsonl"}, "method": {"type": "reinforcement", "grader": GRADER, **method}, **top})


def test_openai_hyperparameters_set_the_local_ones():
    s = spec({"hyperparameters": {"n_epochs": 2, "batch_size": 6, "eval_interval": 3, "learning_rate_multiplier": 0.5}})
    assert (s.hyperparameters.epochs, s.hyperparameters.batch_size) == (2, 6)
    assert (s.checkpointing.eval_steps, s.checkpointing.save_steps) == (3, 3)
    assert s.resolved_learning_rate() == pytest.approx(1e-4)  # 2e-4 x 0.5
    assert s.method.resolved_beta == 0.04  # GRPO's KL coefficient, not DPO's 0.1
    assert [group_size(m) for m in ("auto", 1, 0.5, 0.1, 2.5, 10)] == [8, 8, 4, 2, 20, 64]
    assert "compute_multiplier: auto" in s.to_yaml()  # the saved spec says what was asked


def test_conflicts_and_misplaced_keys_are_one_line_each():
    with pytest.raises(ValueError, match="method.hyperparameters.n_epochs: 2 disagrees with hyperparameters.epochs: 5"):
        spec({"hyperparameters": {"n_epochs": 2}}, hyperparameters={"epochs": 5})
    with pytest.raises(ValueError, match="grader: method reinforcement needs a grader"):
        JobSpec.model_validate({"data": {"train": "x.jsonl"}, "method": {"type": "reinforcement"}})
    with pytest.raises(ValueError, match="grader: applies to method type reinforcement only"):
        JobSpec.model_validate({"data": {"train": "x.jsonl"}, "method": {"type": "dpo", "grader": GRADER}})
    with pytest.raises(ValueError, match="compute_multiplier"):
        spec({"hyperparameters": {"compute_multiplier": 11}})


def test_the_openai_backends_body_fits_openais_schema():
    from openai_schema import errors
    from tunejob.backends.openai_api import request_body

    s = JobSpec.model_validate({"backend": "openai", "model": "o4-mini-2025-04-16", "data": {"train": "x.jsonl"},
                                "method": {"type": "reinforcement", "grader": GRADER, "hyperparameters": {"compute_multiplier": 2, "eval_samples": 3}}})
    body = request_body(s, "tag", "file-1", None)
    assert errors("CreateFineTuningJobRequest", body) == []
    section = body["method"]["reinforcement"]
    assert section["grader"] == GRADER and section["hyperparameters"]["compute_multiplier"] == 2


def _write(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_rft_data_problems_have_line_numbers(tmp_path):
    ok = {"messages": [{"role": "developer", "content": "Answer with the city."}, {"role": "user", "content": "Capital of Peru?"}],
          "answer": {"city": "Lima"}}
    path = _write(tmp_path / "d.jsonl", [ok, {**ok, "answer": {"town": "Lima"}},
                                         {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "answer": {"city": "x"}},
                                         {"prompt": "p", "completion": "c"}])
    report = validate_file(path, format="reinforcement", min_examples=1, item_fields=frozenset({"answer.city"}))
    lines = {p.kind: p.line for ps in report.problems.values() for p in ps}
    assert lines == {"missing_item_field": 2, "prompt_ends_with_answer": 3, "mixed_formats": 4}
    assert validate_file(_write(tmp_path / "ok.jsonl", [ok]), format="reinforcement", min_examples=1,
                         item_fields=frozenset({"answer.city"})).ok


def test_run_checks_grader_and_data_before_training(tmp_path):
    data = _write(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"}], "answer": {"town": "x"}} for i in range(4)])
    spec_path = tmp_path / "rl.yaml"
    spec_path.write_text(f"data: {{train: {data}}}\nmethod:\n  type: reinforcement\n  grader: {json.dumps(GRADER)}\n")
    res = run_cli("run", str(spec_path))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{data}:1" in res.stderr and "answer.city" in res.stderr
    bad = dict(GRADER, operation="contains")
    spec_path.write_text(f"data: {{train: {data}}}\nmethod:\n  type: reinforcement\n  grader: {json.dumps(bad)}\n")
    res = run_cli("run", str(spec_path))
    assert res.returncode == 2 and "operation" in res.stderr and "Traceback" not in res.stderr
