"""The live terminal view of a run: progress with ETA, current and best losses, a small
train-vs-validation chart that redraws, and checkpoint / early-stopping events.

A metric-stream sink like the others. On a terminal it draws with rich; elsewhere (CI, pipes)
`make_console_sink` returns the plain-line sink instead.
"""

from __future__ import annotations

import math
import sys
import time

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from tunejob.monitor.metrics import LineSink, curve_value, rewards_text

CHART_WIDTH, CHART_HEIGHT = 60, 8


def make_console_sink(total_steps: int, stream=None, force_live: bool | None = None):
    stream = stream or sys.stderr
    live = force_live if force_live is not None else stream.isatty()
    return LiveSink(total_steps, stream) if live else LineSink(total_steps, stream)


def chart(train: list[tuple[int, float]], valid: list[tuple[int, float]], total_steps: int,
          width: int = CHART_WIDTH, height: int = CHART_HEIGHT) -> list[str]:
    """Rows of a character chart: '.' training loss, 'o' validation loss, steps left to right."""
    points = [v for _, v in train + valid if math.isfinite(v)]
    if not points:
        return []
    lo, hi = min(points), max(points)
    span = (hi - lo) or 1.0
    grid = [[" "] * width for _ in range(height)]

    def put(step: int, value: float, ch: str) -> None:
        if not math.isfinite(value):
            return
        x = min(width - 1, int((step - 1) / max(total_steps - 1, 1) * (width - 1)))
        y = min(height - 1, int((hi - value) / span * (height - 1)))
        if grid[y][x] != "o":
            grid[y][x] = ch

    for s, v in train:
        put(s, v, ".")
    for s, v in valid:
        put(s, v, "o")
    labels = [f"{hi:7.3f} ", " " * 8, f"{lo:7.3f} "]
    rows = []
    for i, row in enumerate(grid):
        label = labels[0] if i == 0 else labels[2] if i == height - 1 else labels[1]
        rows.append(label + "|" + "".join(row))
    rows.append(" " * 8 + "+" + "-" * width + f"> step (of {total_steps})")
    return rows


class LiveSink:
    def __init__(self, total_steps: int, stream=None):
        self.total = total_steps
        self.console = Console(file=stream or sys.stderr)
        self.train: list[tuple[int, float]] = []
        self.valid: list[tuple[int, float]] = []
        self.events: list[str] = []
        self.step, self.started = 0, time.time()
        self.first_step: int | None = None
        self.best: tuple[int, float] | None = None
        self.last: dict = {}
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def write(self, record: dict) -> None:
        kind, step = record["kind"], record["step"]
        if kind == "train":
            self.train.append((step, curve_value(record)[0]))  # the loss, or a reinforcement run's mean reward
            self.step, self.last = step, record
            if self.first_step is None:
                self.first_step, self.started = step - 1, time.time()
        elif kind == "eval":
            value, higher = curve_value(record)
            self.valid.append((step, value))
            if self.best is None or (value > self.best[1] if higher else value < self.best[1]):
                self.best = (step, value)
        elif record.get("message"):
            self.events = (self.events + [f"step {step}: {record['message']}"])[-4:]
        self.live.update(self._render())

    def _render(self):
        done = self.step / max(self.total, 1)
        bar = "#" * int(30 * done) + "-" * (30 - int(30 * done))
        steps_done = self.step - (self.first_step or 0)
        eta = (time.time() - self.started) / steps_done * (self.total - self.step) if steps_done > 0 else None
        eta_s = f"ETA {int(eta // 60)}m{int(eta % 60):02d}s" if eta is not None else "ETA -"
        head = f"[{bar}] step {self.step}/{self.total}  {eta_s}"
        if self.last:
            head += f"  train {self.last['train_loss']:.4f}  {self.last.get('tokens_per_second', 0):.0f} tok/s" + rewards_text(self.last)
        if self.valid:
            head += f"  valid {self.valid[-1][1]:.4f}"
        if self.best:
            head += f"  best {self.best[1]:.4f} @ {self.best[0]}"
        parts = [Text(head)] + [Text(r) for r in chart(self.train, self.valid, self.total)]
        parts += [Text(e, style="dim") for e in self.events]
        return Group(*parts)

    def close(self) -> None:
        self.live.update(self._render())
        self.live.stop()
