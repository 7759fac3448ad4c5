"""DPO on the LoRA adapter: the policy is the model with its adapter, the reference the same
model with the adapter disabled (peft's `disable_adapter()`), so no second copy is in memory.

A completion's log-probability is the model's own forward at its labelled tokens
(loss.sequence_logps, the supervised loss's path). The loss is TRL 1.16's DPO loss
(`DPOTrainer._compute_loss`, loss_type "sigmoid", the reverse-KL default): TRL ships it only
inside that method, which needs a Trainer, an accelerator and its fused LM head around it, so the
three lines are here and tests/test_dpo_train.py checks them against a real DPOTrainer's loss on
the same tiny model and pairs.

Reference log-probabilities are constant (the base never trains), so each is computed once, in
eval mode without gradients, and kept by (split, pair): no RNG is drawn, so a resumed run
recomputes them without changing what follows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunejob.train.batches import as_batch, autocast
from tunejob.train.loss import LossPath, sequence_logps

METRICS = ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), as TRL 1.16 computes them."""
    chosen_logratios, rejected_logratios = chosen - ref_chosen, rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


class Dpo:
    """The DPO objective for the trainer's loop: gradients of a step's pairs, and evaluation."""

    def __init__(self, beta: float, loss_path: LossPath, collate, micro: int, device, bf16: bool = False):
        self.beta, self.loss_path, self.collate, self.micro, self.device, self.bf16 = beta, loss_path, collate, micro, device, bf16
        self._reference: dict[tuple[str, int], tuple[float, float]] = {}

    def _logps(self, model, seqs: list) -> tuple[torch.Tensor, int, int]:
        batch = as_batch(self.collate, seqs, self.device)
        return sequence_logps(model, batch, self.loss_path.path_for(model, batch))

    @torch.no_grad()
    def reference(self, model, pairs: list, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's (adapter disabled) log-probabilities of each pair's chosen and rejected side."""
        missing = [p for p in pairs if (split, p.source_index) not in self._reference]
        if missing:
            was_training = model.training
            model.eval()
            try:
                with model.disable_adapter(), autocast(self.device, self.bf16):
                    for i in range(0, len(missing), self.micro):
                        chunk = missing[i : i + self.micro]
                        chosen = self._logps(model, [p.chosen for p in chunk])[0].tolist()
                        rejected = self._logps(model, [p.rejected for p in chunk])[0].tolist()
                        for p, c, r in zip(chunk, chosen, rejected):
                            self._reference[(split, p.source_index)] = (c, r)
            finally:
                model.train(was_training)
        ref = torch.tensor([self._reference[(split, p.source_index)] for p in pairs], dtype=torch.float32, device=self.device)
        return ref[:, 0], ref[:, 1]

    def policy(self, model, pairs: list) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The adapted model's log-probabilities of each pair's chosen and rejected side (one
        forward per side: on CPU a micro-batch is one sequence, unpadded), and the chosen side's
        trained and correctly predicted tokens."""
        with autocast(self.device, self.bf16):
            chosen, tokens, token_correct = self._logps(model, [p.chosen for p in pairs])
            rejected = self._logps(model, [p.rejected for p in pairs])[0]
        return chosen, rejected, tokens, token_correct

    def accumulate(self, model, pairs: list, n_pairs: int, split: str = "train", backward: bool = True) -> dict:
        """Sums over `pairs` of loss, rewards and accuracies; with backward, the gradient of the
        pair-mean loss over the whole step (n_pairs) is accumulated, micro-batch by micro-batch."""
        sums = dict.fromkeys(("loss", "chosen", "rejected", "correct", "tokens", "token_correct"), 0.0)
        for i in range(0, len(pairs), self.micro):
            chunk = pairs[i : i + self.micro]
            ref_c, ref_r = self.reference(model, chunk, split)
            chosen, rejected, tokens, token_correct = self.policy(model, chunk)
            losses, r_c, r_r = dpo_loss(chosen, rejected, ref_c, ref_r, self.beta)
            if backward:
                (losses.sum() / n_pairs).backward()
            sums["loss"] += float(losses.detach().sum())
            sums["chosen"] += float(r_c.sum())
            sums["rejected"] += float(r_r.sum())
            sums["correct"] += float((r_c > r_r).sum())
            sums["tokens"] += tokens  # token accuracy of the chosen side, as TRL logs it
            sums["token_correct"] += token_correct
        return sums

    def evaluate(self, model, pairs: list) -> dict:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                sums = self.accumulate(model, pairs, len(pairs), split="validation", backward=False)
        finally:
            model.train(was_training)
        return means(sums, len(pairs), prefix="valid_")


def means(sums: dict, n_pairs: int, prefix: str = "") -> dict:
    """The stream's DPO fields from `accumulate`'s sums: loss, token accuracy and the four rewards."""
    n = max(n_pairs, 1)
    chosen, rejected = sums["chosen"] / n, sums["rejected"] / n
    loss_key, acc_key = ("valid_loss", "valid_mean_token_accuracy") if prefix else ("train_loss", "train_mean_token_accuracy")
    return {loss_key: sums["loss"] / n, acc_key: sums["token_correct"] / max(sums["tokens"], 1),
            f"{prefix}rewards_chosen": chosen, f"{prefix}rewards_rejected": rejected,
            f"{prefix}rewards_margin": chosen - rejected, f"{prefix}rewards_accuracy": sums["correct"] / n}
