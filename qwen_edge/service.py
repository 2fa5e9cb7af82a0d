"""Wires the parts and runs the node's life: load, connect, serve, drain, stop.

Start: open the state store -> connect -> verify the model file -> load the model -> serve the
requests kept in the inbox -> join the pool and prove it with a probe -> online, READY=1.
`online` goes out only when true: every subscription acknowledged (again after each reconnect).
Stop (SIGTERM/SIGINT): STOPPING=1 -> leave the pool -> stop intake -> finish or cancel in-flight
replies -> publish offline -> disconnect -> exit 0.

Two broker links: the main one (persistent session, Last Will, status; node-addressed requests,
every reply) and, in a fleet, the pool link (clean session; pooled requests and cancels, and what
the failover watches). Why two: docs/protocol.md, "Fleet".
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from types import FrameType

import structlog

from . import systemd_notify
from .conversations import ConversationStore
from .engine import Engine
from .failover import Failover
from .fakeengine import open_fake
from .homeassistant import Announcer
from .journal import RequestJournal
from .limits import ClientLimits, Refusal
from .modelfile import ModelError, verify_model_file
from .mqtt import Inbound, MqttLink, Subscription
from .protocol import (
    PROBE_CLIENT,
    ChatRequest,
    ErrorCode,
    FleetTopics,
    InboundTopic,
    NodeState,
    PoolProbe,
    RequestError,
    Stats,
    Status,
    TopicKind,
    Topics,
    WatchKind,
    final_seq,
    parse_cancel,
    parse_request,
)
from .replies import ReplyStream
from .scheduler import Job, Scheduler
from .settings import Settings
from .statestore import Outcome, StateStore, state_directory

log = structlog.get_logger("qwen_edge.service")

EXIT_OK = 0
EXIT_MODEL = 3  # systemd: RestartPreventExitStatus=3, a bad model file will not get better
# Seconds the pool probe may take to come back through the shared subscription (milliseconds on
# a working broker) before the node gives up the pool.
PROBE_TIMEOUT = 5.0


def _then(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    """A pooled reply's end: free its limiter count, then drop its fleet claim."""

    def both() -> None:
        first()
        second()

    return both


def package_version() -> str:
    try:
        return version("qwen-edge")
    except PackageNotFoundError:
        return "0+unknown"


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix, settings.node_id)
        self.fleet = (
            FleetTopics.of(settings.topic_prefix, settings.node_id, settings.fleet.group)
            if settings.fleet.enabled
            else None
        )
        self.model_name = settings.model.display_name
        self.version = package_version()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._scheduler: Scheduler | None = None
        self._link: MqttLink | None = None
        self._pool_link: MqttLink | None = None
        self._failover: Failover | None = None
        self._intake_lock = threading.Lock()
        self._intake_open = False  # the model is loaded and the requests kept meanwhile handed on
        self._early: list[Inbound] = []  # delivered while loading and not in the inbox
        # Requests kept while the model loads (in the inbox or _early), at most what the
        # scheduler takes at once; more get `busy` at once.
        self._kept_while_loading = 0
        self._keep_max = settings.model.slots + settings.model.queue_size
        self._journal: RequestJournal | None = None
        self._limits = ClientLimits(settings.limits)
        self._homeassistant = Announcer(  # Home Assistant discovery: see _on_link_connected
            settings, self.model_name, self.version, state_directory(settings.service.state_dir)
        )
        self._pool_proven = False  # the probe came back through the shared subscription
        self._pool_failed = False  # it did not: this node serves its own topics only
        self._probe_nonce = secrets.token_hex(8)
        self._probe_back = threading.Event()
        self._online = False  # "online" published on this connection of the main link

    # -- status --------------------------------------------------------------------------------

    def _status(
        self,
        state: NodeState,
        *,
        slots: int | None = None,
        pid: int | None = None,
        reason: str | None = None,
    ) -> bytes:
        return Status(
            state=state,
            node=self.settings.node_id,
            model=self.model_name,
            version=self.version,
            # Pool members count one another by it (failover leader; `qwen-edge fleet`).
            # Absent once the pool probe failed: the node is then no member.
            group=self.fleet.group if self.fleet and not self._pool_failed else None,
            slots=slots,
            pid=pid,
            reason=reason,
        ).encode()

    def _on_connected(self) -> None:
        # Every (re)connect: `starting` while the model loads; `online` waits for the SUBACKs.
        self._announce(starting=True)

    def _on_link_lost(self) -> None:
        self._online = False  # to be said again once this connection is subscribed

    def _announce(self, starting: bool = False) -> None:
        """Publish the status when it is true: `starting` (on connect, model loading), or
        `online` once the model is loaded and _serving() holds: a request sent from now on is
        served. Called whenever one of those may have become true. The will covers loss."""
        assert self._link is not None
        with self._intake_lock:  # so a late "starting" can never follow "online"
            if self._stop.is_set() or not self._link.connected.is_set():
                return
            if self._scheduler is None:
                if starting:
                    self._link.publish_status(self._status(NodeState.STARTING, pid=os.getpid()))
            elif not self._online and self._serving():
                self._online = True
                self._link.publish_status(
                    self._status(NodeState.ONLINE, slots=self.settings.model.slots, pid=os.getpid())
                )

    def _on_link_connected(self) -> None:
        """Each connect of the main link: the status, then the Home Assistant discovery configs
        (or their removal once, after the feature was turned off)."""
        self._on_connected()
        assert self._link is not None
        if self._failover is not None:
            self._failover.announce()  # sent while disconnected, a change was skipped
        for topic, payload in self._homeassistant.messages():
            self._link.publish_retained(topic, payload)

    # -- intake (paho network thread) ----------------------------------------------------------

    def _on_message(self, msg: Inbound) -> None:
        inbound = self.topics.parse(msg.topic)
        if inbound is None:
            return
        if msg.retained:
            self._drop_retained(msg)
            return
        if not self._intake_open:
            with self._intake_lock:
                if not self._intake_open:
                    self._keep_while_loading(inbound, msg)
                    return
        self._on_inbound(inbound, msg, self.topics)

    def _drop_retained(self, msg: Inbound) -> None:
        """A retained request or cancel is never acted on: the broker would hand it out again
        on every (re)subscribe, long after its sender meant it (docs/protocol.md)."""
        log.warning("retained_dropped", topic=msg.topic, reason="retained request or cancel")

    def _keep_while_loading(self, inbound: InboundTopic, msg: Inbound) -> None:
        """The model is still loading (and the broker hands on what it queued for us while we
        were away). A request is checked as far as it can be without the model, payload and
        rate, and kept in the inbox (so that it survives a crash too), up to what the scheduler
        takes at once; the rest get `busy` now. Served as soon as the model is ready.
        Called with the intake lock held."""
        assert self._journal is not None
        if inbound.kind is TopicKind.CANCEL:
            if len(self._early) < self._keep_max:
                self._early.append(msg)
            else:
                log.warning("cancel_dropped_while_loading", client_id=inbound.client_id)
            return
        client_id = inbound.client_id
        parsed = parse_request(msg.payload, self.settings.mqtt.max_payload)
        if isinstance(parsed, RequestError):
            self._send_error(client_id, parsed, msg, self.topics)
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
            assert self._link is not None
            stream = ReplyStream(self._link.publish, where[0], parsed.request_id, where[1])
            stream.error(refusal.code, refusal.message, refusal.retry_after)
            if refusal.code is ErrorCode.BUSY:
                log.info("request_refused", client_id=client_id, code=refusal.code.value)
            return
        self._kept_while_loading += 1
        kept = self._journal.store.accept(
            msg.topic, msg.payload, msg.response_topic, msg.correlation
        )
        if kept is None:  # the store failed (logged there): kept in memory instead
            self._early.append(msg)

    def _on_pool_message(self, msg: Inbound) -> None:
        """From the pool link: pooled requests and cancels, returned probes, claims, statuses."""
        assert self.fleet is not None and self._failover is not None
        route = self.fleet.parse(msg.topic)
        if isinstance(route, InboundTopic):
            if route.client_id == PROBE_CLIENT:
                if route.kind is TopicKind.REQUEST:
                    self._on_probe(msg.payload, echoed=False)
            elif msg.retained:
                self._drop_retained(msg)
            else:
                self._on_inbound(route, msg, self.fleet.pool)
        elif route is not None and route.kind is WatchKind.REPLY:
            if route.name == PROBE_CLIENT:
                self._on_probe(msg.payload, echoed=True)
        elif route is not None and route.kind is WatchKind.CLAIMS:
            self._failover.on_claims(route.name, msg.payload)
        elif route is not None and route.kind is WatchKind.STATUS:
            self._failover.on_status(route.name, msg.payload, msg.retained)

    def _on_inbound(self, inbound: InboundTopic, msg: Inbound, topics: Topics) -> None:
        """`topics`: this node's, or the pool's for pooled messages (replies go there)."""
        if inbound.kind is TopicKind.CANCEL:
            self._on_cancel(inbound.client_id, msg.payload, topics, inbound.pooled)
        else:
            self._on_request(inbound.client_id, msg, topics, inbound.pooled)

    def _on_cancel(self, client_id: str, payload: bytes, topics: Topics, pooled: bool) -> None:
        assert self._scheduler is not None
        cancel = parse_cancel(payload, self.settings.mqtt.max_payload)
        if isinstance(cancel, RequestError):
            # Every node gets a pooled cancel; one of them answers a bad one.
            if not pooled or (self._failover is not None and self._failover.is_leader()):
                self._send_error(client_id, cancel, None, topics)
            return
        # A pooled cancel reaches every node; only the one holding the request finds it.
        found = self._scheduler.cancel(client_id, cancel.request_id)
        if found or not pooled:
            log.info("cancel", client_id=client_id, request_id=cancel.request_id, found=found)

    def _on_probe(self, payload: bytes, echoed: bool) -> None:
        """A pool probe, never served: ours back (proof that the shared subscription works),
        or another member's, which the pool handed to us: returned to its sender."""
        assert self.fleet is not None and self._link is not None
        probe = PoolProbe.parse(payload)
        if probe is None:
            return
        node, nonce = probe.probe, probe.nonce
        if node == self.settings.node_id:
            if nonce == self._probe_nonce:
                self._probe_back.set()
        elif not echoed:
            self._link.publish(self.fleet.probe_echo(node), payload)

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
        self._send_error(client_id, refusal, None, topics)
        return None

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
        a restart). `charged`: its rate token was taken when it arrived (while loading)."""
        assert self._scheduler is not None and self._link is not None
        assert self._journal is not None
        scheduler, journal = self._scheduler, self._journal
        parsed = parse_request(msg.payload, self.settings.mqtt.max_payload)
        if isinstance(parsed, RequestError):
            self._send_error(client_id, parsed, msg, topics)
            journal.discard(inbox_id)
            return
        where = self._reply_topic(client_id, parsed, msg, topics)
        if where is None:
            journal.discard(inbox_id)
            return
        topic, correlation = where
        admission = self._limits.admit(
            client_id, parsed.request_id, parsed.conversation_id, charge=not charged
        )
        if isinstance(admission, Refusal):  # before any write; the limiter logs it, not per request
            refusal_stream = ReplyStream(self._link.publish, topic, parsed.request_id, correlation)
            refusal_stream.error(admission.code, admission.message, admission.retry_after)
            journal.discard(inbox_id)
            return
        release = admission.release
        if inbox_id is None and not pooled:
            # Kept before paho acknowledges the request (when this returns): from then on the
            # broker forgets it, and the inbox serves it after a crash. Pooled requests are
            # not kept: the fleet ends them with node_lost instead (docs/protocol.md).
            inbox_id = journal.store.accept(
                msg.topic, msg.payload, msg.response_topic, msg.correlation
            )
        entry = journal.entry(client_id, parsed.request_id, topic, correlation, inbox_id)
        if pooled and self._failover is not None:
            # Claimed before the scheduler sends `start`; every path below ends the reply or
            # calls release(), so the claim goes with it (docs/protocol.md, "Fleet").
            release = _then(release, self._failover.claim(topic, parsed.request_id, correlation))
        stream = ReplyStream(
            self._link.publish, topic, parsed.request_id, correlation, journal=entry, on_end=release
        )
        job = Job(client_id, parsed, stream, announce=pooled)
        refused = journal.admit(client_id, parsed.request_id, lambda: scheduler.submit(job))
        if isinstance(refused, Outcome):
            release()
            journal.discard(inbox_id)
            self._replay(refused)
        elif refused is ErrorCode.DUPLICATE:
            release()  # took nothing (the original holds the count), so frees nothing
            journal.discard(inbox_id)
            log.info("duplicate_ignored", client_id=client_id, request_id=parsed.request_id)
        elif refused is not None:
            message = {
                ErrorCode.BUSY: "all slots and the wait queue are full; retry later",
                ErrorCode.SHUTTING_DOWN: "the node is stopping",
            }.get(refused, refused.value)
            stream.error(refused, message)
            log.info("request_refused", client_id=client_id, code=refused.value)
        elif pooled:
            log.info("pooled_request", client_id=client_id, request_id=parsed.request_id)

    def _replay(self, outcome: Outcome) -> None:
        """A duplicate of a finished request: its reply again, message for message."""
        assert self._link is not None
        for payload in outcome.messages:
            self._link.publish(outcome.topic, payload, outcome.correlation)
        log.info(
            "duplicate_replayed",
            client_id=outcome.client_id,
            request_id=outcome.request_id,
            messages=len(outcome.messages),
        )

    def _serve_kept_requests(self) -> None:
        """Once the model is loaded: the requests accepted but not started before a crash or
        restart, and those that arrived while loading; the interrupted ones are only logged.
        Called with the intake lock held, before new deliveries are handed on."""
        assert self._journal is not None
        queued, interrupted = self._journal.store.recover()
        for entry in interrupted:
            inbound = self.topics.parse(entry.topic)
            parsed = parse_request(entry.payload, self.settings.mqtt.max_payload)
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

    def _send_error(
        self, client_id: str, error: RequestError, msg: Inbound | None, topics: Topics
    ) -> None:
        """An error for a request that never became a job: on its reply topic when we know it,
        else on the client's error topic."""
        assert self._link is not None
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
        stream = ReplyStream(self._link.publish, topic, error.request_id, correlation)
        stream.error(error.code, error.message)
        log.info(
            "request_rejected", client_id=client_id, code=error.code.value, error=error.message
        )

    # -- life cycle ----------------------------------------------------------------------------

    def request_stop(self, signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        self._stop.set()

    def run(self) -> int:
        """Connect -> (status starting) load model -> serve (status online, READY=1) -> drain."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        s = self.settings

        began = time.monotonic()
        state = StateStore(
            state_directory(s.service.state_dir),
            outcomes_max=s.service.outcomes_max,
            outcomes_per_client=s.service.outcomes_per_client,
            outcomes_ttl=s.service.outcomes_ttl,
        )
        self._journal = RequestJournal(state)
        state.start_checkpoints()
        conversations = ConversationStore(
            s.conversations.max_conversations,
            s.conversations.idle_ttl,
            persist=state,
            max_per_client=s.conversations.max_per_client,
        )
        for saved in state.load_conversations(
            s.conversations.max_conversations,
            s.conversations.idle_ttl,
            s.conversations.max_per_client,
        ):
            conversations.restore(
                (saved.client_id, saved.conversation_id), saved.system, saved.turns, saved.idle
            )
        log.info(
            "state_loaded",
            path=None if state.path is None else str(state.path),
            conversations=len(conversations),
            seconds=round(time.monotonic() - began, 3),
        )

        # Connect first, so devices see "starting" while a slow device loads the model.
        self._link = MqttLink(
            s.mqtt,
            client_id=s.mqtt.client_id or f"qwen-edge-{s.node_id}",
            # Requests and cancels keep their retain flag, so retained ones are recognised.
            subscriptions=tuple(Subscription(t, True) for t in self.topics.subscriptions),
            on_message=self._on_message,
            on_connected=self._on_link_connected,
            on_subscribed=self._announce,
            on_disconnected=self._on_link_lost,
            status_topic=self.topics.status,
            will_payload=self._status(NodeState.OFFLINE, reason="connection lost"),
        )
        self._link.start()

        systemd_notify.notify("STATUS=checking model file")
        began = time.monotonic()
        try:
            # `fake://40ms`: no model, a token every 40 ms (scripts/bench --fleet).
            engine: Engine | None = open_fake(s.model)
            if engine is None:
                info = verify_model_file(s.model.path, sha256=s.model.sha256)
                log.info(
                    "model_verified",
                    path=str(s.model.path),
                    bytes=info.size,
                    sha256=info.sha256 is not None,
                    seconds=round(time.monotonic() - began, 2),
                )
                systemd_notify.notify("STATUS=loading model")
                began = time.monotonic()
                engine = Engine(s.model)
        except ModelError as exc:
            log.error("model_unusable", error=str(exc))
            systemd_notify.notify(f"STATUS=model unusable: {exc}")
            self._link.stop(self._status(NodeState.OFFLINE, reason="model unusable"), timeout=1.0)
            state.close()
            return EXIT_MODEL
        # model.memory_mb may have chosen fewer slots, a shorter context or another KV precision:
        # from here on the settings say what the node runs.
        s = self.settings = s.model_copy(update={"model": engine.plan.apply(s.model)})
        log.info(
            "model_loaded",
            model=self.model_name,
            path=str(s.model.path),
            seconds=round(time.monotonic() - began, 2),
            slots=engine.slots,
            n_ctx_seq=engine.n_ctx_seq,
            threads=engine.threads,
        )

        scheduler = Scheduler(
            engine,
            store=conversations,
            generation=s.generation,
            queue_size=s.model.queue_size,
            kv_keep_bytes=s.model.kv_keep_mb * 1024 * 1024,
            node=s.node_id,
            model_name=self.model_name,
        )
        inference = threading.Thread(target=scheduler.run, name="inference")
        inference.start()
        with self._intake_lock:  # from here on the network thread hands requests straight over
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
            self._intake_open = True
        watchdog = threading.Thread(target=self._watchdog, args=(scheduler,), name="watchdog")
        watchdog.start()

        systemd_notify.notify(f"STATUS=connecting to {s.mqtt.host}:{s.mqtt.port}")
        began = time.monotonic()
        if self.fleet is not None:
            # Joins the pool only now, loaded: a loading node would sit on its share of pooled
            # requests. Replies go out on the main link, whose retained status (with the
            # group) the fleet sees first: `online` waits for the pool's SUBACK and probe.
            self._failover = Failover(
                s.node_id,
                self.fleet.group,
                self._link.publish,
                publish_retained=self._link.publish_retained,
                claims_topic=self.fleet.claims,
                final_seq=final_seq(s.generation.max_tokens_limit),
            )
            self._pool_link = MqttLink(
                s.mqtt,
                client_id=f"{s.mqtt.client_id or f'qwen-edge-{s.node_id}'}-pool",
                subscriptions=self.fleet_subscriptions(self.fleet),
                on_message=self._on_pool_message,
                on_subscribed=self._announce,
                on_disconnected=self._failover.on_link_down,
                persistent=False,
                name="pool",
            )
            self._pool_link.start()
            self._prove_pool(self.fleet, self._pool_link)
        self._announce()  # "online" now if every subscription is acknowledged, else on SUBACK
        while not self._serving():
            if self._stop.wait(0.05):
                break
        if not self._stop.is_set():
            log.info("ready", seconds_to_connect=round(time.monotonic() - began, 2))
            systemd_notify.notify(
                "READY=1", f"STATUS=serving {self.model_name} on {self.topics.base}"
            )
        stats = threading.Thread(target=self._publish_stats, args=(scheduler,), name="stats")
        stats.start()
        self._stop.wait()
        self._shutdown(scheduler, inference, engine)
        state.close()
        watchdog.join()
        stats.join()
        return EXIT_OK

    @staticmethod
    def fleet_subscriptions(fleet: FleetTopics) -> tuple[Subscription, ...]:
        """Pooled requests and cancels keep their retain flag (retained ones are dropped);
        statuses do not: there it tells one delivered on subscribing (old news) from a live
        change, which is what the failover needs."""
        intake = {fleet.shared_requests, fleet.pool.cancel("+")}
        return tuple(Subscription(t, t in intake) for t in fleet.subscriptions)

    def _prove_pool(self, fleet: FleetTopics, pool_link: MqttLink) -> None:
        """Send a probe through the shared subscription and wait for it to come back (to this
        node, or via the member the pool gave it to). A broker that takes `$share/...` for a
        plain filter (NATS 2.9) never delivers it: then this node leaves the pool, serves its
        own topics only and drops `group` from its status, with one error."""
        probe = PoolProbe(probe=self.settings.node_id, nonce=self._probe_nonce).encode()
        while not self._stop.is_set():
            if not pool_link.subscribed.wait(0.05):
                continue
            self._probe_back.clear()
            pool_link.publish(fleet.probe_request, probe)
            deadline = time.monotonic() + PROBE_TIMEOUT
            while not self._probe_back.wait(0.05):  # in steps: a stop must not wait for it
                if self._stop.is_set() or time.monotonic() >= deadline:
                    break
            if self._stop.is_set():
                return
            if self._probe_back.is_set():
                self._pool_proven = True
                log.info("pool_joined", group=fleet.group)
                return
            if not pool_link.subscribed.is_set():
                continue  # the link dropped meanwhile: no verdict, probe again
            log.error(
                "pool_unavailable",
                group=fleet.group,
                subscription=fleet.shared_requests,
                reason=f"a probe sent to the pool did not come back within {PROBE_TIMEOUT:g} s: "
                "the broker does not deliver this shared subscription",
                consequence="serving this node's own topics only; not a member of the pool",
            )
            with self._intake_lock:
                self._pool_failed = True
                self._pool_link = None
            pool_link.stop()
            return

    def _serving(self) -> bool:
        """Every subscription is acknowledged (and the pool proven): requests sent from now
        on reach this node."""
        assert self._link is not None
        pool = self._pool_link
        return self._link.subscribed.is_set() and (
            pool is None or (pool.subscribed.is_set() and self._pool_proven)
        )

    def _shutdown(self, scheduler: Scheduler, inference: threading.Thread, engine: Engine) -> None:
        assert self._link is not None
        began = time.monotonic()
        systemd_notify.notify("STOPPING=1", "STATUS=draining")
        log.info("stopping")
        if self._pool_link is not None and self.fleet is not None:
            # Pooled requests go to the other nodes from now on, instead of `shutting_down`
            # here; pooled cancels still reach us during the drain.
            self._pool_link.unsubscribe(self.fleet.shared_requests)
        # The subscriptions stay in the broker session, so requests sent while the node is down
        # wait for its return; requests that arrive during the drain get `shutting_down`.
        scheduler.stop(self.settings.service.drain_timeout)
        inference.join()
        if self._pool_link is not None:
            self._pool_link.stop()
        if self._failover is not None:
            # Every reply has ended: say so now, not after the coalescing interval, which
            # would come after the link closes and leave claims for the leader to end.
            self._failover.announce()
        self._link.wait_flushed(timeout=5.0)
        self._link.stop(self._status(NodeState.OFFLINE, reason="stopped"))
        engine.close()
        log.info("stopped", seconds=round(time.monotonic() - began, 2))

    def _publish_stats(self, scheduler: Scheduler) -> None:
        """Retained load figures on {prefix}/{node}/stats, at once and every stats_interval."""
        assert self._link is not None
        interval = self.settings.fleet.stats_interval
        if interval <= 0:
            return
        tokens, since = scheduler.tokens_generated, time.monotonic()
        rate = 0.0
        while True:
            active, queued = scheduler.load
            self._link.publish_retained(
                self.topics.stats,
                Stats(
                    node=self.settings.node_id,
                    model=self.model_name,
                    uptime_s=round(time.monotonic() - self._started, 1),
                    slots=self.settings.model.slots,
                    active_slots=active,
                    queue_depth=queued,
                    tokens_per_s=round(rate, 2),
                    requests_done=scheduler.requests_done,
                    ts=round(time.time(), 3),
                ).encode(),
            )
            if self._stop.wait(interval):
                return
            # Tokens generated since the last report, by every slot: the node's decode rate.
            now, count = time.monotonic(), scheduler.tokens_generated
            rate = (count - tokens) / (now - since) if now > since else 0.0
            tokens, since = count, now

    def _watchdog(self, scheduler: Scheduler) -> None:
        """Ping systemd while the inference loop is alive; go quiet when it is stuck."""
        interval = systemd_notify.watchdog_interval()
        stall = self.settings.service.watchdog_stall
        period = interval if interval is not None else 1.0
        while not self._stop.wait(period):
            stuck_for = time.monotonic() - scheduler.heartbeat
            if stuck_for > stall:
                log.error("inference_stuck", seconds=round(stuck_for, 1))
                systemd_notify.notify(f"STATUS=inference loop stuck for {stuck_for:.0f}s")
                continue
            if interval is not None:
                systemd_notify.notify("WATCHDOG=1")
