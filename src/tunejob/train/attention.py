"""Attention for packed rows: each sequence of a pack attends by itself, so the blocks that the
block-diagonal mask would zero are never computed.

Why: transformers keeps packed sequences apart with a (T, T) block-diagonal mask, and torch's
CPU flash attention with a mask computes every block of it: a 512-token pack of ~70-token
sequences pays for 512 x 512 scores where 7 x 70 x 70 are used. In bench/profile_step.py
(SmolLM2-135M, fp32, packs of up to 512 tokens) attention forward and backward were 28% of a
training step. Here, per sequence, torch's SDPA runs causal (no mask) on that sequence's rows
of q, k, v: the same arithmetic on what each token may see (losses within 1e-6 of the masked
forward, gradients within 1e-6 relative, on the real model).

In training on a CPU with bf16 units, a bf16 sequence no longer than precision.py's measured
attention_fp32_up_to attends on fp32 copies: torch's bf16 flash-attention backward carries a fixed
cost that fp32's does not (the demo's ~70-token packs trained 1.13x faster, bench/RESULTS.md).

Registered with transformers' AttentionInterface as "tunejob_packed", with sdpa's mask builder,
so whatever is not one packed row (a batch of rows, a KV cache, a single sequence, a sliding
window shorter than a sequence, a bidirectional layer) takes sdpa's own path with sdpa's own
mask. packing.choose_packing switches a model to it and keeps it only if the packed forward
still matches each sequence alone.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

NAME = "tunejob_packed"


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: (output (B, T, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = _sequence_starts(module, query, key, kwargs.get("position_ids"), is_causal, kwargs)
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    ends = starts[1:] + [query.shape[2]]
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    out = torch.cat([_causal(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout, scale=scaling, enable_gqa=gqa)
                     for a, b in zip(starts, ends)], dim=2)
    return out.transpose(1, 2).contiguous(), None


def _causal(q, k, v, **kwargs):
    """Causal SDPA over one sequence; in training, a bf16 sequence on CPU no longer than this
    machine's attention_fp32_up_to runs on fp32 copies (precision.py: bf16's backward is slower
    there), its output cast back."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and torch.is_grad_enabled() and q.shape[2] <= fp32_up_to():
        with torch.autocast("cpu", enabled=False):  # else autocast casts the copies back to bf16
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, **kwargs).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)


@functools.cache
def fp32_up_to() -> int:
    """This machine's attention_fp32_up_to (precision.cached_cpu_probe), 0 without bf16 units."""
    from tunejob.train.precision import cached_cpu_probe, cpu_bf16_flags

    flags = cpu_bf16_flags()
    return cached_cpu_probe(flags).get("attention_fp32_up_to", 0) if flags else 0


def _sequence_starts(module, query, key, position_ids, is_causal, kwargs) -> list[int] | None:
    """Where each packed sequence starts (its position 0), or None where this is not one packed
    row that causal attention per sequence computes exactly."""
    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or kwargs.get("softcap") is not None:
        return None
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    window = getattr(module, "sliding_window", None)
    if window and max(b - a for a, b in zip(starts, starts[1:] + [query.shape[2]])) > window:
        return None
    return starts


def register() -> None:
    """Make "tunejob_packed" an attention implementation models can be switched to (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_packed(model) -> str | None:
    """Switch `model` (a PreTrainedModel) from sdpa to packed attention; the implementation it
    had, to switch back, or None when it was not sdpa (eager, flash kernels: left alone)."""
    before = getattr(model.config, "_attn_implementation", None)
    if before != "sdpa":
        return None
    register()
    model.set_attn_implementation(NAME)
    return before
