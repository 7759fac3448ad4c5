"""Training throughput: tunejob's local backend vs the TRL recipe a user would write instead.

    python bench/train_throughput.py --steps 20 --out bench/results/train_throughput.json
    python bench/train_throughput.py --model /path/to/tiny --steps 2 --examples 16   # smoke size

Same base model (embedded SmolLM2-135M-Instruct by default), same data, same LoRA config
(r=16, alpha=32, q_proj+v_proj, dropout 0.05), same effective batch (4), same learning rate and
steps. Each configuration runs in its own process (its peak RSS is its own):

  trl-default            SFTTrainer + LoraConfig as TRL's docs show it: pads to the longest in the batch
  trl-padding-free       the same with SFTConfig(padding_free=True)
  trl-padding-free-bf16  the same with bf16=True as well (autocast; pays off only where the CPU has
                         bf16 matrix units, AMX or AVX512-BF16)
  tunejob                tunejob.train.trainer.train (length-grouped batches, LM head at trained positions)
  tunejob-bf16           the same with hyperparameters.mixed_precision: bf16

Loss is on the answer only for every configuration: TRL gets prompt/completion pairs
(completion_only_loss), tunejob masks to assistant turns. The final validation loss of every
configuration is computed afterwards by one shared evaluator on the same held-out split.
Reported: real (non-padding) tokens per second, padding fraction, peak RSS, final validation loss,
and model FLOPs utilisation (MFU) against this CPU's GEMM peak, measured first (fp32 and bf16
2048x2048 matmuls, best of 5; bf16 at 512 when it is far slower than fp32). Model FLOPs per real token are counted the same for every
configuration: 4 x parameters (forward 2N, backward to the activations 2N; frozen weights take no
weight gradient; the LoRA matrices are too small to count), so MFU ratios equal throughput ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import publish

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "tunejob" / "resources" / "sales_companion.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}


def datasets_for(n_examples: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Sales Companion examples, plus variable-length ones (50 to ~1,000 tokens) made by joining
    several of its conversations, so lengths spread like real chat data."""
    base = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    rng = random.Random(seed)
    extra = []
    for _ in range(len(base)):
        k = rng.choice([1, 1, 2, 3, 4])
        parts = rng.sample(base, k)
        msgs = [parts[0]["messages"][0]] + [m for p in parts for m in p["messages"][1:]]
        extra.append({"messages": msgs})
    # a joined conversation can repeat a base one (k=1) or another join: tunejob refuses duplicates
    seen, rows = set(), []
    for row in base + extra:
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    rng.shuffle(rows)
    n_val = max(8, n_examples // 10)
    return rows[:n_examples], rows[n_examples : n_examples + n_val]


def to_prompt_completion(ex: dict) -> dict:
    msgs = ex["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return {"prompt": msgs[:last], "completion": [msgs[last]]}


def gemm_peak(dtype_name: str, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul on this CPU (best of `repeats`), torch's default threads."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def model_parameters(model_path: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return sum(p.numel() for p in model.parameters())


def run_trl(model_path: str, train: list[dict], steps: int, max_len: int, padding_free: bool, out: Path, bf16: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    ds = Dataset.from_list([to_prompt_completion(ex) for ex in train])
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, learning_rate=2e-4,
                     # padding-free does not truncate: TRL asks for max_length=None (our examples stay under 1,024)
                     max_length=None if padding_free else max_len, logging_steps=1, save_strategy="no", report_to="none", padding_free=padding_free,
                     seed=42, dataloader_num_workers=0, bf16=bf16,  # TRL's default bf16 is for GPUs; on CPU fp32 unless asked
                     use_cpu=not torch.cuda.is_available())
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=LORA["targets"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    counted = {"real": 0, "processed": 0}
    collate = trainer.data_collator

    def counting(batch):
        out_batch = collate(batch)
        counted["real"] += sum(len(b["input_ids"]) for b in batch)
        counted["processed"] += int(out_batch["input_ids"].numel())
        return out_batch

    trainer.data_collator = counting
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    trainer.model.save_pretrained(out / "adapter")
    return {"seconds": seconds, "real_tokens": counted["real"], "processed_tokens": counted["processed"]}


def run_tunejob(model_path: str, train: list[dict], val: list[dict], steps: int, max_len: int, out: Path, bf16: bool = False) -> dict:
    from tunejob.data.dataset import write_jsonl
    from tunejob.spec import parse_spec
    from tunejob.train.trainer import train as tj_train

    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    spec = parse_spec(
        f"model: {model_path}\ndata: {{train: {out / 'train.jsonl'}, validation: {out / 'val.jsonl'}}}\noutput_dir: {out / 'run'}\n"
        f"hyperparameters: {{learning_rate: 2.0e-4, batch_size: 4, max_steps: {steps}, max_seq_len: {max_len}, warmup: 0, "
        f"mixed_precision: {'bf16' if bf16 else 'no'}}}\n"
        f"lora: {{r: {LORA['r']}, alpha: {LORA['alpha']}, dropout: {LORA['dropout']}, target_modules: [q_proj, v_proj]}}\n"
        f"checkpointing: {{eval_steps: {steps}, save_steps: {steps}, early_stopping_patience: null}}\n"
    )
    summary = tj_train(spec, say=lambda m: None)
    processed = round(summary["tokens_seen"] / (1 - summary["padding_fraction"])) if summary.get("padding_fraction") is not None else None
    # wall_time_s includes the one evaluation at the last step; TRL's timing has none (see RESULTS.md).
    return {"seconds": summary["wall_time_s"], "real_tokens": summary["tokens_seen"], "processed_tokens": processed,
            "adapter": str(out / "run" / "best")}


def final_valid_loss(model_path: str, adapter: str, val: list[dict], max_len: int) -> float:
    """One evaluator for every configuration: assistant-token loss over the held-out split."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunejob.train.models import load_tokenizer
    from tunejob.data.sequences import encode_examples
    from tunejob.train.batches import make_collator
    from tunejob.train.loss import evaluate

    tok = load_tokenizer(model_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), adapter)
    seqs, _ = encode_examples(tok, val, max_len)
    loss, _ = evaluate(model, seqs, make_collator(tok.pad_token_id), 4, torch.device("cpu"))
    return loss


def child(config: str, model_path: str, steps: int, max_len: int, n: int, out: Path) -> None:
    train, val = datasets_for(n)
    if config.startswith("tunejob"):
        r = run_tunejob(model_path, train, val, steps, max_len, out, bf16=config.endswith("-bf16"))
        adapter = r.pop("adapter")
    else:
        r = run_trl(model_path, train, steps, max_len, "padding-free" in config, out, bf16=config.endswith("-bf16"))
        adapter = str(out / "adapter")
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r["final_valid_loss"] = final_valid_loss(model_path, adapter, val, max_len)
    print("RESULT " + json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=2048)  # no example is truncated: padding-free TRL cannot truncate
    ap.add_argument("--configs", default="trl-default,trl-padding-free,trl-padding-free-bf16,tunejob,tunejob-bf16",
                    help="the -bf16 ones are skipped where this CPU's bf16 matmul is slower than fp32 (no AMX / AVX512-BF16)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from tunejob.train.models import default_model_path

        args.model = str(default_model_path())
    if args.child:
        child(args.child, args.model, args.steps, args.max_len, args.examples, args.workdir)
        return
    # bf16 first at 512: without bf16 units a 2048 matmul takes about a minute (0.3 GFLOP/s measured)
    bf16_small = gemm_peak("bfloat16", n=512, repeats=2)
    peak = {"fp32": gemm_peak("float32")}
    peak["bf16"] = gemm_peak("bfloat16") if bf16_small > peak["fp32"] / 4 else bf16_small
    n_params = model_parameters(args.model)
    print(f"GEMM peak: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s; model {n_params:,} parameters", flush=True)
    results, skipped = {}, {}
    for config in args.configs.split(","):
        if config.endswith("-bf16") and peak["bf16"] < peak["fp32"]:
            skipped[config] = f"bf16 matmul runs at {peak['bf16'] / 1e9:.1f} GFLOP/s here vs fp32 {peak['fp32'] / 1e9:.1f}: no bf16 units on this CPU"
            print(f"{config}: skipped ({skipped[config]})", flush=True)
            continue
        r = child_result(__file__, config, ["--model", args.model, "--steps", str(args.steps), "--examples", str(args.examples),
                                            "--max-len", str(args.max_len)])
        r["real_tokens_per_s"] = round(r["real_tokens"] / r["seconds"], 1)
        if r.get("processed_tokens"):
            r["padding_fraction"] = round(1 - r["real_tokens"] / r["processed_tokens"], 3)
        flops = 4 * n_params * r["real_tokens_per_s"]
        r["mfu_vs_fp32_peak"] = round(flops / peak["fp32"], 4)
        r["mfu_vs_bf16_peak"] = round(flops / peak["bf16"], 4)
        results[config] = r
        print(config, json.dumps(r), flush=True)
    base = results.get("trl-default", {}).get("real_tokens_per_s")
    trl_best = max((r["real_tokens_per_s"] for c, r in results.items() if c.startswith("trl")), default=None)
    for r in results.values():
        if base:
            r["speedup_vs_trl_default"] = round(r["real_tokens_per_s"] / base, 2)
        if trl_best:
            r["speedup_vs_best_trl"] = round(r["real_tokens_per_s"] / trl_best, 2)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_model()}", "model": args.model,
              "gemm_peak_gflops": {k: round(v / 1e9, 1) for k, v in peak.items()}, "parameters": n_params, "versions": versions(), "skipped": skipped,
              "steps": args.steps, "examples": args.examples, "max_len": args.max_len, "effective_batch": 4, "lora": LORA, "results": results}
    publish(report, args.out)


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


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "peft", "trl", "accelerate")}


if __name__ == "__main__":
    main()
