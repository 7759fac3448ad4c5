"""The worker's side of the executor seam, with a scripted executor in place of Ray: losing a node
three times in a row is minutes of real cluster (tests/test_serve_ray.py kills one node, once),
and what is checked here is only the worker's bookkeeping: retries bounded, a run never
submitted twice, a re-attached run followed rather than started again."""

from __future__ import annotations

import time

from tunejob.server.jobs.executor import Launch, RunState
from tunejob.server.jobs.store import Store
from tunejob.server.jobs.worker import Worker


class ScriptedExecutor:
    """Every poll answers `state`; records what the worker asked."""

    name, poll_s = "scripted", 0.0

    def __init__(self, state: RunState, known: bool = True):
        self.state, self.known = state, known
        self.submitted: list[str] = []

    def waiting_for(self, launch: Launch) -> str | None:
        return None

    def submit(self, run_id: str, launch: Launch) -> str:
        self.submitted.append(run_id)
        return ""

    def poll(self, run_id: str) -> RunState:
        return self.state

    def stop(self, run_id: str) -> None:
        pass

    def reattach(self, run_id: str) -> bool:
        return self.known

    def training_here(self) -> bool:
        return False

    def shutdown(self) -> None:
        pass


def add_job(store: Store, **fields) -> str:
    job = {"id": "ftjob-test", "created_at": int(time.time()), "status": "queued", "training_file": "file-x", "validation_file": None,
           "_spec": {"name": "job", "data": {"train": "x.jsonl"}}, "_ft_name": "ft:x", **fields}
    store.add_job("owner", job)
    return job["id"]


def run_until(worker: Worker, store: Store, job_id: str, cond, timeout: float = 20) -> dict:
    worker.start()
    try:
        deadline = time.time() + timeout
        while not cond(job := store.get_job(None, job_id)):
            assert time.time() < deadline, job
            time.sleep(0.05)
        return job
    finally:
        worker.stop()


def test_a_run_lost_again_and_again_fails_the_job_after_the_retries(tmp_path):
    store = Store(tmp_path)
    job_id = add_job(store)
    ex = ScriptedExecutor(RunState("lost", "Ray job x failed: its node died or was stopped"))
    job = run_until(Worker(store, {}, log=lambda *a: None, executor=ex, node_retries=2), store, job_id, lambda j: j["status"] == "failed")
    assert ex.submitted == [f"tunejob-{job_id}-{n}" for n in (1, 2, 3)]  # the first run and two resumes, each its own id
    assert job["error"]["code"] == "run_lost" and "its node died" in job["error"]["message"]
    messages = [e["message"] for e in store.list_events(job_id)]
    assert sum(m.startswith("The run was lost") for m in messages) == 2 and any("retry 2 of 2" in m for m in messages)


def test_a_restarted_worker_follows_a_known_run_and_does_not_submit_it(tmp_path):
    store = Store(tmp_path)
    job_id = add_job(store, status="running", _run={"executor": "scripted", "id": "tunejob-ftjob-test-1"}, _attempt=1)
    ex = ScriptedExecutor(RunState("running"))
    worker = Worker(store, {}, log=lambda *a: None, executor=ex)
    job = run_until(worker, store, job_id, lambda j: any(e["message"].startswith("Server restarted; following run")
                                                         for e in store.list_events(job_id)))
    assert ex.submitted == [] and job["status"] == "running" and job["_run"]["id"] == "tunejob-ftjob-test-1"


def test_a_run_the_executor_no_longer_has_is_queued_again(tmp_path):
    """A local child died with the server (or a Ray job was never submitted): back to the queue."""
    store = Store(tmp_path)
    job_id = add_job(store, status="running", _run={"executor": "scripted", "id": "tunejob-ftjob-test-1"}, _attempt=1)
    ex = ScriptedExecutor(RunState("running"), known=False)
    run_until(Worker(store, {}, log=lambda *a: None, executor=ex), store, job_id, lambda j: ex.submitted)
    assert ex.submitted == ["tunejob-ftjob-test-2"]  # a new id: the old one may not be reused
    assert any("the job resumes from its last checkpoint" in e["message"] for e in store.list_events(job_id))


def test_a_run_that_waited_too_long_is_submitted_again_without_using_a_retry(tmp_path):
    """Ray fails a job left PENDING past RAY_JOB_START_TIMEOUT_SECONDS: on a busy cluster that is
    waiting, not a loss, so it must not use up --node-retries and fail a job that never ran."""
    store = Store(tmp_path)
    job_id = add_job(store)
    ex = ScriptedExecutor(RunState("expired", "Ray job x failed: no node had its resources free"))
    job = run_until(Worker(store, {}, log=lambda *a: None, executor=ex, node_retries=1), store, job_id, lambda j: len(ex.submitted) >= 4)
    assert job["status"] in ("queued", "running") and not job.get("_retries") and job.get("error") is None
    assert sum(e["message"].startswith("Still waiting for resources") for e in store.list_events(job_id)) >= 3


def test_training_here_is_safe_while_the_worker_changes_children():
    """Issue 31, finding 4: chat asks training_here() while the worker thread starts and reaps
    children; iterating the live dict raised 'dictionary changed size during iteration'."""
    import threading
    import time as _time

    from tunejob.server.jobs.executor import LocalExecutor, _Child

    class Proc:
        def poll(self):
            _time.sleep(0)  # lets the other thread run mid-iteration, as a real poll() syscall does
            return 0  # exited: training_here() must look at every child

    ex, errors, stop = LocalExecutor(slots=64), [], threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            ex._children[f"r{i}"] = _Child(Proc(), 0, "j")
            ex._children.pop(f"r{i - 8}", None)
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        deadline = _time.time() + 3  # before the fix it failed within a fraction of a second
        while _time.time() < deadline:
            try:
                ex.training_here()
            except RuntimeError as exc:
                errors.append(str(exc))
                break
    finally:
        stop.set()
        t.join()
    assert not errors, errors
