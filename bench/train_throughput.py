"""Training throughput, like for like: tunejob's local backend vs TRL's SFTTrainer at its best.

    python bench/train_throughput.py --out bench/results/train_throughput.json
    python bench/train_throughput.py --model /path/to/tiny --train-examples 8 --held-out 8 --seeds 1   # smoke size

What is held equal (the script asserts the first):
- trained tokens: TRL gets a pre-tokenized dataset (`input_ids` + `assistant_masks`) made by
  tunejob's own encoder, so both sides put loss on exactly the same tokens; one epoch over the same
  training rows, so both sides train the same token count;
- base model (embedded SmolLM2-135M-Instruct by default), LoRA r 16 / alpha 32 / q_proj+v_proj /
  dropout 0.05, batch 4, learning rate 2e-4, cosine schedule, no warm-up, the seed;
- no gradient checkpointing, except one row labelled as TRL's default (SFTConfig turns it on).

Configurations (each in its own process, so its peak RSS is its own):
  trl-default-gc   SFTTrainer as TRL's docs show it (pads to the longest; gradient checkpointing on)
  trl-default      the same, checkpointing off
  trl-padding-free SFTConfig(padding_free=True)
  trl-grouped      train_sampling_strategy="group_by_length" (transformers' length-grouped sampler)
  trl-default-bs1  one unpadded sequence per forward pass: per_device_train_batch_size=1 with
                   gradient_accumulation_steps=4 (the same 4 sequences a step; what tunejob did on CPU
                   before packing)
  *-bf16           the same with bf16=True and the base loaded in bf16 (TRL's strongest CPU setting);
                   run only where this CPU's bf16 matmul beats fp32 (AMX / AVX512-BF16)
  tunejob-fp32     mixed_precision: no
  tunejob-bf16     mixed_precision: bf16 (frozen base stored in bf16)
  tunejob-auto     mixed_precision: auto; resolves per machine (train/precision.py), recorded in the report
  tunejob-auto-unpacked  the same with hyperparameters.packing: off (one sequence per forward pass)
  tunejob-auto-torch-dropout  tunejob-auto with torch's own LoRA dropout (peft's nn.Dropout) left
                   in place of train/dropout.py's cheaper mask: what that mask gives
  every other tunejob row runs with packing: auto (the default: short sequences share a forward
  pass on CPU once the model passes the check, train/packing.py); `packing` in the JSON records
  the tokens per packed pass, or null where it ran one sequence per pass

Held-out: whole base conversations are held out first (default 100 of the 132 Sales Companion
ones); training rows are those left plus joins of them (2-4 conversations, 50 to ~1,000 tokens), so
no held-out text is ever trained on. Every configuration's adapter is scored afterwards by one
shared evaluator (bf16 where this CPU is fast in it, else fp32) (tunejob.train.loss.evaluate: the model's own forward) on the held-out rows,
next to the base model's loss. Speed is the sum of the optimizer steps' times (both sides: batch in,
optimizer stepped), so loading, the final evaluation and saving are outside it.
Model FLOPs per real token: 4 x parameters (forward 2N, backward to the activations 2N).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import publish


REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "tunejob" / "resources" / "sales_companion.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
LR, BATCH = 2e-4, 4
TRL = ("trl-default-gc", "trl-default", "trl-padding-free", "trl-grouped", "trl-default-bs1", "trl-default-bf16", "trl-padding-free-bf16",
       "trl-grouped-bf16", "trl-default-bs1-bf16")
# What RESULTS.md ran: the padded default (checkpointing off) measured 0.75x padding-free in a first
# pass (seed 42: 80 vs 107 tokens/s, same loss), so its two rows gave way to a third seed of the rest.
# Batch 1 x accumulation 4 (issue 33) is TRL's fastest fair row on a CPU without bf16 units: it is in.
MAIN = ("trl-default-gc", "trl-padding-free", "trl-grouped", "trl-default-bs1", "trl-padding-free-bf16", "trl-grouped-bf16",
        "trl-default-bs1-bf16", "tunejob-fp32", "tunejob-auto")
TUNEJOB = ("tunejob-fp32", "tunejob-bf16", "tunejob-auto", "tunejob-auto-unpacked", "tunejob-auto-torch-dropout")


def datasets_for(n_train: int, n_held: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): held-out base conversations first, joins within each side."""
    base = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    rng = random.Random(seed)
    rng.shuffle(base)
    held, pool = base[:n_held], base[n_held:]
    rows, seen = list(pool), set()
    while len(rows) < n_train + len(pool):
        parts = rng.sample(pool, rng.choice([2, 2, 3, 4]))
        msgs = [parts[0]["messages"][0]] + [m for p in parts for m in p["messages"][1:]]
        key = json.dumps(msgs)
        if key not in seen:
            seen.add(key)
            rows.append({"messages": msgs})
    rng.shuffle(rows)
    return rows[:n_train], held


def encoded(model_path: str, rows: list[dict], max_len: int):
    from tunejob.data.sequences import encode_examples
    from tunejob.train.models import load_tokenizer

    tok = load_tokenizer(model_path)
    seqs, _ = encode_examples(tok, rows, max_len)
    return tok, seqs


# ------------------------------------------------------------------ the two sides


def run_trl(model_path: str, train: list[dict], max_len: int, config: str, seed: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    bf16 = config.endswith("-bf16")
    tok, seqs = encoded(model_path, train, max_len)
    ds = Dataset.from_list([{"input_ids": s.input_ids, "assistant_masks": [int(l != -100) for l in s.labels]} for s in seqs])
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    micro = 1 if "-bs1" in config else BATCH  # bs1: the same 4 sequences a step, one per forward pass
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=micro, gradient_accumulation_steps=BATCH // micro,
                     num_train_epochs=1, learning_rate=LR,
                     lr_scheduler_type="cosine", warmup_steps=0, max_length=None, logging_steps=1, save_strategy="no",
                     report_to="none", padding_free="padding-free" in config, gradient_checkpointing=config == "trl-default-gc",
                     train_sampling_strategy="group_by_length" if "grouped" in config else "random",
                     seed=seed, data_seed=seed, dataloader_num_workers=0, bf16=bf16, use_cpu=not torch.cuda.is_available())
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=LORA["targets"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    counted = {"real": 0, "processed": 0, "trained": 0}
    collate = trainer.data_collator

    def counting(batch):
        out_batch = collate(batch)
        counted["real"] += sum(len(b["input_ids"]) for b in batch)
        counted["processed"] += int(out_batch["input_ids"].numel())
        counted["trained"] += int((out_batch["labels"] != -100).sum())
        return out_batch

    class StepClock(TrainerCallback):
        seconds, t0 = 0.0, 0.0

        def on_step_begin(self, *a, **k):
            StepClock.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            StepClock.seconds += time.perf_counter() - StepClock.t0

    trainer.data_collator = counting
    trainer.add_callback(StepClock)
    trainer.train()
    trainer.model.save_pretrained(out / "adapter")
    return {"seconds": StepClock.seconds, "real_tokens": counted["real"], "processed_tokens": counted["processed"],
            "trained_tokens": counted["trained"], "adapter": str(out / "adapter"), "precision": "bf16" if bf16 else "no"}


def run_tunejob(model_path: str, train: list[dict], held: list[dict], max_len: int, config: str, seed: int, out: Path) -> dict:
    from tunejob.data.dataset import write_jsonl
    from tunejob.monitor.metrics import read_metrics
    from tunejob.spec import parse_spec
    from tunejob.train.trainer import train as tj_train

    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", held[:1])  # the in-loop evaluation is not timed; the shared evaluator scores all
    mp = {"tunejob-fp32": "no", "tunejob-bf16": "bf16"}.get(config, "auto")
    if config == "tunejob-auto-torch-dropout":  # this child process only: peft's nn.Dropout stays
        import tunejob.train.dropout

        tunejob.train.dropout.use_mask_dropout = lambda model: 0
    packing = "off" if config.endswith("-unpacked") else "auto"
    spec = parse_spec(
        f"model: {model_path}\ndata: {{train: {out / 'train.jsonl'}, validation: {out / 'val.jsonl'}}}\noutput_dir: {out / 'run'}\n"
        f"hyperparameters: {{learning_rate: {LR}, batch_size: {BATCH}, epochs: 1, max_seq_len: {max_len}, warmup: 0, "
        f"mixed_precision: {mp}, seed: {seed}, packing: {packing}}}\n"
        f"lora: {{r: {LORA['r']}, alpha: {LORA['alpha']}, dropout: {LORA['dropout']}, target_modules: [q_proj, v_proj]}}\n"
        "checkpointing: {eval_steps: 100000, save_steps: 100000, early_stopping_patience: null}\n"
    )
    summary = tj_train(spec, say=lambda m: None)
    seconds, prev = 0.0, 0
    for r in read_metrics(out / "run" / "metrics.jsonl"):
        if r["kind"] == "train":  # per-step tokens / per-step rate = the step's own time
            seconds += (r["tokens_seen"] - prev) / r["tokens_per_second"]
            prev = r["tokens_seen"]
    processed = round(summary["tokens_seen"] / (1 - summary["padding_fraction"])) if summary.get("padding_fraction") is not None else None
    return {"seconds": seconds, "real_tokens": summary["tokens_seen"], "processed_tokens": processed,
            "trained_tokens": summary["trained_tokens"], "adapter": str(out / "run" / "best"), "precision": summary["mixed_precision"],
            "packing": summary.get("pack_tokens")}


def held_out_loss(model_path: str, adapter: str | None, held: list[dict], max_len: int) -> float:
    """One evaluator for every configuration (and the base): assistant-token loss, with the base
    in bf16 under autocast where this machine's probe says bf16 is fast (adapter fp32), else fp32.
    Either way the same arithmetic for every configuration; bf16 halves this script's run time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunejob.train.batches import make_collator
    from tunejob.train.loss import evaluate
    from tunejob.train.precision import resolve

    tok, seqs = encoded(model_path, held, max_len)
    dtype = torch.bfloat16 if resolve("auto", "cpu") == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    seqs.sort(key=lambda s: len(s.input_ids))  # length-sorted batches: little padding, same loss
    loss, _ = evaluate(model, seqs, make_collator(tok.pad_token_id), 4, torch.device("cpu"))
    return loss


def child(args) -> None:
    train, held = datasets_for(args.train_examples, args.held_out)
    if args.child == "base":
        print("RESULT " + json.dumps({"final_valid_loss": held_out_loss(args.model, None, held, args.max_len)}))
        return
    runner = run_tunejob if args.child.startswith("tunejob") else None
    if runner:
        r = run_tunejob(args.model, train, held, args.max_len, args.child, args.seed, args.workdir)
    else:
        r = run_trl(args.model, train, args.max_len, args.child, args.seed, args.workdir)
    r["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    r["final_valid_loss"] = held_out_loss(args.model, r.pop("adapter"), held, args.max_len)
    print("RESULT " + json.dumps(r))


# ------------------------------------------------------------------ the run


def model_parameters(model_path: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return sum(p.numel() for p in model.parameters())


def spawn(args, config: str, seed: int) -> dict:
    return child_result(__file__, config, ["--model", args.model, "--seed", str(seed), "--train-examples", str(args.train_examples),
                                           "--held-out", str(args.held_out), "--max-len", str(args.max_len)])


def summarise(runs: list[dict], n_params: int, peak: dict) -> dict:
    """Mean and spread (half of max - min) over seeds, and MFU against the run's own precision."""
    def ms(key):
        vals = [r[key] for r in runs]
        return {"mean": round(statistics.fmean(vals), 4), "spread": round((max(vals) - min(vals)) / 2, 4), "runs": vals}

    for r in runs:
        r["real_tokens_per_s"] = round(r["real_tokens"] / r["seconds"], 1)
    out = {"real_tokens_per_s": ms("real_tokens_per_s"), "final_valid_loss": ms("final_valid_loss"), "peak_rss_mb": ms("peak_rss_mb"),
           "precision": runs[0]["precision"], "trained_tokens": runs[0]["trained_tokens"], "real_tokens": runs[0]["real_tokens"]}
    if "packing" in runs[0]:  # tunejob rows: tokens per packed forward pass, or None (one sequence per pass)
        out["packing"] = runs[0]["packing"]
    if runs[0].get("processed_tokens"):
        out["padding_fraction"] = round(1 - runs[0]["real_tokens"] / runs[0]["processed_tokens"], 3)
    own_peak = peak["bf16" if out["precision"] == "bf16" else "fp32"]
    out["mfu"] = round(4 * n_params * out["real_tokens_per_s"]["mean"] / own_peak, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--train-examples", type=int, default=16, help="training rows: one epoch of batch 4 over them")
    ap.add_argument("--held-out", type=int, default=100, help="held-out base conversations")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=2048)  # nothing truncated: padding-free TRL cannot truncate
    ap.add_argument("--configs", default=",".join(MAIN), help=f"any of {', '.join(TRL + TUNEJOB)}")
    ap.add_argument("--gc-seeds", type=int, default=1, help="seeds for trl-default-gc (the labelled default-on row)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from tunejob.train.models import default_model_path

        args.model = str(default_model_path())
    if args.child:
        child(args)
        return
    report = run_all(args)
    publish(report, args.out)


def bf16_where_fast(configs: list[str], probe: dict) -> tuple[list[str], dict[str, str]]:
    """The configurations to run, and why each `-bf16` one left out was: `probe`
    (train/precision.measure_cpu on this CPU) found bf16 matmuls slower than fp32 (no bf16 units:
    emulated). dpo_throughput.py splits its configurations the same way."""
    if probe["bf16_gflops"] >= probe["fp32_gflops"]:
        return configs, {}
    why = f"bf16 matmul {probe['bf16_gflops']:.1f} GFLOP/s vs fp32 {probe['fp32_gflops']:.1f}: no bf16 units here"
    return [c for c in configs if not c.endswith("-bf16")], {c: why for c in configs if c.endswith("-bf16")}


def run_all(args) -> dict:
    from tunejob.train.precision import measure_cpu

    # tunejob's own probe (train/precision.py), measured fresh in this run at the bench's size
    probe = measure_cpu(n=2048, repeats=5)
    peak = {"fp32": probe["fp32_gflops"] * 1e9, "bf16": probe["bf16_gflops"] * 1e9}
    n_params = model_parameters(args.model)
    print(f"GEMM peak: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s; model {n_params:,} parameters", flush=True)
    configs, skipped = bf16_where_fast(args.configs.split(","), probe)
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for i in range(args.seeds):  # seed-major: slow drift of the machine touches every configuration alike
        for config in configs:
            if config == "trl-default-gc" and i >= args.gc_seeds:
                continue
            r = spawn(args, config, 42 + i)
            runs[config].append(r)
            print(config, 42 + i, json.dumps(r), flush=True)
            if args.out:  # every finished run kept, so a run cut short still leaves its figures
                with open(args.out.with_suffix(".runs.jsonl"), "a") as f:
                    f.write(json.dumps({"config": config, "seed": 42 + i, **r}) + "\n")
    trained = {c: {r["trained_tokens"] for r in rs} for c, rs in runs.items()}
    assert len(set().union(*trained.values())) == 1, f"trained token counts differ between configurations: {trained}"
    results = {c: summarise(rs, n_params, peak) for c, rs in runs.items() if rs}
    fair = [c for c in results if c.startswith("trl") and c != "trl-default-gc"]
    best = max(fair, key=lambda c: results[c]["real_tokens_per_s"]["mean"], default=None)
    fastest = max(results, key=lambda c: results[c]["real_tokens_per_s"]["mean"]) if results else None
    if best:
        for r in results.values():
            r["speed_vs_best_trl"] = round(r["real_tokens_per_s"]["mean"] / results[best]["real_tokens_per_s"]["mean"], 2)
            r["memory_vs_best_trl"] = round(r["peak_rss_mb"]["mean"] / results[best]["peak_rss_mb"]["mean"], 2)
    base_loss = spawn(args, "base", 0)["final_valid_loss"]
    from tunejob.train.precision import cpu_model, resolve

    return {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_model()}",
            "model": args.model, "gemm_peak_gflops": {k: round(v / 1e9, 1) for k, v in peak.items()}, "parameters": n_params,
            "auto_resolves_to": resolve("auto", "cpu"), "versions": versions(), "skipped": skipped, "seeds": args.seeds,
            "train_examples": args.train_examples, "held_out_examples": args.held_out, "batch": BATCH, "learning_rate": LR,
            "schedule": "cosine, no warm-up, 1 epoch", "lora": LORA, "base_model_valid_loss": round(base_loss, 4),
            "best_fair_trl": best, "fastest": fastest, "results": results}


def child_result(script: str, config: str, args: list[str]) -> dict:
    """Run `script --child CONFIG --workdir TMP ARGS` in its own process (so its peak RSS is its
    own) and return the figures of its RESULT line."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, script, "--child", config, "--workdir", d, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{config} failed:\n{done.stderr[-3000:]}")
    return json.loads(line[7:])


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "peft", "trl", "accelerate")}


if __name__ == "__main__":
    main()
