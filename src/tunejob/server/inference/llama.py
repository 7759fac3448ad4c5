"""The llama.cpp engine (`tunejob serve --engine llama.cpp`): chat's forward passes run in
llama.cpp, in this process, on the run's own GGUF export; everything else is the local engine's.

Why: on a 2-core AVX2 CPU, serve's torch engine (fp32) answered 128-token greedy chats at 8.9
tokens/s for one stream, llama.cpp on the same model's exported GGUF at 39.9 (f16) and 51.6
(q8_0). So only the forward pass moves: generation.py's Engine keeps its one worker thread, its
bounded queue (429 past --chat-queue), streaming, cancel and shutdown, and feeds `LlamaBatch`
instead of engine/batch.Batch. Each row's prompt is tunejob's rendering (engine/chat.prompt_inputs:
the same template, the same tools), its token is chosen from llama.cpp's logits by
engine/logits.Decoding (greedy, temperature, top-p, per-row seeds, penalties, response_format's
grammar, logprobs), it stops at data/templates.stop_token_ids and at stop strings (engine/batch.Row),
and its answer is engine/chat.to_result's. So no OpenAI parameter is refused here: llama.cpp's own
sampler, with its own rules, is never used. What llama.cpp cannot run at all (a family the GGUF
export does not write, an rsLoRA / DoRA adapter) is a 400 (gguf_files.check).

Files: the base folder and each adapter are converted once and cached (gguf_files.py). Adapters:
one model and one context per base; each adapter is loaded once onto that model
(`llama_adapter_lora_init`) and set on the context before the rows that use it are decoded
(`llama_set_adapters_lora`, which does nothing when it is already set). Not one `Llama(model,
lora_path=...)` per adapter: llama-cpp-python turns mmap off whenever lora_path is given, so each
would hold a private copy of the base.

Batching: rows decode together as llama.cpp sequences of one context (one `llama_decode` per step
for the rows of each adapter), up to --chat-batch of them, because on CPU a step is bound by
reading the weights, which a batch reads once. The KV cache is one pool of cells (`kv_unified`)
as large as the model's context or --chat-kv-tokens where smaller (api/context.fit refuses a chat
longer than the pool with OpenAI's 400), allocated when the base loads; a row joins only while the rows in it still
fit in the pool at their full prompt + max_tokens, so a decode never runs out of cells mid-answer
(the oldest waiting row goes first, as in the local engine).

Prompt cache (prompt_cache.py): a finished row's cells stay in the pool under a sequence of their
own, up to CACHED_CHATS of them per base, and a new row of the same adapter starts from the longest
prefix they hold, decoding only the rest (usage.prompt_tokens_details.cached_tokens says how many
it skipped). They give their cells up to rows first.

Threads: llama.cpp's threads are chat's budget (train/threads.py: 1 of 2 cores while a job trains,
all of them when none does); torch, which now only picks a token from a vector of logits, keeps 1.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from tunejob.data.templates import stop_token_ids
from tunejob.engine.batch import Row
from tunejob.server.config import ServerConfig
from tunejob.server.inference.gguf_files import GgufFiles, check
from tunejob.server.inference.prompt_cache import PromptCache
from tunejob.train import threads

# llama.cpp logs every load to stderr through llama-cpp-python's logger; errors only
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
F32 = 0  # GGML_TYPE_F32
CACHED_CHATS = 4  # prompt_cache entries per base; they hold at most a quarter of its KV cells


@dataclass(frozen=True)
class LlamaTarget:
    """What a row runs on (engine/batch.Target): rows of one base share a batch, whatever their adapter."""

    tokenizer: object
    adapter: str | None  # the checkpoint directory, or None for the base
    key: tuple


@dataclass
class LoadedBase:
    """One base in llama.cpp: its model, its one context (KV cells for every row), its adapters."""

    model: object
    context: object
    memory: object
    batch: object  # a llama_batch as large as the context
    cells: int
    vocab: int
    tokenizer: object
    eos: set[int]
    cache: PromptCache
    adapters: dict[str, object] = field(default_factory=dict)  # checkpoint dir -> llama_adapter_lora
    active: str | None = None  # the adapter set on the context now
    threads: int = 0


class LlamaWeights:
    """engine/batch.Weights for llama.cpp: bases and adapters loaded once, for the chat thread."""

    def __init__(self, files: GgufFiles, max_batch: int, log=print, kv_tokens: int = ServerConfig.chat_kv_tokens):
        import llama_cpp

        self.llama, self.files, self.max_batch, self.log, self.kv_tokens = llama_cpp, files, max_batch, log, kv_tokens
        self._bases: dict[str, LoadedBase] = {}
        self._threads = 1
        self._lock = threading.Lock()
        llama_cpp.llama_backend_init()

    check = staticmethod(check)

    def context_cells(self, base_path: str, adapter: Path | None) -> int:
        """The KV cells a chat must fit in (api/context.fit): the pool, at most the model's context."""
        return self.kv_tokens

    def target(self, base_path: str, adapter: Path | None) -> LlamaTarget:
        with self._lock:
            base = self._base(base_path)
            if adapter is not None and str(adapter) not in base.adapters:
                path = self.files.adapter(Path(adapter), base_path)
                lora = self.llama.llama_adapter_lora_init(base.model, str(path).encode())
                if not lora:
                    raise RuntimeError(f"llama.cpp could not load the adapter {path}")
                base.adapters[str(adapter)] = lora
            return LlamaTarget(base.tokenizer, None if adapter is None else str(adapter), ("llama.cpp", base_path))

    def release(self, target: LlamaTarget) -> None:
        """Adapters stay loaded: a few MB each, and loading one again costs a file read."""

    def stop_ids(self, target: LlamaTarget) -> set[int]:
        return self._bases[target.key[1]].eos

    def use_threads(self, n: int) -> None:
        self._threads = n
        threads.apply(1)

    def loaded(self, key: tuple) -> LoadedBase:
        base = self._bases[key[1]]
        if base.threads != self._threads:
            self.llama.llama_set_n_threads(base.context, self._threads, self._threads)
            base.threads = self._threads
        return base

    def set_adapter(self, base: LoadedBase, adapter: str | None) -> None:
        if base.active == adapter:
            return
        llama = self.llama
        if adapter is None:
            done = llama.llama_set_adapters_lora(base.context, None, 0, None)
        else:
            done = llama.llama_set_adapters_lora(base.context, (llama.llama_adapter_lora_p_ctypes * 1)(base.adapters[adapter]), 1,
                                                 (ctypes.c_float * 1)(1.0))
        if done != 0:
            raise RuntimeError(f"llama.cpp could not set the adapter {adapter}")
        base.active = adapter

    def _base(self, base_path: str) -> LoadedBase:
        if base_path in self._bases:
            return self._bases[base_path]
        from transformers import GenerationConfig

        from tunejob.train.models import load_tokenizer

        llama, path = self.llama, self.files.base(base_path)
        model = llama.llama_model_load_from_file(str(path).encode(), llama.llama_model_default_params())
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = llama.llama_context_default_params()
        params.n_ctx = params.n_batch = cells = min(llama.llama_model_n_ctx_train(model), self.kv_tokens)
        slots = max(0, min(CACHED_CHATS, llama.llama_max_parallel_sequences() - self.max_batch))
        params.n_seq_max, params.kv_unified, params.no_perf = self.max_batch + slots, True, True
        params.n_threads = params.n_threads_batch = self._threads
        if self.files.kind == "f32":  # f32 is the reference: an f32 KV cache and no flash attention (f16 inside) keep
            params.type_k = params.type_v = F32  # llama.cpp's logits within 1e-5 of torch's on the tiny test model (8e-3 without)
            params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        context = llama.llama_init_from_model(model, params)
        if not context:
            raise RuntimeError(f"llama.cpp could not make a context of {cells} tokens for {path}")
        tokenizer = load_tokenizer(base_path)
        try:
            generation = GenerationConfig.from_pretrained(base_path)
        except OSError:  # no generation_config.json: the tokenizer's and the template's stops
            generation = None
        memory = llama.llama_get_memory(context)
        self._bases[base_path] = LoadedBase(
            model, context, memory, llama.llama_batch_init(cells, 0, 1), cells,
            llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model)), tokenizer,
            stop_token_ids(tokenizer, SimpleNamespace(generation_config=generation)),
            PromptCache(llama, memory, self.max_batch, slots, cells // 4), threads=self._threads)
        self.log(f"chat: {base_path} runs in llama.cpp from {path} ({cells} KV cells, up to {self.max_batch} rows a step)")
        return self._bases[base_path]


def _need(rows: list[Row]) -> int:
    """KV cells `rows` may fill: each row's prompt and max_tokens."""
    return sum(len(r.prompt) + r.request.max_tokens for r in rows)


class LlamaBatch:
    """A running batch on one base's llama.cpp context (engine/batch.Batch's interface): each row a
    sequence of its own, joined by a prefill, one token per row per step, its cells freed as it leaves."""

    def __init__(self, weights: LlamaWeights, key: tuple, limit: int):
        self.weights, self.key = weights, key
        self.base = weights.loaded(key)
        self.limit = min(limit, weights.max_batch)
        self.rows: list[Row] = []
        self._seq: dict[int, int] = {}  # id(row) -> its sequence in the context

    def room(self) -> int:
        return self.limit - len(self.rows)

    def admits(self, rows: list[Row]) -> bool:
        """Whether `rows` can join with every row's prompt + max_tokens still in the KV cells (cached
        prompts give theirs up); a row alone always joins (the server's context check already bounds
        it by the model's context)."""
        return _need(self.rows + rows) <= self.base.cells or not (self.rows or rows[:-1])

    def join(self, rows: list[Row]) -> None:
        """Prefill `rows` (each its own sequence, from the longest cached prefix of its prompt on) and
        add them: each gets its first token."""
        self.base = self.weights.loaded(self.key)
        free = sorted(set(range(self.limit)) - set(self._seq.values()))
        for row, seq in zip(rows, free):
            self._seq[id(row)] = seq
            row.cached = self.base.cache.reuse(row.target.adapter, row.prompt, seq)
        self.base.cache.make_room(self.base.cells - _need(self.rows + rows))
        try:
            self._decode(rows, lambda row: [(t, i) for i, t in enumerate(row.prompt[row.cached:], row.cached)])
        except BaseException:
            self._forget(rows)
            raise
        self.rows += rows

    def step(self) -> None:
        """One token for every row (rows that finished were dropped by `finished()`)."""
        self.base = self.weights.loaded(self.key)
        self._decode(self.rows, lambda row: [(row.tokens[-1], len(row.prompt) + len(row.tokens) - 1)])

    def finished(self) -> list[Row]:
        """Drop and return the rows that are done, freeing their cells."""
        done = [r for r in self.rows if r.finish]
        if done:
            self.rows = [r for r in self.rows if not r.finish]
            for row in done:  # its cells hold the prompt and every answer token but the last, never decoded
                if row.finish != "error":  # a failed step may have left its cells half written
                    self.base.cache.keep(row.target.adapter, row.prompt + row.tokens[:-1], self._seq[id(row)])
            self._forget(done)
        return done

    def _forget(self, rows: list[Row]) -> None:
        for row in rows:
            seq = self._seq.pop(id(row), None)
            if seq is not None:
                self.weights.llama.llama_memory_seq_rm(self.base.memory, seq, -1, -1)

    def _decode(self, rows: list[Row], tokens) -> None:
        """One llama_decode per adapter among `rows`, feeding each row its (token, position) pairs;
        the logits at each row's last one pick its next token."""
        by_adapter: dict[str | None, list[Row]] = {}
        for row in rows:
            by_adapter.setdefault(row.target.adapter, []).append(row)
        base, llama = self.base, self.weights.llama
        for adapter, group in by_adapter.items():
            self.weights.set_adapter(base, adapter)
            batch, n, last = base.batch, 0, []
            for row in group:
                for token, pos in tokens(row):
                    batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = token, pos, 1, 0
                    batch.seq_id[n][0] = self._seq[id(row)]
                    n += 1
                batch.logits[n - 1] = 1
                last.append(n - 1)
            batch.n_tokens = n
            code = llama.llama_decode(base.context, batch)
            if code != 0:
                raise RuntimeError(f"llama.cpp's decode failed (code {code}) on {n} tokens of {len(group)} rows")
            for row, i in zip(group, last):
                # a view of llama.cpp's buffer, read before the next decode overwrites it
                logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(base.context, i), shape=(base.vocab,))
                row.add(int(logits.argmax()) if row.decoding.plain_greedy else row.decoding.pick(torch.from_numpy(logits)))
