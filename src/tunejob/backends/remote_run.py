"""An API job's run directory: provider events in, the same files as a local run out."""

from __future__ import annotations

import sys
from pathlib import Path

from tunejob.monitor.live import make_console_sink
from tunejob.monitor.metrics import JsonlSink, Stream, read_metrics
from tunejob.train.checkpoint import write_json_atomic

TERMINAL = {"succeeded", "failed", "cancelled"}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class RemoteRun:
    """The run directory of an API job, fed one record at a time.

    Re-attaching after a kill is safe: records already in metrics.jsonl are skipped by step,
    so a record written just before the kill (and before the job store saw its event id) is not
    written twice.
    """

    def __init__(self, run_dir: Path, spec_yaml: str, total_steps: int = 0, console: bool = True):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(spec_yaml)
        path = self.dir / "metrics.jsonl"
        existing = read_metrics(path) if path.exists() else []
        self.seen = {k: max((r["step"] for r in existing if r.get("kind") == k), default=0) for k in ("train", "eval")}
        self.records = existing
        self.stream = Stream([JsonlSink(path), *([make_console_sink(total_steps or 1)] if console else [])])

    def emit(self, record: dict) -> None:
        kind = record.get("kind")
        if kind in self.seen:
            if record["step"] <= self.seen[kind]:
                return
            self.seen[kind] = record["step"]
            self.records.append(record)
        self.stream.emit(record)

    def finish(self, summary: dict) -> dict:
        evals = [r for r in self.records if r.get("kind") == "eval" and r.get("valid_loss") is not None]
        best = min(evals, key=lambda r: r["valid_loss"]) if evals else None
        trains = [r for r in self.records if r.get("kind") == "train"]
        summary = {"run_dir": str(self.dir), "steps": trains[-1]["step"] if trains else 0,
                   "best_step": best["step"] if best else None, "best_valid_loss": best["valid_loss"] if best else None, **summary}
        self.stream.emit({"kind": "end", "step": summary["steps"], "stop_reason": summary.get("stop_reason"), "best_step": summary["best_step"],
                          "message": f"finished: {summary.get('status')}"})
        self.stream.close()
        write_json_atomic(self.dir / "summary.json", summary)
        return summary


def metrics_records(data: dict) -> list[dict]:
    """OpenAI-style `metrics` event data -> stream records (train, and eval when validation is in it)."""
    out = []
    step = data.get("step")
    if step is None:
        return out
    if data.get("train_loss") is not None:
        out.append({"kind": "train", "step": step, "train_loss": data["train_loss"],
                    "train_mean_token_accuracy": data.get("train_mean_token_accuracy") or 0.0,
                    "learning_rate": data.get("learning_rate") or 0.0, "tokens_per_second": 0.0, **_rewards(data, "")})
    valid = data.get("full_valid_loss") if data.get("full_valid_loss") is not None else data.get("valid_loss")
    if valid is not None:
        acc = data.get("full_valid_mean_token_accuracy") or data.get("valid_mean_token_accuracy") or 0.0
        out.append({"kind": "eval", "step": step, "valid_loss": valid, "valid_mean_token_accuracy": acc,
                    "full_valid_loss": data.get("full_valid_loss"), "full_valid_mean_token_accuracy": data.get("full_valid_mean_token_accuracy"),
                    **_rewards(data, "valid_")})
    return out


def _rewards(data: dict, prefix: str) -> dict:
    """DPO's reward metrics, under the local run's names (rewards_* / valid_rewards_*), as
    `tunejob serve` sends them; OpenAI's spec leaves event data free-form."""
    return {k: v for k, v in data.items() if k.startswith(f"{prefix}rewards_") and isinstance(v, (int, float))}

