"""`tunejob watch RUN_DIR`: follow a local run's metric stream from outside the training process.

Reads metrics.jsonl from where it left off (records are whole lines, flushed one by one), feeds
them to the same live view as `tunejob run`, and ends at the stream's "end" record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from tunejob.errors import TunejobError
from tunejob.monitor.live import make_console_sink


def _total_steps(run_dir: Path) -> int:
    summary = run_dir / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text()).get("total_steps") or 0
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    return (cfg or {}).get("hyperparameters", {}).get("max_steps") or 0


def watch_run(run_dir: Path, interval: float = 1.0, timeout: float | None = None) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise TunejobError(f"{run_dir}: no such run directory")
    sink, offset, last, deadline = None, 0, {}, (time.time() + timeout) if timeout else None
    try:
        while True:
            if path.is_file():
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                complete = chunk[: chunk.rfind(b"\n") + 1]  # a torn last line waits for the next read
                offset += len(complete)
                for line in complete.splitlines():
                    record = json.loads(line)
                    if sink is None:
                        sink = make_console_sink(_total_steps(run_dir) or record.get("step", 0))
                    if record.get("kind") in ("train", "eval") and sink.total < record["step"]:
                        sink.total = record["step"]
                    sink.write(record)
                    last = record
                    if record.get("kind") == "end":
                        return last
            if deadline and time.time() > deadline:
                raise TunejobError(f"{run_dir}: no end of run within {timeout:.0f} s (last step {last.get('step', 0)})")
            time.sleep(interval)
    finally:
        if sink is not None:
            sink.close()
