"""Assistant-only labels, truncation, and the trained-positions-only loss."""

from __future__ import annotations

import torch

from tunejob.train.models import load_tokenizer
from tunejob.data.sequences import IGNORE, encode_example, encode_examples
from tunejob.train.batches import batch_order, make_collator
from tunejob.train.loss import forward_loss

MSGS = [
    {"role": "system", "content": "You help sales reps."},
    {"role": "user", "content": "Prep me for Globex."},
    {"role": "assistant", "content": "Lead with the renewal date."},
    {"role": "user", "content": "And pricing?"},
    {"role": "assistant", "content": "Team plan at $59."},
]


def trained_text(tok, seq) -> str:
    return tok.decode([t for t, lab in zip(seq.input_ids, seq.labels) if lab != IGNORE])


def test_only_assistant_turns_are_trained(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    seq = encode_example(tok, MSGS, 512)
    text = trained_text(tok, seq)
    assert "Lead with the renewal date." in text and "Team plan at $59." in text
    assert "Globex" not in text and "sales reps" not in text and "pricing" not in text
    assert "<|im_start|>" not in text  # the header is context, not a target
    assert text.count("<|im_end|>") == 2  # the model must learn to stop
    assert seq.input_ids == tok.apply_chat_template(MSGS, tokenize=True, return_dict=False)


def test_weight_zero_and_train_on_all(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    weighted = [dict(m) for m in MSGS]
    weighted[2]["weight"] = 0
    text = trained_text(tok, encode_example(tok, weighted, 512))
    assert "renewal" not in text and "Team plan" in text
    everything = encode_example(tok, MSGS, 512, train_on="all")
    # token 0 is never scored (nothing predicts it), so it is not counted as trained
    assert everything.labels[0] == IGNORE and everything.labels[1:] == everything.input_ids[1:]


def test_truncation_that_leaves_nothing_to_train_is_counted(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    seqs, stats = encode_examples(tok, [{"messages": MSGS}, {"messages": MSGS[:3]}], max_len=8)
    assert stats.truncated == 2 and stats.dropped_no_trained_tokens == 2 and seqs == []
    seqs, stats = encode_examples(tok, [{"messages": MSGS}], max_len=30)
    assert stats.truncated == 1 and len(seqs[0].input_ids) == 30


def test_head_at_trained_positions_gives_the_full_logits_loss(tiny_model):
    """The speed-up (LM head only where labels are trained) must not change the loss."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    seqs, _ = encode_examples(tok, [{"messages": MSGS}, {"messages": MSGS[:3]}], 512)
    batch = make_collator(tok.pad_token_id)(seqs)
    loss, n, correct = forward_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    assert n == int((labels != IGNORE).sum())
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert correct == int(((logits.argmax(-1) == labels) & (labels != IGNORE)).sum())


def test_batch_order_is_deterministic_and_covers_every_example():
    lengths = [(i * 37) % 500 + 10 for i in range(103)]
    a = batch_order(lengths, 4, seed=1, epoch=0)
    assert a == batch_order(lengths, 4, seed=1, epoch=0)
    assert a != batch_order(lengths, 4, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(103))
    # grouping: padding within batches is far below a random order's
    def pad(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(103, generator=g).tolist()
    assert pad(a) < 0.5 * pad([perm[i : i + 4] for i in range(0, 103, 4)])


def test_one_sequence_micro_batches_give_the_padded_batch_loss_and_gradients(tiny_model):
    """The CPU speed-up (one sequence per forward pass, no padding, no attention mask) must give
    the loss and gradients of the padded 3-sequence batch (only float summation order differs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunejob.train.batches import as_batch as _batch, micro_batch_size

    assert micro_batch_size(8, 2, 1, torch.device("cpu")) == 1
    assert micro_batch_size(8, 2, 2, torch.device("cuda")) == 2
    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    long = [{"role": "system", "content": "You help sales reps. " * 12}, *MSGS[1:]]
    seqs, _ = encode_examples(tok, [{"messages": MSGS}, {"messages": MSGS[:3]}, {"messages": long}], 512)
    assert len({len(s.input_ids) for s in seqs}) == 3, "different lengths: the padded batch really pads"
    collate = make_collator(tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]

    padded = _batch(collate, seqs, torch.device("cpu"))
    assert "attention_mask" in padded
    loss_padded, n, _ = forward_loss(model, padded)
    loss_padded.backward()
    grads_padded = [p.grad.clone() for p in params]
    model.zero_grad()

    loss_single = 0.0
    for s in seqs:
        one = _batch(collate, [s], torch.device("cpu"))
        assert "attention_mask" not in one
        loss, _, _ = forward_loss(model, one)
        loss.backward()
        loss_single += loss.item()
    assert abs(loss_single - loss_padded.item()) < 1e-4 * abs(loss_padded.item())
    for g_pad, p in zip(grads_padded, params):  # relative to each gradient's norm: fp32 sums in another order
        assert float((p.grad - g_pad).norm() / g_pad.norm()) < 1e-5
    assert any(float(g.abs().sum()) > 0 for g in grads_padded)
