"""The training loop's rules: finished runs stay finished, the clip norm comes from the spec,
QLoRA adapters answer on their 4-bit base, bad templates stop before training in one line, and
the function-calling example trains."""

from __future__ import annotations

import json
import shutil

from conftest import REPO, run_cli, write_chat_data
from test_tool_calls import QWEN3_STYLE
from test_train import write_spec
from tunejob.monitor.metrics import read_metrics


def test_rerunning_a_finished_run_changes_nothing_until_the_spec_asks_for_more(tmp_path, tiny_model):
    data = write_chat_data(tmp_path / "d.jsonl", 20)
    out = tmp_path / "run"
    spec = write_spec(tmp_path / "job.yaml", tiny_model, data, out,
                      # no early stopping: the continued run must reach step 8 whatever its losses do
                      "hyperparameters: {epochs: 1, batch_size: 4, max_seq_len: 64}\n"
                      "checkpointing: {eval_steps: 2, save_steps: 2, early_stopping_patience: null}\n")
    assert run_cli("run", str(spec)).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = run_cli("run", str(spec))
    assert again.returncode == 0, again.stderr
    assert "completed all its steps" in again.stderr and "hyperparameters.epochs" in again.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing on disk changed
    more = run_cli("run", str(spec), "--set", "hyperparameters.epochs=2")
    assert more.returncode == 0, more.stderr
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 9))  # 16 examples / 4 = 4 steps an epoch, continued to 8


def test_max_grad_norm_comes_from_the_spec(tmp_path, tiny_model, monkeypatch):
    import torch

    from tunejob.spec import load_spec
    from tunejob.train.trainer import train

    seen = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, **kw: seen.append(max_norm) or real(params, max_norm, **kw))
    data = write_chat_data(tmp_path / "d.jsonl", 10)
    spec = write_spec(tmp_path / "job.yaml", tiny_model, data, tmp_path / "run",
                      "hyperparameters: {max_steps: 2, batch_size: 4, max_seq_len: 64, max_grad_norm: 0.25}\n"
                      "checkpointing: {eval_steps: 2, save_steps: 2}\n")
    train(load_spec(spec), say=lambda *_: None)
    assert seen == [0.25, 0.25]
    bad = run_cli("plan", str(spec), "--set", "hyperparameters.max_grad_norm=0")
    assert bad.returncode == 2 and "max_grad_norm" in bad.stderr and "Traceback" not in bad.stderr


def test_a_template_that_rewrites_earlier_turns_stops_the_run_in_one_line(tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = QWEN3_STYLE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    data = tmp_path / "d.jsonl"
    turn = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>because</think>a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    data.write_text("\n".join(json.dumps({"messages": turn[:2] + [{"role": "user", "content": f"q{i}"}, turn[3]]}) for i in range(12)) + "\n")
    spec = write_spec(tmp_path / "job.yaml", model, data, tmp_path / "run", "hyperparameters: {max_steps: 1, max_seq_len: 64}\n")
    res = run_cli("run", str(spec))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    error = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "renders this turn differently" in error[0] and "train_on: all" in error[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_qlora_adapter_answers_on_its_4bit_base(tmp_path, tiny_model):
    import bitsandbytes as bnb

    from tunejob.evaluate.chat import load_for_chat

    data = write_chat_data(tmp_path / "d.jsonl", 10)
    out = tmp_path / "run"
    spec = write_spec(tmp_path / "job.yaml", tiny_model, data, out,
                      "hyperparameters: {max_steps: 2, batch_size: 4, max_seq_len: 64}\nquantization: 4bit\n"
                      "checkpointing: {eval_steps: 2, save_steps: 2}\n")
    assert run_cli("run", str(spec)).returncode == 0
    model, _ = load_for_chat(out)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    merged, _ = load_for_chat(out, merge=True)  # export folds the adapter into plain weights
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())


def test_the_function_calling_example_plans_and_trains(tmp_path, tiny_model):
    from tunejob.data.dataset import load_examples
    from tunejob.data.sequences import encode_examples
    from tunejob.train.models import load_tokenizer

    example = REPO / "examples" / "function_calling.yaml"
    over = ["--set", f"model={tiny_model}", "--set", f"output_dir={tmp_path / 'run'}"]
    plan = run_cli("plan", str(example), "--json", *over)
    assert plan.returncode == 0, plan.stderr
    figures = json.loads(plan.stdout)
    assert figures["tool_rendering"] == "fallback"
    # every call's name and JSON arguments are trained, so the trained count holds them all
    tok = load_tokenizer(str(tiny_model))
    examples = load_examples(REPO / "examples" / "data" / "function_calling.jsonl")
    seqs, stats = encode_examples(tok, examples, 1024)
    texts = [tok.decode([t for t, lab in zip(s.input_ids, s.labels) if lab != -100]) for s in seqs]
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for ex in examples for m in ex["messages"] for c in m.get("tool_calls") or []]
    assert calls and all(any(name in t and json.dumps(args) in t for t in texts) for name, args in calls)
    assert figures["trained_tokens_per_epoch"] < stats.trained_tokens  # the train split only
    run = run_cli("run", str(example), *over, "--set", "hyperparameters.max_steps=2", "--set", "checkpointing.eval_steps=2",
                  "--set", "checkpointing.save_steps=2")
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["trained_tokens"] > 0
