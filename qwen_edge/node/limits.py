"""Per-client limits, checked when a request arrives, before any model work: a token bucket per
client (`limits.requests_per_minute` with `limits.burst`) and a cap on a client's conversations
with a request queued or generating (`limits.max_conversations_per_client`).

A client is the `{client_id}` topic level, which broker ACLs bind to the device's account. Each
check is O(1), and memory stays bounded whatever client ids arrive: buckets live in an LRU table
of MAX_TRACKED_CLIENTS, and a client is in the in-flight table only while the scheduler holds a
request of it (which the queue bounds). Called from paho's network threads and, for `release`,
from the inference thread: one lock.

What admit() takes, only its Admission gives back: a duplicate of a request in flight takes
nothing, so releasing it frees nothing (else a client could reopen its conversation cap by
sending any request twice).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from ..protocol import ErrorCode
from ..settings import LimitSettings

log = structlog.get_logger("qwen_edge.node.limits")

# Buckets kept; beyond it the client heard from least recently loses its bucket (and gets a fresh
# one, i.e. its burst back, if it returns). ~100 bytes each.
MAX_TRACKED_CLIENTS = 10_000


@dataclass(frozen=True, slots=True)
class Refusal:
    code: ErrorCode
    message: str
    retry_after: float | None = None  # seconds after which the same request would pass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    limited: bool = False  # refused since its last accepted request (logged once per streak)


@dataclass(slots=True)
class _InFlight:
    requests: dict[str, str] = field(default_factory=dict)  # request_id -> conversation_id
    conversations: dict[str, int] = field(default_factory=dict)  # conversation_id -> requests


class Admission:
    """A request let through by ClientLimits.admit; release() once its reply has ended (or it
    was refused further on). Releasing twice, or an admission that took nothing, is harmless."""

    __slots__ = ("_client_id", "_limits", "_request_id")

    def __init__(self, limits: ClientLimits | None, client_id: str, request_id: str) -> None:
        self._limits = limits  # None: took nothing (a duplicate of a request in flight)
        self._client_id = client_id
        self._request_id = request_id

    @property
    def counted(self) -> bool:
        """It holds an in-flight count of its own (not yet released)."""
        return self._limits is not None

    def release(self) -> None:
        limits, self._limits = self._limits, None
        if limits is not None:
            # Private to all but its Admission: nothing else may free a count it did not take.
            limits._release(self._client_id, self._request_id)  # noqa: SLF001


class ClientLimits:
    def __init__(
        self,
        settings: LimitSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_TRACKED_CLIENTS,
    ) -> None:
        self._per_minute = settings.requests_per_minute
        self._rate = settings.requests_per_minute / 60.0  # tokens per second
        self._burst = float(settings.burst)
        self._max_open = settings.max_conversations_per_client
        self._clock = clock
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._inflight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()

    @property
    def tracked_clients(self) -> int:
        return len(self._buckets)

    def admit(
        self, client_id: str, request_id: str, conversation_id: str, *, charge: bool = True
    ) -> Admission | Refusal:
        """An Admission: the request may go on (and counts as in flight until its release());
        else why not. A request already in flight (a QoS 1 redelivery) passes without cost or
        count, and its Admission takes nothing: the scheduler recognises and drops it.
        `charge` False: its rate token was taken already (checked while the model loaded)."""
        with self._lock:
            inflight = self._inflight.get(client_id)
            if inflight is not None and request_id in inflight.requests:
                return Admission(None, client_id, request_id)
            refusal = self._take_token(client_id) if self._rate > 0 and charge else None
            if refusal is None and self._max_open > 0 and inflight is not None:
                open_now = len(inflight.conversations)
                if conversation_id not in inflight.conversations and open_now >= self._max_open:
                    refusal = Refusal(
                        ErrorCode.TOO_MANY_CONVERSATIONS,
                        f"{open_now} conversations of this client are in progress, the most "
                        "allowed; send this after one of their replies has ended",
                    )
            if refusal is not None:
                return refusal
            if inflight is None:
                inflight = self._inflight[client_id] = _InFlight()
            inflight.requests[request_id] = conversation_id
            inflight.conversations[conversation_id] = (
                inflight.conversations.get(conversation_id, 0) + 1
            )
        return Admission(self, client_id, request_id)

    def charge(self, client_id: str) -> Refusal | None:
        """Only the rate check (a token taken, or why not): for a request kept while the model
        loads, which admit(charge=False) counts in flight once it is served."""
        if self._rate <= 0:
            return None
        with self._lock:
            return self._take_token(client_id)

    def _release(self, client_id: str, request_id: str) -> None:
        """The request's reply has ended (or it was refused after admit); via Admission."""
        with self._lock:
            inflight = self._inflight.get(client_id)
            if inflight is None:
                return
            conversation = inflight.requests.pop(request_id, None)
            if conversation is None:
                return
            left = inflight.conversations[conversation] - 1
            if left:
                inflight.conversations[conversation] = left
            else:
                del inflight.conversations[conversation]
            if not inflight.requests:
                del self._inflight[client_id]

    def _take_token(self, client_id: str) -> Refusal | None:
        now = self._clock()
        bucket = self._buckets.get(client_id)
        if bucket is None:
            bucket = self._buckets[client_id] = _Bucket(self._burst, now)
            if len(self._buckets) > self._max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client_id)
            elapsed = max(now - bucket.updated, 0.0)
            bucket.tokens = min(self._burst, bucket.tokens + elapsed * self._rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            bucket.limited = False
            return None
        retry_after = round((1.0 - bucket.tokens) / self._rate + 0.05, 1)
        if not bucket.limited:
            bucket.limited = True
            log.warning("client_rate_limited", client_id=client_id, retry_after=retry_after)
        return Refusal(
            ErrorCode.RATE_LIMITED,
            f"more than {self._per_minute:g} requests per minute (burst {self._burst:.0f}); "
            f"retry in {retry_after:.1f} s",
            retry_after,
        )
