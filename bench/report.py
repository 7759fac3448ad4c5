"""Where a benchmark's figures go: printed, and written to --out (the file RESULTS.md cites)."""

from __future__ import annotations

import json
from pathlib import Path


def publish(figures: dict | str, out: Path | None) -> None:
    """Print the figures (a dict as indented JSON, or text) and write the same to `out` if given."""
    text = figures if isinstance(figures, str) else json.dumps(figures, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def read_bandwidth(gib: int = 1, tries: int = 5) -> float:
    """Bytes a second that every core together reads from memory: the best of `tries` torch sums
    over `gib` GiB of fp32 (all cores, as llama.cpp's threads read). The weight-read bound of a
    batch-1 token is this over the bytes of the weights."""
    import os
    import time

    import torch

    torch.set_num_threads(os.cpu_count())
    buf, read = torch.ones(gib * 2**28), []
    for _ in range(tries):
        t = time.perf_counter()
        buf.sum()
        read.append(buf.numel() * 4 / (time.perf_counter() - t))
    return max(read)
