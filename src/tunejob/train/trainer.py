"""The local training recipe: LoRA / QLoRA on a Hugging Face causal LM, written out in one place.

    spec -> data (validated, split) -> token ids + assistant-only labels -> base model (+ 4-bit)
         -> LoRA adapter -> for each step: forward/backward over micro-batches, clip, AdamW,
            cosine schedule -> every eval_steps: full validation loss, best / early stopping
         -> every save_steps (and at every new best): atomic checkpoint -> summary.json

Each rule lives in one named step: `_prepare` (data, model, optimizer), `_train_step` (one
optimizer step), `_evaluate` (best and early stopping), `_save` (checkpoints), `_summary`. The
loss is the model's own forward at trained positions (loss.py); batches and their order are in
batches.py; what a checkpoint holds and resuming it, in resume.py.
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from tunejob.data.preference import encode_pairs
from tunejob.data.reinforcement import encode_prompts
from tunejob.data.sequences import encode_examples
from tunejob.data.splits import load_splits
from tunejob.errors import BackendError, DataError, Stopped
from tunejob.monitor.live import make_console_sink
from tunejob.monitor.metrics import JsonlSink, Stream, TensorBoardSink
from tunejob.spec import JobSpec
from tunejob.spec.reinforcement import DEFAULT_COMPLETION_TOKENS
from tunejob.train import checkpoint as ckpt
from tunejob.train import distributed, precision
from tunejob.train import resume as saved
from tunejob.train import threads
from tunejob.train.stop import StopRequest
from tunejob.train.adapter import add_lora, count_parameters, load_model
from tunejob.train.batches import EpochOrder, autocast, forward_batches, make_collator, micro_batch_size
from tunejob.train.attention import NAME as PACKED
from tunejob.train.loss import LossPath, base_of, evaluate
from tunejob.train.packing import choose_packing
from tunejob.train.models import load_tokenizer, resolve_model_path
from tunejob.train.preference import Dpo, means
from tunejob.train.reinforcement import Grpo, make_grpo


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class Run:
    """Everything the loop needs, built once by _prepare."""

    spec: JobSpec
    world: distributed.World
    say: object
    config_yaml: str
    train_seqs: list
    val_seqs: list
    model: object
    params: list
    optimizer: object
    scheduler: object
    collate: object
    micro: int
    batch_size: int
    total_steps: int
    order: EpochOrder
    loss_path: LossPath
    trainable: int
    total: int
    bf16: bool = False
    pack_tokens: int = 0  # > 0: short sequences share a forward pass (packing.choose_packing), else `micro` per pass
    dpo: Dpo | None = None  # method dpo: train/val seqs are PairSequences and this is the objective
    rl: Grpo | None = None  # method reinforcement: train/val seqs are PromptSequences and this is the objective
    stop: "StopRequest | None" = None
    state: dict = field(default_factory=lambda: {"step": 0, "best_step": None, "best_valid_loss": None, "evals_without_improvement": 0,
                                                 "tokens_seen": 0, "trained_tokens": 0, "elapsed_s": 0.0})

    @property
    def device(self):
        return self.world.device

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch


def _encode(spec: JobSpec, tokenizer, say) -> tuple[list, list]:
    hp = spec.hyperparameters
    train_examples, val_examples = load_splits(spec)
    if spec.method.type == "dpo":
        (train_seqs, train_stats), (val_seqs, val_stats) = (encode_pairs(tokenizer, ex, hp.max_seq_len) for ex in (train_examples, val_examples))
    elif spec.method.type == "reinforcement":
        n = spec.method.completion_tokens or DEFAULT_COMPLETION_TOKENS
        (train_seqs, train_stats), (val_seqs, val_stats) = (encode_prompts(tokenizer, ex, hp.max_seq_len, n) for ex in (train_examples, val_examples))
    else:
        train_seqs, train_stats = encode_examples(tokenizer, train_examples, hp.max_seq_len, hp.train_on)
        val_seqs, val_stats = encode_examples(tokenizer, val_examples, hp.max_seq_len, hp.train_on)
    for label, st in (("train", train_stats), ("validation", val_stats)):
        if st.truncated:
            say(f"note: {st.truncated} {label} example(s) longer than max_seq_len {hp.max_seq_len} were truncated")
        if st.dropped_no_trained_tokens:
            say(f"warning: {st.dropped_no_trained_tokens} {label} example(s) have no trained tokens after truncation/masking and were skipped; raise max_seq_len")
    if not train_seqs or not val_seqs:
        raise DataError("no trainable examples left in the train or validation split; check max_seq_len and the data")
    return train_seqs, val_seqs


def _prepare(spec: JobSpec, world: distributed.World, model_path: str | None, config_yaml: str, say, pinned: str | None = None) -> Run:
    from transformers import get_cosine_schedule_with_warmup

    hp = spec.hyperparameters
    torch.manual_seed(hp.seed)
    random.seed(hp.seed)
    model_path = model_path or resolve_model_path(spec.model)
    tokenizer = load_tokenizer(model_path, spec.chat_template)
    train_seqs, val_seqs = _encode(spec, tokenizer, say)
    batch_size, epochs = spec.resolved_batch_size(), spec.resolved_epochs()
    order = EpochOrder([_length(s) for s in train_seqs], batch_size, hp.seed)
    total_steps = epochs * order.steps_per_epoch
    if hp.max_steps:
        total_steps = min(total_steps, hp.max_steps)
    warmup = int(hp.warmup * total_steps) if hp.warmup < 1 else int(hp.warmup)

    mixed = pinned if pinned and hp.mixed_precision == "auto" else precision.resolve(hp.mixed_precision, world.device, spec.quantization)
    # bf16: the frozen base is stored in bf16; peft keeps the LoRA weights fp32 (autocast_adapter_dtype),
    # so the optimizer state and the loss reduction (loss.forward_loss upcasts the logits) stay fp32.
    model = add_lora(spec, load_model(spec, model_path, world.device, mixed))
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    distributed.broadcast_parameters(world, params)
    say(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    optimizer = torch.optim.AdamW(params, lr=spec.resolved_learning_rate(), weight_decay=hp.weight_decay)
    collate, loss_path = make_collator(tokenizer.pad_token_id), LossPath(say=say)
    micro = micro_batch_size(batch_size, hp.gradient_accumulation, world.size, world.device)
    pack_tokens = choose_packing(hp.packing, spec.method.type, model, train_seqs, world.device, loss_path, say)
    dpo = Dpo(spec.method.resolved_beta, loss_path, collate, micro, world.device, mixed == "bf16") if spec.method.type == "dpo" else None
    rl = make_grpo(spec, tokenizer, loss_path, world.device, mixed == "bf16", say) if spec.method.type == "reinforcement" else None
    return Run(spec=spec, world=world, say=say, config_yaml=config_yaml, train_seqs=train_seqs, val_seqs=val_seqs, model=model,
               params=params, optimizer=optimizer, scheduler=get_cosine_schedule_with_warmup(optimizer, warmup, total_steps),
               # the effective batch stays batch_size however many processes share it (the spec checks divisibility)
               collate=collate, micro=micro, batch_size=batch_size, total_steps=total_steps, order=order, loss_path=loss_path,
               trainable=trainable, total=total, bf16=mixed == "bf16", pack_tokens=pack_tokens, dpo=dpo, rl=rl)


def _length(seq) -> int:
    """Tokens a sequence (or a preference pair: both sides) puts through the model."""
    return seq.tokens if hasattr(seq, "chosen") else len(seq.input_ids)


def _open_stream(run: Run, resuming: bool) -> Stream:
    run_dir, step = run.spec.run_dir, run.state["step"]
    stream = Stream([
        JsonlSink(run_dir / "metrics.jsonl", truncate_after_step=step),
        TensorBoardSink(run_dir / "tensorboard", purge_step=step + 1 if resuming else None),
        make_console_sink(run.total_steps),
    ] if run.world.is_main else [])
    world = run.world
    attention = getattr(base_of(run.model).config, "_attn_implementation", None)
    per_pass = (f"packed: up to {run.pack_tokens} tokens per forward pass{', attention per sequence' if attention == PACKED else ''}"
                if run.pack_tokens else f"{run.micro} per forward pass")
    per_step = f"{run.batch_size // world.size} per process, {per_pass}" if world.distributed else per_pass
    plan_line = (f"training {len(run.train_seqs)} examples, validating on {len(run.val_seqs)}: {run.total_steps} steps of "
                 f"{run.batch_size} ({per_step}), {run.spec.resolved_epochs()} epoch(s), on {run.device} in {'bf16' if run.bf16 else 'fp32'}")
    run.say(plan_line)
    # The run's shape in the stream itself, so readers (dashboard, watch) need no log parsing.
    stream.emit({"kind": "start", "step": step, "total_steps": run.total_steps, "train_examples": len(run.train_seqs),
                 "validation_examples": len(run.val_seqs), "trainable_parameters": run.trainable, "total_parameters": run.total,
                 "mixed_precision": "bf16" if run.bf16 else "no", "message": plan_line})
    return stream


def _train_step(run: Run, step: int) -> dict | None:
    """One optimizer step (1-based `step`): the step's record, or None when the loss is not finite."""
    world, t0 = run.world, time.time()
    seqs = [run.train_seqs[i] for i in run.order.step(step - 1)]
    if run.rl is not None:
        fields, n_trained, processed = run.rl.train_fields(run.model, seqs, step)
        return _optimizer_step(run, step, seqs, fields, n_trained, processed, t0)
    if run.dpo is not None:
        sums = run.dpo.accumulate(run.model, seqs, len(seqs))
        fields = means(sums, len(seqs))
        n_trained = sum(p.chosen.trained_tokens + p.rejected.trained_tokens for p in seqs)
        return _optimizer_step(run, step, seqs, fields, n_trained, sum(_length(s) for s in seqs), t0)
    n_trained = sum(s.trained_tokens for s in seqs)  # of the global batch: every rank knows it
    mine = seqs[world.rank :: world.size]
    loss_sum, correct, processed = 0.0, 0, 0
    for batch in forward_batches(run.collate, mine, run.micro, run.device, run.pack_tokens):
        processed += int(batch["input_ids"].numel())  # padding included (a pack has none)
        with autocast(run.device, run.bf16):
            loss, _, c = run.loss_path(run.model, batch)
        (loss / n_trained).backward()  # token-mean over the whole global step, however it is split
        loss_sum += loss.detach().item()
        correct += c
    distributed.sum_gradients(world, run.params)  # the one-process gradient of the global batch
    loss_sum, correct, processed = distributed.sum_(world, [loss_sum, correct, processed])
    fields = {"train_loss": loss_sum / n_trained, "train_mean_token_accuracy": correct / n_trained}
    return _optimizer_step(run, step, seqs, fields, n_trained, processed, t0)


def _optimizer_step(run: Run, step: int, seqs: list, fields: dict, n_trained: int, processed: int, t0: float) -> dict:
    """Clip, AdamW, schedule once the step's gradients are in; the step's record (an event when
    the loss is not finite, with the optimizer left untouched)."""
    train_loss = fields["train_loss"]
    if not math.isfinite(train_loss):
        return {"kind": "event", "step": step, "message": f"train loss became {train_loss} at step {step}"}
    torch.nn.utils.clip_grad_norm_(run.params, run.spec.hyperparameters.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    # reinforcement: the prompts and the answers sampled for them went through the model, not the prompts once
    state, tokens = run.state, processed if run.rl else sum(_length(s) for s in seqs)
    state["tokens_processed"] = state.get("tokens_processed", 0) + int(processed)
    state["tokens_seen"] += tokens
    state["trained_tokens"] += n_trained
    return {"kind": "train", "step": step, "epoch": round(step / run.steps_per_epoch, 4), **fields,
            "learning_rate": run.scheduler.get_last_lr()[0], "tokens_seen": state["tokens_seen"],
            "tokens_per_second": tokens / max(time.time() - t0, 1e-9), "batch": [s.source_index for s in seqs]}


def _evaluate(run: Run, step: int, stream: Stream, started: float) -> bool:
    """Full validation loss at eval steps; True when it is a new best."""
    if step % run.spec.checkpointing.eval_steps and step != run.total_steps:
        return False
    if run.rl is not None:
        fields = run.rl.evaluate(run.model, run.val_seqs, step)
    elif run.dpo is not None:
        fields = run.dpo.evaluate(run.model, run.val_seqs)
    else:
        valid_loss, valid_acc = evaluate(run.model, run.val_seqs, run.collate, run.micro, run.device, run.world, run.bf16, run.loss_path,
                                         run.pack_tokens)
        fields = {"valid_loss": valid_loss, "valid_mean_token_accuracy": valid_acc}
    full = {} if run.rl else {"full_valid_loss": fields["valid_loss"], "full_valid_mean_token_accuracy": fields["valid_mean_token_accuracy"]}
    stream.emit({"kind": "eval", "step": step, "epoch": round(step / run.steps_per_epoch, 4), **fields, **full,
                 "elapsed_s": round(time.time() - started, 3)})
    # the best is the lowest validation loss; for reinforcement, the highest held-out reward (kept negated, as a loss)
    valid_loss = -fields["valid_reward_mean"] if run.rl else fields["valid_loss"]
    state = run.state
    if state["best_valid_loss"] is None or valid_loss < state["best_valid_loss"]:
        state.update(best_step=step, best_valid_loss=valid_loss, evals_without_improvement=0)
        return True
    state["evals_without_improvement"] += 1
    return False


def _save(run: Run, step: int, new_best: bool, stop_early: bool, stream: Stream) -> None:
    cp, run_dir = run.spec.checkpointing, run.spec.run_dir
    if not (step % cp.save_steps == 0 or (new_best and cp.keep_best) or step == run.total_steps or stop_early):
        return
    path = saved.write_checkpoint(run_dir, run.model, run.optimizer, run.scheduler, dict(run.state, epoch=step / run.steps_per_epoch),
                                   run.config_yaml, run.world)
    if run.world.is_main:
        stream.emit({"kind": "checkpoint", "step": step, "message": f"checkpoint {path.name}" + (" (best)" if new_best else "")})
        if new_best:
            ckpt.mark_best(run_dir, path, step, run.state["best_valid_loss"])
        best = run_dir / "best"
        ckpt.prune(run_dir, cp.keep_last, {best.resolve()} if best.exists() else set())


def _loop(run: Run, stream: Stream) -> str:
    """Steps until the end, early stopping or a NaN loss; returns the stop reason."""
    cp, state = run.spec.checkpointing, run.state
    run.model.train()
    started = time.time() - state["elapsed_s"]
    step = state["step"]
    if run.stop and run.stop.agreed(run.world):  # asked while loading: the last checkpoint holds it all
        return "stopped"
    if run.rl is not None and step == 0:  # the base's held-out reward, what training must beat (not a checkpoint)
        stream.emit({"kind": "eval", "step": 0, "epoch": 0.0, **run.rl.evaluate(run.model, run.val_seqs, 0), "elapsed_s": 0.0})
    while step < run.total_steps:
        step += 1
        record = _train_step(run, step)
        if record["kind"] != "train":
            stream.emit(record)
            return "nan_loss"
        stream.emit({**record, "elapsed_s": round(time.time() - started, 3)})
        for message in run.rl.drain_events() if run.rl else []:  # graders that failed: why their answers scored 0
            stream.emit({"kind": "event", "step": step, "message": message})
        new_best = _evaluate(run, step, stream, started)
        state["step"], state["elapsed_s"] = step, time.time() - started
        stop_early = bool(cp.early_stopping_patience) and state["evals_without_improvement"] >= cp.early_stopping_patience
        stopping = bool(run.stop) and run.stop.agreed(run.world)
        _save(run, step, new_best, stop_early or stopping, stream)
        if stopping and not (stop_early or step == run.total_steps):
            stream.emit({"kind": "event", "step": step, "message": f"stopped on request after step {step}; checkpoint saved, resume continues from it"})
            return "stopped"
        if stop_early:
            stream.emit({"kind": "event", "step": step, "message": f"early stopping: no improvement in {cp.early_stopping_patience} evaluations; best is step {state['best_step']}"})
            return "early_stopping"
    return "completed"


def _summary(run: Run, stop_reason: str, wall: float) -> dict:
    run_dir, state = run.spec.run_dir, run.state
    best = ckpt.best_checkpoint(run_dir)
    summary = {
        "run_dir": str(run_dir), "stop_reason": stop_reason, "steps": state["step"], "total_steps": run.total_steps,
        "best_step": state["best_step"], "best_valid_loss": state["best_valid_loss"], "best_checkpoint": str(best) if best else None,
        "trained_tokens": state["trained_tokens"], "tokens_seen": state["tokens_seen"], "wall_time_s": round(wall, 2),
        "padding_fraction": round(1 - state["tokens_seen"] / state["tokens_processed"], 4) if state.get("tokens_processed") else None,
        "tokens_per_second": round(state["tokens_seen"] / max(state["elapsed_s"], 1e-9), 1),
        "peak_memory_mb": round(peak_memory_mb(run.device), 1), "trainable_parameters": run.trainable, "total_parameters": run.total,
        "train_examples": len(run.train_seqs), "validation_examples": len(run.val_seqs), "device": str(run.device),
        "mixed_precision": "bf16" if run.bf16 else "no",
        "loss_path": run.loss_path.choice.path if run.loss_path.choice else None, "pack_tokens": run.pack_tokens or None,
        "attention": getattr(base_of(run.model).config, "_attn_implementation", None),
    }
    if run.rl is not None:  # its best is the highest held-out reward, kept negated as a loss while training
        best_loss = summary.pop("best_valid_loss")
        summary["best_valid_reward"] = None if best_loss is None else -best_loss
    if run.world.distributed:
        summary.update(processes=run.world.size, batch_per_process=run.batch_size // run.world.size, effective_batch_size=run.batch_size)
    return summary


def train(spec: JobSpec, resume: bool | None = None, model_path: str | None = None, say=_say) -> dict:
    """Run the job; returns the summary (also written to RUN_DIR/summary.json)."""
    run_dir, config_yaml = spec.run_dir, spec.to_yaml()
    distributed.check_strategy(spec.distributed.strategy, spec.distributed.world_size)
    world = distributed.join()
    if not world.is_main:  # one voice: rank 0 prints, writes metrics, checkpoints and the summary
        say = lambda *_: None  # noqa: E731
    existing = ckpt.last_checkpoint(run_dir)
    if existing is not None and resume is False:
        raise BackendError(f"{run_dir} already holds checkpoints (latest {existing.name}); resume it, or pick another output_dir")
    done = saved.finished_summary(run_dir, config_yaml) if existing is not None else None
    if done is not None:  # nothing on disk changes
        say(saved.finished_message(run_dir, done))
        return done
    resuming = existing is not None
    n_threads = threads.training_threads()  # serve's worker and the distributed launch set it per process
    threads.apply(n_threads)
    if not world.distributed:
        threads.warn_if_oversubscribed(n_threads, say)
    with StopRequest() as stop:
        return _train(spec, world, run_dir, config_yaml, resuming, existing, model_path, say, stop)


def _train(spec: JobSpec, world, run_dir, config_yaml: str, resuming: bool, existing, model_path, say, stop: StopRequest) -> dict:
    pinned = saved.started_precision(run_dir) if resuming else None  # a resumed `auto` run keeps the precision it started in
    run = _prepare(spec, world, model_path, config_yaml, say, pinned)  # data and model first: a job that cannot start writes nothing
    run.stop = stop
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        (run_dir / "config.yaml").write_text(config_yaml)
    if resuming:
        run.state = saved.restore_checkpoint(existing, run.model, run.optimizer, run.scheduler, rank=world.rank)
        say(f"resuming from {existing} (step {run.state['step']})")
        changed = saved.changed_keys((existing / "config.yaml").read_text(), config_yaml)
        if changed:
            say(f"note: the spec differs from the checkpoint's in {', '.join(changed)}; optimizer and schedule state come from the checkpoint")
    stream = _open_stream(run, resuming)
    started = time.time() - run.state["elapsed_s"]
    stop_reason = _loop(run, stream)
    state = run.state
    if stop_reason == "stopped":
        stream.close()
        distributed.barrier(world)
        raise Stopped(f"training stopped on request (SIGTERM) at step {state['step']} of {run.total_steps}; "
                      f"its checkpoint is saved: run the job again to resume")
    stream.emit({"kind": "end", "step": state["step"], "stop_reason": stop_reason, "best_step": state["best_step"],
                 "message": f"finished: {stop_reason}, best step {state['best_step']}"})
    stream.close()
    summary = _summary(run, stop_reason, time.time() - started)
    if world.is_main:
        ckpt.write_json_atomic(run_dir / "summary.json", summary)
    distributed.barrier(world)  # no rank leaves (and tears the group down) before the summary is written
    if stop_reason == "nan_loss":
        kept = f"the best checkpoint (step {state['best_step']}, valid loss {state['best_valid_loss']:.4f}) stays the result" if state["best_step"] else "no checkpoint was reached"
        raise BackendError(f"training loss became NaN/inf at step {state['step'] + 1}; {kept}; lower hyperparameters.learning_rate and check the data")
    return summary
