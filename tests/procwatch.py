"""A sampler of every process's command line and environment, as any local user would read
them with ps: the tests run it while scripts handle passwords and look for them afterwards."""

from __future__ import annotations

import os
import threading
from types import TracebackType


class ProcessSampler:
    """Reads /proc/*/cmdline and /proc/*/environ continuously until stopped; keeps each distinct
    one. (environ is readable only by the process's user and root; the tests run as root and
    read every one, which is stricter than another user could.)"""

    def __init__(self, pause_s: float = 0.0) -> None:
        """`pause_s` between rounds: 0 catches every process that lives a few milliseconds;
        a little more spares the CPU during a long run (an install)."""
        self.pause_s = pause_s
        self.seen: set[bytes] = set()
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-sampler")

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or pid == me:
                    continue
                for name in ("cmdline", "environ"):
                    try:
                        with open(f"/proc/{pid}/{name}", "rb") as f:
                            self.seen.add(f.read())
                    except OSError:
                        continue
            self.rounds += 1
            if self.pause_s:
                self._stop.wait(self.pause_s)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def saw(self, text: str) -> bool:
        return any(text.encode() in item for item in self.seen)

    def leaks(self, *secrets: str) -> list[str]:
        """The secrets found in any command line or environment."""
        return [s for s in secrets if self.saw(s)]
