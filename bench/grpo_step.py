"""GRPO: seconds per training step, tunejob's reinforcement fine-tuning vs TRL's GRPOTrainer.

    python bench/grpo_step.py --steps 6 --out bench/results/grpo_step.json
    python bench/grpo_step.py --model /path/to/tiny --steps 2   # smoke size

Held equal on both sides: the base (embedded SmolLM2-135M-Instruct by default), the prompts
(examples/data/rft_capitals.jsonl, first 2 x steps lines, 2 prompts per step), the reward (the
right capital, any case: tunejob's string_check grader, TRL's same check as a Python reward
function, both in-process), 8 answers per prompt, up to 12 new tokens at temperature 0.7 (top-p 1,
no top-k), LoRA r 16 / alpha 32 on all linear layers without dropout, learning rate 3e-4, no
warm-up, beta 0.04 (a KL term against the base with its adapter disabled), TRL's loss_type "dapo"
(tunejob's), one optimisation pass per batch, no gradient checkpointing, no vLLM, fp32. Each side
runs in its own process.

Timing: the end of each optimizer step (a TrainerCallback on TRL's side; each training record's
elapsed_s on tunejob's, whose evaluation is put after the last step). Steady state: from the end
of step 1 to the end of the last step, over steps - 1 steps; "first_step_s" reports step 1.
Answers that stop early are shorter, so the two sides may decode different token counts: the
answer tokens per step of each side are reported beside its time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

from report import publish
from train_throughput import child_result, versions

from tunejob.train.precision import cpu_model

PROMPTS_PER_STEP, GROUP, NEW_TOKENS, TEMPERATURE, LR, BETA = 2, 8, 12, 0.7, 3e-4, 0.04
DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "rft_capitals.jsonl"


def prompts(n: int) -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines()[:n]]


def run_trl(model_path: str, steps: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, *a, **kw):
            ends.append(time.perf_counter())

    def right_city(completions, capital, **kw):
        return [float(cap.lower() in c[0]["content"].lower()) for c, cap in zip(completions, capital)]

    rows = [{"prompt": p["messages"], "capital": p["capital"]} for p in prompts(PROMPTS_PER_STEP * steps)]
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=PROMPTS_PER_STEP * GROUP, num_generations=GROUP,
                      max_completion_length=NEW_TOKENS, temperature=TEMPERATURE, top_p=1.0, top_k=0, learning_rate=LR, beta=BETA,
                      loss_type="dapo", lr_scheduler_type="cosine", warmup_steps=0, max_steps=steps, gradient_checkpointing=False,
                      logging_steps=1, save_strategy="no", report_to="none", seed=42, bf16=False, use_cpu=not torch.cuda.is_available(),
                      shuffle_dataset=False)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_path), reward_funcs=right_city, args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=AutoTokenizer.from_pretrained(model_path),
                          peft_config=lora, callbacks=[StepEnds()])
    t = time.perf_counter()
    trainer.train()
    lengths = [m["completions/mean_length"] for m in trainer.state.log_history if "completions/mean_length" in m]
    return {"first_step_s": ends[0] - t, "seconds": ends[-1] - ends[0], "steps": steps - 1,
            "answer_tokens_per_step": round(sum(lengths) / max(len(lengths), 1) * PROMPTS_PER_STEP * GROUP, 1)}


def run_tunejob(model_path: str, steps: int, out: Path) -> dict:
    from tunejob.data.dataset import write_jsonl
    from tunejob.monitor.metrics import read_metrics
    from tunejob.spec import parse_spec
    from tunejob.train.trainer import train

    rows = prompts(PROMPTS_PER_STEP * steps + 2)
    write_jsonl(out / "train.jsonl", rows[:-2])
    write_jsonl(out / "val.jsonl", rows[-2:])
    grader = {"type": "string_check", "name": "correct", "input": "{{sample.output_text}}", "reference": "{{item.capital}}", "operation": "ilike"}
    spec = parse_spec(
        f"model: {model_path}\ndata: {{train: {out / 'train.jsonl'}, validation: {out / 'val.jsonl'}}}\noutput_dir: {out / 'run'}\n"
        f"method: {{type: reinforcement, grader: {json.dumps(grader)}, completion_tokens: {NEW_TOKENS}, temperature: {TEMPERATURE},\n"
        f"         beta: {BETA}, hyperparameters: {{compute_multiplier: {GROUP / 8}}}}}\n"
        f"hyperparameters: {{learning_rate: {LR}, batch_size: {PROMPTS_PER_STEP}, max_steps: {steps}, epochs: 1, max_seq_len: 128, warmup: 0, "
        f"mixed_precision: 'no'}}\n"
        "lora: {r: 16, alpha: 32, dropout: 0, target_modules: all-linear}\n"
        f"checkpointing: {{eval_steps: {steps}, save_steps: {steps}, early_stopping_patience: null}}\n")
    train(spec, say=lambda m: None)
    trains = [r for r in read_metrics(out / "run" / "metrics.jsonl") if r["kind"] == "train"]
    # elapsed_s counts from the start of step 1; the base's step-0 evaluation comes before it
    return {"first_step_s": trains[0]["elapsed_s"], "seconds": trains[-1]["elapsed_s"] - trains[0]["elapsed_s"], "steps": steps - 1,
            "answer_tokens_per_step": round(sum(r["completion_tokens_mean"] for r in trains) / len(trains) * PROMPTS_PER_STEP * GROUP, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--configs", default="trl,tunejob")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2 or PROMPTS_PER_STEP * args.steps + 2 > len(DATA.read_text().splitlines()):
        raise SystemExit(f"--steps: 2 to {(len(DATA.read_text().splitlines()) - 2) // PROMPTS_PER_STEP} (each prompt once)")
    if args.model is None:
        from tunejob.train.models import default_model_path

        args.model = str(default_model_path())
    if args.child:
        r = (run_tunejob if args.child == "tunejob" else run_trl)(args.model, args.steps, args.workdir)
        r["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print("RESULT " + json.dumps(r))
        return
    results = {}
    for config in args.configs.split(","):
        r = child_result(__file__, config, ["--model", args.model, "--steps", str(args.steps)])
        r["seconds_per_step"] = round(r["seconds"] / r["steps"], 2)
        results[config] = r
        print(config, json.dumps(r), flush=True)
    if "trl" in results and "tunejob" in results:
        results["tunejob"]["speedup_vs_trl"] = round(results["trl"]["seconds_per_step"] / results["tunejob"]["seconds_per_step"], 2)
    publish({"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_model()}", "model": args.model,
             "versions": versions(), "steps": args.steps, "prompts_per_step": PROMPTS_PER_STEP, "group": GROUP, "new_tokens": NEW_TOKENS,
             "temperature": TEMPERATURE, "learning_rate": LR, "beta": BETA, "lora": "r16/a32 all-linear, no dropout",
             "gradient_checkpointing": False, "vllm": False, "precision": "fp32", "results": results}, args.out)


if __name__ == "__main__":
    main()
