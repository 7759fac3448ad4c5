"""Packed sequences: several short sequences in one forward pass on CPU (issue 33).

Every expected value is the model's own forward on each sequence alone: `model(input_ids,
labels=...).loss`, the LoRA gradients of one sequence per forward pass, or a whole `train(spec)`
run with `hyperparameters.packing: off`.

    python -m pytest -q tests/test_packing.py
"""
from __future__ import annotations

import peft
import pytest
import torch

import tiny_families as F
from conftest import write_chat_data
from tunejob.data.sequences import IGNORE, Sequence
from tunejob.monitor.metrics import read_metrics
from tunejob.spec import parse_spec
from tunejob.train import loss as CL
from tunejob.train.batches import packed_batch, packs
from tunejob.train.attention import NAME, use_packed
from tunejob.train.packing import check_packing, choose_packing

TOL = 1e-5


def sequences(lengths=(17, 23, 12, 30), seed=0) -> list[Sequence]:
    """Random token sequences with a 4-token prompt and a masked turn in the middle."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, F.VOCAB, (n,), generator=g).tolist()
        labels = [IGNORE] * 4 + ids[4:]
        labels[8:10] = [IGNORE] * len(labels[8:10])
        out.append(Sequence(input_ids=ids, labels=labels, source_index=i, truncated=False))
    return out


def alone(seq: Sequence) -> dict:
    return {"input_ids": torch.tensor([seq.input_ids]), "labels": torch.tensor([seq.labels])}


def with_lora(model):
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:  # peft starts lora_B at zero: the adapter would change nothing
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return pm


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_a_pack_is_the_sequences_end_to_end_with_positions_restarting():
    seqs = sequences((5, 3, 4))
    b = packed_batch(seqs, "cpu")
    assert b.keys() == {"input_ids", "labels", "position_ids"}  # no attention mask: no padding
    assert b["input_ids"][0].tolist() == sum((s.input_ids for s in seqs), [])
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]
    starts = [0, 5, 8]  # each sequence's first label: never a target of the previous sequence's last token
    assert [b["labels"][0, i].item() for i in starts] == [IGNORE] * 3


def test_packs_hold_at_most_the_budget_and_a_longer_sequence_alone():
    groups = packs(sequences((300, 200, 100, 600, 50, 40)), 512)
    assert [[len(s.input_ids) for s in g] for g in groups] == [[300, 200], [100], [600], [50, 40]]


def attending(model, attention: str):
    """`model` with transformers' sdpa (the block-diagonal mask) or tunejob's per-sequence attention."""
    if attention == NAME:
        CL.base_of(model).set_attn_implementation("sdpa")  # tiny gemma3 is built eager (tiny_families)
        assert use_packed(CL.base_of(model)) == "sdpa"
    return model


@pytest.mark.parametrize("attention", ["sdpa", NAME])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_packed_losses_are_each_sequences_own_forward(family, attention):
    """Per sequence, the packed row's summed token losses equal `model(labels=...)` on it alone
    (gemma3's sliding layers, window 8 < its sequences, take sdpa's masked path inside tunejob's)."""
    model, seqs = F.build(family), sequences()
    own_model = F.build(family)  # the reference: the model's own attention, each sequence alone
    model = attending(model, attention)
    with torch.no_grad():
        logps, rows = CL.token_logps(model, packed_batch(seqs, "cpu"), "keep")
        assert rows.eq(0).all()  # one row
        counts = [sum(1 for t in s.labels[1:] if t != IGNORE) for s in seqs]
        got = torch.stack([-part.sum() for part in logps.split(counts)])
        own = torch.stack([own_model(**alone(s)).loss * n for s, n in zip(seqs, counts)])
    assert rel(got, own) < TOL, (got, own)


@pytest.mark.parametrize("attention", ["sdpa", NAME])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_lora_gradients_of_a_packed_pass_equal_one_sequence_per_pass(family, attention):
    model, seqs = with_lora(attending(F.build(family), attention)), sequences()
    model.train()  # lora_dropout 0: train mode draws nothing
    n = sum(s.trained_tokens for s in seqs)

    def grads(batches):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for b in batches:
            loss = CL.forward_loss(model, b, "keep")[0]
            (loss / n).backward()  # as the trainer: normalised by the step's trained tokens
            total += loss.item()
        return total, torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    ref_loss, ref = grads([alone(s) for s in seqs])
    loss, got = grads([packed_batch(seqs, "cpu")])
    assert loss == pytest.approx(ref_loss, rel=TOL)
    assert rel(got, ref) < TOL


def test_per_sequence_attention_never_computes_across_sequences(monkeypatch):
    """What the per-sequence attention saves: with it, every SDPA call of a packed forward spans
    one sequence (causal, no mask); with sdpa, each spans the whole row under a mask."""
    seqs, calls = sequences(), []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[2], attn_mask is None and kw.get("is_causal")))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    lengths = {len(s.input_ids) for s in seqs}
    for attention in ("sdpa", NAME):
        calls.clear()
        with torch.no_grad():
            attending(F.build("llama"), attention)(**packed_batch(seqs, "cpu"), use_cache=False)  # as training runs it
        if attention == NAME:
            assert calls and all(n in lengths and causal for n, causal in calls), calls
            assert len(calls) == len(seqs) * F.build("llama").config.num_hidden_layers
        else:
            assert calls and all(n == sum(lengths) and not causal for n, causal in calls), calls


@pytest.mark.parametrize("up_to", [0, 64])
def test_short_bf16_sequences_attend_in_fp32_when_training_where_this_machine_measured_it_faster(monkeypatch, up_to):
    """precision.attention_fp32_up_to: on this CPU, a bf16 sequence no longer than it attends on
    fp32 copies in training (autocast off for the call, else it casts them back to bf16); longer
    ones, and every no-grad forward, attend in bf16."""
    from tunejob.train import attention as A

    seqs, seen = sequences((40, 50, 80)), []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):  # the dtype it computed in: autocast would cast fp32 inputs to bf16 inside
        out = real(q, k, v, **kw)
        seen.append((q.shape[2], out.dtype))
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(A, "fp32_up_to", lambda: up_to)
    model = with_lora(attending(F.build("llama").to(torch.bfloat16), NAME)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = CL.forward_loss(model, packed_batch(seqs, "cpu"), "keep")[0]
    loss.backward()
    fp32 = {n for n, dtype in seen if dtype == torch.float32}
    assert fp32 == ({40, 50} if up_to else set()) and {n for n, _ in seen} == {40, 50, 80}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**packed_batch(seqs, "cpu"), use_cache=False)
    assert seen and all(dtype == torch.bfloat16 for _, dtype in seen)


def test_the_check_refuses_packing_for_a_family_that_carries_state_along_the_row():
    """LFM2's short convolutions read the previous sequence's last tokens across a pack's
    boundary, whatever the mask: a real family where packing is wrong. Llama passes the same check."""
    seqs = sequences((12, 9, 14))
    lfm2 = F.build("lfm2")
    with torch.no_grad():  # it is wrong: the packed losses differ from each sequence alone
        packed = -CL.token_logps(lfm2, packed_batch(seqs, "cpu"), "full")[0]
        each = torch.cat([-CL.token_logps(lfm2, alone(s), "full")[0] for s in seqs])
    assert rel(packed, each) > 1e-3
    assert not check_packing(lfm2, seqs, "cpu", "full").ok
    said = []
    assert choose_packing("auto", "supervised", lfm2, seqs, "cpu", CL.LossPath(), said.append) == 0
    assert len(said) == 1 and said[0].startswith("note: packing off: Lfm2ForCausalLM") and "one sequence per forward pass" in said[0]
    assert lfm2.config._attn_implementation == "sdpa"  # tried per sequence, then the model's own: both refused

    llama, said = F.build("llama"), []
    assert check_packing(llama, seqs, "cpu", "keep").ok
    assert choose_packing("auto", "supervised", llama, seqs, "cpu", CL.LossPath(), said.append) == 512 and said == []
    assert llama.config._attn_implementation == NAME  # checked per sequence, and kept
    assert llama.training is False  # F.build's eval mode, as found
    # never for DPO / reinforcement (per-row sums), GPUs (batched already), or when switched off
    for mode, method, device in (("off", "supervised", "cpu"), ("auto", "dpo", "cpu"), ("auto", "reinforcement", "cpu"),
                                 ("auto", "supervised", "meta")):
        assert choose_packing(mode, method, llama, seqs, device, CL.LossPath(), said.append) == 0


def test_a_bf16_base_is_checked_in_fp32_and_given_back_bit_for_bit(monkeypatch):
    """bf16 rounds the packed row's GEMMs and each sequence's differently: the check upcasts the
    base to fp32 for its two forwards, so the tolerance can stay fp32's, and casts it back
    exactly. At 1e-5 tiny gemma3 passes in fp32 and fails in bf16 (the check's own arithmetic)."""
    from tunejob.train import packing as P

    seqs = sequences((40, 33, 50, 61))
    model = attending(F.build("gemma3").to(torch.bfloat16), NAME)
    params, before = list(model.parameters()), {k: v.clone() for k, v in model.state_dict().items()}
    check = check_packing(model, seqs, "cpu", "full", tolerance=1e-5)
    assert check.ok and check.detail.endswith("(checked in fp32)"), check
    assert list(model.parameters()) == params  # the same Parameter objects: an optimizer's stay valid
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert CL.stored_bf16(model)
    monkeypatch.setattr(P, "available_memory", lambda: 0)  # no room for the fp32 copy: checked as stored
    check = check_packing(model, seqs, "cpu", "full", tolerance=1e-5)
    assert not check.ok and "fp32" not in check.detail, check
    lfm2 = F.build("lfm2").to(torch.bfloat16)  # a leak is refused in bf16 as in fp32
    monkeypatch.setattr(P, "available_memory", lambda: 1 << 40)
    assert choose_packing("auto", "supervised", lfm2, seqs, "cpu", CL.LossPath(), lambda m: None) == 0


def test_the_embedded_model_packs_in_bf16():
    """The real SmolLM2-135M stored in bf16 (as `auto` trains it on a CPU with bf16 units): the
    packed row differs from each sequence alone by bf16 rounding alone (2.7e-2 of the mean loss,
    over the old bf16 tolerance of 1e-2), and within fp32's 1e-4 once checked in fp32."""
    from transformers import AutoModelForCausalLM
    from tunejob.train import packing as P
    from tunejob.train.models import default_model_path

    model = AutoModelForCausalLM.from_pretrained(str(default_model_path()), dtype=torch.bfloat16, attn_implementation="sdpa")
    seqs = sequences((120, 90, 110, 100))
    said = []
    assert choose_packing("auto", "supervised", model, seqs, "cpu", CL.LossPath(), said.append) == 512, said
    assert said == [] and model.config._attn_implementation == NAME and CL.stored_bf16(model)
    check = check_packing(model, seqs, "cpu", "keep")
    assert check.ok and "vs tolerance 1e-04 (checked in fp32)" in check.detail, check


def test_training_with_and_without_packing_gives_the_same_losses(tmp_path, tiny_model, monkeypatch):
    """Same seed, dropout 0, fp32: per-step train losses within 1e-4 and the same validation loss;
    the packed run forwards no padding either."""
    from tunejob.train.trainer import train

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = write_chat_data(tmp_path / "d.jsonl", 20)
    runs = {}
    for packing in ("auto", "off"):  # a bare YAML `off` reads as false: the spec maps it back
        text = (f"model: {tiny_model}\ndata: {{train: {data}, val_fraction: 0.2}}\noutput_dir: {tmp_path / packing}\n"
                f"hyperparameters: {{batch_size: 4, learning_rate: 0.01, max_seq_len: 64, warmup: 0, max_steps: 3, "
                f"mixed_precision: 'no', packing: {packing}}}\n"
                "lora: {r: 4, dropout: 0.0}\ncheckpointing: {eval_steps: 3, save_steps: 3}\n")
        said = []
        summary = train(parse_spec(text), say=said.append)
        records = read_metrics(tmp_path / packing / "metrics.jsonl")
        runs[packing] = (summary, records, said)
    (packed, precs, psaid), (plain, rrecs, rsaid) = runs["auto"], runs["off"]
    assert packed["pack_tokens"] == 512 and plain["pack_tokens"] is None
    assert any("packed: up to 512 tokens per forward pass, attention per sequence" in m for m in psaid)
    assert packed["attention"] == NAME and plain["attention"] == "sdpa"
    assert any("1 per forward pass" in m for m in rsaid)
    losses = [[r["train_loss"] for r in recs if r["kind"] == "train"] for recs in (precs, rrecs)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    evals = [[r["valid_loss"] for r in recs if r["kind"] == "eval"] for recs in (precs, rrecs)]
    assert len(evals[0]) == 1 and evals[0] == pytest.approx(evals[1], rel=1e-4)
    assert packed["padding_fraction"] == 0.0 and packed["tokens_seen"] == plain["tokens_seen"]


def test_packing_off_is_refused_for_an_api_backend():
    from tunejob.errors import SpecError

    with pytest.raises(SpecError, match="hyperparameters.packing: the openai service batches its own way"):
        parse_spec("backend: openai\nmodel: gpt-4o-mini-2024-07-18\ndata: {train: t}\nhyperparameters: {packing: off}\n")
