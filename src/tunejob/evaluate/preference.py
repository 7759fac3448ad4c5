"""Held-out preference pairs, base vs fine-tuned: how often each model ranks the preferred output
above the non-preferred one (its summed log-probability is higher), and the DPO view of the same
pairs (reward accuracy and loss against the base as reference).

The scores come from training's own code: train.preference.Dpo for the log-probabilities (the
model's forward at the outputs' tokens, the reference with the adapter disabled) and dpo_loss, so
the fine-tuned side's reward accuracy equals the run's valid_rewards_accuracy on the same split.
"""

from __future__ import annotations

from tunejob.errors import DataError


def preference_scores(model, tokenizer, spec, pairs: list[dict], device) -> dict:
    import torch

    from tunejob.data.preference import encode_pairs
    from tunejob.train.batches import make_collator, micro_batch_size
    from tunejob.train.loss import LossPath
    from tunejob.train.preference import Dpo, dpo_loss

    hp = spec.hyperparameters
    seqs, _ = encode_pairs(tokenizer, pairs, hp.max_seq_len)
    if not seqs:
        raise DataError("no held-out pair has an output token within max_seq_len; check the data")
    micro = micro_batch_size(spec.resolved_batch_size(), hp.gradient_accumulation, 1, device)
    dpo = Dpo(spec.method.resolved_beta, LossPath(), make_collator(tokenizer.pad_token_id), micro, device)
    base_c, base_r = dpo.reference(model, seqs, "held_out")
    model.eval()
    tuned = [[], []]
    with torch.no_grad():
        for i in range(0, len(seqs), micro):
            chosen, rejected, _, _ = dpo.policy(model, seqs[i : i + micro])
            tuned[0].append(chosen)
            tuned[1].append(rejected)
    tuned_c, tuned_r = torch.cat(tuned[0]), torch.cat(tuned[1])
    losses, rewards_c, rewards_r = dpo_loss(tuned_c, tuned_r, base_c, base_r, dpo.beta)
    share = lambda c, r: float((c > r).float().mean())  # noqa: E731
    return {
        "scored_examples": len(seqs), "scored_tokens": sum(p.chosen.trained_tokens + p.rejected.trained_tokens for p in seqs),
        "base": {"preference_share": share(base_c, base_r)},
        "finetuned": {"preference_share": share(tuned_c, tuned_r), "reward_accuracy": share(rewards_c, rewards_r),
                      "dpo_loss": float(losses.mean())},
    }


def answer_items(pairs: list[dict]) -> list[tuple[list[dict], str]]:
    """(prompt, reference) to answer: the input, and the preferred output's last message as the reference."""
    from tunejob.data.dataset import text_of

    return [(p["input"]["messages"], text_of(p["preferred_output"][-1].get("content"))) for p in pairs]
