"""diagnose() on DPO streams: synthetic curves for each of DPO's patterns and a healthy run."""

from __future__ import annotations

import math
import random

from tunejob.monitor.diagnose import diagnose


def dpo_stream(loss_fn, margin_fn, acc_fn, valid_acc_fn, steps=120, eval_every=10, seed=0, noise=0.01):
    rng = random.Random(seed)
    out = []
    for s in range(1, steps + 1):
        m = margin_fn(s) + rng.gauss(0, noise)
        out.append({"kind": "train", "step": s, "train_loss": loss_fn(s) + rng.gauss(0, noise), "learning_rate": 2e-4,
                    "rewards_chosen": m / 2, "rewards_rejected": -m / 2, "rewards_margin": m,
                    "rewards_accuracy": min(1.0, max(0.0, acc_fn(s) + rng.gauss(0, noise)))})
        if s % eval_every == 0:
            out.append({"kind": "eval", "step": s, "valid_loss": loss_fn(s) + 0.05, "valid_rewards_accuracy": valid_acc_fn(s),
                        "valid_rewards_margin": m * 0.8})
    return out


def kinds(result):
    return [f["kind"] for f in result["findings"]]


def test_healthy_dpo_run():
    r = diagnose(dpo_stream(lambda s: 0.693 * math.exp(-s / 40) + 0.1, lambda s: 2 * (1 - math.exp(-s / 40)),
                            lambda s: 0.5 + 0.45 * (1 - math.exp(-s / 20)), lambda s: 0.5 + 0.4 * (1 - math.exp(-s / 20))))
    assert r["verdict"] in ("healthy", "not_converged"), r


def test_loss_stuck_at_ln2_with_chance_accuracy_is_not_learning():
    r = diagnose(dpo_stream(lambda s: math.log(2), lambda s: 0.0, lambda s: 0.5, lambda s: 0.5, noise=0.005))
    assert r["verdict"] == "flat"
    assert "ln 2" in r["findings"][0]["message"] and "learning_rate" in r["findings"][0]["advice"]


def test_falling_validation_accuracy_with_growing_margin_is_overfitting():
    r = diagnose(dpo_stream(lambda s: 0.693 * math.exp(-s / 30), lambda s: 0.05 * s, lambda s: min(1.0, 0.5 + s / 100),
                            lambda s: 0.85 if s <= 40 else 0.85 - (s - 40) / 200))
    over = next(f for f in r["findings"] if f["kind"] == "overfitting")
    assert over["steps"][0] == 40 and "validation reward accuracy fell" in over["message"]


def test_exploding_margin_blames_beta_or_learning_rate():
    r = diagnose(dpo_stream(lambda s: max(0.0, 0.693 - s / 50), lambda s: 0.3 * s, lambda s: 1.0, lambda s: 0.95))
    assert r["verdict"] == "margin_exploding"
    f = r["findings"][0]
    assert "method.beta" in f["advice"] and "learning_rate" in f["advice"] and 30 <= f["steps"][0] <= 40


def test_supervised_streams_are_read_as_before():
    """No rewards_margin: the DPO rules stay out (a flat supervised loss is still 'flat' from _flat)."""
    records = [{"kind": "train", "step": s, "train_loss": 2.0, "learning_rate": 2e-4} for s in range(1, 60)]
    r = diagnose(records)
    assert r["verdict"] == "flat" and "ln 2" not in r["findings"][0]["message"]
