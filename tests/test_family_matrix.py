"""Loss = the model's own forward, for every family.

For each causal-LM family (tiny random model built from config, LoRA on all linear layers with
non-zero lora_B): the loss and the LoRA gradients of the path tunejob.train.loss.choose_path picks equal
the model's own `model(input_ids, attention_mask, labels).loss * trained_tokens` within 1e-5
relative; and the old fast path (decoder + head, what tunejob.train.trainer.forward_loss does)
is shown to differ where the family transforms its logits (Gemma 2, Cohere, Granite, ...), so
this test fails on the old code.

    python -m pytest -q tests/test_family_matrix.py
"""
from __future__ import annotations

import warnings

import peft
import pytest
import torch
import transformers

from tunejob.train import loss as CL
import tiny_families as F

TOL = 1e-5


def old_fast_loss(model, b):
    """tunejob.train.trainer.forward_loss before the fix (its loss only)."""
    labels = b["labels"][:, 1:]
    mask = labels != -100
    base = CL.base_of(model)
    hidden = base.model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).last_hidden_state
    logits = base.get_output_embeddings()(hidden[:, :-1][mask])
    return torch.nn.functional.cross_entropy(logits.float(), labels[mask], reduction="sum")


def own_loss(model, b):
    """The model's own loss (a mean over trained tokens, ForCausalLMLoss) as a sum."""
    n = int((b["labels"][:, 1:] != -100).sum())
    return model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), labels=b["labels"]).loss * n


def with_lora(model, dropout=0.0):
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:  # peft starts lora_B at zero: the adapter would change nothing
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.train()
    return pm


def loss_and_grad(model, fn, b):
    model.zero_grad(set_to_none=True)
    loss = fn(model, b)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def batch():
    return F.batch()


@pytest.mark.parametrize("family", list(F.FAMILIES))
def test_chosen_path_is_the_models_own_loss(family, batch):
    model = with_lora(F.build(family))
    choice = CL.choose_path(model, batch)
    assert choice.path == "keep", choice  # head only at trained positions, via the model's forward
    assert model.training  # choose_path restores the mode

    ref_loss, ref_grad = loss_and_grad(model, own_loss, batch)
    loss, grad = loss_and_grad(model, lambda m, b: CL.forward_loss(m, b, choice.path)[0], batch)
    assert rel(loss, ref_loss) < TOL
    assert rel(grad, ref_grad) < TOL
    assert grad.abs().max() > 0

    old_loss, old_grad = loss_and_grad(model, old_fast_loss, batch)
    if family in F.TRANSFORMED:  # the bug: the old path skipped the family's logit transform
        assert rel(old_loss, ref_loss) > 1e-2 and rel(old_grad, ref_grad) > 1e-2
    else:  # nothing between head and loss: the old path was already exact
        assert rel(old_loss, ref_loss) < TOL and rel(old_grad, ref_grad) < TOL


@pytest.mark.parametrize("family", sorted(F.TRANSFORMED))
def test_registered_transforms_match_the_model(family, batch):
    """The re-implemented transforms (used where logits_to_keep=<mask> is not supported)."""
    model = with_lora(F.build(family))
    assert CL.choose_path(model, batch, candidates=("transform", "fast")).path == "transform"
    safety_net = CL.choose_path(model, batch, candidates=("fast",))
    assert safety_net.path == "full" and "computing full logits" in CL.describe(model, safety_net)
    ref_loss, ref_grad = loss_and_grad(model, own_loss, batch)
    for path in ("transform", "full"):
        loss, grad = loss_and_grad(model, lambda m, b: CL.forward_loss(m, b, path)[0], batch)
        assert rel(loss, ref_loss) < TOL and rel(grad, ref_grad) < TOL, path


def test_untransformed_family_keeps_the_fast_path(batch):
    model = F.build("llama")
    assert CL.choose_path(model, batch, candidates=("transform", "fast")).path == "fast"


class _OddForCausalLM(transformers.LlamaForCausalLM):
    """A family unknown to the registry that scales its logits and ignores logits_to_keep."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, **kw):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kw)
        out.logits = out.logits * 0.5
        if labels is not None:
            out.loss = self.loss_function(logits=out.logits, labels=labels, vocab_size=self.config.vocab_size)
        return out


def test_unknown_transform_falls_back_to_full_forward(batch):
    model = _OddForCausalLM(F.config_for("llama")).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)  # big logits so * 0.5 matters
    choice = CL.choose_path(model, batch)
    assert "computing full logits" in CL.describe(model, choice)
    assert choice.path == "full" and set(choice.tried) == {"keep", "transform", "fast"}
    with torch.no_grad():
        assert rel(CL.forward_loss(model, batch, "full")[0], own_loss(model, batch)) < TOL
        assert rel(old_fast_loss(model, batch), own_loss(model, batch)) > 1e-2


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "granitemoe"])
def test_moe_router_aux_loss(family, batch):
    """config.output_router_logits=True: the model's .loss adds router_aux_loss_coef * aux_loss."""
    model = F.build(family)
    model.config.output_router_logits = True
    with torch.no_grad():
        ref = own_loss(model, batch)
        assert rel(CL.forward_loss(model, batch, "keep")[0], ref) < TOL
        assert rel(CL.forward_loss(model, batch, "keep", aux_loss=False)[0], ref) > 1e-6


def test_loss_path_single_unmasked_sequence_bf16_and_no_rng():
    """tunejob on CPU: one sequence, no attention_mask, bf16 autocast, LoRA dropout; the check
    draws no random numbers (a resumed run replays the same steps) and runs once."""
    b = F.batch(rows=1)
    b.pop("attention_mask")
    model = with_lora(F.build("gemma2"), dropout=0.1)
    lp = CL.LossPath()
    rng = torch.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss, n, correct = lp(model, b)
    assert lp.choice.path == "keep" and model.training
    assert 0 <= correct <= n == int((b["labels"][:, 1:] != -100).sum())
    model.eval()  # dropout off: compare with the model's own loss under the same autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert rel(lp(model, b)[0], own_loss(model, b)) < TOL
    choice = lp.choice
    lp(model, b)
    assert lp.choice is choice  # decided once
    torch.set_rng_state(rng)
    fresh = torch.rand(3)
    torch.set_rng_state(rng)
    model.train()
    CL.choose_path(model, b)
    assert torch.equal(torch.rand(3), fresh)
