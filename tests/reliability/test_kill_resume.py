"""Kill and resume (issue 10, part 2): SIGKILL `tunejob run` at 10 seeded points, among them
during a checkpoint save and during an evaluation; resume after each; the finished run must match
an uninterrupted one (train loss per step within 1e-4, final adapter weights within 1e-5)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import run_cli, write_chat_data
from tunejob.monitor.metrics import read_metrics

EXTRA = ("hyperparameters: {epochs: 3, batch_size: 4, learning_rate: 0.01, max_seq_len: 64}\n"
         "lora: {r: 8, dropout: 0.1}\ncheckpointing: {eval_steps: 4, save_steps: 4, early_stopping_patience: null}\n")
TOTAL = 36  # 60 examples, 20% validation -> 48 train / batch 4 = 12 steps per epoch, 3 epochs
RESUMING = re.compile(r"resuming from (\S+) \(step (\d+)\)")


def write_spec(path: Path, model: Path, train: Path, out: Path) -> Path:
    path.write_text(f"model: {model}\ndata: {{train: {train}, val_fraction: 0.2}}\noutput_dir: {out}\n" + EXTRA)
    return path


def _train_steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    steps = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written
        if rec.get("kind") == "train":
            steps.append(rec["step"])
    return steps


def _kill_when(proc: subprocess.Popen, predicate, timeout: float = 240) -> bool:
    """SIGKILL the run as soon as `predicate()` holds; False when the run ended first."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if predicate():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    proc.wait(timeout=60)
    return False


@pytest.mark.slow
def test_ten_sigkills_then_resume_match_the_uninterrupted_run(tmp_path, tiny_model):
    data = write_chat_data(tmp_path / "d.jsonl", 60)
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    ref = run_cli("run", str(write_spec(tmp_path / "ref.yaml", tiny_model, data, ref_out)))
    assert ref.returncode == 0, ref.stderr
    spec = write_spec(tmp_path / "job.yaml", tiny_model, data, out)
    ckdir, metrics = out / "checkpoints", out / "metrics.jsonl"

    rng = random.Random(10)
    modes = ["save", "eval"] * 3 + ["step"] * 4  # 10 kills: 3 during a save, 3 during an eval, 4 after a random step
    rng.shuffle(modes)
    kills: dict[str, int] = {"save": 0, "eval": 0, "step": 0}
    resumed_from: list[str] = []
    for i, mode in enumerate(modes):
        log = tmp_path / f"run{i}.err"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "tunejob", "run", str(spec)], stdout=subprocess.DEVNULL, stderr=err)
        seen = len(_train_steps(metrics))
        start = max(_train_steps(metrics) or [0])  # the records a resume keeps are truncated at its step
        if mode == "save":
            # A save is a few tens of ms on this model: poll for the temporary directory.
            pred = lambda: ckdir.is_dir() and any(p.name.startswith(".tmp-") for p in ckdir.iterdir())  # noqa: E731
        elif mode == "eval":
            # The train record of an eval step is written just before its evaluation starts.
            pred = lambda: any(s % 4 == 0 and s > start for s in _train_steps(metrics)[seen:])  # noqa: E731
        else:
            target = start + rng.randint(1, 6)
            pred = lambda: any(s >= target for s in _train_steps(metrics)[seen:])  # noqa: E731
        if _kill_when(proc, pred):
            kills[mode] += 1
        resumed_from += RESUMING.findall(log.read_text())
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    final = run_cli("run", str(spec))
    assert final.returncode == 0, final.stderr
    resumed_from += RESUMING.findall(final.stderr)
    print(f"\n[kill-resume] kills by mode: {kills}; resumes: {len(resumed_from)}: {[int(s) for _, s in resumed_from]}")
    assert sum(kills.values()) >= 8, kills  # a run may rarely finish a save before the poll sees it
    assert kills["eval"] >= 1 and kills["save"] >= 1, kills

    # Every resume loaded a complete step-NNNNNN directory, never a .tmp- one.
    for path, step in resumed_from:
        p = Path(path)
        assert re.fullmatch(r"step-\d{6}", p.name) and ".tmp-" not in path, path
        assert int(p.name[5:]) == int(step) and (p / "state.json").is_file() and (p / "adapter_model.safetensors").is_file()
    assert not [p for p in ckdir.iterdir() if p.name.startswith(".tmp-")], "a temporary checkpoint dir was left behind"

    got = {r["step"]: r["train_loss"] for r in read_metrics(metrics) if r["kind"] == "train"}
    want = {r["step"]: r["train_loss"] for r in read_metrics(ref_out / "metrics.jsonl") if r["kind"] == "train"}
    assert sorted(got) == sorted(want) == list(range(1, TOTAL + 1))
    worst = max(abs(got[s] - want[s]) for s in want)
    a = load_file(str(ref_out / "checkpoints" / f"step-{TOTAL:06d}" / "adapter_model.safetensors"))
    b = load_file(str(out / "checkpoints" / f"step-{TOTAL:06d}" / "adapter_model.safetensors"))
    wdiff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"[kill-resume] max train-loss difference {worst:.2e} (tolerance 1e-4), max adapter weight difference {wdiff:.2e} (tolerance 1e-5)")
    assert worst < 1e-4 and wdiff < 1e-5 and set(a) == set(b)
