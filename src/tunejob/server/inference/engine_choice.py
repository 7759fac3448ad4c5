"""`--engine auto`, serve's default: each model's chat runs where it runs fastest on this machine.

Why: on a CPU, llama.cpp decodes far faster than torch. Measured on a 2-core AVX2 EPYC through
serve (bench/serve_latency.py, SmolLM2-135M, greedy, one run): torch (fp32, the only fast precision
without bf16 units) 18.5 tokens/s for one stream and 78.5 for 8; llama.cpp on the same model's f16
GGUF, with the Makefile's build of llama-cpp-python, 71.9 and 154.9. On a GPU, torch's CUDA kernels
are the fast path, and the Makefile's llama-cpp-python has no GPU backend.

So `auto` is the llama.cpp engine (llama.py) where there is no GPU and llama-cpp-python is
installed, and the local (torch) engine otherwise. Where it is llama.cpp, a model llama.cpp cannot
run (a family the GGUF export does not write, an rsLoRA / DoRA adapter, an adapter with
modules_to_save) runs in torch in the same server, on the same chat thread: `auto` answers
everything `local` answers, only faster where it can. `--engine local` / `llama.cpp` force one.
"""

from __future__ import annotations

import threading
from pathlib import Path

from tunejob.engine.batch import Batch
from tunejob.errors import TunejobError
from tunejob.server.inference.gguf_files import refusal
from tunejob.server.inference.llama import LlamaBatch, LlamaTarget


def torch_only() -> str | None:
    """Why `auto` runs every chat in torch on this machine, or None when llama.cpp can take them."""
    import torch

    if torch.cuda.is_available():
        return "a GPU is here (torch's CUDA), and the GPU engine is torch's"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install -e .[export]: about 4x faster chat on a CPU)"
    return None


class AutoWeights:
    """The engine's weights (engine/batch.py's interface) over both engines: a model goes to
    llama.cpp unless llama.cpp cannot run it, then to torch; each batch holds one engine's rows."""

    def __init__(self, llama, local, log=print):
        self.llama, self.local, self.log = llama, local, log
        self._torch: dict[tuple[str, str | None], str] = {}  # (base, adapter) -> why torch runs it
        self._torch_generations = 0  # generations on torch targets now: torch's threads matter only then
        self._lock = threading.Lock()

    @staticmethod
    def check(base_path: str, adapter: Path | None) -> None:
        """Nothing is refused: what llama.cpp cannot run, torch does."""

    def context_cells(self, base_path: str, adapter: Path | None) -> int | None:
        """The KV cells a chat on this model must fit in (llama.cpp's pool), None in torch."""
        if self._why_torch(base_path, adapter) is None:
            return self.llama.context_cells(base_path, adapter)
        return None

    def target(self, base_path: str, adapter: Path | None):
        why = self._why_torch(base_path, adapter)
        if why is None:
            try:
                return self.llama.target(base_path, adapter)
            except TunejobError as exc:  # the GGUF conversion refused it (modules_to_save, a layer it cannot map)
                why = str(exc)
        key = (base_path, None if adapter is None else str(adapter))
        if key not in self._torch:
            self._torch[key] = why
            self.log(f"chat: {adapter or base_path} runs in torch, not llama.cpp (--engine auto): {why}")
        target = self.local.target(base_path, adapter)
        with self._lock:
            self._torch_generations += 1
        return target

    def release(self, target) -> None:
        if isinstance(target, LlamaTarget):
            return self.llama.release(target)
        with self._lock:
            self._torch_generations -= 1
        self.local.release(target)

    def stop_ids(self, target) -> set[int]:
        return (self.llama if isinstance(target, LlamaTarget) else self.local).stop_ids(target)

    def use_threads(self, n: int) -> None:
        # llama.cpp's threads, and torch's only while torch rows run: llama.cpp keeps torch at one
        # thread (it only picks tokens), so that torch's idle workers take no core from llama.cpp's
        self.llama.use_threads(n)
        if self._torch_generations:
            self.local.use_threads(n)

    def _why_torch(self, base_path: str, adapter: Path | None) -> str | None:
        key = (base_path, None if adapter is None else str(adapter))
        return self._torch.get(key) or refusal(base_path, key[1])


def auto_batch(weights: AutoWeights, key: tuple, limit: int):
    """The running batch for `key` (Engine's batch type): llama.cpp's keys start with "llama.cpp"."""
    if key[0] == "llama.cpp":
        return LlamaBatch(weights.llama, key, limit)
    return Batch(weights.local, key, limit)
