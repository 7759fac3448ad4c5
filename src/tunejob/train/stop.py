"""Stopping a run on request, after the optimizer step in flight and with a checkpoint of it.

SIGTERM (serve's pause and cancel, a scheduler's preemption) asks the loop to stop; so does
`request_stop()`, for a process whose main thread is not the training loop's: a Ray Train worker
runs the loop in a thread of its actor, where no signal handler can be installed, and its driver
asks through the run directory instead (train/ray_train.py).
"""

from __future__ import annotations

import signal
import threading

from tunejob.train import distributed

_asked = threading.Event()  # request_stop(): the whole process


def request_stop() -> None:
    _asked.set()


def clear_request() -> None:
    _asked.clear()


class StopRequest:
    """Stopping at once lost up to save_steps - 1 steps (the default model's step is ~20-45 s on
    2 cores); stopping after the step in flight, with its checkpoint, loses none on resume."""

    def __init__(self):
        self._signalled, self._previous = False, None

    @property
    def requested(self) -> bool:
        return self._signalled or _asked.is_set()

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self._signalled = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self, world: distributed.World) -> bool:
        """Whether any rank was asked to stop: every rank must stop after the same step."""
        return distributed.sum_(world, [float(self.requested)])[0] > 0 if world.distributed else self.requested
