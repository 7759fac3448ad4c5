"""The Ray executor: each run of a server job is a Ray job on a Ray cluster.

`tunejob serve --executor ray --ray-address ADDRESS` submits `tunejob run job.yaml` through Ray's
job API (`JobSubmissionClient`, served by the head node's dashboard): Ray places it on a node with
the job's CPUs, GPUs and custom resources free, queues it (PENDING) while none has, and keeps it
running when the server stops. Requirements, all documented in the README:

- tunejob (the same version) installed on every node at the server's own interpreter path: the
  entrypoint runs `PYTHON -m tunejob run`, with PYTHON the server's sys.executable, so neither the
  node's PATH nor an activated venv matters (a bare `tunejob` was not found on nodes started as
  .venv/bin/ray); where that interpreter or tunejob is missing, the job fails with one line
  saying so (exit 127);
- the server's data dir mounted at the same path on every node (NFS, a shared volume): the spec,
  the uploaded files and the run directory are read and written there, so events, metrics and
  checkpoints flow to the server as they do for a local child. The run's output goes to
  DATA_DIR/jobs/<id>/train.log for the same reason (Ray's own job log gets only its first line).

Stop: Ray's supervisor sends SIGTERM to the entrypoint and SIGKILLs it after
RAY_JOB_STOP_WAIT_TIME_S (3 s by default in Ray 2.60, read by the supervisor actor, whose
environment is the job's runtime_env): set here to STOP_GRACE_S so the trainer can checkpoint.
"""

from __future__ import annotations

import shlex
import sys

from tunejob.errors import TunejobError
from tunejob.server.jobs.executor import STOP_GRACE_S, Launch, RunState

# Ray's states -> the executor's. A FAILED job is a training failure only when the entrypoint
# itself exited non-zero; every other error type (the supervisor actor died with its node, could
# not be scheduled or started) is the cluster's, and the worker retries it from the checkpoint.
_TRAINING_FAILED = "JOB_ENTRYPOINT_COMMAND_ERROR"
_STATES = {"PENDING": "pending", "RUNNING": "running", "SUCCEEDED": "succeeded", "STOPPED": "stopped"}
_WHY = {"JOB_SUPERVISOR_ACTOR_DIED": "its node died or was stopped",
        "JOB_SUPERVISOR_ACTOR_START_TIMEOUT": "no node had its resources free within Ray's RAY_JOB_START_TIMEOUT_SECONDS",
        "JOB_SUPERVISOR_ACTOR_UNSCHEDULABLE": "no node of the cluster can ever have its resources"}


NOT_INSTALLED = 127  # the shell's "command not found", also used when the interpreter lacks tunejob


def entrypoint(launch: Launch, python: str | None = None) -> str:
    """The shell command Ray runs: the server's own interpreter, checked first (a missing one or
    one without tunejob exits 127), then `exec`, so Ray's SIGTERM reaches the trainer itself (a
    shell in between would die at once and leave the trainer to the SIGKILL that follows)."""
    py = shlex.quote(python or sys.executable)
    log = shlex.quote(str(launch.log_path))
    # a job over several nodes: this command is Ray Train's driver, on the cluster it runs in
    ray_train = " --ray-address auto" if launch.nodes > 1 else ""
    return (f"{py} -c 'import tunejob' >> {log} 2>&1 || exit {NOT_INSTALLED}; "
            f"exec {py} -m tunejob run {shlex.quote(str(launch.spec_path))}{ray_train} >> {log} 2>&1")


def exit_reason(code: int | None, node: str) -> str:
    if code == NOT_INSTALLED:
        return (f"tunejob is not installed on the Ray node{(' ' + node) if node else ''} at {sys.executable} (exit {NOT_INSTALLED}); "
                "install it there, with the same version and at the same path as the server's, or run the server from an "
                "interpreter every node has")
    return f"training exited with code {code}"


def run_env(launch: Launch, stop_grace_s: int = STOP_GRACE_S) -> dict[str, str]:
    """The job's environment: torch threads = its CPUs (shared by its processes), and the
    supervisor's SIGTERM-to-SIGKILL wait."""
    from tunejob.train.threads import child_env

    threads = max(1, int(launch.resources.cpus // max(1, launch.processes)))
    env = {**child_env(threads), "PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": str(stop_grace_s), **dict(launch.env)}
    if launch.nodes > 1:  # Ray Train's workers: `threads` CPUs each, and a GPU each when the job asked for GPUs
        from tunejob.train.ray_train import GPU_ENV

        env[GPU_ENV] = "1" if launch.resources.gpus else "0"
    return env


class RayExecutor:
    name = "ray"
    poll_s = 1.0  # one HTTP call to the head per run and second

    def __init__(self, address: str = "auto", stop_grace_s: int = STOP_GRACE_S):
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError:
            raise TunejobError("--executor ray needs Ray's job client: pip install 'tunejob[ray]' (ray[default])") from None
        try:
            self.client = JobSubmissionClient(address)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise TunejobError(f"--ray-address {address}: cannot reach the Ray cluster's job API ({str(exc).splitlines()[0][:200]}); "
                               "start one with `ray start --head` (the dashboard serves the job API) and pass its "
                               "address: auto on the head node, http://HEAD:8265, or ray://HEAD:10001") from None
        self.address, self.stop_grace_s = address, stop_grace_s

    def waiting_for(self, launch: Launch) -> str | None:
        return None  # Ray queues the job itself; poll reports it as pending

    def submit(self, run_id: str, launch: Launch) -> str:
        r = launch.resources
        # over several nodes the entrypoint only drives Ray Train, whose workers hold the CPUs and GPUs:
        # holding them for it too would leave a 2-node job of 1-CPU nodes waiting for a third CPU
        driver_only = launch.nodes > 1
        try:
            self.client.submit_job(entrypoint=entrypoint(launch), submission_id=run_id, metadata={"tunejob_job": launch.job_id},
                                   runtime_env={"env_vars": run_env(launch, self.stop_grace_s)},
                                   entrypoint_num_cpus=0 if driver_only else r.cpus, entrypoint_num_gpus=None if driver_only else r.gpus or None,
                                   entrypoint_resources=r.custom or None)
        except RuntimeError as exc:
            if "already exists" not in str(exc):  # a retried submit of a run Ray already has: the same run
                raise
        if driver_only:
            return (f"Submitted to the Ray cluster as Ray job {run_id}: Ray Train places its {launch.processes * launch.nodes} workers "
                    f"over {launch.nodes} nodes ({launch.processes} per node)")
        return f"Submitted to the Ray cluster as Ray job {run_id}; it starts when a node has {r.describe()} free"

    def poll(self, run_id: str) -> RunState:
        try:
            info = self.client.get_job_info(run_id)
        except RuntimeError as exc:
            if "does not exist" in str(exc):
                return RunState("missing")
            raise
        status = info.status.value
        where = f"node {info.driver_node_id[:12]}" if info.driver_node_id else ""
        if status in _STATES:
            return RunState(_STATES[status], info.message or "", where)
        error_type = getattr(info.error_type, "value", info.error_type)
        if error_type == _TRAINING_FAILED:
            return RunState("failed", exit_reason(info.driver_exit_code, where), where)
        why = _WHY.get(error_type) or (info.message or "no reason given").splitlines()[0][:300]
        if error_type == "JOB_SUPERVISOR_ACTOR_START_TIMEOUT":  # it only waited too long in Ray's queue
            return RunState("expired", f"Ray job {run_id} failed: {why}", where)
        return RunState("lost", f"Ray job {run_id} failed: {why}", where)

    def stop(self, run_id: str) -> None:
        self.client.stop_job(run_id)  # Ray: SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S

    def reattach(self, run_id: str) -> bool:
        return self.poll(run_id).state != "missing"

    def training_here(self) -> bool:
        return False  # the cluster's nodes train; this machine's cores stay chat's

    def shutdown(self) -> None:
        pass  # Ray jobs outlive the server; the next start re-attaches to them
