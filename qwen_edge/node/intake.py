"""From a delivered message to a job, or to an error reply: the node's intake.

Runs on paho's network threads (the main link's and the pool link's). In order, for a request:
topic routing -> retained dropped -> kept in the inbox while the model loads (up to what the
scheduler takes at once) -> payload parsed -> response topic checked -> per-client rate and
conversation cap (limits.ClientLimits) -> kept in the inbox (journal.RequestJournal) -> a
duplicate of a finished request gets its recorded reply again, else the scheduler takes the job
or says why not. Cancels go straight to the scheduler. Rationale: docs/protocol.md.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from ..protocol import ChatRequest, ErrorCode, RequestError, parse_cancel, parse_request
from ..topics import PROBE_CLIENT, FleetTopics, InboundTopic, TopicKind, Topics, WatchKind
from .failover import Failover
from .journal import RequestJournal
from .limits import ClientLimits, Refusal
from .link import Inbound
from .replies import Publish, ReplyStream
from .scheduler import Job
from .statestore import Outcome

log = structlog.get_logger("qwen_edge.node.intake")

# What the scheduler's refusals tell the client.
REFUSED = {
    ErrorCode.BUSY: "all slots and the wait queue are full, or this client holds its share of "
    "the queue (limits.max_queued_per_client); retry later",
    ErrorCode.SHUTTING_DOWN: "the node is stopping",
}


class Taker(Protocol):
    """What the intake needs of the scheduler."""

    def submit(self, job: Job) -> ErrorCode | None: ...

    def cancel(self, client_id: str, request_id: str) -> bool: ...


# A pool probe: (payload, echoed) -> None; see health.PoolProbe.
OnProbe = Callable[[bytes, bool], None]


@dataclass(frozen=True, slots=True)
class _Checked:
    """A request that passed every check before the inbox: where its reply goes, and the
    in-flight count it holds (released when its reply ends)."""

    client_id: str
    request: ChatRequest
    topic: str
    correlation: bytes | None
    release: Callable[[], None]


class Intake:
    def __init__(
        self,
        topics: Topics,
        publish: Publish,
        journal: RequestJournal,
        limits: ClientLimits,
        *,
        max_payload: int,
        keep_max: int,
    ) -> None:
        """`publish`: the main link's (every reply goes out there). `keep_max`: how many
        requests are kept while the model loads (what the scheduler takes at once)."""
        self.topics = topics
        self._publish = publish
        self._journal = journal
        self._limits = limits
        self._max_payload = max_payload
        self._keep_max = keep_max
        self._lock = threading.Lock()
        self._scheduler: Taker | None = None  # set by open(): the model is loaded
        self._open = False  # open() handed on every request kept meanwhile
        self._early: list[Inbound] = []  # delivered while loading and not in the inbox
        self._kept_while_loading = 0  # in the inbox or _early
        self._fleet: FleetTopics | None = None
        self._failover: Failover | None = None
        self._on_probe: OnProbe | None = None

    # -- life cycle (main thread) --------------------------------------------------------------

    def open(self, scheduler: Taker) -> None:
        """The model is loaded: serve the requests kept in the inbox (from before a restart,
        or since the start), then those kept in memory, then hand deliveries straight on."""
        with self._lock:
            self._scheduler = scheduler
            self._serve_kept_requests()
            for msg in self._early:
                inbound = self.topics.parse(msg.topic)
                if inbound is None:
                    continue
                if inbound.kind is TopicKind.CANCEL:
                    self._on_inbound(inbound, msg, self.topics)
                else:  # charged when it arrived
                    self._on_request(inbound.client_id, msg, self.topics, False, charged=True)
            self._early = []
            self._open = True

    def join_pool(self, fleet: FleetTopics, failover: Failover, on_probe: OnProbe) -> None:
        """Before the pool link connects: where its messages go."""
        self._fleet, self._failover, self._on_probe = fleet, failover, on_probe

    # -- the network threads -------------------------------------------------------------------

    def on_message(self, msg: Inbound) -> None:
        """From the main link: this node's requests and cancels."""
        inbound = self.topics.parse(msg.topic)
        if inbound is None:
            return
        if msg.retained:
            drop_retained(msg)
            return
        if not self._open:
            with self._lock:
                if not self._open:
                    self._keep_while_loading(inbound, msg)
                    return
        self._on_inbound(inbound, msg, self.topics)

    def on_pool_message(self, msg: Inbound) -> None:
        """From the pool link: pooled requests and cancels, pooled replies, node statuses."""
        assert self._fleet is not None and self._failover is not None
        assert self._on_probe is not None
        route = self._fleet.parse(msg.topic)
        if isinstance(route, InboundTopic):
            if route.client_id == PROBE_CLIENT:
                if route.kind is TopicKind.REQUEST:
                    self._on_probe(msg.payload, False)
            elif msg.retained:
                drop_retained(msg)
            else:
                self._on_inbound(route, msg, self._fleet.pool)
        elif route is not None and route.kind is WatchKind.REPLY:
            if route.name == PROBE_CLIENT:
                self._on_probe(msg.payload, True)
        elif route is not None and route.kind is WatchKind.CLAIMS:
            self._failover.on_claims(route.name, msg.payload)
        elif route is not None and route.kind is WatchKind.STATUS:
            self._failover.on_status(route.name, msg.payload, msg.retained)

    def _keep_while_loading(self, inbound: InboundTopic, msg: Inbound) -> None:
        """The model is still loading (and the broker hands on what it queued for us while we
        were away). A request is checked as far as it can be without the model, payload and
        rate, and kept in the inbox (so that it survives a crash too), up to what the scheduler
        takes at once; the rest get `busy` now. Served as soon as the model is ready.
        Called with the lock held."""
        if inbound.kind is TopicKind.CANCEL:
            if len(self._early) < self._keep_max:
                self._early.append(msg)
            else:
                log.warning("cancel_dropped_while_loading", client_id=inbound.client_id)
            return
        client_id = inbound.client_id
        parsed = parse_request(msg.payload, self._max_payload)
        if isinstance(parsed, RequestError):
            refuse_invalid(
                self._limits, self._publish, client_id, parsed, msg=msg, topics=self.topics
            )
            return
        where = self._reply_topic(client_id, parsed, msg, self.topics)
        if where is None:
            return
        refusal = self._limits.charge(client_id)
        if refusal is None and self._kept_while_loading >= self._keep_max:
            refusal = Refusal(
                ErrorCode.BUSY,
                f"the model is loading and {self._keep_max} requests wait for it; retry later",
            )
        if refusal is not None:
            stream = ReplyStream(self._publish, where[0], parsed.request_id, where[1])
            stream.error(refusal.code, refusal.message, refusal.retry_after)
            if refusal.code is ErrorCode.BUSY:
                log.info("request_refused", client_id=client_id, code=refusal.code.value)
            return
        self._kept_while_loading += 1
        kept = self._journal.accept(msg.topic, msg.payload, msg.response_topic, msg.correlation)
        if kept is None:  # the store failed (logged there): kept in memory instead
            self._early.append(msg)

    def _on_inbound(self, inbound: InboundTopic, msg: Inbound, topics: Topics) -> None:
        """`topics`: this node's, or the pool's for pooled messages (replies go there)."""
        if inbound.kind is TopicKind.CANCEL:
            self._on_cancel(inbound.client_id, msg.payload, topics, inbound.pooled)
        else:
            self._on_request(inbound.client_id, msg, topics, inbound.pooled)

    def _on_cancel(self, client_id: str, payload: bytes, topics: Topics, pooled: bool) -> None:
        assert self._scheduler is not None
        cancel = parse_cancel(payload, self._max_payload)
        if isinstance(cancel, RequestError):
            # Every node gets a pooled cancel; one of them answers a bad one.
            if not pooled or (self._failover is not None and self._failover.is_leader()):
                send_error(self._publish, client_id, cancel, None, topics)
            return
        # A pooled cancel reaches every node; only the one holding the request finds it.
        found = self._scheduler.cancel(client_id, cancel.request_id)
        if found or not pooled:
            log.info("cancel", client_id=client_id, request_id=cancel.request_id, found=found)

    # -- a request -----------------------------------------------------------------------------

    def _on_request(
        self,
        client_id: str,
        msg: Inbound,
        topics: Topics,
        pooled: bool,
        *,
        inbox_id: int | None = None,
        charged: bool = False,
    ) -> None:
        """`inbox_id`: the request is already in the inbox (kept while loading, or from before
        a restart). `charged`: its rate token was taken when it arrived (while loading).
        Its inbox entry is discarded here unless its reply stream now owns it."""
        checked = self._check(client_id, msg, topics, charged)
        if checked is not None:
            if inbox_id is None and not pooled:
                # Kept before paho acknowledges the request (when this returns): from then on
                # the broker forgets it, and the inbox serves it after a crash. Pooled requests
                # are not kept: the fleet ends them with node_lost instead (docs/protocol.md).
                inbox_id = self._journal.accept(
                    msg.topic, msg.payload, msg.response_topic, msg.correlation
                )
            if self._submit(checked, pooled, inbox_id):
                return
        self._journal.discard(inbox_id)

    def _check(
        self, client_id: str, msg: Inbound, topics: Topics, charged: bool
    ) -> _Checked | None:
        """Payload, response topic and the client's limits; None: refused and answered.
        Parsing is cheap and bounded (max_payload; a `format` schema is only sized here, the
        scheduler has it compiled off this thread); it comes first so that a QoS 1
        redelivery of a request in flight is known and costs nothing."""
        parsed = parse_request(msg.payload, self._max_payload)
        if isinstance(parsed, RequestError):
            limits = None if charged else self._limits
            refuse_invalid(limits, self._publish, client_id, parsed, msg=msg, topics=topics)
            return None
        where = self._reply_topic(client_id, parsed, msg, topics)
        if where is None:
            return None
        topic, correlation = where
        admission = self._limits.admit(
            client_id, parsed.request_id, parsed.conversation_id, charge=not charged
        )
        if isinstance(admission, Refusal):  # before any write; the limiter logs it, not per request
            refusal = ReplyStream(self._publish, topic, parsed.request_id, correlation)
            refusal.error(admission.code, admission.message, admission.retry_after)
            return None
        return _Checked(client_id, parsed, topic, correlation, admission.release)

    def _submit(self, checked: _Checked, pooled: bool, inbox_id: int | None) -> bool:
        """A job to the scheduler, unless the request id is known. True: the job's reply
        stream owns the inbox entry (it ends it with the reply, or with its refusal)."""
        assert self._scheduler is not None
        scheduler, client_id = self._scheduler, checked.client_id
        request_id = checked.request.request_id
        entry = self._journal.entry(
            client_id, request_id, checked.topic, checked.correlation, inbox_id
        )
        if pooled and self._failover is not None:
            # Claimed before the scheduler sends `start`; every path below ends the reply or
            # calls release(), so the claim goes with it (docs/protocol.md, "Fleet").
            unclaim = self._failover.claim(checked.topic, request_id, checked.correlation)
            checked = dataclasses.replace(checked, release=_then(checked.release, unclaim))
        stream = ReplyStream(
            self._publish,
            checked.topic,
            request_id,
            checked.correlation,
            journal=entry,
            on_end=checked.release,
        )
        job = Job(client_id, checked.request, stream, announce=pooled)
        match self._journal.admit(client_id, request_id, lambda: scheduler.submit(job)):
            case Outcome() as finished:
                checked.release()
                self._replay(finished)
                return False
            case ErrorCode.DUPLICATE:
                checked.release()  # took nothing (the original holds the count), so frees nothing
                log.info("duplicate_ignored", client_id=client_id, request_id=request_id)
                return False
            case ErrorCode() as refused:
                stream.error(refused, REFUSED.get(refused, refused.value))
                log.info("request_refused", client_id=client_id, code=refused.value)
            case None if pooled:
                log.info("pooled_request", client_id=client_id, request_id=request_id)
        return True

    def _replay(self, outcome: Outcome) -> None:
        """A duplicate of a finished request: its reply again, message for message."""
        for payload in outcome.messages:
            self._publish(outcome.topic, payload, outcome.correlation)
        log.info(
            "duplicate_replayed",
            client_id=outcome.client_id,
            request_id=outcome.request_id,
            messages=len(outcome.messages),
        )

    def _serve_kept_requests(self) -> None:
        """The requests accepted but not started before a crash or restart, and those that
        arrived while loading; the interrupted ones are only logged. Called with the lock
        held, before new deliveries are handed on."""
        queued, interrupted = self._journal.recover()
        for entry in interrupted:
            inbound = self.topics.parse(entry.topic)
            parsed = parse_request(entry.payload, self._max_payload)
            log.warning(
                "request_interrupted",
                client_id=None if inbound is None else inbound.client_id,
                request_id=getattr(parsed, "request_id", None),
                consequence="its reply stopped without done/error; not run again",
            )
        if queued:
            log.info("serving_kept_requests", count=len(queued))
        for entry in queued:
            inbound = self.topics.parse(entry.topic)
            if inbound is None or inbound.kind is not TopicKind.REQUEST:
                log.warning("kept_request_dropped", topic=entry.topic, reason="not our topic")
                self._journal.discard(entry.id)
                continue
            msg = Inbound(entry.topic, entry.payload, entry.response_topic, entry.correlation)
            # Charged when it arrived (or in the run before a restart, whose buckets are gone).
            self._on_request(
                inbound.client_id, msg, self.topics, False, inbox_id=entry.id, charged=True
            )

    def _reply_topic(
        self, client_id: str, parsed: ChatRequest, msg: Inbound, topics: Topics
    ) -> tuple[str, bytes | None] | None:
        """Where the request's reply goes, and its correlation data; None: its response topic
        is not the requester's (refused here)."""
        if msg.response_topic is None:
            return topics.reply(client_id, parsed.conversation_id), None
        if topics.allows_response_topic(client_id, msg.response_topic):
            return msg.response_topic, msg.correlation
        refusal = RequestError(
            ErrorCode.FORBIDDEN,
            f"response topic must lie under {topics.reply_namespace(client_id)}",
            parsed.request_id,
            parsed.conversation_id,
        )
        send_error(self._publish, client_id, refusal, None, topics)
        return None


def drop_retained(msg: Inbound) -> None:
    """A retained request or cancel is never acted on: the broker would hand it out again on
    every (re)subscribe, long after its sender meant it (docs/protocol.md)."""
    log.warning("retained_dropped", topic=msg.topic, reason="retained request or cancel")


def refuse_invalid(
    limits: ClientLimits | None,
    publish: Publish,
    client_id: str,
    error: RequestError,
    *,
    msg: Inbound,
    topics: Topics,
) -> None:
    """An invalid request costs its sender a rate token like any other (else invalid ones
    would be a free way to make the node work); past the rate it gets rate_limited. Only an
    oversize payload costs nothing: it is refused by its length alone, before any parsing.
    `limits` None: charged already (when it arrived while the model loaded)."""
    charge = limits is not None and error.code is not ErrorCode.TOO_LARGE
    refusal = limits.charge(client_id) if charge and limits is not None else None
    if refusal is not None:
        error = RequestError(refusal.code, refusal.message, error.request_id, error.conversation_id)
    retry_after = None if refusal is None else refusal.retry_after
    send_error(publish, client_id, error, msg, topics, retry_after=retry_after)


def send_error(
    publish: Publish,
    client_id: str,
    error: RequestError,
    msg: Inbound | None,
    topics: Topics,
    *,
    retry_after: float | None = None,
) -> None:
    """An error for a request that never became a job: on its reply topic when we know it,
    else on the client's error topic."""
    correlation = None
    if error.request_id is not None and error.conversation_id is not None:
        topic = topics.reply(client_id, error.conversation_id)
        if (
            msg is not None
            and msg.response_topic is not None
            and (topics.allows_response_topic(client_id, msg.response_topic))
        ):
            topic, correlation = msg.response_topic, msg.correlation
    else:
        topic = topics.error(client_id)
    stream = ReplyStream(publish, topic, error.request_id, correlation)
    stream.error(error.code, error.message, retry_after, size=error.size)
    log.info("request_rejected", client_id=client_id, code=error.code.value, error=error.message)


def _then(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    """A pooled reply's end: free its limiter count, then drop its fleet claim."""

    def both() -> None:
        first()
        second()

    return both
