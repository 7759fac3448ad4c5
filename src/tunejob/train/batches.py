"""Batches: which examples each optimizer step trains on, how a step is split into forward
passes (micro-batches, or packs of short sequences in one row), and the collated tensors. trl is
imported here and nowhere else (its batch collator)."""

from __future__ import annotations

import torch

from tunejob.data.sequences import IGNORE


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The example indices of each step of an epoch: a pure function of (lengths, seed, epoch).

    Length-grouped like transformers' LengthGroupedSampler: shuffle, cut into windows of 16
    batches, sort each window by length, then shuffle the batches. The Sales Companion examples
    run from ~100 to ~900 tokens; grouping cuts the padding a random batch carries (measured in
    bench/) while the batches of an epoch still come in random order.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    window = batch_size * 16
    grouped: list[int] = []
    for i in range(0, len(perm), window):
        grouped += sorted(perm[i : i + window], key=lambda j: -lengths[j])
    batches = [grouped[i : i + batch_size] for i in range(0, len(grouped), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


class EpochOrder:
    """batch_order, computed once per epoch rather than at every step (it sorts the whole set)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.steps_per_epoch = -(-len(lengths) // batch_size)
        self._epoch, self._order = None, []

    def step(self, step: int) -> list[int]:
        """The example indices of 0-based optimizer step `step`."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, batch_order(self.lengths, self.batch_size, self.seed, epoch)
        return self._order[index]


def micro_batch_size(batch_size: int, accumulation: int, processes: int, device: torch.device) -> int:
    """Sequences per forward pass. On CPU, one: a lone sequence needs no padding and no attention
    mask, so attention takes SDPA's causal fast path; with a padding mask it was the biggest cost
    after the matmuls (bench/RESULTS.md: 1.65x the tokens/s of 4-sequence padded micro-batches on
    SmolLM2-135M, same losses). The loss is normalised per step, so the split changes nothing but
    float summation order. On GPUs, batched matmuls win: batch / (accumulation x processes)."""
    if device.type == "cpu":
        return 1
    return max(1, batch_size // (accumulation * processes))


def make_collator(pad_token_id: int):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)
    return lambda seqs: collator([{"input_ids": s.input_ids, "labels": s.labels} for s in seqs])


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def as_batch(collate, seqs, device) -> dict:
    batch = to_device(collate(seqs), device)
    if len(seqs) == 1:
        batch.pop("attention_mask", None)  # all ones: without it attention runs the causal fast path
    return batch


# Tokens per packed row. The packed mask is dense (T x T per head, masked_fill'ed block-diagonal),
# so attention grows with T^2 while the matmuls grow with T: at 512 tokens SmolLM2-135M's
# attention scores are 9 heads x 512^2 = 2.4M per layer, still small beside its 512 x 576 x 1536
# MLP GEMMs, and 7 demo-sized sequences (~68 tokens) share one pass. Longer packs add little:
# the GEMMs are already wide enough to run near peak.
PACK_TOKENS = 512


def packs(seqs: list, budget: int = PACK_TOKENS) -> list[list]:
    """Consecutive sequences grouped into packs of at most `budget` tokens (a longer sequence goes
    alone). A step's sequences come length-grouped (batch_order), so greedy in order packs well."""
    out, current, tokens = [], [], 0
    for s in seqs:
        n = len(s.input_ids)
        if current and tokens + n > budget:
            out.append(current)
            current, tokens = [], 0
        current.append(s)
        tokens += n
    return out + [current] if current else out


def packed_batch(seqs: list, device) -> dict:
    """Sequences concatenated into one (1, T) row with no padding and no attention mask;
    position_ids restart at 0 for each, which is how transformers (masking_utils.
    find_packed_sequence_indices) finds them and keeps each from attending to the others. Each
    sequence's first label is IGNORE so the last token of one never learns to predict the next
    sequence's first (TRL's padding_free collator does the same)."""
    ids, labels, positions = [], [], []
    for s in seqs:
        ids += s.input_ids
        labels += [IGNORE] + list(s.labels[1:])
        positions += range(len(s.input_ids))
    row = lambda xs: torch.tensor([xs], dtype=torch.long, device=device)  # noqa: E731
    return {"input_ids": row(ids), "labels": row(labels), "position_ids": row(positions)}


def forward_batches(collate, seqs: list, micro: int, device, pack_tokens: int = 0):
    """The forward passes of `seqs`, one at a time: packs of up to pack_tokens tokens, or (0)
    micro-batches of `micro`."""
    if pack_tokens:
        yield from (packed_batch(group, device) for group in packs(seqs, pack_tokens))
    else:
        yield from (as_batch(collate, seqs[i : i + micro], device) for i in range(0, len(seqs), micro))


def autocast(device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
