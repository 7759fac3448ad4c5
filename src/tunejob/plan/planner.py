"""`tunejob plan` / `tunejob cost`: everything worth knowing before a job runs.

For API models: billed tokens (tiktoken, capped per example), epochs (OpenAI's auto rule unless
given), training and inference cost, and OpenAI's wind-down dates. For local models: token counts
with the model's own tokenizer and chat template, steps, trainable parameters, memory and time.
"""

from __future__ import annotations

import math
from pathlib import Path

from tunejob import catalog
from tunejob.plan import cost
from tunejob.spec import JobSpec


def _validated(path: Path, fmt: str = "openai", model: str | None = None, method: str | None = None):
    from tunejob.data.validate import require_valid

    return require_valid(path, format=fmt, model=model, method=method)


def token_counts(path: Path, model: str) -> tuple[list[int], bool]:
    """Per-example token counts of a chat file for an API model (cookbook arithmetic)."""
    from tunejob.data.dataset import load_examples
    from tunejob.data.tokens import counter_for

    counter = counter_for(model)
    from tunejob.data.preference import conversations, is_pair

    loaded = load_examples(path)
    if loaded and is_pair(loaded[0]):  # a pair's tokens: both of its conversations, as validate counts them
        counts = iter(counter.count([c for ex in loaded for c in conversations(ex)]))
        return [next(counts)[0] + next(counts)[0] for _ in loaded], counter.approximate
    return [total for total, _ in counter.count([ex["messages"] for ex in loaded])], counter.approximate


def cost_report(model: str | None, data: Path | None = None, tokens: int | None = None, epochs: int | None = None, price_per_1m: float | None = None,
                queries_per_day: float | None = None, tokens_per_query: float | None = None, output_fraction: float = 0.25) -> dict:
    counts, approx = (None, False)
    if data is not None:
        _validated(data, model=model)
        counts, approx = token_counts(data, model)
    est = cost.estimate(model, tokens_per_example=counts, total_tokens=tokens, epochs=epochs, price_per_1m=price_per_1m,
                        queries_per_day=queries_per_day, tokens_per_query=tokens_per_query, output_fraction=output_fraction,
                        tokens_approximate=approx)
    out = est.to_dict()
    info = catalog.lookup(model) if model else None
    if info and info.provider == "openai":
        out["notes"] = ["validation tokens are not billed on OpenAI"]
        out["openai_wind_down"] = catalog.openai_wind_down()
    return out


def plan_job(spec: JobSpec, gpu_memory_gb: float | None = None, price_per_1m: float | None = None) -> dict:
    if spec.backend == "local":
        return _plan_local(spec, gpu_memory_gb)
    return _plan_api(spec, price_per_1m)


def _plan_api(spec: JobSpec, price_per_1m: float | None) -> dict:
    fmt = "bedrock" if spec.backend == "bedrock" else "openai"
    report = _validated(spec.data.train, fmt, spec.model, spec.method.type)
    out: dict = {"backend": spec.backend, "model": spec.model, "train_examples": report.examples,
                 "validation": str(spec.data.validation) if spec.data.validation else f"{spec.data.val_fraction:.0%} of train (split by the provider or tunejob)",
                 "warnings": _warnings(report.examples, 0, 0)}
    epochs = None if spec.hyperparameters.epochs == "auto" else spec.hyperparameters.epochs
    info = catalog.lookup(spec.model)
    if price_per_1m is None and (info is None or info.training_per_1m is None):
        out["cost_note"] = f"no per-token training price known for {spec.model} ({info.source if info else 'not in the price table'}); pass --price-per-1m"
        if info and info.end_of_life:
            out["warnings"].append(f"{spec.model}: end of life {info.end_of_life}")
        return out
    out.update(cost_report(spec.model, data=spec.data.train, epochs=epochs, price_per_1m=price_per_1m))
    return out


def _plan_local(spec: JobSpec, gpu_memory_gb: float | None) -> dict:
    from tunejob.data.dataset import load_examples, split_examples
    from tunejob.plan.memory import estimate_memory, estimate_seconds, measure_cpu_peak_flops
    from tunejob.train.models import load_tokenizer, resolve_model_path
    from tunejob.data.sequences import encode_examples
    from tunejob.data.templates import stop_token_ids, template_source
    from tunejob.data.tool_calls import tool_rendering, uses_tools
    from tunejob.train.shapes import shape_from_path

    hp = spec.hyperparameters
    _validated(spec.data.train, method=spec.method.type)
    examples = load_examples(spec.data.train)
    if spec.data.validation:
        _validated(spec.data.validation, method=spec.method.type)
        train, val = examples, load_examples(spec.data.validation)
    else:
        train, val = split_examples(examples, spec.data.val_fraction, spec.data.seed)
    model_path = resolve_model_path(spec.model)
    tokenizer = load_tokenizer(model_path, spec.chat_template)
    if spec.method.type == "dpo":  # a pair is two sequences (its tokens count both); the reference pass is forward-only, once
        from tunejob.data.preference import encode_pairs

        (train_seqs, tstats), (val_seqs, vstats) = (encode_pairs(tokenizer, x, hp.max_seq_len) for x in (train, val))
        lengths = sorted(len(s.input_ids) for p in train_seqs for s in (p.chosen, p.rejected)) or [0]
    else:
        train_seqs, tstats = encode_examples(tokenizer, train, hp.max_seq_len, hp.train_on)
        val_seqs, vstats = encode_examples(tokenizer, val, hp.max_seq_len, hp.train_on)
        lengths = sorted(len(s.input_ids) for s in train_seqs) or [0]
    batch, epochs = spec.resolved_batch_size(), spec.resolved_epochs()
    steps = epochs * math.ceil(len(train_seqs) / batch)
    if hp.max_steps:
        steps = min(steps, hp.max_steps)
    shape = shape_from_path(model_path)
    seq_len = min(hp.max_seq_len, lengths[-1])
    device = "cuda" if gpu_memory_gb is not None else "cpu"
    # the trainer's own rules: one sequence (or a pack of short ones: train.packing) per forward pass on CPU, batch / accumulation on GPUs
    import torch

    from tunejob.train.batches import PACK_TOKENS, micro_batch_size
    from tunejob.train.packing import applies

    micro = micro_batch_size(batch, hp.gradient_accumulation, spec.distributed.world_size, torch.device(device))
    packing = PACK_TOKENS if applies(hp.packing, spec.method.type, device) else 0  # if the model passes the check
    mixed = _precision(hp.mixed_precision, device, spec.quantization)
    # a pack's activations are those of one row as long as the pack: up to the budget, or the step's
    # longest sequences together when they fill less (a sequence over the budget still goes alone)
    forward_len = max(seq_len, min(packing, sum(min(n, hp.max_seq_len) for n in lengths[-batch:]))) if packing else seq_len
    mem = estimate_memory(shape, r=spec.lora.r, target=spec.lora.target_modules, quantization=spec.quantization,
                          dtype="bf16" if mixed == "bf16" else "fp32", micro_batch=micro, seq_len=forward_len,
                          trained_fraction=tstats.trained_tokens / max(tstats.tokens, 1), lora_dropout=spec.lora.dropout,
                          device=device, gpu_memory_gb=gpu_memory_gb)
    train_tokens = tstats.tokens * epochs if not hp.max_steps else int(tstats.tokens * steps / max(math.ceil(len(train_seqs) / batch), 1))
    evals = steps // spec.checkpointing.eval_steps + 1
    eval_tokens = vstats.tokens * evals
    out = {
        "backend": "local", "model": spec.model, "model_path": model_path, "quantization": spec.quantization,
        "chat_template": template_source(tokenizer, spec.chat_template),
        "stop_tokens": tokenizer.convert_ids_to_tokens(sorted(stop_token_ids(tokenizer))),
        "tool_rendering": tool_rendering(tokenizer) if any(uses_tools(ex.get("input", ex)) for ex in train + val) else None,
        "train_examples": len(train_seqs), "validation_examples": len(val_seqs),
        "tokens_per_epoch": tstats.tokens, "trained_tokens_per_epoch": tstats.trained_tokens,
        "tokens_per_example": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]},
        "mixed_precision": mixed, "epochs": epochs, "steps": steps, "batch_size": batch, "micro_batch": micro, "packing": packing, "gradient_accumulation": hp.gradient_accumulation,
        "evaluations": evals, "trainable_parameters": mem.trainable_parameters, "total_parameters": mem.total_parameters,
        "trainable_percent": mem.trainable_percent, "memory": mem.to_dict(), "vocabulary": shape.vocab,
        # the loss runs the LM head only where a label is trained; over every position it would cost this
        "logits_all_positions_gb": round(mem.logits_gb * tstats.tokens / max(tstats.trained_tokens, 1), 3),
        "warnings": _warnings(len(train), tstats.truncated + vstats.truncated, tstats.dropped_no_trained_tokens + vstats.dropped_no_trained_tokens, hp.max_seq_len),
    }
    if spec.distributed.world_size > 1:  # every worker holds the whole model and its share of each step's batch
        from tunejob.train.ray_train import placement

        where = placement(spec, use_gpu=device == "cuda")
        out["placement"] = {"workers": where.workers, "nodes": where.nodes, "processes_per_node": where.processes_per_node,
                            "ray_strategy": where.strategy, "batch_per_worker": where.batch_per_worker, "micro_batch": micro,
                            "memory_per_worker_gb": mem.to_dict()["total_gb"]}
    if device == "cpu":
        dtype = "bf16" if mixed == "bf16" else "fp32"
        peak, efficiency = measure_cpu_peak_flops(dtype), CPU_EFFICIENCY[dtype]
        # evals are forward-only (~1/3 of a training step's FLOPs)
        seconds = estimate_seconds(shape, train_tokens, peak, efficiency) + estimate_seconds(shape, eval_tokens, peak, efficiency) / 3
        out["time"] = {"device": "cpu", "precision": dtype, "measured_gemm_gflops": round(peak / 1e9, 1),
                       "estimated_seconds": round(seconds), "assumed_efficiency": efficiency}
    return out


# Share of the GEMM peak a training step reaches on CPU (real tokens x 4 x parameters FLOPs) on
# SmolLM2-135M: fp32 ~0.5 on the demo run (0.72 in bench/train_throughput.py's short rows), bf16
# 0.35 in that benchmark (bench/RESULTS.md, 2026-11-30): one sequence per pass is too small for
# the bf16 units.
CPU_EFFICIENCY = {"fp32": 0.5, "bf16": 0.35}


def _precision(setting: str, device: str, quantization: str) -> str:
    """What the trainer will run in. A GPU plan made on a machine without one assumes bf16 for
    'auto' (every GPU of the last generations has it); otherwise the trainer's own rule."""
    from tunejob.train.precision import resolve

    import torch

    if setting == "auto" and device == "cuda" and not torch.cuda.is_available():
        return "bf16"
    return resolve(setting, device, quantization)


def _warnings(n_train: int, truncated: int, dropped: int, max_len: int | None = None) -> list[str]:
    out = []
    if n_train < 10:
        out.append(f"only {n_train} training examples; OpenAI requires 10, and 50-100 good ones is a sensible start")
    elif n_train < 50:
        out.append(f"{n_train} training examples is few; expect quick overfitting (watch validation loss)")
    if truncated:
        out.append(f"{truncated} example(s) exceed max_seq_len {max_len} and will be truncated")
    if dropped:
        out.append(f"{dropped} example(s) keep no trained token after truncation and will be skipped")
    return out
