"""Wires the parts and runs the node's life, one named phase after another (see run()).

Start: open the state store -> connect -> verify and load the model -> open the intake (serve
the requests kept in the inbox) -> join the pool and prove it with a probe -> ready: `online`,
READY=1. `online` goes out only when true: every subscription acknowledged (again after each
reconnect). Stop (SIGTERM/SIGINT): STOPPING=1 -> leave the pool -> stop intake -> finish or
cancel in-flight replies -> publish offline -> disconnect -> exit 0.

Who does what: intake.Intake takes a delivered message to a job or an error reply (paho's
threads); health.Health says what is true of the node (status, stats, pool probe, watchdog);
scheduler.Scheduler runs the jobs (the inference thread).

Two broker links: the main one (persistent session, Last Will, status; node-addressed requests,
every reply) and, in a fleet, the pool link (clean session; pooled requests and cancels, and what
the failover watches). Why two: docs/protocol.md, "Fleet".
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from types import FrameType

import structlog

from ..protocol import NodeState, final_seq
from ..settings import Settings
from ..topics import FleetTopics, Topics
from . import systemd_notify
from .assist import Entities, load_entities
from .conversations import ConversationStore
from .engine import Engine
from .failover import Failover
from .grammar import GrammarCompiler
from .health import Health, status_payload
from .homeassistant import Announcer, package_version
from .intake import Intake
from .journal import RequestJournal
from .limits import ClientLimits
from .link import Inbound, MqttLink, Subscription
from .modelfile import ModelError, verify_model_file
from .pacedengine import PacedEngine, open_paced
from .scheduler import Scheduler
from .statestore import StateStore, state_directory
from .wyoming import WyomingServer

log = structlog.get_logger("qwen_edge.node.service")


class Phase(StrEnum):
    """Where the node is in its life; run() walks these once, in order, and logs each change
    (`phase`). Only `serving` takes new work; requests that arrive while `loading` are kept for it,
    and `draining` refuses them (`shutting_down`)."""

    OPENING = "opening"  # the state store and the intake, before the link connects
    LOADING = "loading"  # connected (status `starting`), the model loading
    SERVING = "serving"  # `online`: the intake hands requests to the scheduler
    DRAINING = "draining"  # STOPPING=1: replies end, nothing new starts
    STOPPED = "stopped"  # `offline` sent, the link closed


EXIT_OK = 0
EXIT_MODEL = 3  # systemd: RestartPreventExitStatus=3, a bad model file will not get better


@contextmanager
def phase(event: str, digits: int = 2) -> Iterator[dict[str, object]]:
    """Log `event` once the phase is done, with its duration and the fields the phase filled
    in; not at all when it raised."""
    began = time.monotonic()
    fields: dict[str, object] = {}
    yield fields
    log.info(event, **fields, seconds=round(time.monotonic() - began, digits))


class Service:
    def __init__(self, settings: Settings) -> None:
        s = self.settings = settings
        self.topics = Topics(s.topic_prefix, s.node_id)
        self.fleet = (
            FleetTopics.of(s.topic_prefix, s.node_id, s.fleet.group) if s.fleet.enabled else None
        )
        self.model_name = s.model.display_name
        self.version = package_version()
        self._stop = threading.Event()
        self._client_id = s.mqtt.client_id or f"qwen-edge-{s.node_id}"
        group = self.fleet.group if self.fleet else None
        self._link = MqttLink(
            s.mqtt,
            client_id=self._client_id,
            # Requests and cancels keep their retain flag, so retained ones are recognised.
            subscriptions=tuple(Subscription(t, True) for t in self.topics.subscriptions),
            # Its callbacks find health and the intake at call time (it starts in run()).
            on_message=self._deliver,
            on_connected=self._on_link_connected,
            on_subscribed=lambda: self.health.announce(),  # noqa: PLW0108
            on_disconnected=lambda: self.health.on_link_lost(),  # noqa: PLW0108
            status_topic=self.topics.status,
            will_payload=status_payload(
                s, self.version, group, NodeState.OFFLINE, reason="connection lost"
            ),
        )
        self.health = Health(
            s,
            self.topics,
            self.fleet,
            self._link,
            self._stop,
            version=self.version,
            homeassistant=Announcer(
                s, self.model_name, self.version, state_directory(s.service.state_dir)
            ),
        )
        self.phase = Phase.OPENING
        # The main link's deliveries: to the intake once it exists (the link starts after).
        self._on_message: Callable[[Inbound], None] = _before_intake
        self._failover: Failover | None = None  # in a fleet, on joining the pool
        # One set of per-client limits for every way in: MQTT devices and Wyoming peers.
        self._limits = ClientLimits(s.limits)
        self._wyoming: WyomingServer | None = None  # [wyoming] enabled, once the model is loaded

    def run(self) -> int:
        _relay_signals(self._stop)
        state, conversations, intake = self._open_state()
        self._enter(Phase.LOADING)
        self._link.start()  # first, so devices see "starting" while a slow device loads
        engine = self._load_model()
        if engine is None:
            self._link.stop(
                self.health.status(NodeState.OFFLINE, reason="model unusable"), timeout=1.0
            )
            state.close()
            self._enter(Phase.STOPPED)
            return EXIT_MODEL
        scheduler, inference = self._open_intake(intake, engine, conversations)
        began = time.monotonic()
        self._join_pool(intake)
        self._ready(began)
        self._enter(Phase.SERVING)
        self._stop.wait()
        self._enter(Phase.DRAINING)
        self._shutdown(scheduler, inference, engine)
        state.close()
        self.health.join()
        self._enter(Phase.STOPPED)
        return EXIT_OK

    def _enter(self, phase: Phase) -> None:
        log.info("phase", phase=phase.value, was=self.phase.value)
        self.phase = phase

    # -- the phases ----------------------------------------------------------------------------

    def _open_state(self) -> tuple[StateStore, ConversationStore, Intake]:
        """The state store, the conversations kept in it, and the intake on top of it."""
        s = self.settings
        with phase("state_loaded", digits=3) as logged:
            state = StateStore(
                state_directory(s.service.state_dir),
                outcomes_max=s.service.outcomes_max,
                outcomes_per_client=s.service.outcomes_per_client,
                outcomes_ttl=s.service.outcomes_ttl,
            )
            state.start_checkpoints()
            c = s.conversations
            conversations = ConversationStore(
                c.max_conversations, c.idle_ttl, persist=state, max_per_client=c.max_per_client
            )
            for saved in state.load_conversations(
                c.max_conversations, c.idle_ttl, c.max_per_client
            ):
                key = (saved.client_id, saved.conversation_id)
                conversations.restore(key, saved.system, saved.turns, saved.idle)
            logged.update(
                path=None if state.path is None else str(state.path),
                conversations=len(conversations),
            )
        intake = Intake(
            self.topics,
            self._link.publish,
            RequestJournal(state),
            self._limits,
            max_payload=s.mqtt.max_payload,
            keep_max=s.model.slots + s.model.queue_size,
        )
        self._on_message = intake.on_message
        return state, conversations, intake

    def _load_model(self) -> Engine | PacedEngine | None:
        """The model file checked, then loaded; None: it is unusable (logged)."""
        s = self.settings
        try:
            # `fake://40ms`: no model, a token every 40 ms (scripts/bench --fleet).
            fake = open_paced(s.model)
            if fake is None:
                systemd_notify.notify("STATUS=checking model file")
                with phase("model_verified") as logged:
                    info = verify_model_file(s.model.path, sha256=s.model.sha256)
                    logged.update(
                        path=str(s.model.path), bytes=info.size, sha256=info.sha256 is not None
                    )
                systemd_notify.notify("STATUS=loading model")
            with phase("model_loaded") as logged:
                engine: Engine | PacedEngine = fake or Engine(s.model)
                logged.update(
                    model=self.model_name,
                    path=str(s.model.path),
                    slots=engine.slots,
                    n_ctx_seq=engine.n_ctx_seq,
                    threads=engine.threads,
                )
        except ModelError as exc:
            log.error("model_unusable", error=str(exc))
            systemd_notify.notify(f"STATUS=model unusable: {exc}")
            return None
        return engine

    def _open_intake(
        self, intake: Intake, engine: Engine | PacedEngine, conversations: ConversationStore
    ) -> tuple[Scheduler, threading.Thread]:
        """The scheduler on its inference thread; the intake hands it the requests kept while
        loading, then every delivery straight away."""
        s = self.settings
        # model.memory_mb may have chosen fewer slots, a shorter context or another KV precision:
        # from here on the settings say what the node runs.
        s = self.settings = s.model_copy(update={"model": engine.plan.apply(s.model)})
        scheduler = Scheduler(
            engine,
            store=conversations,
            generation=s.generation,
            queue_size=s.model.queue_size,
            kv_keep_bytes=s.model.kv_keep_mb * 1024 * 1024,
            node=s.node_id,
            model_name=self.model_name,
            grammars=GrammarCompiler(),
            limits=s.limits,
        )
        inference = threading.Thread(target=scheduler.run, name="inference")
        inference.start()
        with phase("intake_opened"):
            intake.open(scheduler)
        self.health.loaded(scheduler, s)
        self.health.start_watchdog()
        if s.wyoming.enabled:
            self._open_wyoming(scheduler)
        return scheduler, inference

    def _open_wyoming(self, scheduler: Scheduler) -> None:
        """Home Assistant's Assist: one more client of the scheduler and the limits. A port
        that cannot be bound is logged; the node serves MQTT all the same."""
        s = self.settings.wyoming
        with phase("wyoming_opened") as logged:
            entities = load_entities(s.entities) if s.entities is not None else Entities()
            server = WyomingServer(
                s,
                scheduler,
                self._limits,
                entities,
                node_id=self.settings.node_id,
                model_name=self.model_name,
                version=self.version,
            )
            try:
                server.start()
            except OSError as exc:
                log.error("wyoming_unavailable", host=s.host, port=s.port, error=str(exc))
                return
            self._wyoming = server
            logged.update(port=server.port, names=len(entities.names), areas=len(entities.areas))

    def _join_pool(self, intake: Intake) -> None:
        """In a fleet: the pool link, proven by a probe. Only now, loaded: a loading node would
        sit on its share of pooled requests. Replies go out on the main link, whose retained
        status (with the group) the fleet sees first: `online` waits for the pool's SUBACK
        and the probe."""
        s = self.settings
        systemd_notify.notify(f"STATUS=connecting to {s.mqtt.host}:{s.mqtt.port}")
        if self.fleet is None:
            return
        failover = self._failover = Failover(
            s.node_id,
            self.fleet.group,
            self._link.publish,
            publish_retained=self._link.publish_retained,
            claims_topic=self.fleet.claims,
            final_seq=final_seq(s.generation.max_tokens_limit),
        )
        intake.join_pool(self.fleet, failover, self.health.on_probe)
        pool_link = MqttLink(
            s.mqtt,
            client_id=f"{self._client_id}-pool",
            subscriptions=self.fleet_subscriptions(self.fleet),
            on_message=intake.on_pool_message,
            on_subscribed=self.health.announce,
            on_disconnected=failover.on_link_down,
            persistent=False,
            name="pool",
        )
        pool_link.start()
        self.health.prove_pool(pool_link)

    def _ready(self, began: float) -> None:
        """`online` now if every subscription is acknowledged (else on its SUBACK); READY=1
        once it is; then the load figures."""
        self.health.announce()
        while not self.health.serving():
            if self._stop.wait(0.05):
                break
        if not self._stop.is_set():
            log.info("ready", seconds_to_connect=round(time.monotonic() - began, 2))
            systemd_notify.notify(
                "READY=1", f"STATUS=serving {self.model_name} on {self.topics.base}"
            )
        self.health.start_stats()

    def _shutdown(
        self, scheduler: Scheduler, inference: threading.Thread, engine: Engine | PacedEngine
    ) -> None:
        began = time.monotonic()
        systemd_notify.notify("STOPPING=1", "STATUS=draining")
        log.info("stopping")
        pool_link = self.health.pool_link
        if pool_link is not None and self.fleet is not None:
            # Pooled requests go to the other nodes from now on, instead of `shutting_down`
            # here; pooled cancels still reach us during the drain.
            pool_link.unsubscribe(self.fleet.shared_requests)
        if self._wyoming is not None:
            self._wyoming.stop()  # its transcripts in flight are cancelled
        # The subscriptions stay in the broker session, so requests sent while the node is down
        # wait for its return; requests that arrive during the drain get `shutting_down`.
        scheduler.stop(self.settings.service.drain_timeout)
        inference.join()
        if pool_link is not None:
            pool_link.stop()
        if self._failover is not None:
            # Every reply has ended: say so now, not after the coalescing interval, which
            # would come after the link closes and leave claims for the leader to end.
            self._failover.announce()
        self._link.wait_flushed(timeout=5.0)
        self._link.stop(self.health.status(NodeState.OFFLINE, reason="stopped"))
        engine.close()
        log.info("stopped", seconds=round(time.monotonic() - began, 2))

    # -- wiring --------------------------------------------------------------------------------

    def _on_link_connected(self) -> None:
        self.health.on_connected()
        if self._failover is not None:
            self._failover.announce()  # sent while disconnected, a change was skipped

    def _deliver(self, msg: Inbound) -> None:
        self._on_message(msg)

    @staticmethod
    def fleet_subscriptions(fleet: FleetTopics) -> tuple[Subscription, ...]:
        """Pooled requests and cancels keep their retain flag (retained ones are dropped);
        statuses do not: there it tells one delivered on subscribing (old news) from a live
        change, which is what the failover needs."""
        intake = {fleet.shared_requests, fleet.pool.cancel("+")}
        return tuple(Subscription(t, t in intake) for t in fleet.subscriptions)


def _before_intake(msg: Inbound) -> None:
    log.warning("message_before_intake", topic=msg.topic)


def _relay_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set `stop`, from a thread of their own. A handler runs in the main
    thread between two bytecodes, maybe while it holds the lock inside stop.wait(): Event.set()
    there could wait for that lock forever (a daemon once ignored SIGTERM; cpython #126434 is the
    same for multiprocessing.Event). So the handler does nothing; Python writes each signal's
    number to a pipe at C level, and the "signals" thread, which reads it, sets the event. It
    holds no state and blocks on the pipe only: a daemon thread that dies with the process."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)

    def relay() -> None:
        while os.read(read_end, 1):
            stop.set()

    threading.Thread(target=relay, name="signals", daemon=True).start()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Installed so that the signal neither kills the process nor raises; _relay_signals acts."""
