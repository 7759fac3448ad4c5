"""The failed-key throttle: wrong API keys per client address in a sliding window, shared by the
dashboard's login form and the `/v1` key check, so a guesser gets 5 tries a minute in all, not 5 on
each door. A 16-character key from 62 symbols has ~4.8e28 values: at 5 a minute, guessing one
takes longer than the universe has existed.

Every failure is kept as a timestamp, only for as long as the window: one address holds at most
`limit` of them, and addresses whose failures have all expired are forgotten at the next sweep.
"""

from __future__ import annotations

import math
import threading
import time

FAILURES, WINDOW_S = 5, 60
SWEEP_EVERY = 1024  # failures between sweeps of expired addresses: a scan of many IPs stays bounded


class Throttle:
    """Failed attempts per client address; `retry_after` says how long a blocked one waits."""

    def __init__(self, limit: int = FAILURES, window_s: float = WINDOW_S):
        self.limit, self.window_s = limit, window_s
        self._fails: dict[str, list[float]] = {}
        self._lock = threading.Lock()  # the /v1 check runs on the thread pool, the login on the event loop
        self._since_sweep = 0

    def retry_after(self, who: str) -> int | None:
        """Seconds until `who` may try again (its oldest recent failure leaves the window), or None
        if it is not blocked."""
        now = time.time()
        with self._lock:
            recent = [t for t in self._fails.get(who, ()) if t > now - self.window_s]
            if recent:
                self._fails[who] = recent
            else:
                self._fails.pop(who, None)
            if len(recent) < self.limit:
                return None
            return max(1, math.ceil(recent[-self.limit] + self.window_s - now))

    def blocked(self, who: str) -> bool:
        return self.retry_after(who) is not None

    def fail(self, who: str) -> None:
        now = time.time()
        with self._lock:
            recent = [t for t in self._fails.get(who, ()) if t > now - self.window_s]
            self._fails[who] = recent[max(0, len(recent) - self.limit + 1):] + [now]  # the last `limit` are all that count
            self._since_sweep += 1
            if self._since_sweep >= SWEEP_EVERY:
                self._since_sweep = 0
                self._fails = {k: v for k, v in self._fails.items() if v[-1] > now - self.window_s}
