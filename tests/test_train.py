"""End-to-end runs of the local backend on a tiny model (2 layers x 64, the real tokenizer)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import WORDS, run_cli, write_chat_data
from tunejob.train.checkpoint import list_checkpoints
from tunejob.monitor.metrics import read_metrics


def write_spec(path: Path, model: Path, train: Path, out: Path, extra: str = "", validation: Path | None = None) -> Path:
    val = f", validation: {validation}" if validation else ", val_fraction: 0.2"
    path.write_text(
        f"model: {model}\n"
        f"data: {{train: {train}{val}}}\n"
        f"output_dir: {out}\n" + extra
    )
    return path


def random_pairs(path: Path, n: int, seed: int) -> Path:
    """Answers unrelated to questions: only memorisable, so validation loss must rise."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(4))
            a = " ".join(rng.choice(WORDS) for _ in range(6))
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return path


def test_run_trains_and_writes_a_complete_run_dir(tmp_path, tiny_model):
    data = write_chat_data(tmp_path / "d.jsonl", 40)
    out = tmp_path / "run"
    spec = write_spec(tmp_path / "job.yaml", tiny_model, data, out,
                      "hyperparameters: {epochs: 2, batch_size: 4, gradient_accumulation: 2, learning_rate: 0.01, max_seq_len: 64}\n"
                      "lora: {r: 4}\ncheckpointing: {eval_steps: 4, save_steps: 8}\n")
    res = run_cli("run", str(spec))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert "trainable parameters: " in res.stderr and "%" in res.stderr
    # 32 train examples / batch 4 = 8 steps per epoch, 16 in all.
    assert summary["total_steps"] == 16 and summary["steps"] == 16 and summary["stop_reason"] == "completed"
    steps = [s for s, _ in list_checkpoints(out)]
    assert {8, 16} <= set(steps)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8, 12, 16]
    best = min(evals, key=lambda r: r["valid_loss"])
    assert summary["best_step"] == best["step"] and summary["best_valid_loss"] == pytest.approx(best["valid_loss"])
    assert (out / "best").resolve().name == f"step-{best['step']:06d}"
    assert set(steps) - {8, 16} <= {r["step"] for r in evals}  # extra checkpoints only at new bests
    trains = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in trains] == list(range(1, 17))
    assert trains[-1]["train_loss"] < trains[0]["train_loss"]
    for field in ("train_loss", "train_mean_token_accuracy", "learning_rate", "tokens_seen", "epoch"):
        assert field in trains[0]
    for _, ck in list_checkpoints(out):
        for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json", "config.yaml"):
            assert (ck / name).is_file(), f"{ck.name} lacks {name}"
    # LoRA B starts at zero: non-zero now means the adapter was trained.
    weights = load_file(str(out / "best" / "adapter_model.safetensors"))
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and all(float(v.abs().sum()) > 0 for v in b)
    assert "gradient_accumulation: 2" in (out / "config.yaml").read_text()


def test_early_stopping_fires_on_an_overfitting_run_and_keeps_the_earlier_best(tmp_path, tiny_model):
    train = random_pairs(tmp_path / "t.jsonl", 16, seed=1)
    val = random_pairs(tmp_path / "v.jsonl", 8, seed=2)
    out = tmp_path / "run"
    spec = write_spec(tmp_path / "job.yaml", tiny_model, train, out,
                      # fp32: this overfitting curve was chosen in fp32 (in bf16 the first rise after the best
                      # lands at 0.97%, just under diagnose's 1% margin); bf16 parity: tests/test_precision.py
                      "hyperparameters: {epochs: 40, batch_size: 4, learning_rate: 0.01, max_seq_len: 64, warmup: 0, mixed_precision: 'no'}\n"
                      "lora: {r: 16, target_modules: all-linear, dropout: 0}\n"
                      "checkpointing: {eval_steps: 8, save_steps: 8, early_stopping_patience: 2}\n", validation=val)
    res = run_cli("run", str(spec))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["stop_reason"] == "early_stopping"
    assert summary["steps"] < summary["total_steps"] == 160
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    losses = [r["valid_loss"] for r in evals]
    best_i = losses.index(min(losses))
    assert len(losses) - 1 - best_i == 2, "stopped exactly 2 evaluations after the best"
    assert summary["best_step"] == evals[best_i]["step"] < summary["steps"]
    assert (out / "best").resolve().name == f"step-{summary['best_step']:06d}"
    trains = [r["train_loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert trains[-1] < trains[0] - 2, "training loss kept falling while validation rose"
    assert "early stopping" in res.stderr
    diag = run_cli("diagnose", str(out), "--json")
    assert diag.returncode == 0
    verdict = json.loads(diag.stdout)
    assert verdict["verdict"] == "overfitting", verdict
    assert f"use the checkpoint of step {summary['best_step']}" in verdict["findings"][0]["advice"]


def test_target_module_that_matches_nothing_names_the_ones_that_exist(tmp_path, tiny_model):
    data = write_chat_data(tmp_path / "d.jsonl", 20)
    spec = write_spec(tmp_path / "job.yaml", tiny_model, data, tmp_path / "run", "lora: {target_modules: [qkv_proj]}\n")
    res = run_cli("run", str(spec))
    assert res.returncode == 2
    assert "qkv_proj not found in the base model" in res.stderr and "q_proj" in res.stderr
    assert "Traceback" not in res.stderr


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_best(tmp_path, tiny_model):
    data = write_chat_data(tmp_path / "d.jsonl", 40)
    out = tmp_path / "run"
    spec = write_spec(tmp_path / "job.yaml", tiny_model, data, out,
                      "hyperparameters: {epochs: 50, batch_size: 4, learning_rate: 0.01, max_seq_len: 64, warmup: 0}\n"
                      "checkpointing: {eval_steps: 2, save_steps: 2}\n")
    res = run_cli("run", str(spec), "--set", "hyperparameters.max_steps=4")
    assert res.returncode == 0, res.stderr
    best_before = json.loads((out / "summary.json").read_text())["best_step"]
    # Poison the optimizer state of the last checkpoint: the first update after resume writes NaN
    # into the adapter, so the loss of the following step is NaN.
    opt_path = out / "checkpoints" / "step-000004" / "optimizer.pt"
    opt = torch.load(opt_path, weights_only=False)
    for st in opt["state"].values():
        st["exp_avg"].fill_(float("nan"))
    torch.save(opt, opt_path)
    res = run_cli("run", str(spec), "--set", "hyperparameters.max_steps=10")
    assert res.returncode == 2, res.stderr
    assert "became NaN/inf at step 6" in res.stderr and f"best checkpoint (step {best_before}" in res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "nan_loss" and summary["best_step"] == best_before
    assert (out / "best").resolve().name == f"step-{best_before:06d}"
    assert "Traceback" not in res.stderr


def _wait_for(predicate, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


RESUME_EXTRA = ("hyperparameters: {epochs: 3, batch_size: 4, learning_rate: 0.01, max_seq_len: 64}\n"
                "lora: {r: 8, dropout: 0.1}\ncheckpointing: {eval_steps: 4, save_steps: 4, early_stopping_patience: null}\n")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """(data, run dir) of the 36-step run the interrupted-and-resumed runs must reproduce."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    data = write_chat_data(tmp / "d.jsonl", 60)
    ref = run_cli("run", str(write_spec(tmp / "ref.yaml", tiny_model, data, tmp / "ref", RESUME_EXTRA)))
    assert ref.returncode == 0, ref.stderr
    return data, tmp / "ref"


def _assert_same_run(out: Path, ref_out: Path) -> None:
    got = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"}
    want = {r["step"]: r for r in read_metrics(ref_out / "metrics.jsonl") if r["kind"] == "train"}
    assert sorted(got) == sorted(want) == list(range(1, 37))
    for step in want:
        assert abs(got[step]["train_loss"] - want[step]["train_loss"]) < 1e-4, step
    a = load_file(str(ref_out / "checkpoints" / "step-000036" / "adapter_model.safetensors"))
    b = load_file(str(out / "checkpoints" / "step-000036" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path, tiny_model, uninterrupted):
    data, ref_out = uninterrupted
    out = tmp_path / "killed"
    spec = write_spec(tmp_path / "job.yaml", tiny_model, data, out, RESUME_EXTRA)
    proc = subprocess.Popen([sys.executable, "-m", "tunejob", "run", str(spec)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    assert _wait_for(lambda: any(s >= 8 for s, _ in list_checkpoints(out)), 300), "no checkpoint appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(s for s, _ in list_checkpoints(out))
    assert killed_at < 36, "the run finished before it could be killed; make it longer"

    res = run_cli("run", str(spec))  # resumes by default: the output dir holds checkpoints
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stderr
    _assert_same_run(out, ref_out)


def _train_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path) if r["kind"] == "train"] if path.is_file() else []


def test_sigterm_checkpoints_the_step_in_flight_and_resume_loses_no_step(tmp_path, tiny_model, uninterrupted):
    """serve's pause and cancel send SIGTERM: the run stops after the step in flight with a checkpoint
    of it (between save_steps), exits 143, and the resumed run repeats the uninterrupted one."""
    data, ref_out = uninterrupted
    out = tmp_path / "paused"
    spec = write_spec(tmp_path / "job.yaml", tiny_model, data, out, RESUME_EXTRA)
    proc = subprocess.Popen([sys.executable, "-m", "tunejob", "run", str(spec)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=os.environ.copy())
    assert _wait_for(lambda: any(s >= 5 for s in _train_steps(out)), 300), "training never reached step 5"
    proc.send_signal(signal.SIGTERM)  # mid-interval: the next save_steps checkpoint is step 8
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, stderr
    assert "stopped on request (SIGTERM)" in stderr
    stopped_at = max(_train_steps(out))
    assert 5 <= stopped_at < 36 and max(s for s, _ in list_checkpoints(out)) == stopped_at  # no trained step lost

    res = run_cli("run", str(spec))
    assert res.returncode == 0, res.stderr
    assert f"(step {stopped_at})" in res.stderr  # resumed from the stop's own checkpoint
    _assert_same_run(out, ref_out)


def test_no_resume_refuses_to_overwrite(tmp_path, tiny_model):
    data = write_chat_data(tmp_path / "d.jsonl", 20)
    spec = write_spec(tmp_path / "job.yaml", tiny_model, data, tmp_path / "run",
                      "hyperparameters: {max_steps: 2, batch_size: 4, max_seq_len: 64}\ncheckpointing: {eval_steps: 2, save_steps: 2}\n")
    assert run_cli("run", str(spec)).returncode == 0
    res = run_cli("run", str(spec), "--no-resume")
    assert res.returncode == 2 and "already holds checkpoints" in res.stderr


def test_qlora_gradients_stay_nonzero_after_an_eval(tmp_path, tiny_model):
    """bitsandbytes on AVX512-BF16 CPUs repacks 4-bit weights in eval and zeroes LoRA grads."""
    import bitsandbytes as bnb

    from tunejob.train.models import load_tokenizer
    from tunejob.data.sequences import encode_examples
    from tunejob.spec import parse_spec
    from tunejob.train.adapter import add_lora, load_model
    from tunejob.train.batches import make_collator
    from tunejob.train.loss import evaluate, forward_loss

    spec = parse_spec(f"model: {tiny_model}\ndata: {{train: x}}\nquantization: 4bit\nlora: {{target_modules: all-linear}}\n")
    model = add_lora(spec, load_model(spec, str(tiny_model), torch.device("cpu")))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert all(m.support_avx512bf16_for_cpu is False for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    tok = load_tokenizer(str(tiny_model))
    data = write_chat_data(tmp_path / "d.jsonl", 8)
    seqs, _ = encode_examples(tok, [json.loads(line) for line in data.read_text().splitlines()], 64)
    collate = make_collator(tok.pad_token_id)

    def lora_grad_norm() -> float:
        model.zero_grad()
        loss, n, _ = forward_loss(model, collate(seqs[:4]))
        (loss / n).backward()
        return sum(float(p.grad.abs().sum()) for name, p in model.named_parameters() if "lora_" in name and p.grad is not None)

    assert lora_grad_norm() > 0
    evaluate(model, seqs, collate, 4, torch.device("cpu"))
    model.generate(**{k: v for k, v in collate(seqs[:1]).items() if k in ("input_ids", "attention_mask")}, max_new_tokens=3)
    assert lora_grad_norm() > 0


def test_qlora_run_end_to_end(tmp_path, tiny_model):
    data = write_chat_data(tmp_path / "d.jsonl", 20)
    out = tmp_path / "run"
    spec = write_spec(tmp_path / "job.yaml", tiny_model, data, out,
                      "hyperparameters: {max_steps: 4, batch_size: 4, learning_rate: 0.01, max_seq_len: 64}\n"
                      "quantization: 4bit\nlora: {target_modules: all-linear}\ncheckpointing: {eval_steps: 2, save_steps: 2}\n")
    res = run_cli("run", str(spec))
    assert res.returncode == 0, res.stderr
    trains = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert len(trains) == 4 and all(0 < r["train_loss"] < 100 for r in trains)
    weights = load_file(str(out / "best" / "adapter_model.safetensors"))
    assert all(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)


def test_evaluate_leaves_the_model_in_the_mode_it_found(tmp_path, tiny_model):
    """loss.evaluate used to end with model.train(), so a caller in eval mode (the evaluation's
    two sides) had dropout on afterwards unless it knew to switch back."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunejob.data.sequences import encode_examples
    from tunejob.train.batches import make_collator
    from tunejob.train.loss import evaluate
    from tunejob.train.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    data = write_chat_data(tmp_path / "d.jsonl", 4)
    seqs, _ = encode_examples(tok, [json.loads(line) for line in data.read_text().splitlines()], 64)
    for mode in (False, True):
        model.train(mode)
        loss, _ = evaluate(model, seqs, make_collator(tok.pad_token_id), 2, torch.device("cpu"))
        assert loss > 0 and model.training is mode and all(m.training is mode for m in model.modules())
