"""Packing: whether a model may run several short sequences in one forward pass, checked once.

On CPU the trainer runs one unpadded sequence per forward pass (batches.micro_batch_size); for
short sequences (~68 tokens in the demo) its GEMMs are too narrow to run near peak. Packing them
into one row (batches.packed_batch): the demo's training (~68-token rows) ran 1.36x the tokens/s
of one sequence per pass on a 2-core AVX2 CPU, with the same validation loss (bench/RESULTS.md). transformers 5.x keeps
the sequences apart only when it sees the packed position_ids with no attention mask and no KV
cache (masking_utils.find_packed_sequence_indices): a family that builds its mask another way, or
carries state along the row (a recurrent or convolutional layer), would let them read each
other. So, like loss.choose_path, the first pack is run both ways before it is trusted:

    pack_tokens = choose_packing("auto", "supervised", model, train_seqs, device, loss_path, say)
    for batch in forward_batches(collate, seqs, micro, device, pack_tokens): ...
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from tunejob.train.attention import use_packed
from tunejob.train.batches import PACK_TOKENS, packed_batch, packs
from tunejob.train.loss import LossPath, base_of, default_tolerance, stored_bf16, token_logps


@dataclasses.dataclass
class PackCheck:
    ok: bool
    detail: str  # max relative per-token difference, or the error


@torch.no_grad()
def check_packing(model, seqs: list, device, path: str, tolerance: float | None = None) -> PackCheck:
    """Per-token losses of `seqs` packed into one row against each sequence alone (as the trainer
    runs it unpacked: no mask, no position_ids), by loss path `path`, in eval mode (no dropout, no
    RNG drawn). Agreement is max |difference| / mean loss <= tolerance (default_tolerance: 1e-4 in
    fp32). A base stored in bf16 is checked in fp32 (exact_fp32), where memory allows: the check
    asks whether the family keeps sequences apart, and bf16's rounding of the two GEMM shapes
    (7.5e-2 of the mean loss on the demo's first pack, against a leak's 3.9e-1) would hide that
    answer under noise at any tolerance that passes correct packing."""
    with exact_fp32(model) as upcast:
        tol = default_tolerance(model) if tolerance is None else tolerance
        check = _compare(model, seqs, device, path, tol)
    return dataclasses.replace(check, detail=check.detail + (" (checked in fp32)" if upcast else ""))


def _compare(model, seqs: list, device, path: str, tol: float) -> PackCheck:
    """check_packing's comparison, under bf16 autocast only when the weights are stored bf16 (as
    choose_path does)."""
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=stored_bf16(model)):
            packed = -token_logps(model, packed_batch(seqs, device), path)[0]  # per-token losses, in sequence order
            alone = torch.cat([-token_logps(model, _alone(s, device), path)[0] for s in seqs])
    except Exception as e:  # a family that refuses position_ids or a packed row: one sequence per pass
        return PackCheck(False, f"{type(e).__name__}: {str(e)[:80]}")
    finally:
        model.train(was_training)
    if packed.shape != alone.shape:
        return PackCheck(False, f"{packed.numel()} packed tokens vs {alone.numel()} alone")
    diff = float((packed - alone).abs().max() / alone.abs().mean().clamp_min(1e-6))
    return PackCheck(diff <= tol, f"{diff:.1e} vs tolerance {tol:.0e}")


@contextlib.contextmanager
def exact_fp32(model):
    """Within: `model`'s bf16 parameters and buffers held in fp32; after: the same bf16 values, bit
    for bit (every bf16 number is an fp32 number, so the round trip loses nothing). Yields whether
    it upcast: not where nothing is bf16, nor where the fp32 copy (twice the bf16 bytes, held
    beside the rest) would not fit in the memory the system reports available."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.dtype == torch.bfloat16]
    need = 2 * sum(t.numel() * t.element_size() for t in tensors)
    if not tensors or need > available_memory():
        yield False
        return
    for t in tensors:  # .data: the same Parameter objects (the optimizer's, tied weights) keep their identity
        t.data = t.data.float()
    try:
        yield True
    finally:
        for t in tensors:
            t.data = t.data.to(torch.bfloat16)


def available_memory() -> int:
    """Bytes the kernel reports available (MemAvailable), or 0 where it reports none (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0


def _alone(seq, device) -> dict:
    """One sequence as the unpacked trainer sends it (batches.as_batch of one: no attention mask)."""
    row = lambda xs: torch.tensor([list(xs)], dtype=torch.long, device=device)  # noqa: E731
    return {"input_ids": row(seq.input_ids), "labels": row(seq.labels)}


def applies(mode: str, method: str, device) -> bool:
    """Whether packing is on the table at all (before the check): supervised training on CPU with
    `hyperparameters.packing: auto`. `tunejob plan` asks the same question."""
    return mode == "auto" and method == "supervised" and torch.device(device).type == "cpu"


def choose_packing(mode: str, method: str, model, seqs: list, device, loss_path: LossPath, say,
                   budget: int = PACK_TOKENS) -> int:
    """Tokens per packed forward pass, or 0 for one sequence per pass. Packing is for supervised
    training on CPU (GPUs already batch: micro_batch_size; DPO and reinforcement need a row per
    sequence for their per-sequence sums) with `hyperparameters.packing: auto`, and only after
    check_packing passes on the shortest sequences (the fullest pack: the strictest check)."""
    if not applies(mode, method, device):
        return 0
    first = packs(sorted(seqs, key=lambda s: len(s.input_ids)), budget)[0]
    if len(first) < 2:  # no two sequences fit one pack: nothing to gain
        return 0
    path = loss_path.path_for(model, _alone(first[0], device))  # the loss path the trainer will use
    before = use_packed(base_of(model))  # each sequence attends by itself (attention.py), if it checks out
    check = check_packing(model, first, device, path)
    if not check.ok and before is not None:  # the model's own masked attention, as before
        base_of(model).set_attn_implementation(before)
        check = check_packing(model, first, device, path)
    if not check.ok:
        say(f"note: packing off: {type(base_of(model)).__name__}'s packed forward differs from one sequence alone "
            f"({check.detail}); one sequence per forward pass")
        return 0
    return budget
