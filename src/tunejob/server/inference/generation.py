"""The chat engine: every model load and forward pass of `tunejob serve` on one worker thread, fed
by a bounded queue, so the event loop only ever awaits.

Why one thread: two forward passes at once on 2 cores each run at less than half speed (and
oversubscribe the cores with the training child); instead, requests that are in at the same time
share forward passes (batch.py: rows join at any step and leave the step they finish, up to
`max_batch` rows per model). Why bounded: past `max_pending` requests (waiting + generating), a
client gets HTTP 429 with Retry-After at once rather than a reply minutes later. Measured before
this engine: one 128-token chat (22 s) held every other call of 8 clients for a p50 of 21.6 s,
because generation ran on the event loop.

Threads: while a training child runs, generation keeps to chat's share of the cores
(train/threads.py: 1 of 2); with no training it uses them all.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tunejob.errors import TunejobError
from tunejob.engine.batch import Batch, Row
from tunejob.engine.chat import ChatRequest, ChatResult, openai_logprobs, prompt_inputs, to_result
from tunejob.engine.text import TextStream
from tunejob.server import config
from tunejob.server.inference.weights import Weights
from tunejob.train import threads

MAX_PENDING, MAX_BATCH = config.CHAT_QUEUE, config.CHAT_BATCH  # the server's defaults (config.py)


class Busy(Exception):
    """The queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int, pending: int):
        super().__init__(f"{pending} chat requests are already waiting or generating")
        self.retry_after, self.pending = retry_after, pending


@dataclass
class Piece:
    """Streamed text of one choice, with the logprobs of the tokens it completes (when asked)."""

    index: int
    text: str
    logprobs: list[dict] | None = None


@dataclass
class Generation:
    """One request's life on the engine (its n choices, each a row of its own); its events arrive
    on the caller's event loop."""

    base_path: str
    adapter: Path | None
    request: ChatRequest
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.time)
    failed: bool = False  # an error was sent: no choice is answered after it
    rows_left: int = 0  # choices still on the engine

    def __post_init__(self) -> None:
        self.streams = [TextStream(self.request.stop) for _ in range(self.request.n)]
        self.logprobs_sent = [0] * self.request.n

    def cancel(self) -> None:
        self.cancel_flag.set()

    def fail(self, exc: Exception) -> None:
        """Answer the request with `exc` (once), and stop its other choices within a token."""
        if not self.failed:
            self.failed = True
            self._emit("error", exc)
        self.cancel()

    def new_text(self, tokenizer, tokens: list[int], final: bool, index: int = 0) -> str:
        """The streamed text that choice `index`'s `tokens` add to what was sent (text.TextStream)."""
        return self.streams[index].new_text(tokenizer, tokens, final)

    def piece(self, row: Row, index: int, result: ChatResult | None = None) -> Piece | None:
        """What a stream sends for a row now; `result` once it finished, whose logprobs the stream's
        add up to (the ones not sent yet go with the last piece)."""
        tokenizer, stream = row.target.tokenizer, self.streams[index]
        delta = stream.new_text(tokenizer, row.tokens, final=result is not None)
        entries = None
        if self.request.logprobs is not None:
            sent = self.logprobs_sent[index]
            entries = result.logprobs[sent:] if result else openai_logprobs(tokenizer, row.decoding.logprobs[sent:stream.clear])
            self.logprobs_sent[index] += len(entries)
        return Piece(index, delta, entries) if delta or entries else None

    def _emit(self, kind: str, value: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            self.cancel_flag.set()

    async def next_event(self, timeout: float) -> tuple[str, object] | None:
        """("text", Piece), ("done", ChatResult) once per choice, or ("error", exception); None after
        `timeout` s."""
        try:
            return await asyncio.wait_for(self.events.get(), timeout)
        except asyncio.TimeoutError:
            return None


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs models (ServerConfig's chat_* settings)."""

    max_batch: int = MAX_BATCH
    dtype: str = config.CHAT_DTYPE  # "auto": bf16 where training's probe (train/precision.py) says the device is fast in it; or float32, bfloat16
    merged_copies: int = config.ServerConfig.chat_merged_copies  # merged copies of adapters chatted with repeatedly, in copies of the base (weights.py); 0: never merge
    merge_mb: int | None = None  # an optional memory cap on them as well; 0: never merge
    merge_after: int = 2  # an adapter's request number from which it runs merged
    compile: bool = False  # torch.compile the forward of models without unmerged adapters (weights.py)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "auto"):
            raise TunejobError(f"chat_dtype {self.dtype!r}: use auto (the default), float32 or bfloat16 (--chat-dtype)")

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            from tunejob.train.precision import resolve

            return torch.bfloat16 if resolve("auto", "cuda" if torch.cuda.is_available() else "cpu") == "bf16" else torch.float32
        return getattr(torch, self.dtype)


def torch_weights(options: EngineOptions, log=print) -> Weights:
    """The local engine's weights (weights.py), as the options say."""
    if options.dtype == "auto":
        log(f"chat: torch weights in {options.torch_dtype()} (--chat-dtype auto)")
    return Weights(options.torch_dtype(), merged_copies=options.merged_copies, merge_after=options.merge_after, log=log,
                   compile=options.compile, merge_bytes=None if options.merge_mb is None else options.merge_mb * 2**20)


class Engine:
    """`weights` and `batch` are where forward passes run: torch by default (weights.py, engine/batch.py),
    or llama.cpp (llama.py's LlamaWeights and LlamaBatch, the same interfaces)."""

    def __init__(self, budget: threads.Budget, training: Callable[[], bool] = lambda: False,
                 max_pending: int = MAX_PENDING, log=print, options: EngineOptions = EngineOptions(), weights=None, batch=Batch):
        self.budget, self.training, self.max_pending, self.log, self.options = budget, training, max_pending, log, options
        self.weights, self.batch_type = weights if weights is not None else torch_weights(options, log), batch
        self._queue: queue.Queue[Generation | None] = queue.Queue()
        self._pending = 0  # queued + generating
        self._lock = threading.Lock()
        self._seconds = 5.0  # running mean of a generation's time, for Retry-After
        self._thread: threading.Thread | None = None
        self._gens: dict[int, Generation] = {}  # submitted and not yet done, by id
        self.closing: Exception | None = None  # set by shutdown(): every later request gets it

    def shutdown(self, error: Exception) -> int:
        """Answer every generation in flight with `error` now, and refuse new ones: a server told
        to stop must not wait for a long generation (one forward pass can run for a minute) that
        nobody will read. Safe from a signal handler; returns how many were answered."""
        with self._lock:
            self.closing = error
            gens = list(self._gens.values())
        for gen in gens:
            gen.cancel()
            gen._emit("error", error)
        return len(gens)

    def submit(self, gen: Generation) -> None:
        """Queue `gen`, or raise Busy when max_pending requests are already in."""
        with self._lock:
            if self.closing is not None:
                raise self.closing
            if self._pending >= self.max_pending:
                wait = self._seconds * math.ceil(self._pending / self.options.max_batch)
                raise Busy(max(1, math.ceil(wait)), self._pending)
            self._pending += 1
            self._gens[id(gen)] = gen
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tunejob-chat", daemon=True)
                self._thread.start()
        self._queue.put(gen)

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        # Below the server's HTTP threads: a decoding step is tens of ms of one core, a list call
        # under one, so API calls go first and generation takes the rest (issue 31, finding 12).
        threads.yield_to_training(threads.SERVER_NICE + 5)
        batches: dict[tuple, Batch] = {}
        waiting: deque[Row] = deque()
        while self._take(block=not batches and not waiting, waiting=waiting):
            try:
                self.weights.use_threads(self.budget.chat if self.training() else self.budget.chat_alone)
                self._join(batches, waiting)
                for key, batch in list(batches.items()):
                    if batch.rows:
                        self._guarded(batch.rows, batch.step)
                        self._progress(batch, batch.finished())
                    if not batch.rows:
                        del batches[key]
            except Exception as exc:  # a bug past the per-batch guard: fail what runs, keep the thread serving
                for batch in batches.values():
                    self._fail(batch.rows, exc)
                    for row in batch.rows:
                        self._leave(row)
                batches.clear()

    def _take(self, block: bool, waiting: deque) -> bool:
        """Move queued requests to `waiting` as rows (waiting for one if `block`); False to stop."""
        while True:
            try:
                gen = self._queue.get(block=block)
            except queue.Empty:
                return True
            block = False
            if gen is None:
                return False
            if gen.cancel_flag.is_set():  # a client that left while queued costs nothing
                self.log("chat: the client went away before its generation started")
                self._done(gen)
                continue
            try:
                waiting.extend(self._rows(gen))
            except Exception as exc:  # the request's error (a model that will not load, a bad prompt): keep serving
                gen._emit("error", exc)
                self._done(gen)

    def _rows(self, gen: Generation) -> list[Row]:
        """The request's n choices as rows on one target (released once, by the last to leave)."""
        target = self.weights.target(gen.base_path, gen.adapter)
        try:
            prompt = prompt_inputs(target.tokenizer, gen.request, "cpu")["input_ids"][0].tolist()
            eos = self.weights.stop_ids(target)
            rows = [Row(prompt, gen.request.choice(i), target, eos, gen.cancel_flag.is_set, owner=(gen, i)) for i in range(gen.request.n)]
        except Exception:
            self.weights.release(target)
            raise
        gen.rows_left = len(rows)
        return rows

    def _join(self, batches: dict[tuple, Batch], waiting: deque) -> None:
        """Waiting rows into their model's batch, oldest first, while it has room."""
        joining: dict[tuple, list[Row]] = {}
        for row in list(waiting):
            key = row.target.key
            batch = batches.get(key) or batches.setdefault(key, self.batch_type(self.weights, key, self.options.max_batch))
            if len(joining.get(key, [])) < batch.room() and batch.admits(joining.get(key, []) + [row]):
                joining.setdefault(key, []).append(row)
                waiting.remove(row)
        for key, rows in joining.items():
            batch = batches[key]
            self._guarded(rows, lambda: batch.join(rows))
            self._progress(batch, batch.finished() + [r for r in rows if r.finish == "error"])

    def _guarded(self, rows: list[Row], work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:  # the batch's error, not the engine's: its rows fail, the rest go on
            self._fail(rows, exc)

    def _fail(self, rows: list[Row], exc: Exception) -> None:
        for row in rows:
            row.finish = "error"
            row.owner[0].fail(exc)

    def _progress(self, batch: Batch, done: list[Row]) -> None:
        """Stream each row's new text; answer the rows that finished. Every finished row is
        answered (with its error if making the answer fails) and released: `done` rows have left
        the batch, so an error past this point would reach no one, and the client would wait
        forever while its queue slot leaked (issue 31, finding 5)."""
        for row in batch.rows:
            gen, index = row.owner
            if gen.stream and not gen.request.parses_calls and row.finish != "error":
                try:
                    piece = gen.piece(row, index)
                except Exception as exc:  # this row's error: it leaves the batch at the next step
                    self._fail([row], exc)
                    continue
                if piece:
                    gen._emit("text", piece)
        for row in done:
            gen = row.owner[0]
            try:
                if row.finish != "error" and not gen.failed:
                    self._answer(row)
            except Exception as exc:
                gen.fail(exc)
            finally:
                self._leave(row)

    def _answer(self, row: Row) -> None:
        gen, index = row.owner
        result = to_result(row.target.tokenizer, row.request, len(row.prompt), row.tokens, row.eos, row.finish == "cancelled",
                           row.decoding.logprobs if row.request.logprobs is not None else None)
        result.index, result.cached_tokens = index, row.cached
        if result.finish_reason == "cancelled":
            self.log(f"chat: the client went away; generation stopped after {result.completion_tokens} of "
                     f"{row.request.max_tokens} tokens")
        if gen.stream and not gen.request.parses_calls:  # the last text, and the logprobs not sent yet
            piece = gen.piece(row, index, result)
            if piece:
                gen._emit("text", piece)
        gen._emit("done", result)

    def _leave(self, row: Row) -> None:
        """A row left the engine: the last of its request's rows releases the model and the queue slot."""
        gen = row.owner[0]
        gen.rows_left -= 1
        if gen.rows_left <= 0:
            self.weights.release(row.target)
            self._done(gen)

    def _done(self, gen: Generation) -> None:
        with self._lock:
            self._gens.pop(id(gen), None)
            self._pending -= 1
            self._seconds = 0.8 * self._seconds + 0.2 * (time.time() - gen.started)
