"""DPO on the local backend: the loss against TRL's own DPOTrainer, a run that learns a held-out
rule, the loop's guarantees (best checkpoint, SIGKILL resume within 1e-4), QLoRA, `tunejob eval`."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import WORDS, run_cli
from test_train import _wait_for
from tunejob.monitor.metrics import read_metrics
from tunejob.train.checkpoint import list_checkpoints

DPO_FIELDS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")


GREEK = "alpha beta gamma delta epsilon theta lambda mu nu xi pi rho sigma tau".split()
NOUNS = "red blue green black white brown gray gold cat dog sun moon star tree".split()  # one token each, as the Greek names


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """The rule: answer by repeating the question's Greek letter names (preferred) rather than
    with the same number of everyday words (non-preferred). Both sides have the same token count,
    so a model's ranking is about the rule, not about length; a random tiny model has no reason
    to follow it (its ranking share is measured in the eval test)."""
    rng, seen = random.Random(seed), set()
    with open(path, "w") as f:
        while len(seen) < n:
            idx = [rng.randrange(len(GREEK)) for _ in range(4)]
            q = " ".join(GREEK[i] for i in idx)
            if q in seen:
                continue
            seen.add(q)
            f.write(json.dumps({"input": {"messages": [{"role": "user", "content": q}]},
                                "preferred_output": [{"role": "assistant", "content": q}],
                                "non_preferred_output": [{"role": "assistant", "content": " ".join(NOUNS[i] for i in idx)}]}) + "\n")
    return path


def write_dpo_spec(path: Path, model: Path, train: Path, out: Path, extra: str = "", val_fraction: float = 0.2) -> Path:
    path.write_text(f"model: {model}\ndata: {{train: {train}, val_fraction: {val_fraction}}}\noutput_dir: {out}\n"
                    "method: {type: dpo, beta: 0.1}\n" + extra)
    return path


# fp32 on every CPU (`auto` is bf16 where the CPU has bf16 units): the tests compare eval's numbers
# with the run's own to 1e-4, which bf16 rounding of differently batched forwards exceeds
RUN_EXTRA = ("hyperparameters: {epochs: 3, batch_size: 4, learning_rate: 0.02, max_seq_len: 64, mixed_precision: 'no'}\n"
             "lora: {r: 8, dropout: 0.1, target_modules: all-linear}\ncheckpointing: {eval_steps: 4, save_steps: 4, early_stopping_patience: null}\n")


# ---------------------------------------------------------------- the loss, against TRL


def test_loss_rewards_and_gradients_equal_trl_dpo_trainer(tmp_path, tiny_model):
    """TRL 1.16's DPOTrainer (its tokenisation, collator, fused LM head, reference by disabling
    the adapter it created) and tunejob's Dpo on the same pairs, model and adapter weights."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tunejob.data.sequences import Sequence
    from tunejob.data.preference import PairSequence
    from tunejob.train.batches import make_collator
    from tunejob.train.loss import LossPath
    from tunejob.train.preference import Dpo

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    rows = [{"prompt": [{"role": "user", "content": f"say {w}"}], "chosen": [{"role": "assistant", "content": w.upper()}],
             "rejected": [{"role": "assistant", "content": f"{w} is it, {w}"}]} for w in WORDS[:4]]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, beta=0.3, report_to=[], use_cpu=True,
                     gradient_checkpointing=False)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(tiny_model)), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    model = trainer.model
    for name, w in model.named_parameters():  # LoRA B starts at zero: give the policy something to differ by
        if "lora_B" in name:
            w.data.normal_(0, 0.5)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    trl_loss = trainer.compute_loss(model, batch)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    def seq(i: int) -> Sequence:  # TRL's own tokens, its completion mask as labels, padding removed
        keep = batch["attention_mask"][i].bool()
        ids, done = batch["input_ids"][i][keep], batch["completion_mask"][i][keep].bool()
        return Sequence(ids.tolist(), ids.masked_fill(~done, -100).tolist(), i, False)

    pairs = [PairSequence(seq(i), seq(i + 4), i) for i in range(4)]
    dpo = Dpo(0.3, LossPath(), make_collator(tok.pad_token_id), 1, torch.device("cpu"))
    sums = dpo.accumulate(model, pairs, len(pairs))
    metrics = trainer._metrics["train"]
    assert sums["loss"] / 4 == pytest.approx(trl_loss.item(), abs=1e-5) and trl_loss.item() < 0.6  # not ln 2: policy differs
    assert sums["chosen"] / 4 == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-5)
    assert sums["rejected"] / 4 == pytest.approx(metrics["rewards/rejected"][-1], abs=1e-5)
    assert sums["correct"] / 4 == pytest.approx(metrics["rewards/accuracies"][-1])
    for name, p in model.named_parameters():  # padded (TRL) vs one sequence per pass: float noise only
        if p.requires_grad:
            assert float((p.grad - trl_grads[name]).abs().max()) <= 1e-4 * float(trl_grads[name].abs().max()), name


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """(data, run dir) of a 45-step DPO run: 60 train pairs, 20 held out."""
    tmp = tmp_path_factory.mktemp("dpo")
    data = write_pairs(tmp / "pairs.jsonl", 80)
    res = run_cli("run", str(write_dpo_spec(tmp / "job.yaml", tiny_model, data, tmp / "run", RUN_EXTRA, val_fraction=0.25)))
    assert res.returncode == 0, res.stderr
    return data, tmp / "run"


def test_dpo_run_streams_reward_metrics_and_learns_the_held_out_rule(dpo_run):
    _, out = dpo_run
    records = read_metrics(out / "metrics.jsonl")
    trains = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in trains] == list(range(1, 46)) and [r["step"] for r in evals] == [*range(4, 45, 4), 45]
    for r in trains:
        assert all(k in r for k in DPO_FIELDS)
        assert r["rewards_margin"] == pytest.approx(r["rewards_chosen"] - r["rewards_rejected"])
    for r in evals:
        assert all(f"valid_{k}" in r for k in DPO_FIELDS)
    assert trains[0]["train_loss"] == pytest.approx(0.6931, abs=1e-3)  # the adapter starts at zero: policy == reference
    assert evals[-1]["valid_rewards_accuracy"] >= 0.9 and evals[-1]["valid_loss"] < 0.5
    summary = json.loads((out / "summary.json").read_text())
    best = min(evals, key=lambda r: r["valid_loss"])
    assert summary["best_step"] == best["step"] and (out / "best").resolve().name == f"step-{best['step']:06d}"


def test_dpo_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model, dpo_run):
    data, ref_out = dpo_run
    out = tmp_path / "killed"
    spec = write_dpo_spec(tmp_path / "job.yaml", tiny_model, data, out, RUN_EXTRA, val_fraction=0.25)
    proc = subprocess.Popen([sys.executable, "-m", "tunejob", "run", str(spec)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    assert _wait_for(lambda: any(s >= 8 for s, _ in list_checkpoints(out)), 300), "no checkpoint appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(s for s, _ in list_checkpoints(out)) < 45, "the run finished before it could be killed; make it longer"
    res = run_cli("run", str(spec))
    assert res.returncode == 0 and "resuming from" in res.stderr, res.stderr
    got = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if r["kind"] in ("train", "eval")}
    want = {r["step"]: r for r in read_metrics(ref_out / "metrics.jsonl") if r["kind"] in ("train", "eval")}
    assert sorted(got) == sorted(want)
    for step, r in want.items():
        for key in ("train_loss", "valid_loss", *DPO_FIELDS, *(f"valid_{k}" for k in DPO_FIELDS)):
            if key in r:
                assert abs(got[step][key] - r[key]) < 1e-4, (step, key)


def test_dpo_early_stopping_keeps_the_best(tmp_path, tiny_model):
    """Preferences at random (the preferred side is a coin flip): nothing generalises, so the
    validation loss rises once the train pairs are memorised."""
    rng = random.Random(3)
    rows = []
    for i in range(40):
        q = " ".join(rng.choice(WORDS) for _ in range(3)) + f" {i}"
        a, b = " ".join(rng.choice(WORDS) for _ in range(5)), " ".join(rng.choice(WORDS) for _ in range(5))
        rows.append({"input": {"messages": [{"role": "user", "content": q}]}, "preferred_output": [{"role": "assistant", "content": a}],
                     "non_preferred_output": [{"role": "assistant", "content": b + " x"}]})
    data = tmp_path / "random.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    spec = write_dpo_spec(tmp_path / "job.yaml", tiny_model, data, out,
                          "hyperparameters: {epochs: 20, batch_size: 8, learning_rate: 0.03, max_seq_len: 64}\nlora: {r: 8}\n"
                          "checkpointing: {eval_steps: 2, save_steps: 2, early_stopping_patience: 2}\n")
    res = run_cli("run", str(spec))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "early_stopping" and summary["steps"] < summary["total_steps"]
    assert (out / "best").resolve().name == f"step-{summary['best_step']:06d}"


def test_dpo_qlora_run(tmp_path, tiny_model):
    data = write_pairs(tmp_path / "pairs.jsonl", 20)
    out = tmp_path / "run"
    spec = write_dpo_spec(tmp_path / "job.yaml", tiny_model, data, out,
                          "quantization: 4bit\nlora: {target_modules: all-linear}\n"
                          "hyperparameters: {max_steps: 4, batch_size: 4, learning_rate: 0.01, max_seq_len: 64}\n"
                          "checkpointing: {eval_steps: 2, save_steps: 2}\n")
    res = run_cli("run", str(spec))
    assert res.returncode == 0, res.stderr
    trains = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert len(trains) == 4 and trains[0]["train_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert trains[-1]["rewards_margin"] != 0  # the adapter moved the policy away from the 4-bit reference


def test_dpo_run_report_and_diagnosis(dpo_run):
    from tunejob.monitor.report import load_run, write_report
    from tunejob.monitor.diagnose import diagnose

    _, out = dpo_run
    png, html = write_report(out)
    assert png.stat().st_size > 0 and html.is_file()
    # the run learned: none of DPO's failure patterns
    assert not {"margin_exploding", "flat", "divergence"} & {f["kind"] for f in diagnose(load_run(out)["records"])["findings"]}


def test_eval_reports_the_preference_ranking_share_of_base_and_fine_tuned(dpo_run):
    """`tunejob eval` on the run's held-out pairs: the base does not follow the rule, the
    fine-tuned model ranks the preferred output higher on (nearly) every pair, and its reward
    accuracy is the run's own last valid_rewards_accuracy (same code, best checkpoint)."""
    _, out = dpo_run
    res = run_cli("eval", str(out), "--max-new-tokens", "2", "--limit", "1")
    assert res.returncode == 0, res.stderr
    assert "preferred output ranked higher" in res.stdout
    result = json.loads((out / "eval.json").read_text())
    base, tuned = result["models"]["base"], result["models"]["finetuned"]
    assert result["scored_examples"] == 20
    assert base["preference_share"] <= 0.75 and tuned["preference_share"] >= 0.9
    assert tuned["reward_accuracy"] >= 0.9
    best = json.loads((out / "summary.json").read_text())["best_step"]
    at_best = next(r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval" and r["step"] == best)
    assert tuned["reward_accuracy"] == pytest.approx(at_best["valid_rewards_accuracy"])
    assert tuned["dpo_loss"] == pytest.approx(at_best["valid_loss"], abs=1e-4)


def test_dashboard_draws_the_reward_curves(dpo_run):
    """The local dashboard's job page, in headless Chromium: reward margin and accuracy on a second axis."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")
    from tunejob.server.run import free_port, wait_until_up

    _, out = dpo_run
    records = read_metrics(out / "metrics.jsonl")
    n_train, n_eval = sum(r["kind"] == "train" for r in records), sum(r["kind"] == "eval" for r in records)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tunejob", "dashboard", str(out), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", proc)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/jobs/{out.name}")
            page.wait_for_function("tjPointCount('chart') > 0")
            traces = page.evaluate("document.getElementById('chart').data.map(t => [t.name, t.yaxis || 'y', t.x.length])")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    on_y2 = {name: n for name, axis, n in traces if axis == "y2"}
    assert on_y2 == {"reward margin": n_train, "reward accuracy": n_train, "validation reward margin": n_eval, "validation reward accuracy": n_eval}
