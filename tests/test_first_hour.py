"""What a new user hit in the first hour: library noise on stderr, counts that disagreed between
plan and run, errors reported against the wrong place or only later, a cost command that needed a
model the guide's own example does not name, and chat's system prompt and decoding."""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_cli, write_chat_data
from test_train import write_spec

# Every line tunejob itself prints while training (trainer, loss path, live view's plain lines).
OWN_LINE = re.compile(r"^(trainable parameters: |training \d+ examples|loss: |note: |warning: |resuming from |step \d+)")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("first-hour")
    data = write_chat_data(tmp / "d.jsonl", 20)
    spec = write_spec(tmp / "job.yaml", tiny_model, data, tmp / "run",
                      "hyperparameters: {max_steps: 2, batch_size: 4, max_seq_len: 64}\ncheckpointing: {eval_steps: 2, save_steps: 2}\n"
                      "lora: {target_modules: all-linear}\n")
    res = run_cli("run", str(spec))
    assert res.returncode == 0, res.stderr
    return spec, tmp / "run", res.stderr


def test_run_prints_only_tunejobs_own_lines(run):
    _, _, stderr = run
    strangers = [line for line in stderr.splitlines() if line.strip() and not OWN_LINE.match(line)]
    assert not strangers, f"library noise on stderr: {strangers}"


def test_quiet_silences_only_the_known_noise_and_verbose_shows_it(monkeypatch, caplog):
    import logging
    import warnings

    from tunejob.monitor.quiet import quiet

    def noise() -> list[str]:
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", append=True)  # after quiet()'s own filters, which then win
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from kernels-community")
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
            warnings.warn("the user's own warning", UserWarning)
        return [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]

    monkeypatch.delenv("TUNEJOB_VERBOSE", raising=False)
    with quiet():
        assert noise() == ["the user's own warning"]  # the user's warnings stay
    assert len(noise()) == 3  # and everything is back afterwards
    monkeypatch.setenv("TUNEJOB_VERBOSE", "1")
    with quiet():
        assert len(noise()) == 3


def test_plan_and_run_count_the_same_parameters(run):
    spec, run_dir, _ = run
    plan = json.loads(run_cli("plan", str(spec), "--json").stdout)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (plan["trainable_parameters"], plan["total_parameters"]) == (summary["trainable_parameters"], summary["total_parameters"])


def test_chat_defaults_to_the_runs_own_system_prompt(run):
    from tunejob.evaluate.chat import trained_system_prompt

    _, run_dir, _ = run
    assert trained_system_prompt(run_dir) == "Echo in capitals."  # every training example began with it
    res = run_cli("chat", str(run_dir), "alpha beta", "--max-new-tokens", "2")
    assert res.returncode == 0 and "system prompt: the run's own (Echo in capitals.)" in res.stderr
    none = run_cli("chat", str(run_dir), "alpha beta", "--max-new-tokens", "2", "--system", "")
    assert none.returncode == 0 and "system prompt" not in none.stderr


def test_a_bad_set_value_is_reported_against_the_set(run):
    spec, _, _ = run
    res = run_cli("plan", str(spec), "--set", "hyperparameters.epochs=two")
    assert res.returncode == 2 and "--set hyperparameters.epochs=two: hyperparameters.epochs: 'two' is invalid" in res.stderr
    assert f"{spec}:" not in res.stderr.split("problem in the job spec:")[1]


def test_too_few_examples_comes_with_the_other_errors_and_names_no_wrong_provider(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}]} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    report = json.loads(run_cli("validate", str(data), "--json").stdout)
    kinds = {g["kind"]: g for g in report["errors"]}
    assert {"invalid_json", "too_few_examples"} <= set(kinds)
    assert "OpenAI's minimum" in kinds["too_few_examples"]["problems"][0]["message"]
    bedrock = json.loads(run_cli("validate", str(data), "--json", "--format", "bedrock").stdout)
    text = json.dumps(bedrock)
    assert "too_few_examples" in text and "OpenAI" not in text


def test_the_guides_cost_example_needs_no_model():
    res = run_cli("cost", "--tokens", "400000", "--epochs", "3", "--price-per-1m", "8", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["training_cost_usd"] == pytest.approx(9.60)  # 400,000 / 1,000 x $0.008 x 3
    bad = run_cli("cost", "--tokens", "400000", "--epochs", "3")
    assert bad.returncode == 2 and "--price-per-1m" in bad.stderr and "Traceback" not in bad.stderr
