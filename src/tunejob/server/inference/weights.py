"""The weights chat runs on: each base model once, with every adapter chatted with loaded beside it
(unmerged, so rows for different adapters of one base share a forward pass through peft's mixed
adapter batches), and merged copies (adapter folded into a copy of the base) for adapters chatted
with repeatedly, kept least-recently-used under a budget counted in copies of the base.

Why merge: an unmerged LoRA adds two small matmuls to every targeted linear layer per token; folded
in, the forward is the base model's. Why not always: a merged copy costs the base's weights again
(0.54 GB for SmolLM2-135M in fp32, 0.27 GB in bf16), and its rows batch only with rows of the same
adapter. So an adapter is merged at its `merge_after`-th request, and at most `merged_copies` copies
are kept. The budget is counted in copies of the base, in the dtype chat runs in, because a budget
in bytes was sized for one dtype: 1024 MB held one fp32 copy of SmolLM2-135M, so two users
alternating two fine-tuned models evicted each other's copy and re-merged on every request,
stalling every stream for seconds each time (issue 31, finding 9). `merge_bytes`, when set, caps
the copies' memory as well. The log says which path each adapter takes. Adapters are small (r 8
on SmolLM2-135M's attention: ~2 MB) and stay loaded on their base, the least recently used not in
use unloaded past MAX_ADAPTERS; bases are the server's configured ones.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from tunejob.train import threads

BASE_ROWS = "__base__"  # peft's name for rows of a mixed batch that use no adapter
MAX_ADAPTERS = 16  # unmerged adapters kept per base (r 16 on all of a 7B model's linear layers: ~80 MB each)


@dataclass(frozen=True)
class Target:
    """What one request's rows run on. Rows with the same `key` share forward passes."""

    model: object | None  # a merged copy (held here even once the LRU drops it); None: the base's current model
    tokenizer: object
    adapter: str | None  # the adapter directory of an unmerged row
    key: tuple
    path: str  # "base", "unmerged" or "merged", as logged


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Weights:
    def __init__(self, dtype: torch.dtype = torch.float32, merged_copies: int = 2, merge_after: int = 2, log=print,
                 compile: bool = False, merge_bytes: int | None = None):
        self.dtype, self.merged_copies, self.merge_after, self.log, self.compile = dtype, merged_copies, merge_after, log, compile
        self.merge_bytes = merge_bytes  # None: the copies alone bound the memory
        self._bases: dict[str, list] = {}  # base path -> [model (plain or PeftModel), tokenizer, {adapter dir: name}]
        self._merged: OrderedDict[str, tuple] = OrderedDict()  # adapter dir -> (model, tokenizer, bytes)
        self._requests: Counter[str] = Counter()
        self._in_use: Counter[str] = Counter()  # unmerged adapters with rows generating (never unloaded)
        self._serial = 0
        self._lock = threading.Lock()

    def target(self, base_path: str, adapter: Path | None) -> Target:
        """The model a new request runs on, loading (and merging) what it needs."""
        with self._lock:
            if adapter is None:
                tokenizer = self._base(base_path)[1]
                return Target(None, tokenizer, None, ("base", base_path), "base")
            key = str(adapter)
            self._requests[key] += 1
            if key in self._merged:
                self._merged.move_to_end(key)
                model, tokenizer, _ = self._merged[key]
                return Target(model, tokenizer, None, ("merged", key), "merged")
            model, tokenizer, names = self._base(base_path)
            size = parameter_bytes(model.get_base_model() if names else model)
            unmergeable = self._unmergeable(size)
            if self._requests[key] >= self.merge_after and not unmergeable:
                return self._merge(base_path, key, size)
            self._adapter(base_path, key)
            self._in_use[key] += 1
            if self._requests[key] == 1 or (self._requests[key] == self.merge_after and unmergeable):
                self.log(f"chat: adapter {key} runs unmerged on its base ({unmergeable or f'merged from its request {self.merge_after} on'})")
            return Target(None, tokenizer, key, ("base", base_path), "unmerged")

    def release(self, target: Target) -> None:
        """A row on `target` finished: its adapter may be unloaded again."""
        with self._lock:
            if target.adapter is not None:
                self._in_use[target.adapter] -= 1

    def stop_ids(self, target: Target) -> set[int]:
        """The tokens a row on `target` stops at (data.templates.stop_token_ids: the one stop set)."""
        from tunejob.data.templates import stop_token_ids

        return stop_token_ids(target.tokenizer, self.forward_model(target, [])[0])

    def use_threads(self, n: int) -> None:
        """Chat's thread budget now (train/threads.py), applied to torch's forward passes."""
        threads.apply(n)

    @staticmethod
    def check(base_path: str, adapter: Path | None) -> None:
        """Every model that loads runs here; the llama.cpp engine refuses some (llama.py)."""

    @staticmethod
    def context_cells(base_path: str, adapter: Path | None) -> None:
        """No limit of the engine's own: the KV cache grows with the chat, up to the model's context."""

    def forward_model(self, target: Target, adapters: list[str | None]):
        """(model, adapter_names or None) for one forward pass over rows of `target.key` with these
        adapters. Asked at every step, not kept: the first adapter wraps a base in a PeftModel
        (injecting LoRA layers into it), after which its plain rows must say "__base__"."""
        if target.model is not None:
            return self._maybe_compiled(target.model), None
        model, _, names = self._bases[target.key[1]]
        if names:  # peft's per-row adapter hooks stay eager
            return model, [names[a] if a else BASE_ROWS for a in adapters]
        return self._maybe_compiled(model), None

    def _maybe_compiled(self, model):
        """torch.compile'd (dynamic shapes: rows join and leave) when asked for: an option, not a
        default, until it is measured to pay on the machine (the first calls of each shape compile)."""
        if not self.compile:
            return model
        if getattr(model, "_tunejob_compiled", None) is None:  # kept on the model: a dropped merged copy takes it along
            model._tunejob_compiled = torch.compile(model, dynamic=True)
        return model._tunejob_compiled

    def _base(self, base_path: str) -> list:
        if base_path not in self._bases:
            from transformers import AutoModelForCausalLM

            from tunejob.train.models import load_tokenizer

            model = AutoModelForCausalLM.from_pretrained(base_path, dtype=self.dtype).eval()
            self._bases[base_path] = [model, load_tokenizer(base_path), {}]
        return self._bases[base_path]

    def _adapter(self, base_path: str, adapter: str) -> None:
        entry = self._bases[base_path]
        model, _, names = entry
        if adapter in names:
            names[adapter] = names.pop(adapter)  # most recently used last
            return
        self._serial += 1
        name = f"a{self._serial}"
        if not names:
            from peft import PeftModel

            entry[0] = PeftModel.from_pretrained(model, adapter, adapter_name=name).eval()
        else:
            model.load_adapter(adapter, adapter_name=name)
        entry[0].to(self.dtype)
        names[adapter] = name
        idle = [a for a in names if not self._in_use[a] and a != adapter]
        if len(names) > MAX_ADAPTERS and idle:
            entry[0].delete_adapter(names.pop(idle[0]))
            self.log(f"chat: adapter {idle[0]} unloaded (least recently used of {MAX_ADAPTERS + 1} on its base)")

    def _unmergeable(self, size: int) -> str | None:
        """Why a copy of `size` bytes can never be kept merged; None if it can."""
        if self.merged_copies < 1:
            return "--chat-merged-copies 0: never merged"
        if self.merge_bytes is not None and size > self.merge_bytes:
            return f"a merged copy would need {size / 2**20:.0f} MB of the {self.merge_bytes / 2**20:.0f} MB of --chat-merge-mb"
        return None

    def _over_budget(self, size: int) -> bool:
        """Whether one more copy of `size` bytes would pass the budget: the copies, or the bytes."""
        used = sum(b for _, _, b in self._merged.values())
        return len(self._merged) >= self.merged_copies or (self.merge_bytes is not None and used + size > self.merge_bytes)

    def _merge(self, base_path: str, adapter: str, size: int) -> Target:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        while self._merged and self._over_budget(size):
            old, _ = self._merged.popitem(last=False)
            cap = f", {self.merge_bytes / 2**20:.0f} MB" if self.merge_bytes is not None else ""
            self.log(f"chat: merged copy of {old} dropped (least recently used) to stay within the merge budget ({self.merged_copies} copies{cap})")
        tokenizer = self._bases[base_path][1]
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=self.dtype)
        model = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
        self._merged[adapter] = (model, tokenizer, size)
        used = sum(b for _, _, b in self._merged.values())
        self.log(f"chat: adapter {adapter} merged into a copy of its base ({size / 2**20:.0f} MB in {self.dtype}; "
                 f"{len(self._merged)} of {self.merged_copies} merged copies in use, {used / 2**20:.0f} MB)")
        return Target(model, tokenizer, None, ("merged", adapter), "merged")
