"""What a run's end does to its job: pure decisions, applied by the worker as one conditional
update (server/jobs/lifecycle.py), so the job as it is at that instant decides, not a stale copy.

In order:
    cancelled / paused   the API already answered with that status; the run only had to stop
    settled              the job was already final: only the run is cleared
    requeued             the worker stopped the run and the job was resumed meanwhile: it starts
                         again from its last checkpoint; no retry is used (a pause is not a loss)
    broken               the server gave up following the run (worker.FOLLOW_FAILURES): failed
    succeeded / failed   the training process ended by itself
    expired              it waited for resources longer than the executor keeps a run queued
    lost                 its node or process died under it: resumed at most `node_retries` times
"""

from __future__ import annotations

import time

from tunejob.server.jobs.executor import RunState


def outcome_of(job: dict, state: RunState, stopping: bool, broken: str | None) -> str:
    status = job["status"]
    if status in ("cancelled", "paused"):
        return status
    if status not in ("queued", "running"):
        return "settled"  # already final (left so by a server before the state machine): only the run is cleared
    if job.get("control") or (stopping and not broken):
        return "requeued"
    if broken:
        return "broken"
    if state.state in ("succeeded", "failed", "expired"):
        return state.state
    return "lost"


def fields_for(outcome: str, job: dict, state: RunState, node_retries: int, error: str | None = None) -> dict:
    """The job's new fields (its status among them) for an outcome; `error` is the failed run's last line."""
    done = {"_run": None, "control": None}
    if outcome in ("cancelled", "paused", "settled"):
        return done
    if outcome in ("requeued", "expired"):
        return {**done, "status": "queued"}
    if outcome == "broken":
        return {**done, **_failed("server_error", f"the server could not follow its run: {error}")}
    if outcome == "failed":
        return {**done, **_failed("training_failed", error or state.detail or "training failed")}
    if outcome == "lost":
        retries = int(job.get("_retries", 0))
        if retries < node_retries:
            return {**done, "status": "queued", "_retries": retries + 1}
        return {**done, **_failed("run_lost", f"the run was lost {retries + 1} time(s), the last: {lost_why(state)}; its checkpoints "
                                              f"are kept (the server's --node-retries allows {node_retries} resumes)")}
    raise ValueError(outcome)  # succeeded: the worker builds its fields (result file, model name)


def _failed(code: str, message: str) -> dict:
    return {"status": "failed", "finished_at": int(time.time()), "error": {"code": code, "message": message, "param": None}}


def lost_why(state: RunState) -> str:
    return state.detail or {"missing": "the executor has no such run: its submission failed",
                            "stopped": "it was stopped outside tunejob"}.get(state.state, f"the run is {state.state}")


def events_for(outcome: str, after: dict, state: RunState, node_retries: int) -> list[tuple[str, str]]:
    """(level, message) lines for the job's events once the update went through."""
    if outcome == "cancelled":
        return [("info", "Fine-tuning job cancelled")]
    if outcome == "paused":
        return [("info", "Fine-tuning job paused; resume continues from the last checkpoint")]
    if outcome == "requeued":
        return [("info", "The stopped run has ended; the job starts again from its last checkpoint")]
    if outcome == "expired":
        return [("info", f"Still waiting for resources ({state.detail}); submitted again")]
    if outcome in ("broken", "failed", "lost") and after["status"] == "failed":
        return [("error", f"Fine-tuning job failed: {after['error']['message']}")]
    if outcome == "lost":
        return [("warn", f"The run was lost ({lost_why(state)}); resuming from the last checkpoint "
                         f"(retry {after['_retries']} of {node_retries})")]
    return []
