"""The metric stream: one record type shared by every backend, and the sinks that read it.

Field names follow OpenAI's fine-tuning `metrics` events (step, train_loss,
train_mean_token_accuracy, valid_loss, valid_mean_token_accuracy, full_valid_loss, ...), so a
local run and an API job produce the same stream. A record has `kind` "train" (one optimizer
step) or "eval" (the whole validation split). tunejob always evaluates on the full split, so an
eval record carries the same value as valid_loss and full_valid_loss.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Protocol


class Sink(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """metrics.jsonl: one JSON object per line, flushed after each so a killed run keeps them."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            # On resume, records past the checkpoint were produced by the lost part of the run.
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def rewards_text(record: dict, prefix: str = "") -> str:
    """A DPO record's reward margin and accuracy, or a reinforcement record's reward, KL and answer
    length, for a progress line ("" for supervised records)."""
    rl = prefix or "train_"  # a reinforcement train record's keys are train_reward_*
    if f"{rl}reward_mean" in record:
        kl = f"  kl {record['kl']:.4f}" if "kl" in record else ""
        return (f"  reward {record[f'{rl}reward_mean']:.3f} (std {record[f'{rl}reward_std']:.3f}){kl}"
                f"  answer {record.get(f'{prefix}completion_tokens_mean', 0):.1f} tokens")
    if f"{prefix}rewards_margin" not in record:
        return ""
    return f"  margin {record[f'{prefix}rewards_margin']:.3f}  reward acc {record[f'{prefix}rewards_accuracy']:.2f}"


def curve_value(record: dict) -> tuple[float, bool] | None:
    """(the number a progress view plots for a train or eval record, whether higher is better):
    the loss, or for reinforcement the mean reward (its GRPO loss says little)."""
    prefix = "train_" if record["kind"] == "train" else "valid_"
    if f"{prefix}reward_mean" in record:
        return record[f"{prefix}reward_mean"], True
    value = record.get(f"{prefix}loss")
    return (value, False) if value is not None else None


class LineSink:
    """Plain progress lines on stderr (the rich live view replaces this on a terminal)."""

    def __init__(self, total_steps: int, stream=None):
        self.total = total_steps
        self.stream = stream or sys.stderr

    def write(self, record: dict) -> None:
        step = record["step"]
        if record["kind"] == "train":
            acc = f"acc {record['train_mean_token_accuracy']:.3f}  " if "train_mean_token_accuracy" in record else ""
            line = (
                f"step {step}/{self.total}  train_loss {record['train_loss']:.4f}  "
                f"{acc}lr {record['learning_rate']:.2e}  {record['tokens_per_second']:.0f} tok/s" + rewards_text(record)
            )
        elif record["kind"] == "eval":
            loss = f"  valid_loss {record['valid_loss']:.4f}  acc {record['valid_mean_token_accuracy']:.3f}" if "valid_loss" in record else ""
            line = f"step {step}/{self.total}{loss}" + rewards_text(record, "valid_")
        elif record["kind"] == "start":
            return  # the trainer has printed the same line already
        else:
            line = f"step {step}: {record.get('message', record['kind'])}"
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class TensorBoardSink:
    """TensorBoard event files under RUN_DIR/tensorboard (`tensorboard --logdir runs/`)."""

    TAGS = {"train_loss": "loss/train", "valid_loss": "loss/valid", "train_mean_token_accuracy": "accuracy/train",
            "valid_mean_token_accuracy": "accuracy/valid", "learning_rate": "learning_rate", "tokens_per_second": "throughput/tokens_per_second",
            # DPO (TRL's tag names)
            **{f"{p}rewards_{k}": f"rewards/{k}{'_valid' if p else ''}" for p in ("", "valid_") for k in ("chosen", "rejected", "margin", "accuracy")}}

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events past the resumed checkpoint, as JsonlSink truncates.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, record: dict) -> None:
        for key, tag in self.TAGS.items():
            value = record.get(key)
            if isinstance(value, (int, float)):
                self.writer.add_scalar(tag, value, record["step"])
        if record["kind"] == "eval":
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Stream:
    """Fan a record out to every sink."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def emit(self, record: dict) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_metrics(path: Path) -> list[dict]:
    """All complete records of a metrics.jsonl (a torn last line from a kill is skipped)."""
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
