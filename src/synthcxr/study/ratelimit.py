"""A small in-process limiter for failed token attempts (admin sign-in, invite links).

Tokens are 256-bit random values, so guessing is hopeless anyway; the limiter slows a scanner down
and makes such traffic visible as HTTP 429. It counts only *failures* in a sliding window, under
any keys the caller chooses (the app uses the client address and the token tried). A correct token
is never refused: the app checks it before consulting the limiter, so people sharing one address
(a hospital) cannot lock each other out. State lives in memory: one server process, reset on
restart, which is all a reader study needs.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable


class AttemptLimiter:
    """At most `max_failures` failures per `window_s` seconds per key; `max_failures=0` disables it."""

    def __init__(self, max_failures: int, window_s: float, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, key: str) -> int | None:
        """Seconds until `key` may try again, or None when it is not blocked."""
        if self.max_failures <= 0:
            return None
        with self._lock:
            now = self._clock()
            times = self._recent(key, now)
            if times is None or len(times) < self.max_failures:
                return None
            # blocked until enough failures have aged out of the window
            oldest_needed = times[len(times) - self.max_failures]
            return max(1, math.ceil(oldest_needed + self.window_s - now))

    def failed(self, key: str) -> None:
        """Record one failed attempt by `key`."""
        if self.max_failures <= 0:
            return
        with self._lock:
            now = self._clock()
            if key not in self._failures and len(self._failures) >= self._max_keys:
                for old in list(self._failures):  # bound memory under a flood of addresses
                    self._recent(old, now)
                if len(self._failures) >= self._max_keys:
                    self._failures.pop(next(iter(self._failures)))
            times = self._failures.setdefault(key, deque())
            times.append(now)
            while len(times) > self.max_failures:  # older ones cannot matter any more
                times.popleft()
