"""From token pieces to the text a reply publishes: whole UTF-8 characters only, cut at the first
stop string. Pure Python, on the per-token path."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextAssembler:
    """Turns token pieces into text that never splits a UTF-8 character.

    Bytes of a character split across tokens wait until the character is complete; bytes that can
    never form a character (a model may emit them) are dropped, as llama-cpp-python does.
    """

    __slots__ = ("_decode",)

    def __init__(self) -> None:
        self._decode = codecs.getincrementaldecoder("utf-8")("ignore").decode

    def push(self, piece: bytes) -> str:
        return self._decode(piece)

    def flush(self) -> str:
        return self._decode(b"", True)


class StopStrings:
    """Cuts a reply at the first stop string, holding back only text that could still become one.

    The reply ends where a stop string is first complete (of two completed by the same text, the
    longer); the text before it is the reply, the stop string and anything after are never
    published.
    """

    __slots__ = ("_held", "_stops", "hit")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""  # the longest tail of the text so far that begins some stop string
        self.hit = False  # a stop string was found: nothing more comes

    def push(self, text: str) -> str:
        """The text that can be published now."""
        if self.hit:
            return ""
        pending = self._held + text
        cut = end = -1
        for stop in self._stops:
            # The held tail contains no whole stop string, so any match ends in `text`.
            i = pending.find(stop)
            if i >= 0 and (end < 0 or i + len(stop) < end or (i + len(stop) == end and i < cut)):
                cut, end = i, i + len(stop)
        if cut >= 0:
            self.hit = True
            self._held = ""
            return pending[:cut]
        keep = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(pending)), keep, -1):
                if pending.endswith(stop[:n]):
                    keep = n
                    break
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def flush(self, text: str = "") -> str:
        """The last text of a reply that ends for another reason: the held tail is no stop."""
        out = self.push(text) + self._held
        self._held = ""
        return out
