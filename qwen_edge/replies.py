"""One request's reply stream: start, chunks, then exactly one done or error, numbered by seq."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Protocol

from .protocol import ErrorCode, FinishReason, encode

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
        "_chunk_head",
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
        # The chunk message differs only in seq and text: keep its fixed head encoded once.
        self._chunk_head = b'{"type":"chunk","request_id":%s,"seq":' % json.dumps(
            request_id
        ).encode("utf-8")
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

    def _message(self, kind: str, **fields: Any) -> bytes:
        return encode({"type": kind, "request_id": self.request_id, "seq": self.seq, **fields})

    def start(self, node: str, model: str) -> None:
        """The first message; a second call does nothing (a pooled reply starts on acceptance)."""
        if self.ended or self.started:
            return
        self.started = True
        self._send(self._message("start", node=node, model=model))

    def chunk(self, text: str) -> None:
        if self.ended:
            return
        if self._pace:
            text = self._paced(text)
            if not text:
                return
        payload = b'%s%d,"text":%s}' % (
            self._chunk_head,
            self.seq,
            json.dumps(text, ensure_ascii=False).encode("utf-8"),
        )
        self._send(payload)

    def done(
        self,
        finish_reason: FinishReason,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_ms: float | None,
        tokens_per_s: float | None,
        *,
        cached_tokens: int = 0,
    ) -> None:
        """`cached_tokens`: prompt tokens whose KV state was reused, not evaluated again."""
        if self.ended:
            return
        self._flush()
        self._send_final(
            self._message(
                "done",
                finish_reason=finish_reason.value,
                usage={
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "cached_tokens": cached_tokens,
                },
                timings={
                    "ttft_ms": None if ttft_ms is None else round(ttft_ms, 1),
                    "tokens_per_s": None if tokens_per_s is None else round(tokens_per_s, 2),
                },
            ),
            None,
        )
        self._ended()

    def error(self, code: ErrorCode, message: str, retry_after: float | None = None) -> None:
        """`retry_after`: seconds after which the same request would be accepted, if known."""
        if self.ended:
            return
        self._flush()
        extra = {} if retry_after is None else {"retry_after": retry_after}
        self._send_final(self._message("error", code=code.value, message=message, **extra), code)
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
