"""Makes accepted requests durable and request ids idempotent, on top of the state store.

A node-addressed request enters the inbox before paho acknowledges it to the broker, is marked
started before its first reply message goes out, and leaves the inbox in the same transaction
that keeps its outcome, before its final message goes out. So after a crash: a request the broker
still holds is delivered again, an acknowledged one that had not started is served from the
inbox, and one that had started is never run twice. A duplicate of a finished request gets the
recorded messages again instead of a second generation. Rationale: docs/protocol.md, "Delivery
across restarts".
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from .protocol import ErrorCode
from .statestore import Outcome, StateStore

# Refusals that ask the client to send the same request again: not an outcome to repeat.
RETRYABLE = frozenset(
    {
        ErrorCode.BUSY,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.RATE_LIMITED,
        ErrorCode.TOO_MANY_CONVERSATIONS,
    }
)


class RequestJournal:
    def __init__(self, store: StateStore) -> None:
        self.store = store
        # Admission (look up an outcome, else submit) and recording an outcome exclude each
        # other, so a duplicate arriving as the original finishes finds one or the other: the
        # job is in flight until after its outcome is committed.
        self._lock = threading.Lock()

    def admit(
        self, client_id: str, request_id: str, submit: Callable[[], ErrorCode | None]
    ) -> Outcome | ErrorCode | None:
        """The recorded outcome of a finished request with this id, else `submit()`'s verdict."""
        with self._lock:
            outcome = self.store.outcome(client_id, request_id)
            return outcome if outcome is not None else submit()

    def entry(
        self,
        client_id: str,
        request_id: str,
        topic: str,
        correlation: bytes | None,
        inbox_id: int | None,
    ) -> RequestEntry:
        return RequestEntry(self, client_id, request_id, topic, correlation, inbox_id)

    def discard(self, inbox_id: int | None) -> None:
        if inbox_id is not None:
            self.store.discard(inbox_id)

    def _finish(self, inbox_id: int | None, outcome: Outcome | None) -> None:
        with self._lock:
            self.store.finish(inbox_id, outcome)


@dataclass(slots=True)
class RequestEntry:
    """One accepted request's record; the ReplyStream's journal (replies.StreamJournal)."""

    journal: RequestJournal
    client_id: str
    request_id: str
    topic: str
    correlation: bytes | None
    inbox_id: int | None  # None: not in the inbox (pooled, or the store failed)

    def opening(self) -> None:
        if self.inbox_id is not None:
            self.journal.store.started(self.inbox_id)

    def closing(self, messages: list[bytes], code: ErrorCode | None) -> None:
        outcome = None
        if code not in RETRYABLE:
            outcome = Outcome(
                self.client_id, self.request_id, self.topic, self.correlation, tuple(messages)
            )
        self.journal._finish(self.inbox_id, outcome)  # noqa: SLF001  # its own journal's lock
