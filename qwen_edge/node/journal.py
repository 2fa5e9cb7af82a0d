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

from ..protocol import ErrorCode
from .statestore import InboxEntry, Outcome, StateStore

# What admit() decided: a finished request's Outcome (a duplicate: replay it), else submit()'s
# verdict: None (accepted), DUPLICATE (the original is in flight) or why it was refused.
Verdict = Outcome | ErrorCode | None

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
        self._store = store
        # Admission (look up an outcome, else submit) and recording an outcome exclude each
        # other, so a duplicate arriving as the original finishes finds one or the other: the
        # job is in flight until after its outcome is committed.
        self._lock = threading.Lock()

    def accept(
        self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None
    ) -> int | None:
        """Keep a request in the inbox; its id, or None when the store failed (logged there)."""
        return self._store.accept(topic, payload, response_topic, correlation)

    def recover(self) -> tuple[list[InboxEntry], list[InboxEntry]]:
        """After a (re)start: the kept requests to serve, and those interrupted mid-reply."""
        return self._store.recover()

    def admit(
        self, client_id: str, request_id: str, submit: Callable[[], ErrorCode | None]
    ) -> Verdict:
        """The recorded outcome of a finished request with this id, else `submit()`'s verdict."""
        with self._lock:
            outcome = self._store.outcome(client_id, request_id)
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
        """Forget a kept request that never became a job (refused, or a duplicate)."""
        if inbox_id is not None:
            self._store.discard(inbox_id)

    def started(self, inbox_id: int | None) -> None:
        """Its first reply message goes out next: after a crash it is not run again."""
        if inbox_id is not None:
            self._store.started(inbox_id)

    def finish(self, inbox_id: int | None, outcome: Outcome | None) -> None:
        """Out of the inbox and, unless None, its outcome kept: in one transaction, under the
        lock that admit() holds, so a duplicate finds the job in flight or its outcome."""
        with self._lock:
            self._store.finish(inbox_id, outcome)


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
        self.journal.started(self.inbox_id)

    def closing(self, messages: list[bytes], code: ErrorCode | None) -> None:
        outcome = None
        if code not in RETRYABLE:
            outcome = Outcome(
                self.client_id, self.request_id, self.topic, self.correlation, tuple(messages)
            )
        self.journal.finish(self.inbox_id, outcome)
