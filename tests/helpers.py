"""Helpers the tests share, written once: a clock moved by hand. (The real-parts harness, a
broker, a daemon and a probe device, is devtools/harness.py; fixtures are in conftest.py.)"""

from __future__ import annotations


class Clock:
    """A clock a test moves by hand: call it (a `time.monotonic` passed in) or use it as a
    stand-in for the `time` module (`monotonic()`)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now
