"""Ends the pooled replies of a node that vanished, so no pooled request is silently lost.

Every node of a pool watches the pool's reply topics and remembers which replies other nodes
have started and not yet ended. When a node's status turns offline (its Last Will after a crash,
or a stop that left replies open), the lowest-named node still online ends each of its open
replies with an `error` `node_lost`, numbered right after the last message seen, so the stream
stays contiguous and the client knows to send the request again.

Only a status change seen live counts, and only if this node's own pool link stays up for
LOSS_GRACE seconds after it: mosquitto publishes every client's Last Will when it shuts down,
and the nodes whose wills those are go on streaming once the broker is back. Retained statuses
delivered on (re)subscribing tell who is online, never that someone was lost.

Called from the pool link's network thread and a timer thread; one lock.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog

from .protocol import (
    DoneMessage,
    ErrorMessage,
    StartMessage,
    Status,
    node_lost,
    parse_reply,
)
from .replies import Publish

log = structlog.get_logger("qwen_edge.failover")

MAX_OPEN: Final = 10_000  # replies remembered at most; the oldest are forgotten first
MAX_AGE: Final = 3600.0  # seconds; a reply open longer than this is forgotten
LOSS_GRACE: Final = 2.0  # seconds this node's own link must stay up after another's loss


@dataclass(slots=True)
class _Open:
    """A reply another node started and has not ended, as far as this node has seen."""

    node: str
    seq: int  # the highest seq seen
    correlation: bytes | None
    since: float  # clock time, for forgetting old ones
    order: int  # event number: before or after its node's loss


@dataclass(slots=True)
class _Node:
    online: bool
    reason: str | None
    lost_at: int | None = None  # event number of its loss, seen live; replies before: orphans


class Failover:
    def __init__(
        self,
        node: str,
        group: str,
        publish: Publish,
        *,
        max_open: int = MAX_OPEN,
        max_age: float = MAX_AGE,
        grace: float = LOSS_GRACE,
        clock: Callable[[], float] = time.monotonic,
        schedule: Callable[[float, Callable[[], None]], None] | None = None,
    ) -> None:
        """`schedule(delay, fn)` runs fn after delay seconds (default: a timer thread)."""
        self._node = node
        self._group = group
        self._publish = publish
        self._max_open = max_open
        self._max_age = max_age
        self._grace = grace
        self._clock = clock
        self._schedule = schedule or _later
        self._lock = threading.Lock()
        # (reply topic, request_id) -> open reply; insertion order is age order.
        self._open: dict[tuple[str, str], _Open] = {}
        self._nodes: dict[str, _Node] = {}  # every node of this pool whose status we saw
        self._link_epoch = 0  # bumped whenever our own pool link drops
        self._events = itertools.count()  # orders replies' starts and nodes' losses

    # -- what the fleet says -------------------------------------------------------------------

    def on_reply(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        """A message on a pooled reply topic, from any node (this one included)."""
        message = parse_reply(payload)
        if message is None or message.request_id is None:
            return
        key = (topic, message.request_id)
        with self._lock:
            if isinstance(message, StartMessage):
                if message.node != self._node:  # we end our own replies
                    self._open.pop(key, None)  # re-inserted at the end: age order holds
                    self._open[key] = _Open(
                        message.node, message.seq, correlation, self._clock(), next(self._events)
                    )
                    self._forget_old()
            elif isinstance(message, DoneMessage | ErrorMessage):
                self._open.pop(key, None)
            else:
                entry = self._open.get(key)
                if entry is not None and message.seq > entry.seq:
                    entry.seq = message.seq

    def on_status(self, node: str, payload: bytes, retained: bool = False) -> None:
        """A node's status (also its Last Will); `retained`: delivered on subscribing, old news.

        Returns at once; a loss is acted on after the grace period (see check_losses)."""
        if node == self._node:
            return
        status = Status.parse(payload)
        with self._lock:
            if status is None or status.group != self._group:
                # Not a member of this pool (or no longer): it cannot hold pooled replies.
                self._nodes.pop(node, None)
                return
            known = self._nodes.get(node)
            entry = _Node(status.online, status.reason)
            entry.lost_at = known.lost_at if known is not None else None
            if not entry.online and not retained and (known is None or known.online):
                entry.lost_at = next(self._events)
            self._nodes[node] = entry
            if entry.lost_at is None or entry.online:
                return
            epoch = self._link_epoch
        self._schedule(self._grace, lambda: self.check_losses(epoch))

    def on_link_down(self) -> None:
        """Our own pool link dropped: losses seen just before may be the broker going down."""
        with self._lock:
            self._link_epoch += 1
            for state in self._nodes.values():
                state.lost_at = None

    def check_losses(self, epoch: int | None = None) -> None:
        """If this node leads and its link stayed up since `epoch`, end every orphaned reply:
        those of nodes not online, and those a node had started before it was lost (it may be
        back, as a new process that knows nothing of them)."""
        with self._lock:
            if epoch is not None and epoch != self._link_epoch:
                return
            if not self._is_leader():
                return
            for key, entry in list(self._open.items()):
                state = self._nodes.get(entry.node)
                if state is None:
                    continue  # status never seen: given the benefit of the doubt
                died = state.lost_at is not None and entry.order < state.lost_at
                if state.online and not died:
                    continue
                del self._open[key]
                self._end(key, entry, state.reason or "offline")

    def is_leader(self) -> bool:
        """This node is the lowest-named online member of the pool, as far as it knows."""
        with self._lock:
            return self._is_leader()

    @property
    def open_replies(self) -> int:
        return len(self._open)

    # -- internals -----------------------------------------------------------------------------

    def _is_leader(self) -> bool:
        return all(self._node < name for name, n in self._nodes.items() if n.online)

    def _end(self, key: tuple[str, str], entry: _Open, reason: str) -> None:
        topic, request_id = key
        message = node_lost(request_id, entry.seq + 1, entry.node, reason)
        self._publish(topic, message.encode(), entry.correlation)
        log.info("node_lost_reply_ended", node=entry.node, request_id=request_id, topic=topic)

    def _forget_old(self) -> None:
        horizon = self._clock() - self._max_age
        while self._open:
            key, entry = next(iter(self._open.items()))
            if len(self._open) <= self._max_open and entry.since >= horizon:
                return
            del self._open[key]


def _later(delay: float, fn: Callable[[], None]) -> None:
    timer = threading.Timer(delay, fn)
    timer.daemon = True
    timer.start()
