"""A fine-tuning job's life, written down: its states, the moves between them, and who makes each.

    validating_files ──► queued ──► running ──► succeeded | failed
           │               ▲ │ ▲      │ │
           │               │ │ └──────┘ │  the run was lost (resumed from its checkpoint) or
           │               │ │          │  expired (waited too long for resources): queued again
           │               │ ▼          ▼
           │             paused ◄───────┘  pause (API); resume (API) queues it again
           ▼               ▼
       cancelled ◄──── any non-final state (API)

The API moves a job to cancelled / paused at once and answers with that status, as OpenAI does;
when the job has a run (`_run`), it also sets `control`, and the worker stops the run and clears
`control` once the run has ended. So `control` is set exactly while a run is being stopped.

Every status change is one conditional update (Store.transition): the move is decided on the row
as it is at that instant, never on a copy read earlier. A worker that read `queued`, asked the
executor (an HTTP call on Ray) and then wrote `running` could otherwise overwrite a cancel that
landed in between (issue 31, finding 1); here the write sees `cancelled` and decides again.
"""

from __future__ import annotations

import time
from typing import Callable

ACTIVE = ("validating_files", "queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")

MOVES: dict[str, frozenset[str]] = {
    "validating_files": frozenset({"queued", "failed", "cancelled"}),
    "queued": frozenset({"queued", "running", "succeeded", "failed", "cancelled", "paused"}),
    "running": frozenset({"queued", "succeeded", "failed", "cancelled", "paused"}),
    "paused": frozenset({"queued", "cancelled"}),
    **{s: frozenset() for s in TERMINAL},
}

# A decision: given the job as it is now, the fields to write (with or without `status`), or None
# to leave it as it is.
Decide = Callable[[dict], "dict | None"]


class InvalidState(Exception):
    """The API asked a move the job's status does not allow (a 400 `invalid_state`)."""


def check_move(before: str, after: str) -> None:
    if after not in MOVES.get(before, ()):
        raise ValueError(f"a job cannot move from {before} to {after}")  # a bug in the server, not the client's doing


def cancel(store, job_id: str) -> dict:
    return _stop(store, job_id, "cancel", "cancelled", (*ACTIVE, "paused"), "cannot be cancelled")


def pause(store, job_id: str) -> dict:
    return _stop(store, job_id, "pause", "paused", ("queued", "running"), "cannot be paused")


def _stop(store, job_id: str, control: str, status: str, allowed: tuple[str, ...], why: str) -> dict:
    """OpenAI answers with the new status at once; a job with a run gets `control`, which the
    worker turns into a stop of the run (SIGTERM: its last checkpoint stays)."""
    def decide(job: dict) -> dict | None:
        if job["status"] not in allowed:
            return None
        done = {"finished_at": int(time.time())} if status == "cancelled" else {}
        return {"status": status, **done, **({"control": control} if job.get("_run") else {})}

    moved = store.transition(job_id, decide)
    if moved is None:
        raise InvalidState(f"Job {job_id} is {store.get_job(None, job_id)['status']} and {why}")
    if not moved.get("_run"):  # nothing to stop: the move is the whole of it
        store.add_event(job_id, f"Fine-tuning job {status}")
    return moved


def resume(store, job_id: str) -> dict:
    """A pending `control` stays: the worker is still stopping the old run and clears it then;
    the job starts again (from its last checkpoint) once that run has ended."""
    moved = store.transition(job_id, lambda job: {"status": "queued", "_queued_at": time.time()} if job["status"] == "paused" else None)
    if moved is None:
        raise InvalidState(f"Job {job_id} is {store.get_job(None, job_id)['status']}; only a paused job can be resumed")
    store.add_event(job_id, "Fine-tuning job resumed")
    return moved
