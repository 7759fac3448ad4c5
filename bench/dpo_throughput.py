"""DPO throughput: seconds per 1,000 preference pairs, tunejob's local DPO vs TRL's DPOTrainer.

    python bench/dpo_throughput.py --steps 12 --seeds 3 --out bench/results/dpo_throughput.json
    python bench/dpo_throughput.py --model /path/to/tiny --steps 2 --seeds 1   # smoke size

Same base model (embedded SmolLM2-135M-Instruct by default), same pairs, same LoRA (r=16, alpha=32,
q_proj+v_proj, dropout 0.05), 4 pairs per step, learning rate 5e-6, beta 0.1, sigmoid loss,
reference = the base with the adapter disabled on both sides, no gradient checkpointing on either
side, fp32 (and bf16 rows where the CPU has bf16 units). Each side runs in its own process (its
peak RSS is its own) and trains on the same steps x 4 pairs, each once, so tunejob's cache of
reference log-probabilities saves nothing here.
Each child counts the tokens it forwards per pair (prompt + chosen and prompt + rejected, from its
own tokenization); the script asserts that every configuration trained the same total.

Configurations (`--configs`), each `--seeds` times, seed-major (slow drift of the machine touches
every configuration alike); figures are the mean and spread (half of max - min) over seeds:
  trl        DPOTrainer as its docs show it: 4 pairs a step, padded to the longest (TRL's default)
  trl-bs1    per_device_train_batch_size=1, gradient_accumulation_steps=4: one unpadded pair per
             forward pass, what tunejob does on CPU
  tunejob    method: dpo, mixed_precision: 'no'
  *-bf16     trl-bs1-bf16: TRL at batch 1 with bf16=True and the base loaded in bf16; tunejob-bf16:
             mixed_precision: bf16. Run only where this CPU's bf16 matmul beats fp32 (AMX /
             AVX512-BF16), as in train_throughput.py
TRL 1.16's `padding_free=True` for DPO is disabled in the trainer itself ("temporarily unavailable
after a refactor"; it warns and pads), so there is no padding-free row; the report says so.

Pairs: each Sales Companion conversation up to its last assistant turn is the prompt; that turn is
preferred, and the last assistant turn of another conversation (fixed by the seed) is not.

Timing: the end of each optimizer step (a TrainerCallback on TRL's side, each training record's
elapsed_s on tunejob's). The figure is steady state: from the end of step 1 to the end of the last
step, over (steps - 1) x 4 pairs, so one-off first-step costs (TRL: a slow first step measured at
tiny size; tunejob: the loss-path check) are left out; "first_step_s" reports them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import time
from pathlib import Path

from report import publish
from train_throughput import LORA, SAMPLE, bf16_where_fast, child_result, versions

from tunejob.train.precision import cpu_model

BATCH, LR, BETA = 4, 5e-6, 0.1


def make_pairs(n: int, seed: int = 0, fits=lambda messages: True) -> list[dict]:
    """n pairs whose two sides each fit (`fits`: the whole conversation within max_len), so that
    neither trainer truncates and both train the same tokens."""
    rows = [json.loads(line)["messages"] for line in SAMPLE.read_text().splitlines()]
    rng, pairs = random.Random(seed), []
    while len(pairs) < n:
        before = len(pairs)
        for i, msgs in enumerate(rows):
            last = max(k for k, m in enumerate(msgs) if m["role"] == "assistant")
            other = rows[(i + rng.randrange(1, len(rows))) % len(rows)]
            wrong = other[max(k for k, m in enumerate(other) if m["role"] == "assistant")]
            if wrong["content"] == msgs[last]["content"] or not (fits(msgs[: last + 1]) and fits(msgs[:last] + [wrong])):
                continue
            # the copy number keeps repeated prompts distinct (tunejob refuses duplicate lines)
            prompt = [dict(m) for m in msgs[:last]]
            prompt[-1]["content"] += f" (#{len(pairs)})"
            pairs.append({"input": {"messages": prompt}, "preferred_output": [msgs[last]], "non_preferred_output": [wrong]})
            if len(pairs) == n:
                break
        if len(pairs) == before:
            raise SystemExit("no Sales Companion pair fits --max-len: raise it")
    return pairs


def fits_within(model_path: str, max_len: int):
    """Whether a conversation, as the model's chat template renders it (+ 8 tokens of margin for
    the copy number and either side's special tokens), fits in max_len tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return lambda messages: len(tok(tok.apply_chat_template(messages, tokenize=False))["input_ids"]) + 8 <= max_len


def run_trl(model_path: str, pairs: list[dict], steps: int, max_len: int, out: Path, seed: int, micro: int = BATCH,
            bf16: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, *a, **kw):
            ends.append(time.perf_counter())

    tok = AutoTokenizer.from_pretrained(model_path)
    rows = [{"prompt": p["input"]["messages"], "chosen": p["preferred_output"], "rejected": p["non_preferred_output"]} for p in pairs]
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=micro, gradient_accumulation_steps=BATCH // micro,
                     max_steps=steps, learning_rate=LR, beta=BETA,
                     max_length=max_len, gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
                     seed=seed, dataloader_num_workers=0, bf16=bf16, use_cpu=not torch.cuda.is_available())
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=LORA["targets"], task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, peft_config=lora, callbacks=[StepEnds()])
    # the tokens each pair puts through the model (prompt twice: once before each answer)
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trainer.train_dataset)
    t = time.perf_counter()
    trainer.train()
    return {"first_step_s": ends[0] - t, "seconds": ends[-1] - ends[0], "pairs": (steps - 1) * BATCH, "tokens": tokens}


def run_tunejob(model_path: str, pairs: list[dict], steps: int, max_len: int, out: Path, seed: int, precision: str = "no") -> dict:
    from transformers import AutoTokenizer

    from tunejob.data.dataset import write_jsonl
    from tunejob.data.preference import encode_pairs
    from tunejob.monitor.metrics import read_metrics
    from tunejob.spec import parse_spec
    from tunejob.train.trainer import train

    write_jsonl(out / "train.jsonl", pairs)
    write_jsonl(out / "val.jsonl", make_pairs(len(pairs) + 8, fits=fits_within(model_path, max_len))[-8:])
    spec = parse_spec(
        f"model: {model_path}\ndata: {{train: {out / 'train.jsonl'}, validation: {out / 'val.jsonl'}}}\noutput_dir: {out / 'run'}\n"
        f"method: {{type: dpo, beta: {BETA}}}\n"
        f"hyperparameters: {{learning_rate: {LR}, batch_size: {BATCH}, max_steps: {steps}, max_seq_len: {max_len}, warmup: 0, mixed_precision: '{precision}', seed: {seed}}}\n"
        f"lora: {{r: {LORA['r']}, alpha: {LORA['alpha']}, dropout: {LORA['dropout']}, target_modules: [q_proj, v_proj]}}\n"
        f"checkpointing: {{eval_steps: {steps}, save_steps: {steps}, early_stopping_patience: null}}\n")
    encoded, _ = encode_pairs(AutoTokenizer.from_pretrained(model_path), pairs, max_len)
    train(spec, say=lambda m: None)
    trains = [r for r in read_metrics(out / "run" / "metrics.jsonl") if r["kind"] == "train"]
    # elapsed_s of a step's record includes the evaluation of the step before it when there was one;
    # eval_steps = steps puts the only evaluation after the last record
    return {"first_step_s": trains[0]["elapsed_s"], "seconds": trains[-1]["elapsed_s"] - trains[0]["elapsed_s"], "pairs": (steps - 1) * BATCH,
            "tokens": sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in encoded)}


CONFIGS = {"trl": lambda *a: run_trl(*a, micro=BATCH), "trl-bs1": lambda *a: run_trl(*a, micro=1), "tunejob": run_tunejob,
           "trl-bs1-bf16": lambda *a: run_trl(*a, micro=1, bf16=True), "tunejob-bf16": lambda *a: run_tunejob(*a, precision="bf16")}


def child(config: str, model_path: str, steps: int, max_len: int, seed: int, out: Path) -> None:
    pairs = make_pairs(steps * BATCH, fits=fits_within(model_path, max_len))
    r = CONFIGS[config](model_path, pairs, steps, max_len, out, seed)
    r["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(r))


def summarise(runs: list[dict]) -> dict:
    """Mean and spread (half of max - min) over seeds."""
    def ms(vals):
        return {"mean": round(statistics.fmean(vals), 1), "spread": round((max(vals) - min(vals)) / 2, 1), "runs": vals}

    return {"seconds_per_1k_pairs": ms([round(1000 * r["seconds"] / r["pairs"], 1) for r in runs]),
            "peak_rss_mb": ms([r["peak_rss_mb"] for r in runs]), "first_step_s": ms([round(r["first_step_s"], 1) for r in runs]),
            "tokens": runs[0]["tokens"]}


def configs_to_run(configs: list[str]) -> tuple[list[str], dict[str, str]]:
    """train_throughput's split of the configurations by this CPU's GEMM probe, probed only when a
    bf16 row was asked for (the probe takes seconds)."""
    from tunejob.train.precision import measure_cpu

    if not any(c.endswith("-bf16") for c in configs):
        return configs, {}
    probe = measure_cpu(n=2048, repeats=5)
    print(f"GEMM peak: fp32 {probe['fp32_gflops']:.1f} GFLOP/s, bf16 {probe['bf16_gflops']:.1f} GFLOP/s", flush=True)
    return bf16_where_fast(configs, probe)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps of 4 pairs; each side trains the same steps x 4 pairs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"any of {', '.join(CONFIGS)}")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2: the figure is from the end of step 1 to the end of the last")
    if args.model is None:
        from tunejob.train.models import default_model_path

        args.model = str(default_model_path())
    if args.child:
        child(args.child, args.model, args.steps, args.max_len, args.seed, args.workdir)
        return
    configs, skipped = configs_to_run(args.configs.split(","))
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for i in range(args.seeds):
        for config in configs:
            r = child_result(__file__, config, ["--model", args.model, "--steps", str(args.steps), "--max-len", str(args.max_len),
                                                "--seed", str(42 + i)])
            runs[config].append(r)
            print(config, 42 + i, json.dumps(r), flush=True)
    tokens = {c: {r["tokens"] for r in rs} for c, rs in runs.items()}
    assert len(set().union(*tokens.values())) == 1, f"the configurations trained different token counts: {tokens}"
    results = {c: summarise(rs) for c, rs in runs.items()}
    trl = [c for c in results if c.startswith("trl")]
    best = min(trl, key=lambda c: results[c]["seconds_per_1k_pairs"]["mean"], default=None)
    if best:
        for r in results.values():
            r["speed_vs_best_trl"] = round(results[best]["seconds_per_1k_pairs"]["mean"] / r["seconds_per_1k_pairs"]["mean"], 2)
            r["memory_vs_best_trl"] = round(r["peak_rss_mb"]["mean"] / results[best]["peak_rss_mb"]["mean"], 2)
    publish({"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_model()}", "model": args.model,
             "versions": versions(), "steps": args.steps, "pairs": args.steps * BATCH, "batch_pairs": BATCH, "learning_rate": LR,
             "beta": BETA, "seeds": args.seeds, "max_len": args.max_len, "lora": LORA, "gradient_checkpointing": False,
             "skipped": {"trl-padding-free": "TRL 1.16 disables padding_free for DPO (it warns and pads)", **skipped},
             "best_trl": best, "results": results}, args.out)


if __name__ == "__main__":
    main()
