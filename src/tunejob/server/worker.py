"""The job queue: one training job at a time per device, each in its own `tunejob run` process.

A separate process makes cancel and pause plain (stop the process; its last complete checkpoint
stays), keeps a crash in training from taking the server down, and lets resume reuse the local
backend's own resume. The child is tied to the server (PR_SET_PDEATHSIG): if the server dies, so
does its training process, and on the next start the job resumes from its last checkpoint.
"""

from __future__ import annotations

import csv
import ctypes
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import yaml

from tunejob.monitor.metrics import read_metrics
from tunejob.server.store import Store, new_id

POLL_S = 0.25
# Pause and cancel send SIGTERM; the trainer finishes the optimizer step in flight and checkpoints
# it before exiting. A step of the default 135M model at batch 8 is ~20 s on 2 cores at 180 real
# tokens/s (bench/RESULTS.md), ~45 s on the 1 thread a training child gets beside chat, and the
# checkpoint ~1-5 s more; model loading before the first step can take longer still on a cold
# cache. Only past this does the worker kill the child (it then resumes from the checkpoint before).
STOP_GRACE_S = 300
ACTIVE = ("validating_files", "queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Worker:
    def __init__(self, store: Store, base_models: dict[str, str], log=print, train_threads: int | None = None,
                 chat_threads: int | None = None):
        from tunejob.train import threads

        self.store = store
        self.base_models = base_models
        self.log = log
        self.train_threads = threads.budget(train_threads, chat_threads).train  # the cores minus chat's share
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tunejob-worker", daemon=True)
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        # A job that was running when the server stopped resumes from its last checkpoint.
        for job in self.store.list_jobs(status="running"):
            self.store.update_job(job["id"], status="queued")
            self.store.add_event(job["id"], "Server restarted; the job resumes from its last checkpoint")
        for job in self.store.list_jobs(status="validating_files"):
            self.store.update_job(job["id"], status="queued")
        self._thread.start()

    @property
    def training(self) -> bool:
        """Whether a training child is running now (chat then keeps to its share of the cores)."""
        proc = self._proc
        return proc is not None and proc.poll() is None

    def stop(self) -> None:
        self._stop.set()
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            queued = sorted(self.store.list_jobs(status="queued"), key=lambda j: (j["created_at"], j["id"]))
            if not queued:
                time.sleep(POLL_S)
                continue
            try:
                self._run(queued[0])
            except Exception as exc:  # never let one job kill the queue
                # The server's log keeps the traceback (the job's error keeps one line): a bug here
                # is ours, not the job's, and needs the place it happened.
                self.log(f"worker: job {queued[0]['id']} failed in the server\n{traceback.format_exc()}")
                self.store.update_job(queued[0]["id"], status="failed", finished_at=int(time.time()),
                                      error={"code": "server_error", "message": f"{exc.__class__.__name__}: {exc}", "param": None})

    # ------------------------------------------------------------ one job

    def job_dir(self, job_id: str) -> Path:
        return self.store.dir / "jobs" / job_id

    def _write_spec(self, job: dict) -> Path:
        d = self.job_dir(job["id"])
        d.mkdir(parents=True, exist_ok=True)
        spec = json.loads(json.dumps(job["_spec"]))
        spec["data"]["train"] = str(self.store.file_path(job["training_file"]))
        if job.get("validation_file"):
            spec["data"]["validation"] = str(self.store.file_path(job["validation_file"]))
        spec["output_dir"] = str(d / "run")
        path = d / "job.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    def _run(self, job: dict) -> None:
        job_id = job["id"]
        spec_path = self._write_spec(job)
        run_dir = self.job_dir(job_id) / "run"
        self.store.update_job(job_id, status="running", control=None)
        self.store.add_event(job_id, "Fine-tuning job started")
        log_path = self.job_dir(job_id) / "train.log"
        from tunejob.train.threads import child_env

        env = {**os.environ, "PYTHONUNBUFFERED": "1", **child_env(self.train_threads)}
        with log_path.open("ab") as log:
            self._proc = subprocess.Popen([sys.executable, "-m", "tunejob", "run", str(spec_path)], stdout=log, stderr=log,
                                          stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, env=env)
        tail = _Tail(run_dir / "metrics.jsonl")
        control = None
        while True:
            rc = self._proc.poll()
            for record in tail.read():
                self._on_record(job_id, record)
            if rc is not None:
                break
            control = (self.store.get_job(None, job_id) or {}).get("control")
            if control in ("cancel", "pause") or self._stop.is_set():
                self._proc.send_signal(signal.SIGTERM)  # the trainer checkpoints the step in flight, then exits (143)
                try:
                    self._proc.wait(timeout=10 if self._stop.is_set() else STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                for record in tail.read():
                    self._on_record(job_id, record)
                break
            time.sleep(POLL_S)
        self._proc = None
        if self._stop.is_set() and control not in ("cancel", "pause"):
            return  # server shutting down: the job stays 'running' and resumes on the next start
        now = int(time.time())
        # The API already answered cancelled / paused (as OpenAI does) and set the status; a resume
        # that came while the child was stopping set 'queued', which must stay.
        if control == "cancel":
            self.store.update_job(job_id, control=None)
            self.store.add_event(job_id, "Fine-tuning job cancelled")
        elif control == "pause":
            self.store.update_job(job_id, control=None)
            self.store.add_event(job_id, "Fine-tuning job paused; resume continues from the last checkpoint")
        elif rc == 0:
            self._succeed(job_id, run_dir)
        else:
            message = _last_error(log_path) or f"training exited with code {rc}"
            self.store.update_job(job_id, status="failed", finished_at=now, error={"code": "training_failed", "message": message, "param": None})
            self.store.add_event(job_id, f"Fine-tuning job failed: {message}", level="error")

    def _on_record(self, job_id: str, r: dict) -> None:
        job = self.store.get_job(None, job_id)
        kind, step = r.get("kind"), r.get("step", 0)
        seen = job.get("_seen", {"train": 0, "eval": 0})
        if kind == "start":
            self.store.update_job(job_id, _total_steps=r.get("total_steps"))
        elif kind == "train" and step > seen["train"]:
            last_train = {"step": step, "train_loss": r["train_loss"], "train_mean_token_accuracy": r["train_mean_token_accuracy"], **_rewards(r, "")}
            self.store.add_event(job_id, f"Step {step}: training loss={r['train_loss']:.4f}", type="metrics", data={**last_train, "total_steps": job.get("_total_steps")})
            seen["train"] = step
            self.store.update_job(job_id, _seen=seen, _last_train=last_train)
        elif kind == "eval" and step > seen["eval"]:
            data = {"step": step, "valid_loss": r["valid_loss"], "valid_mean_token_accuracy": r["valid_mean_token_accuracy"],
                    "full_valid_loss": r["full_valid_loss"], "full_valid_mean_token_accuracy": r["full_valid_mean_token_accuracy"], **_rewards(r, "valid_")}
            last = job.get("_last_train") or {}
            if last.get("step") == step:  # OpenAI's metrics event at an eval step carries both losses
                data.update({k: v for k, v in last.items() if k != "step"})
            data["total_steps"] = job.get("_total_steps")
            self.store.add_event(job_id, f"Step {step}: validation loss={r['valid_loss']:.4f}", type="metrics", data=data)
            seen["eval"] = step
            self.store.update_job(job_id, _seen=seen, _last_eval={k: v for k, v in data.items() if k != "total_steps"})
        elif kind == "checkpoint":
            metrics = {**(job.get("_last_train") or {})}
            if (job.get("_last_eval") or {}).get("step") == step:
                metrics.update({k: v for k, v in job["_last_eval"].items() if k != "step"})
            metrics["step"] = step
            self.store.add_checkpoint(job_id, step, {"fine_tuned_model_checkpoint": f"{job['_ft_name']}:ckpt-step-{step}", "metrics": metrics,
                                                     "_path": f"checkpoints/step-{step:06d}"})
            msg = f"Checkpoint created at step {step}"
            if not self.store.has_event(job_id, msg):
                self.store.add_event(job_id, msg)
        elif kind == "event" and r.get("message") and not self.store.has_event(job_id, r["message"]):
            self.store.add_event(job_id, r["message"], level="warn" if "NaN" in r["message"] else "info")

    def _succeed(self, job_id: str, run_dir: Path) -> None:
        job = self.store.get_job(None, job_id)
        summary = json.loads((run_dir / "summary.json").read_text())
        result_id = new_id("file")
        csv_bytes = _results_csv(run_dir / "metrics.jsonl")
        self.store.file_path(result_id).write_bytes(csv_bytes)
        self.store.add_file(self.store.job_owner(job_id), "step_metrics.csv", "fine-tune-results", len(csv_bytes), "processed", None, result_id)
        best = summary.get("best_step")
        self.store.update_job(job_id, status="succeeded", finished_at=int(time.time()), fine_tuned_model=job["_ft_name"],
                              trained_tokens=summary.get("trained_tokens"), result_files=[result_id], _best_step=best)
        self.store.add_event(job_id, f"New fine-tuned model created: {job['_ft_name']} (best checkpoint: step {best})")
        self.store.add_event(job_id, "The job has successfully completed")


def _rewards(record: dict, prefix: str) -> dict:
    """A DPO record's reward metrics (rewards_* / valid_rewards_*), for events and checkpoints."""
    return {k: v for k, v in record.items() if k.startswith(f"{prefix}rewards_")}


class _Tail:
    """New complete lines of a JSONL file.

    A resumed run replaces its metrics file (truncated to the checkpoint) with a rename, so the
    file is followed by inode as well as size: an offset into the old file, used on a new one that
    has grown past it, would land mid-line. A line that still does not parse (a writer killed
    mid-line) is skipped rather than failing the job that is being watched."""

    def __init__(self, path: Path):
        self.path, self.offset, self.inode = path, 0, None

    def read(self) -> list[dict]:
        try:
            with self.path.open("rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self.inode or st.st_size < self.offset:
                    self.inode, self.offset = st.st_ino, 0
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        out = []
        for line in complete.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return [r for r in out if isinstance(r, dict)]


def _results_csv(metrics: Path) -> bytes:
    """OpenAI's result file: step, train_loss, train_accuracy, valid_loss, valid_mean_token_accuracy."""
    rows: dict[int, dict] = {}
    for r in read_metrics(metrics):  # a torn line is skipped there, as everywhere the stream is read
        if r.get("kind") == "train":
            rows.setdefault(r["step"], {}).update(train_loss=r["train_loss"], train_accuracy=r["train_mean_token_accuracy"])
        elif r.get("kind") == "eval":
            rows.setdefault(r["step"], {}).update(valid_loss=r["valid_loss"], valid_mean_token_accuracy=r["valid_mean_token_accuracy"])
    out = io.StringIO()
    w = csv.writer(out)
    cols = ["train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    w.writerow(["step", *cols])
    for step in sorted(rows):
        w.writerow([step, *[rows[step].get(c, "") for c in cols]])
    return out.getvalue().encode()


def _last_error(log_path: Path) -> str | None:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith(("error: ", "internal error: ")):
            return line.split(": ", 1)[1][:1000]
    return None
