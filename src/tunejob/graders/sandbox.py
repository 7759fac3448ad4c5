"""Running python graders: their `grade(sample, item)` in a separate process, never in ours.

One worker process serves a whole batch (a training step grades 16-64 samples; starting Python
and the grader's imports once, not per sample, is ~50 ms instead of seconds). Each sample has a
wall-time limit; a worker still busy past it is killed (with any process it started), that
sample scores 0 with an error, and a fresh worker grades the rest. Each worker:
- is `python -I` (no PYTHONPATH, no user site-packages) running sandbox_worker.py, which caps its
  memory (RLIMIT_AS) and cuts the socket module before the grader's code runs;
- starts in a scratch directory made for the batch and removed after it;
- gets an environment built from nothing but PATH and locale, so OPENAI_API_KEY, cloud
  credentials and tunejob's own keys are not there to read;
- is the leader of its own process group, so killing the group ends what the grader spawned.
This is best-effort isolation for graders you wrote or trust, not a jail (see sandbox_worker.py).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("sandbox_worker.py")


@dataclass
class Outcome:
    score: float | None  # None: no score (see error)
    error: str | None = None  # the grader's failure, one line (the exception's last line)
    timed_out: bool = False
    server_error: str | None = None  # the worker itself could not run (not the grader's fault)


class _Died(Exception):
    pass


def clean_env(scratch: str) -> dict[str, str]:
    """The worker's whole environment. OpenAI's graders get 2 CPU cores: numpy's BLAS threads are
    held to that (each thread also reserves address space that RLIMIT_AS counts)."""
    return {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch,
            "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONDONTWRITEBYTECODE": "1"}


class _Worker:
    def __init__(self, scratch: str):
        # stderr (the grader's prints, and what a dying interpreter or library says last) goes to an
        # unnamed file outside the scratch dir: its last line explains a worker that died
        self.log = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self.log, cwd=scratch, env=clean_env(scratch), start_new_session=True)
        except OSError:
            self.log.close()
            raise
        self._buffer = b""

    def send(self, message: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise _Died() from None

    def receive(self, timeout_s: float) -> dict | None:
        """The next reply, None past the deadline; _Died when the worker has exited."""
        deadline, fd = time.monotonic() + timeout_s, self.proc.stdout.fileno()
        poller = select.poll()  # not select.select: a busy server can hold fds past select's 1024
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if poller.poll(left * 1000):
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise _Died()
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def ended(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # it closed its output but lives on: treat as dead
            self.stop()
            code = self.proc.returncode
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        said = self.last_words()
        return f"the grader's process ended ({why}) before answering" + (f": {said}" if said else "; did it exhaust its memory or call os._exit?")

    def last_words(self) -> str:
        self.log.seek(max(0, self.log.seek(0, os.SEEK_END) - 4096))
        lines = [line.strip() for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]
        return lines[-1][:200] if lines else ""

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and whatever the grader started
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.log):
            try:
                pipe.close()
            except OSError:
                pass


def run_python(source: str, pairs: list[tuple[dict, dict]], timeout_s: float, memory_mb: int) -> list[Outcome]:
    """grade(sample, item) for each (sample, item), in order, in as few workers as the timeouts allow."""
    outcomes: list[Outcome] = []
    scratch = tempfile.mkdtemp(prefix="tunejob-grader-")
    try:
        while len(outcomes) < len(pairs):
            outcomes += _run_worker(source, pairs[len(outcomes):], scratch, timeout_s, memory_mb)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return outcomes


def _run_worker(source, pairs, scratch, timeout_s, memory_mb) -> list[Outcome]:
    """Outcomes from one worker: all of `pairs`, or up to the first sample that hung or killed it."""
    try:
        worker = _Worker(scratch)
    except OSError as exc:
        return [Outcome(None, server_error=f"cannot start {sys.executable}: {exc}")] * len(pairs)
    try:
        try:
            worker.send({"source": source, "memory_mb": memory_mb})
            ready = worker.receive(timeout_s)
        except _Died:
            return [Outcome(None, worker.ended())] * len(pairs)
        if ready is None or "error" in ready:  # the module itself fails or hangs: so would every sample
            why = ready["error"] if ready else f"loading the grader took more than {timeout_s:g} s"
            return [Outcome(None, why, timed_out=ready is None)] * len(pairs)
        outcomes = []
        for sample, item in pairs:
            try:
                worker.send({"sample": sample, "item": item})
                reply = worker.receive(timeout_s)
            except _Died:
                return outcomes + [Outcome(None, worker.ended())]
            if reply is None:
                return outcomes + [Outcome(None, f"grade took more than {timeout_s:g} s; it was stopped", timed_out=True)]
            outcomes.append(Outcome(reply.get("score"), reply.get("error")))
        return outcomes
    finally:
        worker.stop()
