"""The diagnosis over a table of synthetic curves (clean and noisy) and a real run's stream."""

from __future__ import annotations

import math
import random

import pytest

from tunejob.monitor.diagnose import KINDS, diagnose


def stream(train_fn, val_fn, steps=200, eval_every=20, noise_t=0.0, noise_v=0.0, seed=0, spikes=(), nan_at=None):
    rng = random.Random(seed)
    out = []
    for s in range(1, steps + 1):
        loss = train_fn(s) + rng.gauss(0, noise_t)
        if s in spikes:
            loss *= 2.5
        if s == nan_at:
            loss = float("nan")
        out.append({"kind": "train", "step": s, "train_loss": loss, "learning_rate": 2e-4, "batch": [s % 7, s % 11]})
        if s % eval_every == 0:
            out.append({"kind": "eval", "step": s, "valid_loss": val_fn(s) + rng.gauss(0, noise_v)})
    return out


def healthy_t(s):
    return 2.0 * math.exp(-s / 25) + 1.0


def healthy_v(s):
    return 2.0 * math.exp(-s / 25) + 1.1


def overfit_v(s):
    return 1.2 + 1.5 * math.exp(-s / 20) + (0.004 * (s - 60) if s > 60 else 0)


def overfit_t(s):
    return 2.0 * math.exp(-s / 40) + 0.3


CASES = [
    ("healthy clean", stream(healthy_t, healthy_v), "healthy"),
    ("healthy noisy", stream(healthy_t, healthy_v, noise_t=0.08, noise_v=0.02, seed=3), "healthy"),
    ("overfitting clean", stream(overfit_t, overfit_v), "overfitting"),
    ("overfitting noisy", stream(overfit_t, overfit_v, noise_t=0.08, noise_v=0.02, seed=5), "overfitting"),
    ("flat", stream(lambda s: 2.5, lambda s: 2.6, noise_t=0.01, noise_v=0.005, seed=1), "flat"),
    ("spikes", stream(healthy_t, healthy_v, noise_t=0.03, seed=2, spikes=(57, 130)), "spikes"),
    ("divergence", stream(lambda s: 2.0 * math.exp(-s / 30) + 1 + (0.002 * math.exp((s - 100) / 15) if s > 100 else 0), healthy_v), "divergence"),
    ("nan", stream(healthy_t, healthy_v, nan_at=90), "divergence"),
    ("not converged", stream(lambda s: 3.0 - 0.008 * s, lambda s: 3.1 - 0.008 * s, noise_t=0.02, noise_v=0.005, seed=4), "not_converged"),
]


@pytest.mark.parametrize("name, records, verdict", CASES, ids=[c[0] for c in CASES])
def test_each_pattern_is_recognised(name, records, verdict):
    result = diagnose(records, epochs=3)
    assert result["verdict"] == verdict, result
    f = result["findings"][0]
    assert set(f) >= {"kind", "steps", "message", "advice"} and f["message"] and f["advice"]
    assert all(x["kind"] in KINDS for x in result["findings"])


def test_findings_carry_the_numbers():
    over = diagnose(stream(overfit_t, overfit_v), epochs=4)["findings"][0]
    assert over["steps"][0] == 60 and "use the checkpoint of step 60" in over["advice"] and "epoch(s) instead of 4" in over["advice"]
    spikes = next(f for f in diagnose(stream(healthy_t, healthy_v, noise_t=0.03, seed=2, spikes=(57, 130)))["findings"] if f["kind"] == "spikes")
    assert spikes["steps"] == [57, 130] and spikes["examples"] == [[57 % 7, 57 % 11], [130 % 7, 130 % 11]]
    flat = diagnose(stream(lambda s: 2.5, lambda s: 2.6, noise_t=0.01, seed=1))["findings"][0]
    assert "1.0e-03" in flat["advice"]  # 5 x the 2e-4 in the stream
    nan = diagnose(stream(healthy_t, healthy_v, nan_at=90))["findings"][0]
    assert nan["steps"] == [90]


@pytest.mark.parametrize("seed", range(25))
def test_noisy_healthy_runs_are_never_called_overfitting(seed):
    records = stream(healthy_t, healthy_v, noise_t=0.1, noise_v=0.03, seed=100 + seed)
    kinds = {f["kind"] for f in diagnose(records)["findings"]}
    assert "overfitting" not in kinds and "divergence" not in kinds and "flat" not in kinds


def test_short_or_empty_streams_do_not_crash():
    assert diagnose([])["verdict"] == "healthy"
    assert diagnose(stream(healthy_t, healthy_v, steps=3, eval_every=1))["verdict"] in KINDS
