"""The local training recipe: LoRA / QLoRA on a Hugging Face causal LM, written out in one place.

    spec -> data (validated, split) -> token ids + assistant-only labels -> base model (+ 4-bit)
         -> LoRA adapter -> for each step: forward/backward over micro-batches, clip, AdamW,
            cosine schedule -> every eval_steps: full validation loss, best / early stopping
         -> every save_steps (and at every new best): atomic checkpoint -> summary.json

The data order of step s is a pure function of (seed, epoch), and each checkpoint holds the
adapter, optimizer, scheduler and RNG states, so a resumed run repeats the uninterrupted one
step for step. trl is imported here and nowhere else (its batch collator).
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from pathlib import Path

import torch

from tunejob.data.sequences import IGNORE, encode_examples
from tunejob.data.splits import load_splits
from tunejob.errors import BackendError, DataError
from tunejob.monitor.live import make_console_sink
from tunejob.monitor.metrics import JsonlSink, Stream, TensorBoardSink
from tunejob.spec import JobSpec
from tunejob.train import checkpoint as ckpt
from tunejob.train import distributed
from tunejob.train.adapter import add_lora, count_parameters, load_model
from tunejob.train.models import load_tokenizer, resolve_model_path


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- steps


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


def forward_loss(model, batch: dict) -> tuple[torch.Tensor, int, int]:
    """(sum of token losses, trained tokens, correctly predicted trained tokens) of a micro-batch.

    The language-model head runs only where a label is trained: SmolLM2's vocabulary is 49,152
    wide, so full logits cost 2 x 576 x 49,152 FLOPs per token (a fifth of the forward pass) plus
    a softmax, and most positions (system and user turns, padding) carry no loss.
    """
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = getattr(base, "model", None), base.get_output_embeddings()
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).last_hidden_state
        logits = head(hidden[:, :-1][mask])
        targets = labels[mask]
    else:  # unusual architectures: full logits
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1][mask]
        targets = labels[mask]
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    with torch.no_grad():
        correct = int((logits.argmax(-1) == targets).sum())
    return loss, int(mask.sum()), correct


def micro_batch_size(batch_size: int, accumulation: int, processes: int, device: torch.device) -> int:
    """Sequences per forward pass. On CPU, one: a lone sequence needs no padding and no attention
    mask, so attention takes SDPA's causal fast path; with a padding mask it was the biggest cost
    after the matmuls (bench/RESULTS.md: 1.65x the tokens/s of 4-sequence padded micro-batches on
    SmolLM2-135M, same losses). The loss is normalised per step, so the split changes nothing but
    float summation order. On GPUs, batched matmuls win: batch / (accumulation x processes)."""
    if device.type == "cpu":
        return 1
    return max(1, batch_size // (accumulation * processes))


def _batch(collate, seqs, device) -> dict:
    batch = _to_device(collate(seqs), device)
    if len(seqs) == 1:
        batch.pop("attention_mask", None)  # all ones: without it attention runs the causal fast path
    return batch


def evaluate(model, sequences, collate, micro_batch: int, device, world: distributed.World | None = None,
             bf16: bool = False) -> tuple[float, float]:
    """(token-mean loss, token accuracy) over the whole split; with several processes each rank
    takes every world.size-th example and the sums are all-reduced, so every rank gets the total."""
    world = world or distributed.World(device=device)
    model.eval()
    total_loss, total_tokens, total_correct = 0.0, 0, 0
    mine = sequences[world.rank :: world.size]
    with torch.no_grad(), _autocast(device, bf16):
        for i in range(0, len(mine), micro_batch):
            batch = _batch(collate, mine[i : i + micro_batch], device)
            loss, tokens, correct = forward_loss(model, batch)
            total_loss += loss.item()
            total_tokens += tokens
            total_correct += correct
    model.train()
    total_loss, total_tokens, total_correct = distributed.sum_(world, [total_loss, total_tokens, total_correct])
    return total_loss / max(total_tokens, 1), total_correct / max(total_tokens, 1)


def _autocast(device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_collator(pad_token_id: int):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)
    return lambda seqs: collator([{"input_ids": s.input_ids, "labels": s.labels} for s in seqs])


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save(obj, path: Path) -> None:
    # Given a path, torch.save reports a full disk as a bare RuntimeError ("unexpected pos 6976 vs
    # 6868"); given a Python file, the ENOSPC OSError stays attached, so the save can say "disk full".
    with open(path, "wb") as f:
        torch.save(obj, f)


def write_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict, config_yaml: str, world: distributed.World | None = None) -> Path | None:
    """Rank 0 writes (the others' RNG states are gathered into rng.pt); every rank waits for the save."""
    world = world or distributed.World()
    rng = distributed.gather_objects(world, _rng_state())

    def contents(tmp: Path) -> None:
        model.save_pretrained(tmp)
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        _torch_save(rng[0] if len(rng) == 1 else {"ranks": rng}, tmp / "rng.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        ckpt.write_json_atomic(tmp / "state.json", state)  # last: marks the contents complete

    path = ckpt.save_checkpoint(run_dir, state["step"], contents) if world.is_main else None
    distributed.barrier(world)
    return path


def restore_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> dict:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    if "ranks" in rng:  # written by several processes: this rank's own (or rank 0's, if there are now more ranks)
        rng = rng["ranks"][rank] if rank < len(rng["ranks"]) else rng["ranks"][0]
    _set_rng_state(rng)
    return ckpt.read_state(path)


def _changed_keys(old_yaml: str, new_yaml: str) -> list[str]:
    import yaml

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(yaml.safe_load(old_yaml) or {}), flat(yaml.safe_load(new_yaml) or {})
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


# ---------------------------------------------------------------- the loop


def train(spec: JobSpec, resume: bool | None = None, model_path: str | None = None, say=_say) -> dict:
    """Run the job; returns the summary (also written to RUN_DIR/summary.json)."""
    from transformers import get_cosine_schedule_with_warmup

    hp, cp = spec.hyperparameters, spec.checkpointing
    run_dir = spec.run_dir
    distributed.check_strategy(spec.distributed.strategy, spec.distributed.world_size)
    world = distributed.join()
    if not world.is_main:  # one voice: rank 0 prints, writes metrics, checkpoints and the summary
        say = lambda *_: None  # noqa: E731
    bf16 = hp.mixed_precision == "bf16"
    existing = ckpt.last_checkpoint(run_dir)
    if existing is not None and resume is False:
        raise BackendError(f"{run_dir} already holds checkpoints (latest {existing.name}); resume it, or pick another output_dir")
    resuming = existing is not None and resume is not False
    run_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = spec.to_yaml()
    if world.is_main:
        (run_dir / "config.yaml").write_text(config_yaml)

    torch.manual_seed(hp.seed)
    random.seed(hp.seed)
    device = world.device
    train_examples, val_examples = load_splits(spec)
    model_path = model_path or resolve_model_path(spec.model)
    tokenizer = load_tokenizer(model_path)
    train_seqs, train_stats = encode_examples(tokenizer, train_examples, hp.max_seq_len, hp.train_on)
    val_seqs, val_stats = encode_examples(tokenizer, val_examples, hp.max_seq_len, hp.train_on)
    for label, st in (("train", train_stats), ("validation", val_stats)):
        if st.truncated:
            say(f"note: {st.truncated} {label} example(s) longer than max_seq_len {hp.max_seq_len} were truncated")
        if st.dropped_no_trained_tokens:
            say(f"warning: {st.dropped_no_trained_tokens} {label} example(s) have no trained tokens after truncation/masking and were skipped; raise max_seq_len")
    if not train_seqs or not val_seqs:
        raise DataError("no trainable examples left in the train or validation split; check max_seq_len and the data")

    batch_size, epochs = spec.resolved_batch_size(), spec.resolved_epochs()
    # the effective batch stays batch_size however many processes share it (the spec checks divisibility)
    micro = micro_batch_size(batch_size, hp.gradient_accumulation, world.size, device)
    steps_per_epoch = math.ceil(len(train_seqs) / batch_size)
    total_steps = epochs * steps_per_epoch
    if hp.max_steps:
        total_steps = min(total_steps, hp.max_steps)
    warmup = int(hp.warmup * total_steps) if hp.warmup < 1 else int(hp.warmup)

    model = add_lora(spec, load_model(spec, model_path, device))
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    distributed.broadcast_parameters(world, params)
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.resolved_learning_rate(), weight_decay=hp.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    collate = make_collator(tokenizer.pad_token_id)

    state = {"step": 0, "best_step": None, "best_valid_loss": None, "evals_without_improvement": 0, "tokens_seen": 0, "trained_tokens": 0, "elapsed_s": 0.0}
    if resuming:
        state = restore_checkpoint(existing, model, optimizer, scheduler, rank=world.rank)
        say(f"resuming from {existing} (step {state['step']})")
        changed = _changed_keys((existing / "config.yaml").read_text(), config_yaml)
        if changed:
            say(f"note: the spec differs from the checkpoint's in {', '.join(changed)}; optimizer and schedule state come from the checkpoint")
    stream = Stream([
        JsonlSink(run_dir / "metrics.jsonl", truncate_after_step=state["step"]),
        TensorBoardSink(run_dir / "tensorboard", purge_step=state["step"] + 1 if resuming else None),
        make_console_sink(total_steps),
    ] if world.is_main else [])
    per_step = f"{batch_size // world.size} per process, {micro} per forward pass" if world.distributed else f"{micro} per forward pass"
    plan_line = f"training {len(train_seqs)} examples, validating on {len(val_seqs)}: {total_steps} steps of {batch_size} ({per_step}), {epochs} epoch(s), on {device}"
    say(plan_line)
    # The run's shape in the stream itself, so readers (dashboard, watch) need no log parsing.
    stream.emit({"kind": "start", "step": state["step"], "total_steps": total_steps, "train_examples": len(train_seqs),
                 "validation_examples": len(val_seqs), "trainable_parameters": trainable, "total_parameters": total, "message": plan_line})

    lengths = [len(s.input_ids) for s in train_seqs]
    model.train()
    stop_reason, started = "completed", time.time() - state["elapsed_s"]
    step = state["step"]
    while step < total_steps:
        epoch, index = divmod(step, steps_per_epoch)
        batch_ids = batch_order(lengths, batch_size, hp.seed, epoch)[index]
        step += 1
        t0 = time.time()
        seqs = [train_seqs[i] for i in batch_ids]
        n_trained = sum(s.trained_tokens for s in seqs)  # of the global batch: every rank knows it
        mine = seqs[world.rank :: world.size]
        loss_sum, correct, processed = 0.0, 0, 0
        for j in range(0, len(mine), micro):
            batch = _batch(collate, mine[j : j + micro], device)
            processed += int(batch["input_ids"].numel())  # padding included
            with _autocast(device, bf16):
                loss, _, c = forward_loss(model, batch)
            (loss / n_trained).backward()  # token-mean over the whole global step, however it is split
            loss_sum += loss.detach().item()
            correct += c
        distributed.sum_gradients(world, params)  # the one-process gradient of the global batch
        loss_sum, correct, processed = distributed.sum_(world, [loss_sum, correct, processed])
        state["tokens_processed"] = state.get("tokens_processed", 0) + int(processed)
        train_loss = loss_sum / n_trained
        if not math.isfinite(train_loss):
            stop_reason = "nan_loss"
            stream.emit({"kind": "event", "step": step, "message": f"train loss became {train_loss} at step {step}"})
            break
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["tokens_seen"] += sum(len(s.input_ids) for s in seqs)
        state["trained_tokens"] += n_trained
        dt = time.time() - t0
        stream.emit({
            "kind": "train", "step": step, "epoch": round(step / steps_per_epoch, 4),
            "train_loss": train_loss, "train_mean_token_accuracy": correct / n_trained,
            "learning_rate": scheduler.get_last_lr()[0], "tokens_seen": state["tokens_seen"],
            "tokens_per_second": sum(len(s.input_ids) for s in seqs) / max(dt, 1e-9),
            "elapsed_s": round(time.time() - started, 3), "batch": [s.source_index for s in seqs],
        })
        new_best = False
        if step % cp.eval_steps == 0 or step == total_steps:
            valid_loss, valid_acc = evaluate(model, val_seqs, collate, micro, device, world, bf16)
            stream.emit({"kind": "eval", "step": step, "epoch": round(step / steps_per_epoch, 4), "valid_loss": valid_loss,
                         "valid_mean_token_accuracy": valid_acc, "full_valid_loss": valid_loss, "full_valid_mean_token_accuracy": valid_acc,
                         "elapsed_s": round(time.time() - started, 3)})
            if state["best_valid_loss"] is None or valid_loss < state["best_valid_loss"]:
                state.update(best_step=step, best_valid_loss=valid_loss, evals_without_improvement=0)
                new_best = True
            else:
                state["evals_without_improvement"] += 1
        state["step"], state["elapsed_s"] = step, time.time() - started
        stop_early = bool(cp.early_stopping_patience) and state["evals_without_improvement"] >= cp.early_stopping_patience
        if step % cp.save_steps == 0 or (new_best and cp.keep_best) or step == total_steps or stop_early:
            path = write_checkpoint(run_dir, model, optimizer, scheduler, dict(state, epoch=step / steps_per_epoch), config_yaml, world)
            if world.is_main:
                stream.emit({"kind": "checkpoint", "step": step, "message": f"checkpoint {path.name}" + (" (best)" if new_best else "")})
                if new_best:
                    ckpt.mark_best(run_dir, path, step, state["best_valid_loss"])
                best = run_dir / "best"
                ckpt.prune(run_dir, cp.keep_last, {best.resolve()} if best.exists() else set())
        if stop_early:
            stop_reason = "early_stopping"
            stream.emit({"kind": "event", "step": step, "message": f"early stopping: no improvement in {cp.early_stopping_patience} evaluations; best is step {state['best_step']}"})
            break
    stream.emit({"kind": "end", "step": state["step"], "stop_reason": stop_reason, "best_step": state["best_step"],
                 "message": f"finished: {stop_reason}, best step {state['best_step']}"})
    stream.close()

    wall = time.time() - started
    summary = {
        "run_dir": str(run_dir), "stop_reason": stop_reason, "steps": state["step"], "total_steps": total_steps,
        "best_step": state["best_step"], "best_valid_loss": state["best_valid_loss"],
        "best_checkpoint": str(ckpt.best_checkpoint(run_dir)) if ckpt.best_checkpoint(run_dir) else None,
        "trained_tokens": state["trained_tokens"], "tokens_seen": state["tokens_seen"], "wall_time_s": round(wall, 2),
        "padding_fraction": round(1 - state["tokens_seen"] / state["tokens_processed"], 4) if state.get("tokens_processed") else None,
        "tokens_per_second": round(state["tokens_seen"] / max(state["elapsed_s"], 1e-9), 1),
        "peak_memory_mb": round(peak_memory_mb(device), 1), "trainable_parameters": trainable, "total_parameters": total,
        "train_examples": len(train_seqs), "validation_examples": len(val_seqs), "device": str(device),
    }
    if world.distributed:
        summary.update(processes=world.size, batch_per_process=batch_size // world.size, effective_batch_size=batch_size)
    if world.is_main:
        ckpt.write_json_atomic(run_dir / "summary.json", summary)
    distributed.barrier(world)  # no rank leaves (and tears the group down) before the summary is written
    if stop_reason == "nan_loss":
        kept = f"the best checkpoint (step {state['best_step']}, valid loss {state['best_valid_loss']:.4f}) stays the result" if state["best_step"] else "no checkpoint was reached"
        raise BackendError(f"training loss became NaN/inf at step {step}; {kept}; lower hyperparameters.learning_rate and check the data")
    return summary
