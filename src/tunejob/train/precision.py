"""The precision a run trains in: `hyperparameters.mixed_precision: auto` resolved to "no" or "bf16".

bf16 pays only where the hardware multiplies bf16 fast. Measured on two CPUs of this project's
kind: an AMD EPYC with AVX512-BF16 ran a 2048 matmul at 908 GFLOP/s in bf16 against 216 in fp32;
another CPU without bf16 units ran bf16 at 1.3 GFLOP/s (emulated, 160x slower than its fp32). So
`auto` means: CUDA devices that support bf16 -> bf16; CPUs whose flags name AMX-BF16 or AVX512-BF16
*and* whose measured bf16 matmul beats fp32 by BF16_MIN_RATIO -> bf16; everything else -> fp32.

The CPU measurement takes about a second, so it is cached per machine (CPU model, its bf16 flags,
torch version) in the cache folder, in `precision.json`; `tunejob plan` reads its GFLOP/s too.
Where bf16 is fast it also times attention (attention_fp32_up_to): torch's CPU flash attention
backward in bf16 pays a fixed cost that fp32's does not (on a 2-core AMX CPU, forward and backward
of one 64-token sequence, 9 heads: 1.38 ms in bf16, 0.49 ms in fp32), so train/attention.py runs
short packed sequences' attention in fp32 up to the length this machine measures it faster.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

BF16_MIN_RATIO = 1.5  # bf16 must beat fp32 matmul by this much: a weight cast per step eats some of it
CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CACHE_NAME = "precision.json"
ATTENTION_LENGTHS = (32, 64, 128, 256, 512)  # sequence lengths attention_fp32_up_to tries, shortest first
ATTENTION_MIN_RATIO = 1.25  # fp32 must beat bf16 attention by this much: a margin against timing noise


def resolve(setting: str, device: torch.device | str, quantization: str = "none") -> str:
    """'no' or 'bf16': `setting` itself unless it is 'auto'."""
    device = torch.device(device)
    if setting != "auto":
        return setting
    if quantization != "none" and device.type == "cpu":
        return "no"  # bitsandbytes' CPU NF4 kernels compute in fp32 (train/adapter.py); bf16 there is untested
    return "bf16" if bf16_is_fast(device) else "no"


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False  # mps and others: fp32 until measured there
    flags = cpu_bf16_flags()
    if not flags:  # no bf16 units: bf16 is emulated, often 100x slower; don't even measure it
        return False
    return cached_cpu_probe(flags)["bf16_fast"]


def cpu_bf16_flags() -> list[str]:
    """The bf16 matrix-unit flags this CPU advertises (Linux /proc/cpuinfo), sorted."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return sorted(f for f in CPU_FLAGS if f in have)
    return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cached_cpu_probe(flags: list[str] | None = None, cache: Path | None = None) -> dict:
    """This machine's matmul speed in fp32 and bf16 and the bf16 verdict: THE probe, which
    `mixed_precision: auto`, `tunejob plan`'s time estimate and the benchmarks' MFU all read, so
    they cannot disagree on one machine. Measured once per machine (CPU, its bf16 flags, torch)
    on all its cores, and kept in `cache`; the thread count a process happens to run with (a serve
    child, the CLI, a Ray node) no longer gives it a probe, and a verdict, of its own."""
    from tunejob.train.models import cache_dir
    from tunejob.train.threads import available_cores

    flags = cpu_bf16_flags() if flags is None else flags
    cache = cache or cache_dir() / CACHE_NAME
    key = f"{cpu_model()}|{','.join(flags)}|torch {torch.__version__}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if "attention_fp32_up_to" in known.get(key, {}):  # an entry from before that field is measured again
        return known[key]
    threads = torch.get_num_threads()
    torch.set_num_threads(available_cores())
    try:  # fork_rng: its random matrices must not move a seeded run's generator (the first run on a machine would differ)
        with torch.random.fork_rng(devices=[]):
            result = {**measure_cpu(), "threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(threads)
    known[key] = result
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(cache)
    except OSError:  # a read-only cache costs a second per run, nothing more
        pass
    return result


def measure_cpu(n: int = 1024, repeats: int = 3) -> dict:
    """GFLOP/s of an n x n matmul in fp32 and bf16 (best of `repeats`) and the verdict. Without
    bf16 units a bf16 matmul is emulated (~1 GFLOP/s: a 1024 one takes seconds), so bf16 is first
    timed at n/4, and only measured at n when that is within 4x of fp32, in turns with fp32 again."""
    fp32 = gemm_gflops(torch.float32, n, repeats)
    bf16 = gemm_gflops(torch.bfloat16, n // 4, 2)
    if bf16 > fp32 / 4:  # then fp32 and bf16 in turns, best of each: a burst of load elsewhere (the verdict
        # is cached for good) slows both alike instead of only the one measured during it
        bf16 = 0.0
        for _ in range(repeats):
            fp32 = max(fp32, gemm_gflops(torch.float32, n, 1))
            bf16 = max(bf16, gemm_gflops(torch.bfloat16, n, 1))
    fast = bf16 >= BF16_MIN_RATIO * fp32
    return {"fp32_gflops": fp32, "bf16_gflops": bf16, "bf16_fast": fast, "attention_fp32_up_to": attention_fp32_up_to() if fast else 0}


def attention_fp32_up_to(lengths=ATTENTION_LENGTHS, repeats: int = 3) -> int:
    """The longest of `lengths` (shortest first, stopping at the first that fails) at which causal
    attention's forward and backward on bf16 inputs runs ATTENTION_MIN_RATIO faster on fp32 copies
    than in bf16 (SmolLM2-135M's shape: 9 query heads over 3 key/value heads of 64); 0 where none."""
    best = 0
    for n in lengths:
        if attention_ms(n, True, repeats) < ATTENTION_MIN_RATIO * attention_ms(n, False, repeats):
            break
        best = n
    return best


def attention_ms(n: int, bf16: bool, repeats: int) -> float:
    """Best-of-`repeats` milliseconds of one causal attention forward and backward over n tokens of
    bf16 inputs, in bf16 or (bf16=False) on fp32 copies, as train/attention.py would run it."""
    import torch.nn.functional as F

    q, k, v = (torch.randn(1, h, n, 64, dtype=torch.bfloat16, requires_grad=True) for h in (9, 3, 3))
    grad = torch.randn(1, 9, n, 64, dtype=torch.bfloat16)

    def step() -> None:
        args = (q, k, v) if bf16 else (q.float(), k.float(), v.float())
        F.scaled_dot_product_attention(*args, is_causal=True, enable_gqa=True).to(torch.bfloat16).backward(grad)

    return best_seconds(step, repeats) * 1e3


def gemm_gflops(dtype: torch.dtype, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return round(2 * n**3 / best_seconds(lambda: torch.matmul(a, b), repeats) / 1e9, 1)


def best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn`, after one untimed call (the first allocates and
    picks kernels)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
