"""Reading the loss curves: the guide's four patterns, plus divergence and "not converged yet".

Pure functions over metric records (the stream's "train" and "eval" records). The curves are
judged after smoothing, and a change only counts when it is larger than the curve's own noise,
so a noisy healthy run is not called overfitting. Advice is tied to the guide's table: learning
rate 1e-5 to 5e-5 for full fine-tuning (LoRA: 1e-4 to 3e-4), epochs 2-4, batch size 4-16.

    {"verdict": KIND, "findings": [{"kind": KIND, "steps": [...], "message": "...", "advice": "..."}]}

KIND is one of healthy, overfitting, flat, spikes, divergence, not_converged, margin_exploding.

A reinforcement stream (train records with train_reward_mean) is read by monitor/rewards.py,
RL's four failure shapes, instead of the loss patterns.

A DPO stream (train records with rewards_margin) is read with DPO's own signs (`_dpo`): a loss
stuck at ln 2 with reward accuracy near 0.5 is not learning (the policy still equals the
reference), validation reward accuracy falling while the training margin grows is overfitting,
and a margin that keeps climbing after the loss has saturated means beta or the learning rate is
too high.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict

from tunejob.monitor import rewards
from tunejob.monitor.curves import MIN_POINTS, Finding, _lr_advice, _series, smooth

KINDS = ("healthy", "overfitting", "flat", "spikes", "divergence", "not_converged", "margin_exploding",
         "reward_hacking", "kl_exploding", "length_collapse")
PRIORITY = ("divergence", "kl_exploding", "margin_exploding", "reward_hacking", "overfitting", "length_collapse", "spikes", "flat",
            "not_converged", "healthy")

FLAT_RELATIVE_CHANGE = 0.02  # under 2% change start-to-end counts as flat
SPIKE_MAD_FACTOR = 8.0  # a spike sits this many robust deviations above the local median
SPIKE_MIN_RISE = 0.25  # ... and at least 25% above it
LN2 = math.log(2)  # the DPO loss when policy and reference agree
DPO_STUCK_LOSS = 0.02  # within this of ln 2 ...
DPO_CHANCE_ACCURACY = 0.1  # ... with reward accuracy within this of 0.5: not learning
DPO_ACCURACY_DROP = 0.1  # validation reward accuracy this far below its best: overfitting (with a growing margin)
DPO_MARGIN_LIMIT = 10.0  # sigmoid(10) leaves a pair loss of 4.5e-5: past it the margin only pushes the policy away


def _noise(values: list[float]) -> float:
    """The curve's own jitter: robust spread of the values around their smoothed trend
    (1.4826 x median absolute residual, the normal-consistent MAD), so a steady trend is not
    mistaken for noise."""
    if len(values) < 3:
        return 0.0
    trend = smooth(values, window=min(5, len(values) | 1))
    return 1.4826 * statistics.median(abs(v - t) for v, t in zip(values, trend))


def _jitter(values: list[float]) -> float:
    """Noise of a short series: robust spread of its second differences, scaled to one point
    (a second difference of white noise has variance 6 sigma^2)."""
    if len(values) < 3:
        return 0.0
    second = [values[i - 1] - 2 * values[i] + values[i + 1] for i in range(1, len(values) - 1)]
    return 1.4826 * statistics.median(abs(d) for d in second) / math.sqrt(6)


def _finite(series: list[tuple[int, float]]) -> tuple[list[tuple[int, float]], list[int]]:
    good = [(s, v) for s, v in series if math.isfinite(v)]
    bad = [s for s, v in series if not math.isfinite(v)]
    return good, bad


def diagnose(records: list[dict], learning_rate: float | None = None, epochs: int | None = None) -> dict:
    """Findings over a metric stream, most serious first; the verdict is the first finding's kind."""
    train_all = _series(records, "train", "train_loss")
    valid_all = _series(records, "eval", "valid_loss")
    train, bad_train = _finite(train_all)
    valid, bad_valid = _finite(valid_all)
    lr = learning_rate or max((r.get("learning_rate") or 0 for r in records), default=0) or None
    findings: list[Finding] = []

    if bad_train or bad_valid:
        first = min(bad_train + bad_valid)
        findings.append(Finding("divergence", f"the loss became NaN or infinite at step {first}",
                                _lr_advice(lr, 0.1, "divide the learning rate by 10") + "; check the data for empty or broken examples", [first]))
    dpo = any(r.get("kind") == "train" and "rewards_margin" in r for r in records)
    if rewards.is_reinforcement(records):
        if not findings:
            findings += rewards.reward_findings(records, lr)
        if not findings:
            findings.append(Finding("healthy", "none of RL's failure shapes: the reward moved, the held-out reward did not fall from its best, "
                                               "the KL stayed in range and the answers' lengths did not collapse",
                                    "use the best checkpoint (the highest held-out reward); train on if it was still rising"))
        findings.sort(key=lambda f: PRIORITY.index(f.kind))
        return {"verdict": findings[0].kind, "findings": [asdict(f) for f in findings]}
    if len(train) >= MIN_POINTS:
        findings += _divergence(train, lr, already=bool(findings))
        if not findings:  # a run that blew up has no meaningful spikes or plateaus
            findings += _spikes(train, records, lr)
            findings += _dpo(records, lr) if dpo else _flat(train, valid, lr)
    if len(valid) >= 3:
        if not any(f.kind == "overfitting" for f in findings):
            findings += _overfitting(train, valid, epochs)
        if not any(f.kind == "overfitting" for f in findings):
            findings += _not_converged(valid, epochs)
    elif len(train) >= MIN_POINTS and not findings:
        findings += _not_converged(train, epochs, what="training loss")
    if not findings:
        findings.append(Finding("healthy", "both losses are decreasing and settling", "keep training as planned; use the best checkpoint"))
    findings.sort(key=lambda f: PRIORITY.index(f.kind))
    return {"verdict": findings[0].kind, "findings": [asdict(f) for f in findings]}


def _divergence(train: list[tuple[int, float]], lr: float | None, already: bool) -> list[Finding]:
    """Training loss that climbs well above its own minimum and stays there."""
    if already:
        return []
    vals = smooth([v for _, v in train])
    low = min(vals)
    k = max(1, len(vals) // 10)
    end = statistics.fmean(vals[-k:])
    if end > low * 1.3 and end - low > 8 * max(_noise([v for _, v in train]), 1e-9):
        i_low = vals.index(low)
        step = next(train[i][0] for i in range(i_low, len(vals)) if vals[i] > low * 1.1)
        return [Finding("divergence", f"training loss rose from {low:.3f} to {end:.3f} (from step {step})",
                        _lr_advice(lr, 0.1, "lower the learning rate tenfold") + ", and keep warmup", [step])]
    return []


def _spikes(train: list[tuple[int, float]], records: list[dict], lr: float | None) -> list[Finding]:
    vals = [v for _, v in train]
    base = smooth(vals, window=max(5, (len(vals) // 8) | 1))
    resid = [v - b for v, b in zip(vals, base)]
    mad = statistics.median(abs(r) for r in resid) or 1e-9
    hits = [i for i, (v, b, r) in enumerate(zip(vals, base, resid)) if r > SPIKE_MAD_FACTOR * 1.4826 * mad and v > b * (1 + SPIKE_MIN_RISE)]
    if not hits:
        return []
    steps = [train[i][0] for i in hits]
    batches = {r["step"]: r.get("batch") for r in records if r.get("kind") == "train" and r.get("batch") is not None}
    examples = [batches[s] for s in steps if s in batches]
    where = ", ".join(str(s) for s in steps[:10]) + (" ..." if len(steps) > 10 else "")
    named = f"; the batches held examples {examples[:3]} (0-based in the training split)" if examples else ""
    return [Finding("spikes", f"{len(steps)} loss spike(s) at step(s) {where}, up to {max(vals[i] / base[i] for i in hits):.1f}x the local level{named}",
                    _lr_advice(lr, 0.5, "lower the learning rate") + ", or a larger batch (the guide: 4-16); inspect the examples of those batches", steps, examples)]


def _flat(train: list[tuple[int, float]], valid: list[tuple[int, float]], lr: float | None) -> list[Finding]:
    tv = smooth([v for _, v in train])
    k = max(1, len(tv) // 5)
    t_change = (statistics.fmean(tv[:k]) - statistics.fmean(tv[-k:])) / max(abs(statistics.fmean(tv[:k])), 1e-9)
    v_ok = True
    if len(valid) >= 2:
        vv = [v for _, v in valid]
        v_change = (vv[0] - min(vv)) / max(abs(vv[0]), 1e-9)
        v_ok = v_change < FLAT_RELATIVE_CHANGE
    if abs(t_change) < FLAT_RELATIVE_CHANGE and v_ok:
        return [Finding("flat", f"both losses stayed flat from the start (training changed {100 * t_change:+.1f}%)",
                        _lr_advice(lr, 5, "raise the learning rate (LoRA: 1e-4 to 3e-4)") + "; if that does not move it, the data may teach the model nothing new",
                        [train[0][0], train[-1][0]])]
    return []


def _overfitting(train: list[tuple[int, float]], valid: list[tuple[int, float]], epochs: int | None) -> list[Finding]:
    vals = [v for _, v in valid]
    best = min(range(len(vals)), key=vals.__getitem__)
    after = vals[best + 1 :]
    if len(after) < 2:
        return []
    # Noise from second differences (a straight trend has none); with under 6 evaluations there
    # is too little to estimate it, and the 1% floor plus the parting-curves test below decide.
    margin = max(0.01 * abs(vals[best]), 1.5 * _jitter(vals) if len(vals) >= 6 else 0.0)
    if min(after[-2:]) <= vals[best] + margin or statistics.fmean(after) <= vals[best] + margin:
        return []
    best_step = valid[best][0]
    # The pattern is the two curves parting: training loss must still fall clearly after the best
    # evaluation (by 2% and by 3 standard errors of the window means). A validation wobble on a
    # plateaued run is noise, not overfitting.
    raw = [v for _, v in train]
    later = [v for s, v in train if s > best_step]
    if later and len(later) < len(raw):
        earlier = [v for s, v in train if s <= best_step][-len(later):]
        fall = statistics.fmean(earlier) - statistics.fmean(later)
        stderr = _noise(raw) * math.sqrt(1 / len(earlier) + 1 / len(later))
        if fall <= max(0.02 * abs(statistics.fmean(earlier)), 3 * stderr):
            return []
    rise_step = next(valid[i][0] for i in range(best + 1, len(vals)) if vals[i] > vals[best] + margin)
    advice = f"use the checkpoint of step {best_step}"
    if epochs:
        frac = best_step / valid[-1][0]
        advice += f"; next time train about {max(1, round(epochs * frac))} epoch(s) instead of {epochs}"
    else:
        advice += "; next time train fewer epochs (the guide: 2-4)"
    return [Finding("overfitting", f"validation loss rose from {vals[best]:.4f} (step {best_step}) to {vals[-1]:.4f} while training loss kept falling; overfitting from step {rise_step}",
                    advice, [best_step, rise_step])]


def _not_converged(series: list[tuple[int, float]], epochs: int | None, what: str = "validation loss") -> list[Finding]:
    vals = smooth([v for _, v in series], window=3) if len(series) >= 3 else [v for _, v in series]
    k = max(2, len(vals) // 3)
    tail = vals[-k:]
    drop = (tail[0] - tail[-1]) / max(abs(tail[0]), 1e-9)
    if drop > 0.03 and tail[-1] <= min(vals) + 1e-12 and drop * abs(tail[0]) > 2 * _noise([v for _, v in series]):
        more = f"{epochs + 1}-{epochs + 2}" if epochs else "more"
        return [Finding("not_converged", f"{what} was still falling at the end ({100 * drop:.1f}% over the last third)",
                        f"train longer: {more} epochs (the guide: 2-4), or a somewhat higher learning rate", [series[-1][0]])]
    return []


def _dpo(records: list[dict], lr: float | None) -> list[Finding]:
    """DPO's three patterns over the reward metrics (train records with rewards_*, evals with valid_rewards_*)."""
    loss = [v for _, v in _series(records, "train", "train_loss")]
    accuracy = [v for _, v in _series(records, "train", "rewards_accuracy")]
    margin = _series(records, "train", "rewards_margin")
    valid_acc = _series(records, "eval", "valid_rewards_accuracy")
    out: list[Finding] = []
    k = max(MIN_POINTS, len(loss) // 3)
    if len(loss) >= MIN_POINTS and abs(statistics.fmean(loss[-k:]) - LN2) < DPO_STUCK_LOSS \
            and abs(statistics.fmean(accuracy[-k:] or [0.5]) - 0.5) < DPO_CHANCE_ACCURACY:
        out.append(Finding("flat", f"the DPO loss stayed at ln 2 = {LN2:.3f} with reward accuracy near 0.5: the model still ranks "
                                   "the pairs as its reference does (not learning)",
                           _lr_advice(lr, 5, "raise the learning rate") + "; check that preferred and non-preferred outputs really differ",
                           [records[0].get("step", 0), margin[-1][0] if margin else 0]))
    smoothed = smooth([v for _, v in margin]) if len(margin) >= MIN_POINTS else []
    if smoothed and smoothed[-1] > DPO_MARGIN_LIMIT:
        step = next(margin[i][0] for i, v in enumerate(smoothed) if v > DPO_MARGIN_LIMIT)
        out.append(Finding("margin_exploding", f"the reward margin climbed past {DPO_MARGIN_LIMIT:g} (to {smoothed[-1]:.1f}, from step {step}) "
                                               "after the loss had nothing left to gain",
                           "lower beta (method.beta) or " + _lr_advice(lr, 0.3, "lower the learning rate"), [step]))
    if len(valid_acc) >= 3 and smoothed:
        best = max(range(len(valid_acc)), key=lambda i: (valid_acc[i][1], i))  # the latest of equal bests
        best_step, best_acc = valid_acc[best]
        at_best = next((v for (s, _), v in zip(margin, smoothed) if s >= best_step), smoothed[-1])
        late = [v for _, v in valid_acc[best + 1 :]]
        if len(late) >= 2 and max(late[-2:]) <= best_acc - DPO_ACCURACY_DROP and smoothed[-1] > at_best:
            out.append(Finding("overfitting", f"validation reward accuracy fell from {best_acc:.2f} (step {best_step}) to {late[-1]:.2f} "
                                              f"while the training margin grew from {at_best:.2f} to {smoothed[-1]:.2f}",
                               f"use the checkpoint of step {best_step}; next time train fewer epochs or raise beta", [best_step, valid_acc[-1][0]]))
    return out
