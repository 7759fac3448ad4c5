"""What the diagnoses share: a finding, a metric series, smoothing and learning-rate advice
(monitor/diagnose.py reads loss curves with them, monitor/rewards.py reward curves)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

MIN_POINTS = 5


@dataclass
class Finding:
    kind: str
    message: str
    advice: str
    steps: list[int] = field(default_factory=list)
    examples: list[list[int]] = field(default_factory=list)  # for spikes: the batch of each step


def _series(records: list[dict], kind: str, key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in records if r.get("kind", kind) == kind and r.get(key) is not None]


def smooth(values: list[float], window: int | None = None) -> list[float]:
    """Centred rolling median: robust to single spikes, keeps the trend."""
    n = len(values)
    w = window or max(3, (n // 10) | 1)
    half = w // 2
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(n)]


def _lr_advice(lr: float | None, factor: float, fallback: str) -> str:
    if lr:
        return f"set learning_rate to about {lr * factor:.1e} (now {lr:.1e})"
    return fallback
