"""The metric stream's sinks: report (PNG + HTML), TensorBoard, the live view, watch."""

from __future__ import annotations

import io
import json
import subprocess
import os
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, write_chat_data
from tunejob.monitor.metrics import read_metrics


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    data = write_chat_data(tmp / "d.jsonl", 40)
    out = tmp / "run"
    (tmp / "job.yaml").write_text(
        f"name: tiny\nmodel: {tiny_model}\ndata: {{train: {data}, val_fraction: 0.2}}\noutput_dir: {out}\n"
        "hyperparameters: {epochs: 3, batch_size: 4, learning_rate: 0.01, max_seq_len: 64}\n"
        "checkpointing: {eval_steps: 4, save_steps: 4}\n"
    )
    res = run_cli("run", str(tmp / "job.yaml"))
    assert res.returncode == 0, res.stderr
    return out


def test_report_writes_chart_and_self_contained_html(tiny_run):
    import matplotlib.image as mpimg

    res = run_cli("report", str(tiny_run))
    assert res.returncode == 0, res.stderr
    png, page = tiny_run / "loss.png", tiny_run / "report.html"
    h, w = mpimg.imread(png).shape[:2]
    assert (w, h) == (990, 528)
    text = page.read_text()
    assert 'src="data:image/png;base64,' in text and "<script src" not in text and "<link" not in text
    blob = text.split('<script type="application/json" id="tunejob-data">')[1].split("</script>")[0]
    data = json.loads(blob)
    records = read_metrics(tiny_run / "metrics.jsonl")
    assert [p["train_loss"] for p in data["train"]] == [r["train_loss"] for r in records if r["kind"] == "train"]
    assert [p["step"] for p in data["eval"]] == [r["step"] for r in records if r["kind"] == "eval"]
    assert data["diagnosis"]["verdict"] in text and "Hyperparameters" in text
    assert data["summary"]["best_step"] == json.loads((tiny_run / "summary.json").read_text())["best_step"]


def test_tensorboard_events_are_readable(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_run / "tensorboard"))
    acc.Reload()
    train = acc.Scalars("loss/train")
    valid = acc.Scalars("loss/valid")
    records = read_metrics(tiny_run / "metrics.jsonl")
    assert [e.step for e in train] == [r["step"] for r in records if r["kind"] == "train"]
    assert [e.step for e in valid] == [r["step"] for r in records if r["kind"] == "eval"]
    assert valid[-1].value == pytest.approx([r for r in records if r["kind"] == "eval"][-1]["valid_loss"], rel=1e-6)


def test_stream_ends_with_an_end_record(tiny_run):
    last = read_metrics(tiny_run / "metrics.jsonl")[-1]
    assert last["kind"] == "end" and last["stop_reason"] == "completed"


def test_diagnose_cli_json_contract(tiny_run):
    res = run_cli("diagnose", str(tiny_run / "metrics.jsonl"), "--json")
    assert res.returncode == 0
    out = json.loads(res.stdout)
    assert set(out) == {"verdict", "findings"} and out["findings"]
    assert all(set(f) >= {"kind", "steps", "message", "advice"} for f in out["findings"])


def test_live_view_draws_progress_chart_and_events():
    from tunejob.monitor.live import make_console_sink

    buf = io.StringIO()
    sink = make_console_sink(10, stream=buf, force_live=True)
    for step in range(1, 11):
        sink.write({"kind": "train", "step": step, "train_loss": 3.0 - 0.1 * step, "tokens_per_second": 100.0})
        if step % 5 == 0:
            sink.write({"kind": "eval", "step": step, "valid_loss": 3.1 - 0.1 * step})
    sink.write({"kind": "event", "step": 10, "message": "early stopping: no improvement"})
    sink.close()
    out = buf.getvalue()
    assert "step 10/10" in out and "best 2.1000 @ 10" in out and "early stopping" in out
    assert "o" in out and "|" in out  # the chart
    plain = make_console_sink(5, stream=io.StringIO())  # not a TTY: plain lines
    assert type(plain).__name__ == "LineSink"


def test_watch_follows_a_running_job_to_its_end(tmp_path, tiny_model):
    data = write_chat_data(tmp_path / "d.jsonl", 40)
    out = tmp_path / "run"
    spec = tmp_path / "job.yaml"
    spec.write_text(f"model: {tiny_model}\ndata: {{train: {data}}}\noutput_dir: {out}\n"
                    "hyperparameters: {epochs: 4, batch_size: 4, max_seq_len: 64}\ncheckpointing: {eval_steps: 3, save_steps: 3}\n")
    proc = subprocess.Popen([sys.executable, "-m", "tunejob", "run", str(spec)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        res = run_cli("watch", str(out), "--interval", "0.2", "--timeout", "300")
    finally:
        proc.wait(timeout=300)
    assert res.returncode == 0, res.stderr
    ended = json.loads((out / "summary.json").read_text())["stop_reason"]  # completed, or early_stopping in bf16 here
    assert ended in ("completed", "early_stopping") and json.loads(res.stdout)["stop_reason"] == ended
    assert "valid_loss" in res.stderr
