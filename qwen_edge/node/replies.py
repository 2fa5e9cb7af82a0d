"""One request's reply stream: start, chunks, then exactly one done or error, numbered by seq.

It numbers and sends; protocol.py builds every message (ChunkEncoder on the per-token path)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from ..protocol import (
    ChunkEncoder,
    DoneMessage,
    ErrorCode,
    ErrorMessage,
    FinishReason,
    StartMessage,
)

# publish(topic, payload, correlation_data); must be safe to call from any thread.
Publish = Callable[[str, bytes, bytes | None], None]


class StreamJournal(Protocol):
    """Told about a reply's first and last message before they go out (statestore)."""

    def opening(self) -> None:
        """The first message of a reply that will have more is about to be sent."""

    def closing(self, messages: list[bytes], code: ErrorCode | None) -> None:
        """The final message (the last of `messages`, every one sent in order) is about to be
        sent; `code` is the error's, None for done."""


class ReplyStream:
    """Numbers and sends the messages of one reply. After done/error it sends nothing more."""

    __slots__ = (
        "_chunk",
        "_clock",
        "_correlation",
        "_journal",
        "_last_chunk",
        "_on_end",
        "_pace",
        "_pending",
        "_publish",
        "ended",
        "request_id",
        "sent",
        "seq",
        "started",
        "topic",
    )

    def __init__(
        self,
        publish: Publish,
        topic: str,
        request_id: str | None,  # None: an error for a request whose id could not be read
        correlation: bytes | None = None,
        *,
        journal: StreamJournal | None = None,
        on_end: Callable[[], None] | None = None,  # called once, after done or error is sent
    ) -> None:
        self._publish = publish
        self._journal = journal
        self._on_end = on_end
        self.sent: list[bytes] = []  # every payload sent, kept only for a journal
        self.topic = topic
        self.request_id = request_id
        self._correlation = correlation
        self.seq = 0
        self.started = False
        self.ended = False
        self._chunk = ChunkEncoder(request_id)  # the per-token builder
        self._pace = 0.0  # seconds between chunks; 0: a chunk per piece of text
        self._pending: list[str] = []  # text joined into the next paced chunk
        self._last_chunk = float("-inf")
        self._clock = time.monotonic

    def pace(self, chunk_ms: int, clock: Callable[[], float] = time.monotonic) -> None:
        """Send at most one chunk per `chunk_ms` milliseconds, joining the text between; the
        rest goes out before done or error."""
        self._pace = chunk_ms / 1000
        self._clock = clock

    def _send(self, payload: bytes) -> None:
        if self._journal is not None:
            if self.seq == 0:
                self._journal.opening()
            self.sent.append(payload)
        self.seq += 1
        self._publish(self.topic, payload, self._correlation)

    def _send_final(self, payload: bytes, code: ErrorCode | None) -> None:
        self.ended = True
        if self._journal is not None:
            self.sent.append(payload)
            self._journal.closing(self.sent, code)
            self._journal = None
            self.sent = []
        self.seq += 1
        self._publish(self.topic, payload, self._correlation)

    def start(self, node: str, model: str) -> None:
        """The first message; a second call does nothing (a pooled reply starts on acceptance)."""
        if self.ended or self.started:
            return
        self.started = True
        self._send(
            StartMessage(request_id=self.request_id, seq=self.seq, node=node, model=model).encode()
        )

    def chunk(self, text: str) -> None:
        if self.ended:
            return
        if self._pace:
            text = self._paced(text)
            if not text:
                return
        self._send(self._chunk(self.seq, text))

    def done(
        self,
        finish_reason: FinishReason,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_ms: float | None,
        tokens_per_s: float | None,
        *,
        cached_tokens: int = 0,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> None:
        """`cached_tokens`: prompt tokens whose KV state was reused, not evaluated again;
        `tool_calls`: the calls of a reply that ended with them (finish_reason tool_calls)."""
        if self.ended:
            return
        self._flush()
        done = DoneMessage.of(
            self.request_id,
            self.seq,
            finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=cached_tokens,
            ttft_ms=ttft_ms,
            tokens_per_s=tokens_per_s,
            tool_calls=tool_calls,
        )
        self._send_final(done.encode(), None)
        self._ended()

    def error(
        self,
        code: ErrorCode,
        message: str,
        retry_after: float | None = None,
        size: int | None = None,
    ) -> None:
        """`retry_after`: seconds after which the same request would be accepted, if known;
        `size`: a too_large payload's bytes."""
        if self.ended:
            return
        self._flush()
        error = ErrorMessage(
            request_id=self.request_id,
            seq=self.seq,
            code=code.value,
            message=message,
            retry_after=retry_after,
            size=size,
        )
        self._send_final(error.encode(), code)
        self._ended()

    def _paced(self, text: str) -> str:
        """The text to send now: all pending text once `chunk_ms` has passed, else ""."""
        self._pending.append(text)
        now = self._clock()
        if now - self._last_chunk < self._pace:
            return ""
        self._last_chunk = now
        text = "".join(self._pending)
        self._pending.clear()
        return text

    def _flush(self) -> None:
        """Send the pending text of a paced reply; called only as it ends."""
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self._pace = 0.0
            self.chunk(text)

    def _ended(self) -> None:
        if self._on_end is not None:
            self._on_end()
