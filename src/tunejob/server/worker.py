"""The job queue: each queued job runs as `tunejob run job.yaml` through an executor
(server/executor.py: child processes on this machine, or Ray jobs on a cluster), as many at once
as the executor has room for.

The worker owns the job's life in the store: it records a run id before it submits (so a
restarted server finds the run again, or knows it never started, and a job never runs twice),
tails the run's metrics.jsonl into events and checkpoints, turns cancel and pause into a stop of
the run (SIGTERM: the trainer checkpoints the step in flight), and resubmits a run that was lost
with its node, from its last checkpoint, at most `node_retries` times before failing the job.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from tunejob.monitor.metrics import read_metrics
from tunejob.server.executor import Executor, Launch, LocalExecutor, Resources, RunState
from tunejob.server.store import Store, new_id

POLL_S = 0.25
ACTIVE = ("validating_files", "queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")
STOPPING = ("cancelled", "paused")


@dataclass
class _Run:
    id: str
    tail: "_Tail"
    started: bool = False
    stopping: bool = False
    next_poll: float = 0.0
    errors: int = field(default=0)


class Worker:
    def __init__(self, store: Store, base_models: dict[str, str], log=print, train_threads: int | None = None,
                 chat_threads: int | None = None, executor: Executor | None = None, node_retries: int = 2, grader_env=None):
        from tunejob.train import threads

        self.store = store
        self.base_models = base_models
        # owner -> the environment a reinforcement job's score_model graders need (app.py: this server and the owner's key)
        self.grader_env = grader_env or (lambda owner: {})
        self.log = log
        self.train_threads = threads.budget(train_threads, chat_threads).train  # the cores minus chat's share
        self.executor = executor or LocalExecutor(1, self.train_threads)
        self.node_retries = node_retries
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tunejob-worker", daemon=True)
        self._runs: dict[str, _Run] = {}  # job id -> its run in flight
        self._foreign: set[str] = set()  # jobs another executor runs (a Ray job seen by a local server)
        # Called with (job id, adapter dir) before a job is marked succeeded: the vLLM engine
        # (server/vllm.py) hands the adapter to vLLM there, so a client that sees "succeeded" can chat.
        self.on_succeeded: list = []

    def start(self) -> None:
        for job in self.store.list_jobs():
            self._recover(job)
        self._thread.start()

    def _recover(self, job: dict) -> None:
        """A job the last server left with a run: follow the run if it still exists (a Ray job),
        else put the job back in the queue; it resumes from its last checkpoint."""
        job_id, run = job["id"], job.get("_run")
        if job["status"] == "validating_files":
            self.store.update_job(job_id, status="queued")
        if not run:
            if job["status"] == "running":  # written by a server before the executor seam
                self.store.update_job(job_id, status="queued")
                self.store.add_event(job_id, "Server restarted; the job resumes from its last checkpoint")
            return
        if run["executor"] != self.executor.name and run["executor"] != "local":
            self._foreign.add(job_id)
            self.log(f"worker: job {job_id} runs on {run['executor']} as {run['id']}; start the server with "
                     f"--executor {run['executor']} to follow it")
            return
        if run["executor"] == self.executor.name and self._still_there(run["id"]):
            self._runs[job_id] = _Run(run["id"], _Tail(self.job_dir(job_id) / "run" / "metrics.jsonl"), started=job["status"] == "running")
            self.store.add_event(job_id, f"Server restarted; following run {run['id']} again")
            return
        self.store.update_job(job_id, _run=None, control=None)
        if job["status"] == "running":
            self.store.update_job(job_id, status="queued")
            self.store.add_event(job_id, "Server restarted; the job resumes from its last checkpoint")
        elif job["status"] == "paused":
            self.store.add_event(job_id, "Fine-tuning job paused; resume continues from the last checkpoint")
        elif job["status"] == "cancelled" and not self.store.has_event(job_id, "Fine-tuning job cancelled"):
            self.store.add_event(job_id, "Fine-tuning job cancelled")

    def _still_there(self, run_id: str) -> bool:
        """Whether the executor still has the run. If it cannot say (the cluster's API is down),
        follow it as if it had: resubmitting a run that may be alive could train the job twice."""
        try:
            return self.executor.reattach(run_id)
        except Exception as exc:
            self.log(f"worker: cannot ask the executor about run {run_id} ({exc}); following it")
            return True

    @property
    def training(self) -> bool:
        """Whether a job trains on this machine now (chat then keeps to its share of the cores)."""
        return self.executor.training_here()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.executor.shutdown()  # local children are killed (their jobs resume on the next start); Ray jobs go on

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._guarded(None, self._start_queued)
            for job_id in list(self._runs):
                if self._stop.is_set():
                    break
                self._guarded(job_id, lambda: self._follow(job_id))
            time.sleep(POLL_S)

    def _guarded(self, job_id: str | None, step) -> None:
        try:
            step()
        except Exception as exc:  # never let one job kill the queue
            # The server's log keeps the traceback (the job's error keeps one line): a bug here
            # is ours, not the job's, and needs the place it happened.
            self.log(f"worker: job {job_id} failed in the server\n{traceback.format_exc()}")
            if job_id is not None:
                self._runs.pop(job_id, None)
                self.store.update_job(job_id, status="failed", finished_at=int(time.time()), _run=None,
                                      error={"code": "server_error", "message": f"{exc.__class__.__name__}: {exc}", "param": None})

    # ------------------------------------------------------------ starting runs

    def job_dir(self, job_id: str) -> Path:
        return self.store.dir.resolve() / "jobs" / job_id

    def _launch(self, job: dict) -> Launch:
        d = self.job_dir(job["id"])
        processes = int((job["_spec"].get("distributed") or {}).get("processes", 1))
        return Launch(job["id"], d / "job.yaml", d / "train.log", Resources.from_dict(job.get("_resources")), processes)

    def _write_spec(self, job: dict) -> Path:
        d = self.job_dir(job["id"])
        d.mkdir(parents=True, exist_ok=True)
        spec = json.loads(json.dumps(job["_spec"]))
        # absolute paths: a Ray job reads them on another node, from the shared data dir
        spec["data"]["train"] = str(self.store.file_path(job["training_file"]).resolve())
        if job.get("validation_file"):
            spec["data"]["validation"] = str(self.store.file_path(job["validation_file"]).resolve())
        spec["output_dir"] = str(d / "run")
        path = d / "job.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    def _start_queued(self) -> None:
        queued = [j for j in self.store.list_jobs(status="queued") if j["id"] not in self._runs and j["id"] not in self._foreign]
        for job in sorted(queued, key=lambda j: (j.get("_queued_at", j["created_at"]), j["id"])):
            if self._stop.is_set():
                return
            launch = self._launch(job)
            why = self.executor.waiting_for(launch)
            if why:
                message = f"Queued: waiting for {why}"
                if job.get("_waiting") != message:
                    self.store.update_job(job["id"], _waiting=message)
                    self.store.add_event(job["id"], message)
                continue
            self._guarded(job["id"], lambda: self._submit(job, launch))

    def _submit(self, job: dict, launch: Launch) -> None:
        job_id = job["id"]
        attempt = int(job.get("_attempt", 0)) + 1
        run_id = f"tunejob-{job_id}-{attempt}"
        self._write_spec(job)
        if (job["_spec"].get("method") or {}).get("type") == "reinforcement":  # asked once, at submit, not at every queue check
            launch = replace(launch, env=tuple(sorted(self.grader_env(self.store.job_owner(job_id)).items())))
        # recorded before the submit: a server killed in between finds the id, or sees it missing
        self.store.update_job(job_id, _run={"executor": self.executor.name, "id": run_id}, _attempt=attempt, _waiting=None)
        self._runs[job_id] = _Run(run_id, _Tail(self.job_dir(job_id) / "run" / "metrics.jsonl"))
        try:
            line = self.executor.submit(run_id, launch)
        except Exception as exc:
            # It may have gone through (a timeout after Ray took it): poll says. A run that is
            # missing then counts as lost (resubmitted, at most node_retries times); a live one is followed.
            self.log(f"worker: submitting run {run_id} of job {job_id} failed\n{traceback.format_exc()}")
            line = f"Submitting run {run_id} failed ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
        if line:
            self.store.add_event(job_id, line)

    # ------------------------------------------------------------ following runs

    def _follow(self, job_id: str) -> None:
        run = self._runs[job_id]
        for record in run.tail.read():
            self._on_record(job_id, record)
        job = self.store.get_job(None, job_id)
        if (job.get("control") in ("cancel", "pause") or job["status"] in STOPPING) and not run.stopping:
            self.executor.stop(run.id)  # the trainer checkpoints the step in flight, then exits (143)
            run.stopping = True
        if time.time() < run.next_poll:
            return
        run.next_poll = time.time() + self.executor.poll_s
        try:
            state = self.executor.poll(run.id)
        except Exception as exc:  # the cluster's API unreachable: the run may well go on, so wait, never resubmit
            run.errors += 1
            if run.errors == 1:
                self.log(f"worker: cannot follow run {run.id} of job {job_id}: {exc}")
                self.store.add_event(job_id, f"Cannot reach the executor to follow run {run.id} ({str(exc).splitlines()[0][:200]}); "
                                             "retrying", level="warn")
            return
        run.errors = 0
        if state.state == "running" and not run.started:
            run.started = True
            if job["status"] == "queued" and not run.stopping:
                self.store.update_job(job_id, status="running")
                self.store.add_event(job_id, "Fine-tuning job started" + (f" on {state.where}" if state.where else ""))
        elif state.state not in ("pending", "running"):
            for record in run.tail.read():
                self._on_record(job_id, record)
            del self._runs[job_id]
            self._finish(job_id, state)

    def _finish(self, job_id: str, state: RunState) -> None:
        job = self.store.get_job(None, job_id)
        control, status = job.get("control"), job["status"]
        self.store.update_job(job_id, _run=None, control=None)
        # The API already answered cancelled / paused (as OpenAI does) and set the status; a resume
        # that came while the run was stopping set 'queued', which must stay.
        if control == "cancel" or (control is None and status == "cancelled"):
            if not self.store.has_event(job_id, "Fine-tuning job cancelled"):
                self.store.add_event(job_id, "Fine-tuning job cancelled")
        elif control == "pause" or (control is None and status == "paused"):
            self.store.add_event(job_id, "Fine-tuning job paused; resume continues from the last checkpoint")
        elif state.state == "succeeded":
            self._succeed(job_id, self.job_dir(job_id) / "run")
        elif state.state == "failed":
            self._fail(job_id, "training_failed", _last_error(self.job_dir(job_id) / "train.log") or state.detail)
        elif state.state == "expired":  # Ray's pending limit (RAY_JOB_START_TIMEOUT_SECONDS, 900 s): still waiting, so queue it again
            self.store.update_job(job_id, status="queued")
            self.store.add_event(job_id, f"Still waiting for resources ({state.detail}); submitted again")
        else:
            self._lost(job, state)

    def _fail(self, job_id: str, code: str, message: str) -> None:
        self.store.update_job(job_id, status="failed", finished_at=int(time.time()), error={"code": code, "message": message, "param": None})
        self.store.add_event(job_id, f"Fine-tuning job failed: {message}", level="error")

    def _lost(self, job: dict, state: RunState) -> None:
        """The run ended under the job (its node died, Ray stopped it): resume from the last
        checkpoint, at most node_retries times, then fail; never 'running' forever."""
        job_id, retries = job["id"], int(job.get("_retries", 0))
        why = state.detail or {"missing": "the executor has no such run: its submission failed",
                               "stopped": "it was stopped outside tunejob"}.get(state.state, f"the run is {state.state}")
        if retries < self.node_retries:
            self.store.update_job(job_id, status="queued", _retries=retries + 1)
            self.store.add_event(job_id, f"The run was lost ({why}); resuming from the last checkpoint "
                                         f"(retry {retries + 1} of {self.node_retries})", level="warn")
        else:
            self._fail(job_id, "run_lost", f"the run was lost {retries + 1} time(s), the last: {why}; its checkpoints are kept "
                                           f"(the server's --node-retries allows {self.node_retries} resumes)")

    def _on_record(self, job_id: str, r: dict) -> None:
        job = self.store.get_job(None, job_id)
        kind, step = r.get("kind"), r.get("step", 0)
        seen = job.get("_seen", {"train": 0, "eval": 0})
        if kind == "start":
            self.store.update_job(job_id, _total_steps=r.get("total_steps"))
        elif kind == "train" and step > seen["train"]:
            last_train = {"step": step, "train_loss": r["train_loss"], **_pick(r, ("train_mean_token_accuracy",)), **_rewards(r, "")}
            said = f"reward={r['train_reward_mean']:.4f}" if "train_reward_mean" in r else f"training loss={r['train_loss']:.4f}"
            self.store.add_event(job_id, f"Step {step}: {said}", type="metrics", data={**last_train, "total_steps": job.get("_total_steps")})
            seen["train"] = step
            self.store.update_job(job_id, _seen=seen, _last_train=last_train)
        elif kind == "eval" and step > seen["eval"]:
            data = {"step": step, **_pick(r, ("valid_loss", "valid_mean_token_accuracy", "full_valid_loss", "full_valid_mean_token_accuracy")),
                    **_rewards(r, "valid_")}
            last = job.get("_last_train") or {}
            if last.get("step") == step:  # OpenAI's metrics event at an eval step carries both losses
                data.update({k: v for k, v in last.items() if k != "step"})
            data["total_steps"] = job.get("_total_steps")
            said = f"validation reward={r['valid_reward_mean']:.4f}" if "valid_reward_mean" in r else f"validation loss={r['valid_loss']:.4f}"
            self.store.add_event(job_id, f"Step {step}: {said}", type="metrics", data=data)
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
        for hook in self.on_succeeded:
            try:
                hook(job_id, run_dir / "best")
            except Exception as exc:  # the model still answers: chat retries the hand-over
                self.log(f"job {job_id}: {exc}")
        self.store.update_job(job_id, status="succeeded", finished_at=int(time.time()), fine_tuned_model=job["_ft_name"],
                              trained_tokens=summary.get("trained_tokens"), result_files=[result_id], _best_step=best)
        self.store.add_event(job_id, f"New fine-tuned model created: {job['_ft_name']} (best checkpoint: step {best})")
        self.store.add_event(job_id, "The job has successfully completed")


def _rewards(record: dict, prefix: str) -> dict:
    """A DPO record's reward metrics (rewards_* / valid_rewards_*), or a reinforcement record's
    (reward mean and std, each sub-grader's score_*, KL, answer lengths), for events and checkpoints."""
    rl = ("kl", "clip_ratio", f"{prefix}completion_tokens_mean", f"{prefix}completion_tokens_std", f"{prefix}truncated_ratio")
    own = prefix or "train_"  # a reinforcement train record's rewards are train_reward_* / train_score_*
    return {k: v for k, v in record.items() if k.startswith((f"{prefix}rewards_", f"{own}reward_", f"{own}score_")) or k in rl}


def _pick(record: dict, keys: tuple[str, ...]) -> dict:
    return {k: record[k] for k in keys if k in record}


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
            rows.setdefault(r["step"], {}).update(train_loss=r["train_loss"], train_accuracy=r.get("train_mean_token_accuracy"),
                                                  train_reward_mean=r.get("train_reward_mean"))
        elif r.get("kind") == "eval":
            rows.setdefault(r["step"], {}).update(valid_loss=r.get("valid_loss"), valid_mean_token_accuracy=r.get("valid_mean_token_accuracy"),
                                                  valid_reward_mean=r.get("valid_reward_mean"))
    out = io.StringIO()
    w = csv.writer(out)
    cols = ["train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    if any(v.get("train_reward_mean") is not None for v in rows.values()):  # reinforcement: its rewards too
        cols += ["train_reward_mean", "valid_reward_mean"]
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
