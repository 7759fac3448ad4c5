"""Where a server job's training runs: the seam between the job worker and the machines.

The worker (server/jobs/worker.py) owns the job's life in the store (status, events, checkpoints, the
result file); an executor only starts `tunejob run job.yaml` somewhere, says how that run is, and
stops it. Two implementations:

    local   child processes on this machine, `slots` at a time (one per GPU on a GPU host); a
            child dies with the server (PR_SET_PDEATHSIG), so nothing is re-attached: the job
            resumes from its last checkpoint on the next start
    ray     one Ray job per run on a Ray cluster (server/jobs/ray_cluster.py); Ray jobs outlive the
            server, so a restarted server re-attaches to them by their submission id

A run id is chosen by the worker and recorded in the store *before* `submit`, so a server killed
at any point either finds the run again or knows it never started: a job never runs twice.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

# Pause and cancel send SIGTERM; the trainer finishes the optimizer step in flight and checkpoints
# it before exiting. A step of the default 135M model at batch 8 is ~20 s on 2 cores at 180 real
# tokens/s (bench/RESULTS.md), ~45 s on the 1 thread a training child gets beside chat, and the
# checkpoint ~1-5 s more; model loading before the first step can take longer still on a cold
# cache. Only past this is the run killed (it then resumes from the checkpoint before).
STOP_GRACE_S = 300


@dataclass(frozen=True)
class Resources:
    """What one job asks for: CPUs (= its torch threads), GPUs, Ray custom resources."""

    cpus: float = 1
    gpus: float = 0
    custom: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Resources":
        return cls(**(d or {}))

    def describe(self) -> str:
        parts = [f"{self.cpus:g} CPU"] + ([f"{self.gpus:g} GPU"] if self.gpus else []) + [f"{v:g} {k}" for k, v in sorted(self.custom.items())]
        return ", ".join(parts)


def resources_for(spec: dict, requested, default_cpus: float | None = None) -> Resources:
    """A job's resources from `"tunejob": {"resources": ...}` (requests.JobResources) and the
    spec's `distributed` section: each process needs a CPU, and a GPU job one GPU per process.
    CPUs not asked for are `default_cpus` (the local executor's share of a slot), else one per process."""
    processes = int((spec.get("distributed") or {}).get("processes", 1))
    cpus = requested.cpus if requested and requested.cpus else (default_cpus or processes)
    gpus = requested.gpus if requested and requested.gpus else 0
    if gpus and gpus < processes:
        gpus = processes
    return Resources(cpus=max(cpus, processes), gpus=gpus, custom=dict(requested.custom or {}) if requested else {})


def visible_gpus() -> list[str]:
    """The GPUs of this machine that a child may be given ($CUDA_VISIBLE_DEVICES where set)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


@dataclass(frozen=True)
class Launch:
    """One run of a job: the spec to train, where its output goes, what it needs."""

    job_id: str
    spec_path: Path
    log_path: Path
    resources: Resources
    processes: int = 1
    nodes: int = 1  # > 1: the Ray executor runs it as a Ray Train job over processes x nodes workers
    # variables the run needs beyond the executor's own (a reinforcement job's grader endpoint and key)
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RunState:
    """How a run is now. `state`: pending (waiting for resources), running, succeeded, failed
    (training exited non-zero), stopped (by `stop`), lost (its node or process died under it:
    the worker retries from the last checkpoint), expired (it waited for resources longer than
    the executor keeps a run queued: submitted again, not counted as a loss), missing (the
    executor does not know the id)."""

    state: str
    detail: str = ""
    where: str = ""  # the node it runs on, when the executor knows


class Executor(Protocol):
    name: str
    poll_s: float  # seconds between polls of one run

    def waiting_for(self, launch: Launch) -> str | None:
        """Why a run cannot be submitted now (None: submit it). An executor that queues runs
        itself (Ray) always answers None and reports `pending` from poll instead."""

    def submit(self, run_id: str, launch: Launch) -> str:
        """Start the run under `run_id`; returns a line for the job's events. Submitting an id
        that already exists must not start a second run."""

    def poll(self, run_id: str) -> RunState: ...

    def stop(self, run_id: str) -> None:
        """Ask the run to stop (SIGTERM: the trainer checkpoints), killing it after STOP_GRACE_S."""

    def reattach(self, run_id: str) -> bool:
        """After a server restart: whether the run still exists (running, or finished since)."""

    def training_here(self) -> bool:
        """Whether a run trains on this machine now (chat then keeps to its share of cores)."""

    def shutdown(self) -> None:
        """The server stops: end what cannot outlive it; leave what can."""


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class _Child:
    proc: subprocess.Popen
    slot: int
    job_id: str
    cpus: int = 1  # torch threads it holds of the executor's budget, all its processes together
    gpus: tuple[str, ...] = ()  # the GPU ids it was given (CUDA_VISIBLE_DEVICES); (): none set
    kill_at: float | None = None  # set by stop(): SIGKILL past this time


class LocalExecutor:
    """`tunejob run` child processes on this machine, at most `slots` at once, sharing `threads`
    torch threads (the cores training may use). A child holds the CPUs its job asks for (a job
    that asks none: its slot's share, threads / slots), bounded by `threads`, and its processes
    split them; a job asking GPUs gets that many GPUs of its own. A job that does not fit in what
    is free waits, queued, rather than every child getting the same threads whatever it asked.
    On a host with at least `slots` GPUs, a job asking none still gets one (one per slot)."""

    name = "local"
    poll_s = 0.25

    def __init__(self, slots: int = 1, threads: int = 1):
        self.slots, self.threads = max(1, slots), max(1, threads)
        self._children: dict[str, _Child] = {}
        self._gpus: list[str] | None = None

    @property
    def default_cpus(self) -> int:
        """The CPUs of a job that asks for none (jobs.py resolves them at creation)."""
        return max(1, self.threads // self.slots)

    def _all_gpus(self) -> list[str]:
        if self._gpus is None:
            self._gpus = visible_gpus()
        return self._gpus

    def _needs(self, launch: Launch) -> tuple[int, int]:
        """(CPUs, GPUs) the run holds while it lives."""
        cpus = min(self.threads, max(1, math.ceil(launch.resources.cpus)))
        gpus = math.ceil(launch.resources.gpus)
        if not gpus and self.slots > 1 and len(self._all_gpus()) >= self.slots:
            gpus = 1
        return cpus, gpus

    def _free(self) -> tuple[int, list[str]]:
        children = tuple(self._children.values())
        held = {g for c in children for g in c.gpus}
        return self.threads - sum(c.cpus for c in children), [g for g in self._all_gpus() if g not in held]

    def waiting_for(self, launch: Launch) -> str | None:
        busy = ", ".join(sorted(c.job_id for c in self._children.values()))
        if len(self._children) >= self.slots:
            return f"a free training slot ({len(self._children)} of {self.slots} in use: {busy})"
        (cpus, gpus), (free_cpus, free_gpus) = self._needs(launch), self._free()
        if cpus > free_cpus:
            return f"{cpus} free CPU(s) ({free_cpus} of the {self.threads} training threads free; in use by {busy})"
        if gpus > len(free_gpus):
            return f"{gpus} free GPU(s) ({len(free_gpus)} of {len(self._all_gpus())} free" + (f"; in use by {busy})" if busy else ")")
        return None

    def submit(self, run_id: str, launch: Launch) -> str:
        from tunejob.train.threads import child_env

        if run_id in self._children:
            return f"run {run_id} is already running"
        (cpus, gpus), (_, free_gpus) = self._needs(launch), self._free()
        given = tuple(free_gpus[:gpus])
        threads = max(1, cpus // max(1, launch.processes))  # as on Ray (ray_cluster.run_env): its processes split its CPUs
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **child_env(threads), **dict(launch.env)}
        if given:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(given)
        with launch.log_path.open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "tunejob", "run", str(launch.spec_path)], stdout=log, stderr=log,
                                    stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, env=env)
        slot = min(set(range(self.slots)) - {c.slot for c in self._children.values()})
        self._children[run_id] = _Child(proc, slot, launch.job_id, cpus, given)
        where = [f"slot {slot + 1} of {self.slots}"] if self.slots > 1 else []
        where += [f"{threads} thread(s)" + (" per process" if launch.processes > 1 else "")] + ([f"GPU {','.join(given)}"] if given else [])
        return f"training process {proc.pid} started ({', '.join(where)})"

    def poll(self, run_id: str) -> RunState:
        child = self._children.get(run_id)
        if child is None:
            return RunState("missing")
        rc = child.proc.poll()
        if rc is None:
            if child.kill_at is not None and time.time() > child.kill_at:
                child.proc.kill()
            return RunState("running")
        del self._children[run_id]
        if child.kill_at is not None:
            return RunState("stopped", f"exit code {rc}")
        return RunState("succeeded") if rc == 0 else RunState("failed", f"training exited with code {rc}")

    def stop(self, run_id: str) -> None:
        child = self._children.get(run_id)
        if child is not None and child.kill_at is None:
            child.proc.send_signal(signal.SIGTERM)  # the trainer checkpoints the step in flight, then exits (143)
            child.kill_at = time.time() + STOP_GRACE_S

    def reattach(self, run_id: str) -> bool:
        return False  # children die with the server (PR_SET_PDEATHSIG)

    def training_here(self) -> bool:
        # Asked from the chat thread while the worker thread adds and drops children: iterate a
        # snapshot (tuple() copies under the GIL), or a change mid-loop raises "dictionary changed
        # size during iteration" into every chat row (issue 31, finding 4).
        return any(c.proc.poll() is None for c in tuple(self._children.values()))

    def shutdown(self) -> None:
        for child in self._children.values():
            if child.proc.poll() is None:
                child.proc.kill()  # the job stays 'running' in the store and resumes on the next start
        for child in self._children.values():
            child.proc.wait()
        self._children.clear()

