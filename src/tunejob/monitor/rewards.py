"""Reading a reinforcement (GRPO) run: the four ways RL fails, over its reward metrics.

Pure functions over the stream's records: train records carry train_reward_mean / _std, kl and
completion_tokens_mean / _std; eval records carry valid_reward_mean. A GRPO loss is not a curve to
read (its value is about the advantages, which average to zero), so these replace the loss patterns:

- flat: the reward sits where it started, with (near) zero spread within groups: every answer to
  a prompt scores the same, so no answer is better than another and there is nothing to learn;
- reward_hacking: the training reward climbs while the held-out reward falls from its best: the
  policy learned what the grader pays for on these prompts, not the task;
- kl_exploding: the per-token KL to the base climbs far past where it started: the policy left
  the base's language (watch for gibberish that a lenient grader still pays);
- length_collapse: the answers' lengths stop varying (spread near zero) after they varied: the
  policy found one length (often the limit, or an instant stop) that the grader does not punish.
"""

from __future__ import annotations

import statistics

from tunejob.monitor.curves import MIN_POINTS, Finding, _lr_advice, _series, smooth

FLAT_REWARD_CHANGE = 0.05  # of the reward's range seen (or absolute, for 0-1 rewards): under this is flat
FLAT_GROUP_STD = 0.02  # mean within-step spread under this: the grader gives (nearly) every answer the same score
HACKING_DROP = 0.1  # held-out reward this far under its best, twice in a row, while training reward rose
KL_LIMIT = 1.0  # nats per token: past it answers rarely read like the base's language
LENGTH_STD_FLOOR = 0.5  # tokens: answer lengths that vary less than this are one length


def is_reinforcement(records: list[dict]) -> bool:
    return any(r.get("kind") == "train" and "train_reward_mean" in r for r in records)


def reward_findings(records: list[dict], lr: float | None) -> list[Finding]:
    return _flat(records, lr) + _hacking(records) + _kl(records, lr) + _length_collapse(records)


def _flat(records: list[dict], lr: float | None) -> list[Finding]:
    reward = [v for _, v in _series(records, "train", "train_reward_mean")]
    spread = [v for _, v in _series(records, "train", "train_reward_std")]
    if len(reward) < MIN_POINTS:
        return []
    k = max(2, len(reward) // 3)
    start, end = statistics.fmean(reward[:k]), statistics.fmean(reward[-k:])
    if abs(end - start) >= FLAT_REWARD_CHANGE or statistics.fmean(spread or [0.0]) >= FLAT_GROUP_STD:
        return []
    steps = [r["step"] for r in records if r.get("kind") == "train"]
    return [Finding("flat", f"the reward stayed at {start:.3f} from the start, and answers to one prompt all scored about the same "
                            f"(spread {statistics.fmean(spread or [0.0]):.3f}): no answer beats another, so GRPO has nothing to learn from",
                    "give partial credit (a text_similarity or multi grader instead of pass/fail), raise compute_multiplier for more "
                    "answers per prompt, or fine-tune on examples first (method supervised) so some answers succeed; "
                    + _lr_advice(lr, 3, "then consider a higher learning rate"), [steps[0], steps[-1]])]


def _hacking(records: list[dict]) -> list[Finding]:
    valid = _series(records, "eval", "valid_reward_mean")
    train = _series(records, "train", "train_reward_mean")
    if len(valid) < 3 or len(train) < MIN_POINTS:
        return []
    best = max(range(len(valid)), key=lambda i: (valid[i][1], -i))  # the earliest of equal bests
    best_step, best_value = valid[best]
    late = [v for _, v in valid[best + 1 :]]
    smoothed = smooth([v for _, v in train])
    at_best = next((v for (s, _), v in zip(train, smoothed) if s >= best_step), smoothed[-1])
    if len(late) >= 2 and max(late[-2:]) <= best_value - HACKING_DROP and smoothed[-1] > at_best:
        return [Finding("reward_hacking", f"the held-out reward fell from {best_value:.3f} (step {best_step}) to {late[-1]:.3f} while "
                                          f"the training reward rose from {at_best:.3f} to {smoothed[-1]:.3f}: the policy learned what "
                                          "the grader pays for on the training prompts, not the task",
                        f"use the checkpoint of step {best_step}; read some high-scoring answers, tighten the grader, "
                        "raise method.beta to keep the policy nearer the base", [best_step, valid[-1][0]])]
    return []


def _kl(records: list[dict], lr: float | None) -> list[Finding]:
    kl = _series(records, "train", "kl")
    if len(kl) < MIN_POINTS:
        return []
    smoothed = smooth([v for _, v in kl])
    if smoothed[-1] <= KL_LIMIT or smoothed[-1] <= 10 * max(smoothed[0], 1e-3):
        return []
    step = next(kl[i][0] for i, v in enumerate(smoothed) if v > KL_LIMIT)
    return [Finding("kl_exploding", f"the KL to the base model climbed to {smoothed[-1]:.2f} nats per token (past {KL_LIMIT:g} at step {step}, "
                                    f"from {smoothed[0]:.3f}): the policy is leaving the base's language",
                    "raise method.beta (the KL coefficient) or " + _lr_advice(lr, 0.3, "lower the learning rate"), [step])]


def _length_collapse(records: list[dict]) -> list[Finding]:
    std = _series(records, "train", "completion_tokens_std")
    mean = _series(records, "train", "completion_tokens_mean")
    if len(std) < MIN_POINTS:
        return []
    k = max(2, len(std) // 3)
    early, late = statistics.fmean(v for _, v in std[:k]), [v for _, v in std[-k:]]
    if early < 4 * LENGTH_STD_FLOOR or max(late) >= LENGTH_STD_FLOOR:
        return []
    step = std[-k][0]
    return [Finding("length_collapse", f"every answer now has the same length ({mean[-1][1]:.0f} tokens; spread {max(late):.2f} since step {step}, "
                                       f"{early:.1f} at the start): the policy settled on one length the grader does not punish",
                    "check whether the grader pays for length (or for stopping at the limit); make it score content, "
                    "or raise method.beta", [step])]
