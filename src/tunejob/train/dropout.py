"""LoRA dropout on CPU with a cheaper mask: the same Bernoulli dropout peft applies to each adapted
layer's input, drawn 4 elements to one random number instead of one each.

Why: torch's CPU dropout (at::native::_dropout_impl) draws one Bernoulli per element with
`bernoulli_` on a tensor of the input's dtype, at ~5 ns an element; with peft's default
lora_dropout 0.05 and every linear layer adapted, that was 9.3% of a bf16 training step on a
2-core AMX CPU (bench/profile_step.py; bench/RESULTS.md). Here one 64-bit draw from torch's own
generator (`random_` over the full int64 range) gives four independent 16-bit uniforms: an element
is dropped where its uniform falls below round(p * 65536), so p is kept to 1/65536 (0.05 ->
0.0500031), kept elements are scaled by 1 / (1 - that p) (unbiased, as torch's), and the mask is
saved as bool (torch's saves it in the input's dtype). Forward and backward of a (880, 576) bf16
input: 1.65 ms against torch's 3.00 ms.

It draws from torch's default generator, so a seeded run repeats itself and a resumed run's
restored RNG state carries on; it does not draw the same masks as torch's dropout (no two
dropout implementations do). Only on CPU: CUDA's fused dropout kernel is already cheap.

    adapted = use_mask_dropout(peft_model)   # after get_peft_model: how many layers it replaced
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 1 << 16  # 16-bit uniforms: the resolution of p


def dropped_fraction(p: float) -> float:
    """The probability an element is dropped: p rounded to the mask's resolution."""
    return round(p * LEVELS) / LEVELS


def keep_mask(shape: torch.Size, p: float, device) -> torch.Tensor:
    """A bool mask of `shape`, each element False with probability dropped_fraction(p),
    independently: four 16-bit uniforms from each 64-bit draw of torch's default generator."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)  # all 64 bits
    uniforms = words.view(torch.int16)[:n].view(shape)  # each in [-32768, 32767], uniform
    return uniforms >= round(p * LEVELS) - LEVELS // 2


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale; the backward is the same mask and scale on the gradient."""

    @staticmethod
    def forward(ctx, x, keep, scale: float):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.ops.aten.native_dropout_backward(grad, keep, ctx.scale), None, None


class MaskDropout(nn.Module):
    """nn.Dropout(p) for LoRA inputs: identity in eval mode or at p 0; on CPU in training, the
    cheaper mask above; elsewhere torch's own dropout."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        keep = keep_mask(x.shape, self.p, x.device)
        return _MaskedScale.apply(x, keep, 1.0 / (1.0 - dropped_fraction(self.p)))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_mask_dropout(model) -> int:
    """Replace every peft LoRA layer's nn.Dropout (its `lora_dropout` ModuleDict) with
    MaskDropout of the same p; how many it replaced (nn.Identity, at dropout 0, is left alone)."""
    replaced = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        for name, drop in drops.items():
            if type(drop) is nn.Dropout:
                drops[name] = MaskDropout(drop.p).train(drop.training)
                replaced += 1
    return replaced
