"""`tunejob serve --executor ray` on a real Ray cluster started here (tests/ray_nodes.py): a head
node and a worker node with its own custom resource, each with 1 CPU, so two 1-CPU jobs fill the
cluster. Driven by the official openai SDK over HTTP on 127.0.0.1; Ray's own job API is asked
what really ran (how many Ray jobs, on which node). Nothing is mocked.

The cluster starts once for the module (~20-30 s on 2 cores); each job is a tiny model for tens
of steps at 1 torch thread (its 1 CPU).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

try:
    import ray.job_submission  # noqa: F401
except ImportError:
    if os.environ.get("CI"):  # `make test` installs the ray extra: missing there is a failure
        raise
    pytest.skip("the ray extra is not installed: pip install 'tunejob[ray]'", allow_module_level=True)

from conftest import write_chat_data  # noqa: E402
from ray_nodes import start_cluster  # noqa: E402
from test_serve import Server, client, wait_status  # noqa: E402

WORKER = "tunejob_worker"  # the worker node's custom resource: a job asking for it runs there
# 60 examples at batch 4 are 15 steps an epoch; a checkpoint every 5 steps
EXAMPLES = 60


def epochs(n: int) -> dict:
    return {"n_epochs": n, "batch_size": 4}


def job_body(resources: dict | None = None, save_steps: int = 5) -> dict:
    # no early stopping: these tests count every step of the run, whichever precision `auto` picks here
    return {"tunejob": {"checkpointing": {"eval_steps": save_steps, "save_steps": save_steps, "early_stopping_patience": None},
                        "hyperparameters": {"max_seq_len": 64},
                        "resources": resources or {"cpus": 1}}}


@pytest.fixture(scope="module")
def cluster():
    c = start_cluster(head_cpus=1, workers={"worker": (1, {WORKER: 1})})
    yield c
    c.stop()


@pytest.fixture(scope="module")
def ray_jobs(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.address)


def ray_server(data_dir: Path, model: Path, cluster) -> Server:
    return Server(data_dir, model, ("--executor", "ray", "--ray-address", cluster.address, "--node-retries", "2")).start()


def runs_of(ray_jobs, job_id: str) -> list:
    """The Ray jobs the server submitted for one tunejob job (its metadata names the job)."""
    return [j for j in ray_jobs.list_jobs() if (j.metadata or {}).get("tunejob_job") == job_id]


def ended(ray_jobs, job_id: str, attempt: int):
    """The job's Ray job of that attempt once it has ended (else None)."""
    run = next((r for r in runs_of(ray_jobs, job_id) if r.submission_id.endswith(f"-{attempt}")), None)
    return run if run is not None and run.status.is_terminal() else None


def messages(c, job_id: str) -> list[str]:
    return [e.message for e in c.fine_tuning.jobs.list_events(job_id, limit=100)]


def wait_for(cond, what: str, timeout: float = 180):
    deadline = time.time() + timeout
    while not (value := cond()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


def train_steps(c, job_id: str) -> list[int]:
    """The steps of the job's training-loss events (an eval step's event, which carries both losses, apart)."""
    return [e.data["step"] for e in c.fine_tuning.jobs.list_events(job_id, limit=100)
            if e.type == "metrics" and "train_loss" in e.data and "valid_loss" not in e.data]


def all_steps(c, job_id: str) -> list[int]:
    """1..total_steps, the total as the job's own metrics events give it (the split holds out some examples)."""
    totals = {e.data["total_steps"] for e in c.fine_tuning.jobs.list_events(job_id, limit=100) if e.type == "metrics"}
    assert len(totals) == 1, totals
    return list(range(1, totals.pop() + 1))


def test_two_jobs_run_at_once_a_third_waits_pause_resume_and_cancel(tmp_path, tiny_model, cluster, ray_jobs):
    s = ray_server(tmp_path / "data", tiny_model, cluster)
    try:
        c = client(s)
        f = c.files.create(file=open(write_chat_data(tmp_path / "t.jsonl", EXAMPLES), "rb"), purpose="fine-tune")
        # a and the third are long (they are cancelled mid-run); b runs its ~30 steps to the end
        a, b, third = (c.fine_tuning.jobs.create(training_file=f.id, model="default", hyperparameters=epochs(n), extra_body=job_body()).id
                       for n in (8, 2, 8))
        # the cluster has 2 CPUs: the first two run at the same time, on both nodes
        wait_for(lambda: all(c.fine_tuning.jobs.retrieve(j).status == "running" for j in (a, b)), "two jobs running together")
        assert len({runs_of(ray_jobs, j)[0].driver_node_id for j in (a, b)}) == 2  # one on each node
        # the third waits, and says for what
        assert c.fine_tuning.jobs.retrieve(third).status == "queued"
        waiting = [m for m in messages(c, third) if "Ray job" in m]
        assert waiting and "when a node has 1 CPU free" in waiting[0], messages(c, third)
        assert runs_of(ray_jobs, third)[0].status.value == "PENDING"
        # both train now: each has metrics events while the other runs
        wait_for(lambda: train_steps(c, a) and train_steps(c, b), "metrics from both jobs")
        assert {c.fine_tuning.jobs.retrieve(j).status for j in (a, b)} == {"running"}

        # pause a: its Ray job is stopped (SIGTERM: the trainer checkpoints first), the third takes its CPU
        assert c.fine_tuning.jobs.pause(a).status == "paused"
        assert wait_for(lambda: ended(ray_jobs, a, 1), "the paused Ray job to end").status.value == "STOPPED"
        wait_for(lambda: any(m.startswith("Fine-tuning job paused") for m in messages(c, a)), "the pause event")
        log = (s.data_dir / "jobs" / a / "train.log").read_text()
        assert "training stopped on request (SIGTERM)" in log, log[-2000:]  # it saved before Ray's SIGKILL
        wait_status(c, third, ("running",))
        # resume a: a second Ray job, queued like any other until a CPU frees
        c.fine_tuning.jobs.resume(a)
        wait_for(lambda: len(runs_of(ray_jobs, a)) == 2, "the resumed Ray job")
        # cancel the running third: its Ray job stops, and the resumed a runs from its checkpoint
        assert c.fine_tuning.jobs.cancel(third).status == "cancelled"
        assert wait_for(lambda: ended(ray_jobs, third, 1), "the cancelled Ray job to end").status.value == "STOPPED"
        wait_for(lambda: "Fine-tuning job cancelled" in messages(c, third), "the cancel event")
        wait_status(c, a, ("running",))
        wait_for(lambda: "resuming from" in (s.data_dir / "jobs" / a / "train.log").read_text(), "a to resume from its checkpoint")
        c.fine_tuning.jobs.cancel(a)
        assert wait_for(lambda: ended(ray_jobs, a, 2), "the resumed Ray job to end").status.value == "STOPPED"
        done = wait_status(c, b, ("succeeded",))
        assert done.fine_tuned_model and sorted(train_steps(c, b)) == all_steps(c, b)
        assert {j: c.fine_tuning.jobs.retrieve(j).status for j in (a, third)} == {a: "cancelled", third: "cancelled"}
        assert [len(runs_of(ray_jobs, j)) for j in (a, b, third)] == [2, 1, 1]  # one Ray job per run, none twice
    finally:
        s.stop()


def test_a_killed_server_reattaches_and_runs_nothing_twice(tmp_path, tiny_model, cluster, ray_jobs):
    s = ray_server(tmp_path / "data", tiny_model, cluster)
    c = client(s)
    f = c.files.create(file=open(write_chat_data(tmp_path / "t.jsonl", EXAMPLES), "rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(training_file=f.id, model="default", hyperparameters=epochs(3), extra_body=job_body())
    wait_for(lambda: c.fine_tuning.jobs.checkpoints.list(job.id).data, "a first checkpoint")
    s.kill()  # SIGKILL: no shutdown hook; the Ray job does not depend on the server
    assert runs_of(ray_jobs, job.id)[0].status.value == "RUNNING"
    s2 = ray_server(tmp_path / "data", tiny_model, cluster)
    try:
        c2 = client(s2)
        done = wait_status(c2, job.id, ("succeeded", "failed"))
        assert done.status == "succeeded", done.error
        runs = runs_of(ray_jobs, job.id)
        assert len(runs) == 1 and runs[0].status.value == "SUCCEEDED"  # re-attached, not started again
        assert any(m.startswith("Server restarted; following run") for m in messages(c2, job.id))
        assert "resuming from" not in (s2.data_dir / "jobs" / job.id / "train.log").read_text()  # one uninterrupted run
        steps = train_steps(c2, job.id)
        assert sorted(steps) == all_steps(c2, job.id)  # every step once: none lost, none doubled
        assert [j.id for j in c2.fine_tuning.jobs.list()] == [job.id]
    finally:
        s2.stop()


def test_a_dead_worker_node_resumes_the_job_from_its_checkpoint(tmp_path, tiny_model, cluster, ray_jobs):
    s = ray_server(tmp_path / "data", tiny_model, cluster)
    try:
        c = client(s)
        f = c.files.create(file=open(write_chat_data(tmp_path / "t.jsonl", EXAMPLES), "rb"), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(training_file=f.id, model="default", hyperparameters=epochs(4),
                                        extra_body=job_body({"cpus": 1, "custom": {WORKER: 1}}))
        wait_for(lambda: c.fine_tuning.jobs.checkpoints.list(job.id).data, "a first checkpoint")
        first = runs_of(ray_jobs, job.id)[0]
        cluster.kill_raylet("worker")  # the node dies with its raylet; Ray kills its processes
        lost = wait_for(lambda: [m for m in messages(c, job.id) if m.startswith("The run was lost")], "the loss to be seen", timeout=120)
        assert "retry 1 of 2" in lost[0]
        assert c.fine_tuning.jobs.retrieve(job.id).status in ("queued", "running")  # never 'running' on a dead node
        cluster.add_node("worker", 1, {WORKER: 1})  # the node comes back (a replaced machine, a restarted pod)
        done = wait_status(c, job.id, ("succeeded", "failed"))
        assert done.status == "succeeded", done.error
        runs = runs_of(ray_jobs, job.id)
        assert len(runs) == 2 and first.status.value == "RUNNING" and {r.status.value for r in runs} == {"FAILED", "SUCCEEDED"}
        assert "resuming from" in (s.data_dir / "jobs" / job.id / "train.log").read_text()  # from the checkpoint, not step 0
        assert sorted(train_steps(c, job.id)) == all_steps(c, job.id)  # each step reported once, across both runs
    finally:
        s.stop()
