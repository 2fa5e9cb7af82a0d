"""Ends the pooled replies of a node that vanished, so no pooled request is silently lost.

Each node announces the pooled replies it holds: a retained claims message on
`{prefix}/{group}/claims/{node}`, sent again whenever it takes a reply, and at most every
CLAIM_INTERVAL when replies end. Nobody watches anybody's tokens: what a node receives grows
with the pool's requests, not with its tokens. When a node's status turns offline (its Last
Will after a crash, or a stop that left replies open), the lowest-named node still online ends
each reply that node claimed with an `error` `node_lost` numbered `final_seq`, past any seq the
reply can reach, so it sorts after whatever the client saw. A node whose claims come from a new
process (another `boot`) lost the replies of the old one: they are ended too, by the leader, or
by the node itself when it finds its own old claims on start.

Only a status change seen live counts, and only if this node's own pool link stays up for
LOSS_GRACE seconds after it: mosquitto publishes every client's Last Will when it shuts down,
and the nodes whose wills those are go on streaming once the broker is back. Retained statuses
delivered on (re)subscribing tell who is online, never that someone was lost.

Called from the pool link's network thread, the threads that start and end replies, and a timer
thread; one lock.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog

from ..protocol import Claim, Claims, Status, node_lost, parse_claims
from .replies import Publish

log = structlog.get_logger("qwen_edge.node.failover")

LOSS_GRACE: Final = 2.0  # seconds this node's own link must stay up after another's loss
CLAIM_INTERVAL: Final = 0.2  # seconds between two claims messages of this node, at least


@dataclass(slots=True)
class _Node:
    online: bool
    reason: str | None
    lost_at: int | None = None  # event number of its loss, seen live


@dataclass(frozen=True, slots=True)
class _Orphan:
    """A claimed reply whose process is gone: its node is offline or runs a new process."""

    node: str
    claim: Claim
    final_seq: int
    reason: str


class Failover:
    def __init__(
        self,
        node: str,
        group: str,
        publish: Publish,
        *,
        publish_retained: Callable[[str, bytes], None],
        claims_topic: Callable[[str], str],
        final_seq: int,
        grace: float = LOSS_GRACE,
        interval: float = CLAIM_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        schedule: Callable[[float, Callable[[], None]], None] | None = None,
    ) -> None:
        """`publish` sends node_lost errors; `publish_retained` claims messages, on the topic
        `claims_topic(node)`. `schedule(delay, fn)` runs fn after delay seconds (default: a
        timer thread)."""
        self._node = node
        self._group = group
        self._publish = publish
        self._publish_retained = publish_retained
        self._claims_topic = claims_topic
        self._final_seq = final_seq
        self._grace = grace
        self._interval = interval
        self._clock = clock
        self._schedule = schedule or _later
        self._lock = threading.Lock()
        self.boot = secrets.token_hex(6)  # this process: a restart is a new boot
        self._tokens = itertools.count()
        self._mine: dict[int, Claim] = {}  # this node's claims, by token
        self._sent_at = float("-inf")  # clock time of our last claims message
        self._flush_due = False  # a claims message is scheduled
        self._claims: dict[str, Claims] = {}  # other nodes' latest claims
        self._orphans: dict[tuple[str, str], _Orphan] = {}  # to be ended by the leader
        self._nodes: dict[str, _Node] = {}  # every node of this pool whose status we saw
        self._link_epoch = 0  # bumped whenever our own pool link drops
        self._events = itertools.count()  # orders nodes' losses

    # -- what this node holds ------------------------------------------------------------------

    def claim(self, topic: str, request_id: str, correlation: bytes | None) -> Callable[[], None]:
        """This node holds a pooled reply from now on; call the returned function once it ended
        (calling it again does nothing)."""
        token = next(self._tokens)
        with self._lock:
            self._mine[token] = Claim(topic, request_id, correlation)
        # At once, not coalesced: sent on the connection `start` then goes out on, the claim
        # reaches the broker first, so a reply a client saw begin is always claimed. A late
        # release only costs a node_lost after `done`, which clients ignore.
        self.announce()

        def release() -> None:
            with self._lock:
                gone = self._mine.pop(token, None)
            if gone is not None:
                self._changed()

        return release

    def announce(self) -> None:
        """Send this node's claims now (joining the pool, or its main link reconnected)."""
        with self._lock:
            self._flush_due = False
            self._sent_at = self._clock()
            payload = self._own_claims().encode()
        self._publish_retained(self._claims_topic(self._node), payload)

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._mine)

    def _changed(self) -> None:
        """A release: at most one claims message per interval, the last one always sent."""
        with self._lock:
            if self._flush_due:
                return
            wait = self._sent_at + self._interval - self._clock()
            if wait > 0:
                self._flush_due = True
        if wait > 0:
            self._schedule(wait, self.announce)
        else:
            self.announce()

    def _own_claims(self) -> Claims:
        # One entry per reply: a duplicate request shares its original's topic and id.
        unique = {(c.topic, c.request_id): c for c in self._mine.values()}
        return Claims(self._node, self.boot, self._final_seq, tuple(unique.values()))

    # -- what the fleet says -------------------------------------------------------------------

    def on_claims(self, node: str, payload: bytes) -> None:
        """A node's claims message (retained ones too: claims are current state, not news)."""
        claims = parse_claims(payload)
        if claims is not None and claims.node != node:
            return  # not where that node's claims go: ignored
        if node == self._node:
            self._on_own_claims(claims, payload)
            return
        with self._lock:
            old = self._claims.get(node)
            if claims is None:  # cleared (by the leader that ended them)
                self._claims.pop(node, None)
                return
            self._claims[node] = claims
            if old is None or old.boot == claims.boot:
                return
            # A new process of that node: the old one's replies are lost, whatever its status.
            for orphan in old.replies:
                self._orphans[(orphan.topic, orphan.request_id)] = _Orphan(
                    node, orphan, old.final_seq, "restarted"
                )
            epoch = self._link_epoch
        self._schedule(self._grace, lambda: self.check_losses(epoch))

    def _on_own_claims(self, claims: Claims | None, payload: bytes) -> None:
        if claims is not None and claims.boot != self.boot:
            # Our previous process's claims (retained): it is gone, so are its replies. Ended
            # here, not by the leader, so that a lone node also ends them.
            for claim in claims.replies:
                self._end(self._node, claim, claims.final_seq, "restarted")
            self.announce()
        elif claims is None:
            self.announce()  # cleared while we run (a leader took us for lost): say it again

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
        those claimed by a node not online, and those of a node's previous process."""
        cleared: list[str] = []
        with self._lock:
            if epoch is not None and epoch != self._link_epoch:
                return
            if not self._is_leader():
                return
            ending = list(self._orphans.values())
            self._orphans.clear()
            for node, claims in list(self._claims.items()):
                state = self._nodes.get(node)
                if state is None or state.online:
                    continue  # status never seen: given the benefit of the doubt
                reason = state.reason or "offline"
                ending.extend(_Orphan(node, c, claims.final_seq, reason) for c in claims.replies)
                del self._claims[node]
                cleared.append(node)
        for orphan in ending:
            self._end(orphan.node, orphan.claim, orphan.final_seq, orphan.reason)
        for node in cleared:
            # Ended: no later leader should end them again. A node still running (only cut
            # off) sees its claims cleared and sends them again.
            self._publish_retained(self._claims_topic(node), b"")

    def is_leader(self) -> bool:
        """This node is the lowest-named online member of the pool, as far as it knows."""
        with self._lock:
            return self._is_leader()

    @property
    def watched_replies(self) -> int:
        """Replies other nodes claim, as far as this node knows."""
        with self._lock:
            return sum(len(c.replies) for c in self._claims.values()) + len(self._orphans)

    # -- internals -----------------------------------------------------------------------------

    def _is_leader(self) -> bool:
        return all(self._node < name for name, n in self._nodes.items() if n.online)

    def _end(self, node: str, claim: Claim, final_seq: int, reason: str) -> None:
        message = node_lost(claim.request_id, final_seq, node, reason)
        self._publish(claim.topic, message.encode(), claim.correlation)
        log.info("node_lost_reply_ended", node=node, request_id=claim.request_id, topic=claim.topic)


def _later(delay: float, fn: Callable[[], None]) -> None:
    timer = threading.Timer(delay, fn)
    timer.daemon = True
    timer.start()
