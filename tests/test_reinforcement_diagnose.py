"""RL's failure shapes in `diagnose` (monitor/rewards.py), on synthetic GRPO streams: each shape is
called by its name, and a healthy run is not called any of them."""

from __future__ import annotations

import random

from tunejob.monitor.diagnose import diagnose


def stream(steps=30, reward=lambda s: 0.2 + 0.02 * s, spread=lambda s: 0.2, kl=lambda s: 0.01 + 0.001 * s,
           length_std=lambda s: 6.0, valid=lambda s: 0.2 + 0.02 * s, seed=0):
    rng, out = random.Random(seed), []
    for s in range(1, steps + 1):
        out.append({"kind": "train", "step": s, "train_loss": rng.gauss(0, 0.05), "train_reward_mean": reward(s) + rng.gauss(0, 0.01),
                    "train_reward_std": spread(s), "kl": kl(s), "completion_tokens_mean": 20.0, "completion_tokens_std": length_std(s),
                    "learning_rate": 1e-4})
        if s % 5 == 0:
            out.append({"kind": "eval", "step": s, "valid_reward_mean": valid(s)})
    return out


def kinds(records) -> list[str]:
    return [f["kind"] for f in diagnose(records)["findings"]]


def test_a_rising_reward_is_healthy():
    assert diagnose(stream())["verdict"] == "healthy"


def test_flat_reward_with_no_spread_within_groups():
    found = diagnose(stream(reward=lambda s: 0.0, spread=lambda s: 0.0, valid=lambda s: 0.0))
    assert found["verdict"] == "flat"
    assert "partial credit" in found["findings"][0]["advice"]
    # the same flat mean with answers that do differ is not "nothing to learn from"
    assert "flat" not in kinds(stream(reward=lambda s: 0.3, spread=lambda s: 0.3, valid=lambda s: 0.3))


def test_reward_hacking_training_up_held_out_down():
    found = diagnose(stream(valid=lambda s: 0.5 + 0.01 * s if s <= 10 else 0.6 - 0.03 * (s - 10)))
    assert found["verdict"] == "reward_hacking"
    assert found["findings"][0]["steps"][0] == 10  # the best held-out step is named
    assert "reward_hacking" not in kinds(stream(reward=lambda s: 0.8 - 0.01 * s, valid=lambda s: 0.6 if s <= 10 else 0.3))


def test_kl_exploding():
    found = diagnose(stream(kl=lambda s: 0.01 * 1.3 ** s))
    assert found["verdict"] == "kl_exploding"
    assert "method.beta" in found["findings"][0]["advice"]


def test_answers_collapsing_to_one_length():
    assert diagnose(stream(length_std=lambda s: 8.0 if s < 15 else 0.0))["verdict"] == "length_collapse"
    assert "length_collapse" not in kinds(stream(length_std=lambda s: 0.0))  # never varied: nothing collapsed


def test_nan_is_still_divergence():
    records = stream()
    records[10]["train_loss"] = float("nan")
    assert diagnose(records)["verdict"] == "divergence"
