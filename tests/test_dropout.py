"""LoRA dropout with a cheaper mask (train/dropout.py): the same distribution as torch's dropout,
which is the reference: each element dropped independently with probability p, the rest scaled by
1 / (1 - p), the gradient through the same mask and scale, identity in eval mode.

    python -m pytest -q tests/test_dropout.py
"""
from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import tiny_families as F
from tunejob.train.dropout import MaskDropout, dropped_fraction, keep_mask, use_mask_dropout


def within(observed: float, p: float, n: int, sigmas: float = 5.0) -> bool:
    return abs(observed - p) <= sigmas * (p * (1 - p) / n) ** 0.5


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_element_is_dropped_with_p_and_the_rest_scaled_like_torchs(p, dtype):
    torch.manual_seed(0)
    x = (torch.rand(1000, 997) + 0.5).to(dtype)  # never 0: a zero out is a dropped element
    out = MaskDropout(p).train()(x)
    dropped = out == 0
    assert within(float(dropped.float().mean()), p, x.numel())
    assert abs(dropped_fraction(p) - p) <= 1 / 65536
    scale = 1 / (1 - dropped_fraction(p))
    assert torch.equal(out[~dropped], (x * scale)[~dropped])  # torch's dropout: x * (1 / (1 - p))
    torch.manual_seed(0)
    ref = nn.Dropout(p).train()(x)  # torch's own, for the same expectations
    assert within(float((ref == 0).float().mean()), p, x.numel())
    assert float(out.float().mean()) == pytest.approx(float(x.float().mean()), rel=1e-2)  # unbiased, as torch's
    assert float(ref.float().mean()) == pytest.approx(float(x.float().mean()), rel=1e-2)


def test_elements_sharing_a_random_draw_are_independent():
    """Four elements come from one 64-bit draw: each of the four positions drops with p, and any
    two of them together with p * p."""
    torch.manual_seed(1)
    p, n = 0.3, 1_000_000
    drop = ~keep_mask(torch.Size([4 * n]), p, "cpu").view(n, 4)
    for i in range(4):
        assert within(float(drop[:, i].float().mean()), p, n)
        for j in range(i + 1, 4):
            assert within(float((drop[:, i] & drop[:, j]).float().mean()), p * p, n)
    nxt = ~keep_mask(torch.Size([4 * n]), p, "cpu").view(n, 4)  # and the next call's masks are new ones
    assert within(float((drop & nxt).float().mean()), p * p, 4 * n)


def test_the_gradient_goes_through_the_same_mask_and_scale():
    torch.manual_seed(2)
    x = (torch.rand(64, 50) + 0.5).requires_grad_()
    w = torch.randn(64, 50)
    out = MaskDropout(0.2).train()(x)
    (out * w).sum().backward()
    kept = out.detach() != 0
    assert torch.allclose(x.grad, w * kept / (1 - dropped_fraction(0.2)), rtol=1e-6, atol=0)


def test_identity_in_eval_mode_at_p_zero_and_repeatable_under_a_seed():
    x = torch.randn(8, 16)
    assert MaskDropout(0.5).eval()(x) is x
    assert MaskDropout(0.0).train()(x) is x
    torch.manual_seed(3)
    a = MaskDropout(0.5).train()(x)
    torch.manual_seed(3)
    assert torch.equal(a, MaskDropout(0.5).train()(x))  # the default generator: a seeded run repeats itself


def test_every_lora_dropout_of_a_peft_model_is_replaced_and_the_adapter_still_trains():
    torch.manual_seed(4)
    model = peft.get_peft_model(F.build("llama"), peft.LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    layers = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)]
    ids = torch.randint(3, F.VOCAB, (1, 24))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert use_mask_dropout(model) == len(layers) > 0
    assert all(type(m.lora_dropout["default"]) is MaskDropout and m.lora_dropout["default"].p == 0.1 for m in layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # eval: no dropout either way
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A's are 0: peft starts B at 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert use_mask_dropout(model) == 0  # already replaced; nn.Identity (dropout 0) never is
    plain = peft.get_peft_model(F.build("llama"), peft.LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear"))
    assert use_mask_dropout(plain) == 0


def test_a_run_with_lora_dropout_trains_through_it(tmp_path, tiny_model):
    from tunejob.spec import parse_spec
    from tunejob.train.adapter import add_lora, load_model

    spec = parse_spec(f"model: {tiny_model}\ndata: {{train: t.jsonl}}\nlora: {{r: 4, dropout: 0.05}}\noutput_dir: {tmp_path}\n")
    model = add_lora(spec, load_model(spec, str(tiny_model), torch.device("cpu"), "no"))
    drops = [m for m in model.modules() if isinstance(m, (nn.Dropout, MaskDropout))]
    assert drops and all(type(d) is MaskDropout and d.p == 0.05 for d in drops)
