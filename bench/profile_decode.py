"""Where one chat decoding step's time goes (tunejob serve's engine: engine/batch.py), against the
bound of reading every weight once per token, measured in the same run.

    python bench/profile_decode.py --out bench/results/profile_decode.json
    python bench/profile_decode.py --dtype bfloat16 --out bench/results/profile_decode_bf16.json
    python bench/profile_decode.py --model /path/to/tiny --steps 3   # smoke size

For 1 and 8 rows: the engine's own `Batch.step` (greedy, rows of the base model), timed over
`--steps` steps after 5 warm-up steps, then 10 steps under torch.profiler (the top operators by
self CPU time). Beside it: the model's bare forward with its KV cache (no batching code) and one
matrix-vector product over every 2-D weight, which is what a batch-1 token cannot go below on a
CPU whose decoding is bound by memory bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish  # noqa: E402


def _rows(target, n: int):
    from tunejob.engine.batch import Row
    from tunejob.engine.chat import ChatRequest, prompt_inputs

    out = []
    for i in range(n):
        req = ChatRequest([{"role": "user", "content": f"Tell me about product number {i} in detail."}], max_tokens=10**6, temperature=0)
        out.append(Row(prompt_inputs(target.tokenizer, req, "cpu")["input_ids"][0].tolist(), req, target, set()))
    return out


def _batch_figures(weights, target, n: int, steps: int) -> dict:
    from tunejob.engine.batch import Batch

    batch = Batch(weights, target.key, max(n, 1))
    batch.join(_rows(target, n))
    for _ in range(5):
        batch.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        batch.step()
    seconds = (time.perf_counter() - t0) / steps
    with torch.profiler.profile() as prof:
        for _ in range(10):
            batch.step()
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    return {"rows": n, "ms_per_step": round(seconds * 1000, 1), "tokens_per_s": round(n / seconds, 1),
            "top_ops_self_cpu_share": {e.key: round(e.self_cpu_time_total / total, 3) for e in top}}


def _bounds(model, target, steps: int) -> dict:
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([_rows(target, 1)[0].prompt]), use_cache=True)
        cache, ids = out.past_key_values, torch.tensor([[1]])
        t0 = time.perf_counter()
        for _ in range(steps):
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        bare = (time.perf_counter() - t0) / steps
        mats = [p for p in model.parameters() if p.dim() == 2]  # a tied embedding / head counts once, as it is read once
        vecs = [torch.randn(1, m.shape[1], dtype=m.dtype) for m in mats]
        t0 = time.perf_counter()
        for _ in range(steps):
            for m, v in zip(mats, vecs):
                v @ m.T
        read = (time.perf_counter() - t0) / steps
    size = sum(m.numel() * m.element_size() for m in mats)
    return {"bare_forward_ms": round(bare * 1000, 1), "weight_read_ms": round(read * 1000, 1), "weights_mb": round(size / 2**20),
            "weight_read_gb_per_s": round(size / read / 1e9, 1), "one_stream_ceiling_tokens_per_s": round(1 / read, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores tunejob finds)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from tunejob.server.inference.weights import Weights
    from tunejob.train import threads
    from tunejob.train.models import resolve_model_path

    threads.apply(args.threads or threads.available_cores())
    weights = Weights(dtype=getattr(torch, args.dtype))
    target = weights.target(str(args.model or resolve_model_path("default")), None)
    model, _ = weights.forward_model(target, [])
    figures = {"dtype": args.dtype, "threads": torch.get_num_threads(), "attention": model.config._attn_implementation,
               "batch": [_batch_figures(weights, target, n, args.steps) for n in (1, 8)], **_bounds(model, target, args.steps)}
    publish(figures, args.out)


if __name__ == "__main__":
    main()
