"""The chat engine: every model load and generate() of `tunejob serve` on one worker thread, fed by
a bounded queue, so the event loop only ever awaits.

Why one thread: generate() is a chain of small forwards; two at once on 2 cores each run at less
than half speed (and oversubscribe the cores with the training child). Why bounded: past
`max_pending` requests (waiting + generating), a client gets HTTP 429 with Retry-After at once
rather than a reply minutes later; at 8 and ~5-20 s a generation on 2 cores that is 40-160 s of
queue. Measured before this engine: one 128-token chat (22 s) held every other call of 8 clients
for a p50 of 21.6 s, because generation ran on the event loop.

Threads: while a training child runs, generation keeps to chat's share of the cores
(train/threads.py: 1 of 2); with no training it uses them all.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tunejob.server.inference import ChatRequest, ChatResult, ModelCache, generate
from tunejob.train import threads

MAX_PENDING = 8


class Busy(Exception):
    """The queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int, pending: int):
        super().__init__(f"{pending} chat requests are already waiting or generating")
        self.retry_after, self.pending = retry_after, pending


@dataclass
class Generation:
    """One request's life on the engine; its events arrive on the caller's event loop."""

    base_path: str
    adapter: Path | None
    request: ChatRequest
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel_flag: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancel_flag.set()

    def _emit(self, kind: str, value: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            self.cancel_flag.set()

    async def next_event(self, timeout: float) -> tuple[str, object] | None:
        """("text", str), ("done", ChatResult) or ("error", exception); None after `timeout` s."""
        try:
            return await asyncio.wait_for(self.events.get(), timeout)
        except asyncio.TimeoutError:
            return None


class Engine:
    def __init__(self, budget: threads.Budget, training: Callable[[], bool] = lambda: False,
                 max_pending: int = MAX_PENDING, log=print):
        self.cache, self.budget, self.training, self.max_pending, self.log = ModelCache(), budget, training, max_pending, log
        self._queue: queue.Queue[Generation | None] = queue.Queue()
        self._pending = 0  # queued + generating
        self._lock = threading.Lock()
        self._seconds = 5.0  # running mean of a generation's time, for Retry-After
        self._thread: threading.Thread | None = None

    def submit(self, gen: Generation) -> None:
        """Queue `gen`, or raise Busy when max_pending requests are already in."""
        with self._lock:
            if self._pending >= self.max_pending:
                raise Busy(max(1, math.ceil(self._seconds * self._pending)), self._pending)
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tunejob-chat", daemon=True)
                self._thread.start()
        self._queue.put(gen)

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (gen := self._queue.get()) is not None:
            started = time.time()
            try:
                if not gen.cancel_flag.is_set():  # a client that left while queued costs nothing
                    gen._emit("done", self._generate(gen))
            except Exception as exc:  # the request's error, not the engine's: keep serving
                gen._emit("error", exc)
            finally:
                with self._lock:
                    self._pending -= 1
                    self._seconds = 0.8 * self._seconds + 0.2 * (time.time() - started)

    def _generate(self, gen: Generation) -> ChatResult:
        threads.apply(self.budget.chat if self.training() else self.budget.chat_alone)
        model, tokenizer = self.cache.get(gen.base_path, gen.adapter)
        on_text = (lambda text: gen._emit("text", text)) if gen.stream else None
        result = generate(model, tokenizer, gen.request, on_text=on_text, cancelled=gen.cancel_flag.is_set)
        if result.finish_reason == "cancelled":
            self.log(f"chat: the client went away; generation stopped after {result.completion_tokens} of "
                     f"{gen.request.max_tokens} tokens")
        return result
