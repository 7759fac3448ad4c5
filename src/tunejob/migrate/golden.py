"""The golden set: the source model's own answers, recorded once, kept whatever happens.

    log = GoldenLog(folder / "golden.jsonl")
    stats = record_answers(client, "ft:gpt-4o-mini-2024-07-18:acme::AbC123", items, log, concurrency=4)

After the shutdown these answers cannot be asked again, and each one was paid for, so:
- every answer is appended as one write of one line, then fsync'd: a kill loses at most the line
  being written, and `GoldenLog` cuts such a torn tail on open;
- a prompt already in the log is never sent again (ids are hashes of what is sent), so a killed
  `record` continues where it stopped;
- a 429 pauses every worker for as long as the server asks (`retry-after-ms` / `Retry-After`);
  `insufficient_quota` stops the run (waiting does not help), as does a 404 for the model (shut
  down, or not this key's): one line says which, and every answer so far stays saved;
- a 4xx about one prompt (too long, say) is recorded as that prompt's error and not sent again;
  5xx and connection errors are retried with backoff, then left for the next `record`.
Concurrency is bounded by a thread pool; the SDK's own retries are off for these calls, so the
count of requests sent is exact.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tunejob.backends.openai_api import retry_after


class GoldenLog:
    """golden.jsonl, append-only; `entries` maps prompt id to its recorded line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line: the write in flight when the process was killed
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        for line in data[:end].splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "id" in entry:
                self.entries.setdefault(entry["id"], entry)

    def append(self, entry: dict) -> bool:
        """Write one entry durably; False (nothing written) if its prompt is already recorded."""
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if entry["id"] in self.entries:
                return False
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            self.entries[entry["id"]] = entry
            return True

    def answers(self) -> list[dict]:
        return [e for e in self.entries.values() if "answer" in e]


class _Gate:
    """Shared pause: a 429 on one worker holds back every worker until the server's time passes."""

    def __init__(self):
        self._until = 0.0
        self._lock = threading.Lock()

    def defer(self, seconds: float) -> None:
        with self._lock:
            self._until = max(self._until, time.monotonic() + seconds)

    def wait(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._lock:
                delay = self._until - time.monotonic()
            if delay <= 0:
                return
            stop.wait(min(delay, 1.0))


def ask(client, model: str, item: dict, max_tokens: int, seed: int) -> dict:
    """One temperature-0 answer to one prompt, as the golden line to record."""
    kwargs = {"model": model, "messages": item["messages"], "temperature": 0, "max_completion_tokens": max_tokens, "seed": seed}
    for key in ("tools", "functions", "parallel_tool_calls"):
        if item.get(key) is not None:
            kwargs[key] = item[key]
    started = time.perf_counter()
    reply = client.chat.completions.create(**kwargs)
    latency = time.perf_counter() - started
    choice = reply.choices[0]
    calls = [c.model_dump(exclude_none=True) for c in (choice.message.tool_calls or [])]
    return {**item, "model": model, "answer": {"content": choice.message.content, "tool_calls": calls or None,
                                               "refusal": getattr(choice.message, "refusal", None)},
            "finish_reason": choice.finish_reason, "usage": reply.usage.model_dump(exclude_none=True) if reply.usage else None,
            "latency_s": round(latency, 4), "system_fingerprint": reply.system_fingerprint, "recorded_at": int(time.time())}


@dataclass
class Recording:
    """What one `record_answers` did: requests sent, answers kept, waits, and why it stopped early."""

    requests: int = 0
    answered: int = 0
    errors: int = 0
    already: int = 0
    unanswered: int = 0
    rate_limited: int = 0
    seconds: float = 0.0
    stopped: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("requests", "answered", "errors", "already", "unanswered", "rate_limited", "stopped")}
        out["seconds"] = round(self.seconds, 3)
        out["requests_per_second"] = round(self.requests / self.seconds, 3) if self.seconds > 0 else None
        return out


class _Recorder:
    def __init__(self, client, model: str, log: GoldenLog, max_tokens: int, seed: int, max_attempts: int):
        self.client = client.with_options(max_retries=0)
        self.model, self.log, self.max_tokens, self.seed, self.max_attempts = model, log, max_tokens, seed, max_attempts
        self.gate, self.stop, self.stats = _Gate(), threading.Event(), Recording()

    def halt(self, why: str) -> None:
        with self.stats.lock:
            self.stats.stopped = self.stats.stopped or why
        self.stop.set()

    def answer(self, item: dict) -> None:
        import openai

        for attempt in range(self.max_attempts):
            self.gate.wait(self.stop)
            if self.stop.is_set():
                return self.stats.count("unanswered")
            self.stats.count("requests")
            try:
                entry = ask(self.client, self.model, item, self.max_tokens, self.seed)
            except openai.RateLimitError as exc:
                if exc.code == "insufficient_quota":
                    return self.halt(f"429 insufficient_quota: {exc.message}; add credit, then run record again (it resumes)")
                self.stats.count("rate_limited")
                self.gate.defer(retry_after(exc) or min(2.0 ** attempt, 30.0))
                continue
            except openai.NotFoundError as exc:
                return self.halt(f"{self.model} answers 404 ({exc.code or 'not found'}): shut down, deleted, or not this key's; "
                                 "the answers recorded before it are kept")
            except (openai.APIConnectionError, openai.InternalServerError) as exc:
                self.stop.wait(min(2.0 ** attempt, 30.0))
                continue
            except openai.APIStatusError as exc:
                if exc.status_code in (408, 409):
                    self.stop.wait(min(2.0 ** attempt, 30.0))
                    continue
                if exc.status_code in (401, 403):
                    return self.halt(f"{exc.status_code} from the API: {exc.message}; check the key")
                self.log.append({**item, "model": self.model, "error": {"status": exc.status_code, "code": exc.code, "message": exc.message}})
                return self.stats.count("errors")
            self.stats.count("answered" if self.log.append(entry) else "already")
            return None
        self.stats.count("unanswered")


def record_answers(client, model: str, items: list[dict], log: GoldenLog, concurrency: int = 4, max_tokens: int = 1024,
                   seed: int = 0, max_attempts: int = 8, say=lambda msg: None) -> dict:
    """Ask every prompt not yet in the log, at most `concurrency` at a time; returns the counts."""
    todo = [item for item in items if item["id"] not in log.entries]
    recorder = _Recorder(client, model, log, max_tokens, seed, max_attempts)
    recorder.stats.already = len(items) - len(todo)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="golden") as pool:
        for done, _ in enumerate(pool.map(recorder.answer, todo), 1):
            if done % 25 == 0:
                say(f"golden set: {done}/{len(todo)} asked")
    recorder.stats.seconds = time.perf_counter() - started
    return recorder.stats.to_dict()
