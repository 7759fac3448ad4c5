"""The job queue: each queued job runs as `tunejob run job.yaml` through an executor
(server/jobs/executor.py: child processes on this machine, or Ray jobs on a cluster), as many at once
as the executor has room for.

The worker owns the job's life in the store: it records a run id before it submits (so a
restarted server finds the run again, or knows it never started, and a job never runs twice),
tails the run's metrics.jsonl into events and checkpoints, turns cancel and pause into a stop of
the run (SIGTERM: the trainer checkpoints the step in flight), and resubmits a run that was lost
with its node, from its last checkpoint, at most `node_retries` times before failing the job.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from tunejob.server.jobs.executor import Executor, Launch, LocalExecutor, Resources, RunState
from tunejob.server.jobs.outcome import events_for, fields_for, outcome_of
from tunejob.server.jobs.run_records import Tail, last_error, on_record, results_csv
from tunejob.server.jobs.store import Store, new_id

POLL_S = 0.25
STOPPING = ("cancelled", "paused")
# Following a run that fails this many rounds in a row, and for this long (the store's disk full,
# a bug of ours), is given up: the run is stopped, and once it has ended the job fails. Until it
# has ended, it stays followed, so its slot is freed and nothing trains unseen (issue 31, finding 3).
FOLLOW_FAILURES = 5
GIVE_UP_S = 60.0


@dataclass
class _Run:
    id: str
    tail: Tail
    started: bool = False
    stopping: bool = False  # the worker asked the executor to stop it
    next_poll: float = 0.0
    errors: int = field(default=0)  # polls in a row the executor could not answer
    failures: int = 0  # exceptions in a row while following it
    failing_since: float = 0.0
    broken: str | None = None  # why following it was given up (the job fails once it has ended)
    ended: RunState | None = None  # how it ended, once the executor said so (kept until the job is updated)


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
        self.give_up_s = GIVE_UP_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tunejob-worker", daemon=True)
        self._runs: dict[str, _Run] = {}  # job id -> its run in flight
        self._foreign: set[str] = set()  # jobs another executor runs (a Ray job seen by a local server)
        # Called with (job id, adapter dir) before a job is marked succeeded: the vLLM engine
        # (server/inference/vllm.py) hands the adapter to vLLM there, so a client that sees "succeeded" can chat.
        self.on_succeeded: list = []

    def start(self) -> None:
        self.recover()
        self._thread.start()

    def recover(self) -> None:
        """After a (re)start: each job the last server left with a run is followed again if the
        run still exists (a Ray job), else queued again; it resumes from its last checkpoint."""
        for job in self.store.list_jobs():
            self._recover(job)

    def _recover(self, job: dict) -> None:
        job_id, run = job["id"], job.get("_run")
        if job["status"] == "validating_files":
            self.store.transition(job_id, lambda j: {"status": "queued"} if j["status"] == "validating_files" else None)
        if not run:
            # written by a server before the executor seam
            if self.store.transition(job_id, lambda j: {"status": "queued"} if j["status"] == "running" and not j.get("_run") else None):
                self.store.add_event(job_id, "Server restarted; the job resumes from its last checkpoint")
            return
        if run["executor"] != self.executor.name and run["executor"] != "local":
            self._foreign.add(job_id)
            self.log(f"worker: job {job_id} runs on {run['executor']} as {run['id']}; start the server with "
                     f"--executor {run['executor']} to follow it")
            return
        if run["executor"] == self.executor.name and self._still_there(run["id"]):
            self._runs[job_id] = _Run(run["id"], Tail(self.job_dir(job_id) / "run" / "metrics.jsonl"), started=job["status"] == "running")
            self.store.add_event(job_id, f"Server restarted; following run {run['id']} again")
            return
        # The run died with the last server (a local child): the job starts again from its last
        # checkpoint, and no retry is used (the server went, not the node).
        before = {}

        def decide(j: dict) -> dict | None:
            before.update(j)
            if (j.get("_run") or {}).get("id") != run["id"]:
                return None
            return {"_run": None, "control": None, **({"status": "queued"} if j["status"] == "running" else {})}

        if self.store.transition(job_id, decide) is None:
            return
        if before["status"] == "running":
            self.store.add_event(job_id, "Server restarted; the job resumes from its last checkpoint")
        elif before["status"] in ("paused", "cancelled"):  # the run stopped as asked: the lines a run's end writes
            for _, message in events_for(before["status"], before, RunState("stopped"), self.node_retries):
                if not self.store.has_event(job_id, message):
                    self.store.add_event(job_id, message)

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
            self.tick()
            time.sleep(POLL_S)

    def tick(self) -> None:
        """One round: start what the executor has room for, then follow every run once."""
        self._start_queued()
        for job_id in list(self._runs):
            if self._stop.is_set():
                break
            self._guarded_follow(job_id)

    def _guarded_follow(self, job_id: str) -> None:
        """Follow a run, never letting a failure drop it: a run dropped while alive would train
        unseen and hold its slot for good (issue 31, finding 3). After FOLLOW_FAILURES failures in
        a row over GIVE_UP_S, the run is stopped; the job fails once the run has ended."""
        run = self._runs[job_id]
        try:
            self._follow(job_id, run)
            run.failures = 0
            return
        except Exception as exc:  # never let one job kill the queue
            # The server's log keeps the traceback: a bug here is ours, not the job's.
            self.log(f"worker: following run {run.id} of job {job_id} failed\n{traceback.format_exc()}")
            run.failures += 1
            run.failing_since = run.failing_since if run.failures > 1 else time.time()
            if run.failures >= FOLLOW_FAILURES and time.time() - run.failing_since >= self.give_up_s and run.broken is None:
                run.broken = f"{exc.__class__.__name__}: {exc}"
        if run.broken and not run.stopping and run.ended is None:
            try:
                self.executor.stop(run.id)
                run.stopping = True
            except Exception as exc:
                self.log(f"worker: cannot stop run {run.id} of job {job_id} ({exc}); trying again")

    # ------------------------------------------------------------ starting runs

    def job_dir(self, job_id: str) -> Path:
        return self.store.dir.resolve() / "jobs" / job_id

    def _launch(self, job: dict) -> Launch:
        d = self.job_dir(job["id"])
        dist = job["_spec"].get("distributed") or {}
        return Launch(job["id"], d / "job.yaml", d / "train.log", Resources.from_dict(job.get("_resources")),
                      int(dist.get("processes", 1)), int(dist.get("nodes", 1)))

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
        try:
            queued = [j for j in self.store.list_jobs(status="queued") if j["id"] not in self._runs and j["id"] not in self._foreign]
        except Exception:
            self.log(f"worker: cannot read the queue\n{traceback.format_exc()}")
            return
        for job in sorted(queued, key=lambda j: (j.get("_queued_at", j["created_at"]), j["id"])):
            if self._stop.is_set():
                return
            try:
                self._start(job)
            except Exception as exc:
                self.log(f"worker: starting job {job['id']} failed\n{traceback.format_exc()}")
                if job["id"] not in self._runs:  # never submitted: the job fails; a submitted run stays followed
                    self._fail_unstarted(job["id"], exc)

    def _start(self, job: dict) -> None:
        launch = self._launch(job)
        why = self.executor.waiting_for(launch)
        if not why:
            self._submit(job, launch)
            return
        message = f"Queued: waiting for {why}"
        if job.get("_waiting") != message:
            self.store.update_job(job["id"], _waiting=message)
            self.store.add_event(job["id"], message)

    def _fail_unstarted(self, job_id: str, exc: Exception) -> None:
        error = {"code": "server_error", "message": f"{exc.__class__.__name__}: {exc}", "param": None}
        try:
            self.store.transition(job_id, lambda j: {"status": "failed", "finished_at": int(time.time()), "error": error}
                                  if j["status"] == "queued" and not j.get("_run") else None)
        except Exception:
            self.log(f"worker: cannot fail job {job_id}\n{traceback.format_exc()}")

    def _submit(self, job: dict, launch: Launch) -> None:
        job_id = job["id"]
        self._write_spec(job)
        if (job["_spec"].get("method") or {}).get("type") == "reinforcement":  # asked once, at submit, not at every queue check
            launch = replace(launch, env=tuple(sorted(self.grader_env(self.store.job_owner(job_id)).items())))
        run_id = ""

        def claim(j: dict) -> dict | None:  # only a job still queued, with no run: a pause or cancel since the queue was read wins
            nonlocal run_id
            if j["status"] != "queued" or j.get("_run") or j.get("control"):
                return None
            attempt = int(j.get("_attempt", 0)) + 1
            run_id = f"tunejob-{job_id}-{attempt}"
            return {"_run": {"executor": self.executor.name, "id": run_id}, "_attempt": attempt, "_waiting": None}

        # recorded before the submit: a server killed in between finds the id, or sees it missing
        if self.store.transition(job_id, claim) is None:
            return
        self._runs[job_id] = _Run(run_id, Tail(self.job_dir(job_id) / "run" / "metrics.jsonl"))
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

    def _follow(self, job_id: str, run: _Run) -> None:
        if run.ended is None:
            self._watch(job_id, run)
        if run.ended is not None:  # kept until the job is updated: a failure here is retried on the next round
            for record in run.tail.read():
                on_record(self.store, job_id, record)
            self._finish(job_id, run)

    def _watch(self, job_id: str, run: _Run) -> None:
        for record in run.tail.read():
            on_record(self.store, job_id, record)
        job = self.store.get_job(None, job_id)
        if (job.get("control") or job["status"] in STOPPING) and not run.stopping:
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
            # decided on the row as it is now: a cancel or pause since `job` was read is kept (finding 1)
            if self.store.transition(job_id, lambda j: {"status": "running"} if j["status"] == "queued" and not j.get("control") else None):
                self.store.add_event(job_id, "Fine-tuning job started" + (f" on {state.where}" if state.where else ""))
        elif state.state not in ("pending", "running"):
            run.ended = state

    def _finish(self, job_id: str, run: _Run) -> None:
        """The run has ended: one conditional update moves the job (server/jobs/outcome.py), decided
        again whenever a client moved the job in between."""
        state = run.ended
        while True:
            job = self.store.get_job(None, job_id)
            outcome = outcome_of(job, state, run.stopping, run.broken)
            if outcome == "succeeded":
                fields = self._success_fields(job)
            else:
                error = run.broken or (last_error(self.job_dir(job_id) / "train.log") if outcome == "failed" else None)
                fields = fields_for(outcome, job, state, self.node_retries, error)
            same = (job["status"], job.get("control"), job.get("_retries"))
            after = self.store.transition(job_id, lambda j: fields if (j["status"], j.get("control"), j.get("_retries")) == same else None)
            if after is not None:
                break
            for file_id in fields.get("result_files") or ():  # a cancel came first: the result file goes
                self.store.delete_file(self.store.job_owner(job_id), file_id)
        del self._runs[job_id]  # the job has moved: from here on, a failure must not move it twice
        lines = events_for(outcome, after, state, self.node_retries)
        if outcome == "succeeded":
            lines = [("info", f"New fine-tuned model created: {job['_ft_name']} (best checkpoint: step {after['_best_step']})"),
                     ("info", "The job has successfully completed")]
        try:
            for level, message in lines:
                if outcome != "cancelled" or not self.store.has_event(job_id, message):
                    self.store.add_event(job_id, message, level=level)
        except Exception:  # the disk full: the status is written, its events are what is lost
            self.log(f"worker: cannot write the events of job {job_id}\n{traceback.format_exc()}")

    def _success_fields(self, job: dict) -> dict:
        """A finished run's result file and model: written before the job says succeeded, so a
        client that sees succeeded can read both (and chat: the vLLM hand-over runs here too)."""
        job_id, run_dir = job["id"], self.job_dir(job["id"]) / "run"
        summary = json.loads((run_dir / "summary.json").read_text())
        result_id = new_id("file")
        csv_bytes = results_csv(run_dir / "metrics.jsonl")
        self.store.file_path(result_id).write_bytes(csv_bytes)
        self.store.add_file(self.store.job_owner(job_id), "step_metrics.csv", "fine-tune-results", len(csv_bytes), "processed", None, result_id)
        for hook in self.on_succeeded:
            try:
                hook(job_id, run_dir / "best")
            except Exception as exc:  # the model still answers: chat retries the hand-over
                self.log(f"job {job_id}: {exc}")
        return {"_run": None, "control": None, "status": "succeeded", "finished_at": int(time.time()), "fine_tuned_model": job["_ft_name"],
                "trained_tokens": summary.get("trained_tokens"), "result_files": [result_id], "_best_step": summary.get("best_step")}
