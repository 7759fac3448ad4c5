"""GRPO on the LoRA adapter: reinforcement fine-tuning against a grader.

Each step samples a group of answers per prompt (train/rollout.py), grades them
(tunejob.graders.grade_many), and turns each score into an advantage within its group:
(reward - group mean) / (group std + 1e-4), as TRL 1.16's GRPOTrainer (scale_rewards "group").

The loss is GRPO's clipped objective per answer token, with a KL term against the base, the same
model with its adapter disabled (as DPO's reference, so no second copy is in memory):

    ratio = exp(logp - logp_old);  loss_t = -min(ratio A, clip(ratio, 1-eps, 1+eps) A) + beta ratio KL_t
    KL_t  = exp(ref - logp) - (ref - logp) - 1           (the k3 estimator, always >= 0)

(KL times the ratio is TRL's default `use_bias_correction_kl`: its value is KL_t, its gradient carries
the importance weight of answers sampled from the policy.)

summed over every answer token of the step and divided by their number (TRL's default loss_type
"dapo": a long answer does not weigh less per token than a short one). One optimisation pass per
batch of answers, so logp_old is logp itself, detached (TRL's num_iterations 1); the clip then
only shapes the gradient when later passes reuse the answers. tests/test_reinforcement_train.py
checks the loss and its gradients against a real GRPOTrainer's `_compute_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tunejob.train.batches import autocast
from tunejob.train.loss import IGNORE, LossPath, token_logps
from tunejob.train.rollout import Answer, Draw, sample, seed_of

EPSILON = 0.2  # TRL GRPOConfig.epsilon (and epsilon_high's default)


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(prompts, group) rewards -> flat advantages, TRL's group scaling (unbiased std)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return ((rewards - mean) / (std + 1e-4)).reshape(-1)


def grpo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor, beta: float,
                    epsilon: float = EPSILON) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (loss, KL, clipped flag); every argument is per token (the answer's advantage repeated)."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
    if beta:  # times the ratio: TRL 1.16's use_bias_correction_kl (its default), the estimator's importance weight
        loss = loss + beta * kl * ratio
    was_clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    return loss, kl.detach(), was_clipped


@dataclass
class Settings:
    group: int
    draw: Draw
    beta: float
    eval_samples: int
    seed: int


class Grpo:
    """The reinforcement objective for the trainer's loop: one step's gradients, and evaluation."""

    def __init__(self, settings: Settings, grader: dict, grade_many, tokenizer, loss_path: LossPath, device, bf16: bool = False):
        self.s, self.grader, self.grade_many, self.tokenizer = settings, grader, grade_many, tokenizer
        self.loss_path, self.device, self.bf16 = loss_path, device, bf16
        self._events: list[str] = []

    def drain_events(self) -> list[str]:
        """What went wrong in grading since the last call (one line per distinct error)."""
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ sampling and grading

    def rollout(self, model, prompts: list, step: int, group: int, draw: Draw) -> tuple[list[Answer], list]:
        seeds = [[seed_of(self.s.seed, step, p.source_index, j) for j in range(group)] for p in prompts]
        answers = sample(model, self.tokenizer, [p.input_ids for p in prompts], group, draw, seeds, self.bf16)
        texts = [self.tokenizer.decode(a.tokens, skip_special_tokens=True) for a in answers]
        from tunejob.graders import make_sample

        results = self.grade_many(self.grader, [make_sample(t) for t in texts], [prompts[a.prompt].item for a in answers])
        errors: dict[str, int] = {}
        for r in results:
            for e in r.errors:
                errors[e] = errors.get(e, 0) + 1
        self._events += [f"grader: {n} of {len(results)} answers scored 0: {e}" for e, n in sorted(errors.items())]
        return answers, results

    # ------------------------------------------------------------------ the loss

    def _batch(self, prompt: list[int], answers: list[list[int]]) -> dict:
        """A prompt's answers as one batch: the same prompt, answers right-padded. Causal attention
        never looks ahead, so the padding changes no real position and needs no attention mask
        (a mask would take attention off SDPA's causal fast path on CPU)."""
        width, pad = max(len(a) for a in answers), self.tokenizer.pad_token_id or 0
        ids = torch.tensor([prompt + a + [pad] * (width - len(a)) for a in answers], device=self.device)
        labels = torch.tensor([[IGNORE] * len(prompt) + a + [IGNORE] * (width - len(a)) for a in answers], device=self.device)
        return {"input_ids": ids, "attention_mask": None, "labels": labels}

    def _logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device, self.bf16):
            return token_logps(model, batch, self.loss_path.path_for(model, batch), self.s.draw.temperature)

    def group_loss(self, model, prompt: list[int], answers: list[list[int]], advantages: list[float], n_tokens: int) -> dict:
        """Backward of one prompt's answers' share of the step's loss; their sums for the metrics."""
        batch = self._batch(prompt, answers)
        with torch.no_grad():
            with model.disable_adapter():
                ref = self._logps(model, batch)[0]
        logps, rows = self._logps(model, batch)
        adv = torch.tensor(advantages, dtype=logps.dtype, device=logps.device)[rows]
        loss, kl, clipped = grpo_token_loss(logps, logps.detach(), ref, adv, self.s.beta)
        (loss.sum() / n_tokens).backward()
        return {"loss": float(loss.detach().sum()), "kl": float(kl.sum()), "clipped": float(clipped.sum())}

    def train_fields(self, model, prompts: list, step: int) -> tuple[dict, int, int]:
        """(the step's metrics, answer tokens trained, tokens through the model) with the step's
        gradients accumulated."""
        answers, results = self.rollout(model, prompts, step, self.s.group, self.s.draw)
        rewards = torch.tensor([r.score for r in results], dtype=torch.float32).reshape(len(prompts), self.s.group)
        advantages = group_advantages(rewards).tolist()
        n_tokens = sum(len(a.tokens) for a in answers)
        sums = dict.fromkeys(("loss", "kl", "clipped"), 0.0)
        for i, prompt in enumerate(prompts):
            group = [(a.tokens, adv) for a, adv in zip(answers, advantages) if a.prompt == i and a.tokens]
            if group:
                tokens, advs = zip(*group)
                for k, v in self.group_loss(model, prompt.input_ids, list(tokens), list(advs), max(n_tokens, 1)).items():
                    sums[k] += v
        fields = {"train_loss": sums["loss"] / max(n_tokens, 1), **reward_fields(results, "train_"), "kl": sums["kl"] / max(n_tokens, 1),
                  "clip_ratio": sums["clipped"] / max(n_tokens, 1), **length_fields(answers, "")}
        processed = sum(len(prompts[a.prompt].input_ids) + len(a.tokens) for a in answers)
        return fields, n_tokens, processed

    def evaluate(self, model, prompts: list, step: int) -> dict:
        """The held-out reward: the greedy answer per prompt (eval_samples 1), or the mean of
        eval_samples sampled ones."""
        n = self.s.eval_samples
        draw = self.s.draw if n > 1 else Draw(self.s.draw.max_tokens, 0.0)
        answers, results = self.rollout(model, prompts, -1 - step, n, draw)  # its own seeds, apart from training's
        return {**reward_fields(results, "valid_"), **length_fields(answers, "valid_")}


def reward_fields(results: list, prefix: str) -> dict:
    """Mean and std of the rewards, and each sub-grader's mean (score_<name>)."""
    scores = [r.score for r in results]
    mean = sum(scores) / max(len(scores), 1)
    std = math.sqrt(sum((x - mean) ** 2 for x in scores) / max(len(scores) - 1, 1))
    fields = {f"{prefix}reward_mean": mean, f"{prefix}reward_std": std}
    names = sorted({k for r in results for k in r.sub_scores})
    for name in names:
        values = [r.sub_scores.get(name, 0.0) for r in results]
        fields[f"{prefix}score_{name}"] = sum(values) / len(values)
    return fields


def length_fields(answers: list[Answer], prefix: str) -> dict:
    lengths = [len(a.tokens) for a in answers]
    mean = sum(lengths) / max(len(lengths), 1)
    std = math.sqrt(sum((x - mean) ** 2 for x in lengths) / max(len(lengths), 1))
    return {f"{prefix}completion_tokens_mean": mean, f"{prefix}completion_tokens_std": std,
            f"{prefix}truncated_ratio": sum(a.finish == "length" for a in answers) / max(len(answers), 1)}


def make_grpo(spec, tokenizer, loss_path: LossPath, device, bf16: bool, say) -> Grpo:
    """The objective of a `method: reinforcement` spec (spec/reinforcement.py says what each setting means)."""
    import os

    from tunejob.graders import GraderContext, grade_many
    from tunejob.spec.reinforcement import DEFAULT_COMPLETION_TOKENS, DEFAULT_TEMPERATURE, eval_samples, group_size

    m, rl = spec.method, spec.method.rl
    settings = Settings(group=group_size(rl.compute_multiplier),
                        draw=Draw(m.completion_tokens or DEFAULT_COMPLETION_TOKENS, m.temperature or DEFAULT_TEMPERATURE),
                        beta=m.resolved_beta, eval_samples=eval_samples(rl.eval_samples), seed=spec.hyperparameters.seed)
    # score_model graders call an OpenAI-compatible endpoint: serve sets TUNEJOB_GRADER_* for its jobs
    # (itself, with the job owner's key); elsewhere the openai SDK's own variables.
    env = os.environ
    context = GraderContext(base_url=env.get("TUNEJOB_GRADER_BASE_URL") or env.get("OPENAI_BASE_URL"),
                            api_key=env.get("TUNEJOB_GRADER_API_KEY") or env.get("OPENAI_API_KEY"))
    say(f"reinforcement: {settings.group} answers per prompt (compute_multiplier {rl.compute_multiplier}), up to "
        f"{settings.draw.max_tokens} tokens at temperature {settings.draw.temperature}, KL beta {settings.beta}; "
        f"validation reward from {'the greedy answer' if settings.eval_samples == 1 else f'{settings.eval_samples} samples'} per prompt")
    if rl.reasoning_effort != "default":
        say(f"note: reasoning_effort {rl.reasoning_effort} changes nothing on the local backend (the model has no reasoning mode)")
    return Grpo(settings, m.grader, lambda g, samples, items: grade_many(g, samples, items, context), tokenizer, loss_path, device, bf16)
