"""A run's records, read by the server: the metrics stream a training run writes (metrics.jsonl),
turned into the job's events and checkpoints as OpenAI shows them, and the result file.

The worker (server/jobs/worker.py) tails each run's stream with Tail and hands every record to
on_record; what is here knows the records' shape, not the job's life.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from tunejob.monitor.metrics import read_metrics


def on_record(store, job_id: str, r: dict) -> None:
    """One record of the run's metrics.jsonl into the job: OpenAI's metrics events, checkpoints,
    the trainer's own events. Each is written once, however often the stream is read again."""
    job = store.get_job(None, job_id)
    kind, step = r.get("kind"), r.get("step", 0)
    seen = job.get("_seen", {"train": 0, "eval": 0})
    if kind == "start":
        store.update_job(job_id, _total_steps=r.get("total_steps"))
    elif kind == "train" and step > seen["train"]:
        last_train = {"step": step, "train_loss": r["train_loss"], **_pick(r, ("train_mean_token_accuracy",)), **_rewards(r, "")}
        said = f"reward={r['train_reward_mean']:.4f}" if "train_reward_mean" in r else f"training loss={r['train_loss']:.4f}"
        store.add_event(job_id, f"Step {step}: {said}", type="metrics", data={**last_train, "total_steps": job.get("_total_steps")})
        seen["train"] = step
        store.update_job(job_id, _seen=seen, _last_train=last_train)
    elif kind == "eval" and step > seen["eval"]:
        data = {"step": step, **_pick(r, ("valid_loss", "valid_mean_token_accuracy", "full_valid_loss", "full_valid_mean_token_accuracy")),
                **_rewards(r, "valid_")}
        last = job.get("_last_train") or {}
        if last.get("step") == step:  # OpenAI's metrics event at an eval step carries both losses
            data.update({k: v for k, v in last.items() if k != "step"})
        data["total_steps"] = job.get("_total_steps")
        said = f"validation reward={r['valid_reward_mean']:.4f}" if "valid_reward_mean" in r else f"validation loss={r['valid_loss']:.4f}"
        store.add_event(job_id, f"Step {step}: {said}", type="metrics", data=data)
        seen["eval"] = step
        store.update_job(job_id, _seen=seen, _last_eval={k: v for k, v in data.items() if k != "total_steps"})
    elif kind == "checkpoint":
        metrics = {**(job.get("_last_train") or {})}
        if (job.get("_last_eval") or {}).get("step") == step:
            metrics.update({k: v for k, v in job["_last_eval"].items() if k != "step"})
        metrics["step"] = step
        store.add_checkpoint(job_id, step, {"fine_tuned_model_checkpoint": f"{job['_ft_name']}:ckpt-step-{step}", "metrics": metrics,
                                            "_path": f"checkpoints/step-{step:06d}"})
        msg = f"Checkpoint created at step {step}"
        if not store.has_event(job_id, msg):
            store.add_event(job_id, msg)
    elif kind == "event" and r.get("message") and not store.has_event(job_id, r["message"]):
        store.add_event(job_id, r["message"], level="warn" if "NaN" in r["message"] else "info")


def _rewards(record: dict, prefix: str) -> dict:
    """A DPO record's reward metrics (rewards_* / valid_rewards_*), or a reinforcement record's
    (reward mean and std, each sub-grader's score_*, KL, answer lengths), for events and checkpoints."""
    rl = ("kl", "clip_ratio", f"{prefix}completion_tokens_mean", f"{prefix}completion_tokens_std", f"{prefix}truncated_ratio")
    own = prefix or "train_"  # a reinforcement train record's rewards are train_reward_* / train_score_*
    return {k: v for k, v in record.items() if k.startswith((f"{prefix}rewards_", f"{own}reward_", f"{own}score_")) or k in rl}


def _pick(record: dict, keys: tuple[str, ...]) -> dict:
    return {k: record[k] for k in keys if k in record}


class Tail:
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


def results_csv(metrics: Path) -> bytes:
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


def last_error(log_path: Path) -> str | None:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith(("error: ", "internal error: ")):
            return line.split(": ", 1)[1][:1000]
    return None
