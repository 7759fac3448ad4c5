"""Where one chat decoding step's time goes (tunejob serve's engine: engine/batch.py), against the
bound of reading every weight once per token, measured in the same run.

    python bench/profile_decode.py --out bench/results/profile_decode.json
    python bench/profile_decode.py --dtype bfloat16 --out bench/results/profile_decode_bf16.json
    python bench/profile_decode.py --model /path/to/tiny --steps 3   # smoke size
    python bench/profile_decode.py --engine llama.cpp --gguf-type f16 --out bench/results/profile_decode_llama_cpp.json

For 1 and 8 rows: the engine's own `Batch.step` (greedy, rows of the base model), timed over
`--steps` steps after 5 warm-up steps, then 10 steps under torch.profiler (the top operators by
self CPU time). Beside it: the model's bare forward with its KV cache (no batching code) and one
matrix-vector product over every 2-D weight, which is what a batch-1 token cannot go below on a
CPU whose decoding is bound by memory bandwidth.

With `--engine llama.cpp` (serve --engine llama.cpp): the engine's own `LlamaBatch.step` for 1 and 8
rows (the top Python functions under cProfile), beside llama.cpp bare (the same context: one
`llama_decode` of one token per row and a numpy argmax, nothing else) and the GGUF's bytes over the
read bandwidth measured here. The gap between the first two is what the engine's Python adds a step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish, read_bandwidth  # noqa: E402


def _rows(target, n: int):
    from tunejob.engine.batch import Row
    from tunejob.engine.chat import ChatRequest, prompt_inputs

    out = []
    for i in range(n):
        req = ChatRequest([{"role": "user", "content": f"Tell me about product number {i} in detail."}], max_tokens=10**6, temperature=0)
        out.append(Row(prompt_inputs(target.tokenizer, req, "cpu")["input_ids"][0].tolist(), req, target, set()))
    return out


def _seconds_a_step(step, steps: int) -> float:
    """Mean seconds of `step()` over `steps` calls, after 5 warm-up calls."""
    for _ in range(5):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def _batch_figures(weights, target, n: int, steps: int) -> dict:
    from tunejob.engine.batch import Batch

    batch = Batch(weights, target.key, max(n, 1))
    batch.join(_rows(target, n))
    seconds = _seconds_a_step(batch.step, steps)
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


def _llama_step_figures(weights, target, n: int, steps: int) -> dict:
    import cProfile
    import pstats

    from tunejob.server.inference.llama import LlamaBatch

    batch = LlamaBatch(weights, target.key, n)
    batch.join(_rows(target, n))
    seconds = _seconds_a_step(batch.step, steps)
    prof = cProfile.Profile()
    prof.runcall(lambda: [batch.step() for _ in range(10)])
    stats = pstats.Stats(prof)
    total = max(stats.total_tt, 1e-9)
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:8]  # by own time
    batch._forget(batch.rows)
    return {"rows": n, "ms_per_step": round(seconds * 1000, 2), "tokens_per_s": round(n / seconds, 1),
            "top_functions_own_time_share": {f"{Path(f).name}:{line}:{name}": round(v[2] / total, 3) for (f, line, name), v in top}}


def _llama_bare(weights, target, n: int, steps: int) -> float:
    """Seconds a step of llama.cpp alone: one token for each of n sequences, logits read, argmax."""
    import numpy as np

    base, llama = weights.loaded(target.key), weights.llama
    prompt = _rows(target, 1)[0].prompt
    llama.llama_memory_clear(base.memory, True)
    batch = base.batch

    def fill(items: list[tuple[int, int, int, int]]) -> None:  # (token, position, sequence, wants logits)
        for i, (token, pos, seq, out) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, out
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        assert llama.llama_decode(base.context, batch) == 0

    for seq in range(n):  # the prompt, as the engine's join does
        fill([(t, i, seq, int(i == len(prompt) - 1)) for i, t in enumerate(prompt)])
    pos, tokens = len(prompt), [1] * n

    def step() -> None:
        nonlocal pos
        fill([(tokens[s], pos, s, 1) for s in range(n)])
        for s in range(n):
            tokens[s] = int(np.argmax(np.ctypeslib.as_array(llama.llama_get_logits_ith(base.context, s), shape=(base.vocab,))))
        pos += 1

    seconds = _seconds_a_step(step, steps)
    llama.llama_memory_clear(base.memory, True)
    return seconds


def llama_figures(model: str, kind: str, steps: int, threads: int) -> dict:
    import tempfile

    from tunejob.server.inference.gguf_files import GgufFiles
    from tunejob.server.inference.llama import LlamaWeights

    with tempfile.TemporaryDirectory() as tmp:
        weights = LlamaWeights(GgufFiles(Path(tmp), kind, log=lambda m: None), max_batch=8, log=lambda m: None)
        weights.use_threads(threads)
        target = weights.target(model, None)
        size = weights.files.base(model).stat().st_size
        engine = [_llama_step_figures(weights, target, n, steps) for n in (1, 8)]
        bare = {n: _llama_bare(weights, target, n, steps) for n in (1, 8)}
    read = read_bandwidth()
    for row in engine:
        row["llama_cpp_bare_ms_per_step"] = round(bare[row["rows"]] * 1000, 2)
        row["llama_cpp_bare_tokens_per_s"] = round(row["rows"] / bare[row["rows"]], 1)
        row["engine_vs_bare"] = round(bare[row["rows"]] / (row["ms_per_step"] / 1000), 3)
    return {"engine": "llama.cpp", "gguf_type": kind, "threads": threads, "gguf_bytes": size, "batch": engine,
            "read_gb_per_s": round(read / 1e9, 2), "weight_read_bound_tokens_per_s": round(read / size, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores tunejob finds)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--engine", default="local", choices=["local", "llama.cpp"], help="serve's engine to profile")
    ap.add_argument("--gguf-type", default="f16", help="with --engine llama.cpp: f16, q8_0 or f32")
    args = ap.parse_args()

    from tunejob.server.inference.weights import Weights
    from tunejob.train import threads
    from tunejob.train.models import resolve_model_path

    threads.apply(args.threads or threads.available_cores())
    if args.engine == "llama.cpp":
        model_path = str(args.model or resolve_model_path("default"))
        return publish(llama_figures(model_path, args.gguf_type, args.steps, args.threads or threads.available_cores()), args.out)
    weights = Weights(dtype=getattr(torch, args.dtype))
    target = weights.target(str(args.model or resolve_model_path("default")), None)
    model, _ = weights.forward_model(target, [])
    figures = {"dtype": args.dtype, "threads": torch.get_num_threads(), "attention": model.config._attn_implementation,
               "batch": [_batch_figures(weights, target, n, args.steps) for n in (1, 8)], **_bounds(model, target, args.steps)}
    publish(figures, args.out)


if __name__ == "__main__":
    main()
