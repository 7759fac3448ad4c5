"""Where the time of one tunejob training step goes (torch.profiler), on the same data and LoRA
config as bench/train_throughput.py.

    python bench/profile_step.py --steps 4 --out bench/results/profile_step.txt
    python bench/profile_step.py --model /path/to/tiny --steps 1 --examples 16   # smoke size

Runs the trainer's own step (micro_batch_size or, with --packing auto, the trainer's packs of short
sequences after its check; forward_loss, backward, clip, AdamW) on the same length-grouped batches, one warm-up step unprofiled, then `--steps` profiled. Prints the phases
(forward / backward / optimizer, wall time) and the operators by self CPU time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish  # noqa: E402
from train_throughput import LORA, datasets_for  # noqa: E402  (the benchmark's own data and LoRA config)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--precision", default="auto", choices=["auto", "no", "bf16"], help="hyperparameters.mixed_precision")
    ap.add_argument("--packing", default="auto", choices=["auto", "off"], help="hyperparameters.packing")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile, record_function

    from tunejob.train.models import default_model_path, load_tokenizer
    from tunejob.data.sequences import encode_examples
    from tunejob.spec import parse_spec
    from tunejob.train.adapter import add_lora, load_model
    from tunejob.train.batches import autocast, batch_order, forward_batches, make_collator, micro_batch_size
    from tunejob.train.loss import LossPath
    from tunejob.train.packing import choose_packing
    from tunejob.train.precision import resolve

    model_path = args.model or str(default_model_path())
    spec = parse_spec(f"model: {model_path}\ndata: {{train: x.jsonl}}\n"
                      f"lora: {{r: {LORA['r']}, alpha: {LORA['alpha']}, dropout: {LORA['dropout']}, target_modules: [q_proj, v_proj]}}\n")
    tok = load_tokenizer(model_path)
    train, _ = datasets_for(args.examples, 100)
    seqs, _ = encode_examples(tok, train, args.max_len)
    mixed = resolve(args.precision, "cpu")
    model = add_lora(spec, load_model(spec, model_path, torch.device("cpu"), mixed))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    collate = make_collator(tok.pad_token_id)
    order = batch_order([len(s.input_ids) for s in seqs], 4, 42, 0)

    micro = micro_batch_size(4, 1, 1, torch.device("cpu"))  # as the trainer splits a step
    loss_path = LossPath()
    pack_tokens = choose_packing(args.packing, "supervised", model, seqs, "cpu", loss_path, print)
    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    tokens = 0

    def step(i: int, timed: bool) -> None:
        nonlocal tokens
        batch_seqs = [seqs[j] for j in order[i]]
        n = sum(s.trained_tokens for s in batch_seqs)
        t_fwd = t_bwd = 0.0
        for batch in forward_batches(collate, batch_seqs, micro, torch.device("cpu"), pack_tokens):
            t0 = time.perf_counter()
            with record_function("forward"), autocast(torch.device("cpu"), mixed == "bf16"):
                loss, _, _ = loss_path(model, batch)
            t1 = time.perf_counter()
            with record_function("backward"):
                (loss / n).backward()
            t_fwd, t_bwd = t_fwd + t1 - t0, t_bwd + time.perf_counter() - t1
        t2 = time.perf_counter()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if timed:
            phases["forward"] += t_fwd
            phases["backward"] += t_bwd
            phases["optimizer"] += t3 - t2
            tokens += sum(len(s.input_ids) for s in batch_seqs)

    step(0, timed=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for i in range(1, args.steps + 1):
            step(i, timed=True)
    total = sum(phases.values())
    lines = [f"model {model_path}; {'bf16' if mixed == 'bf16' else 'fp32'}; {args.steps} profiled steps, batch 4, {tokens:,} real tokens, "
             f"{f'packed up to {pack_tokens} tokens' if pack_tokens else f'{micro} per forward pass'}; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads", "",
             "phase       seconds   share"]
    lines += [f"{k:<10} {v:8.2f}   {100 * v / total:5.1f}%" for k, v in phases.items()]
    lines += [f"{'total':<10} {total:8.2f}   ({tokens / total:.0f} real tokens/s)", "",
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40)]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
