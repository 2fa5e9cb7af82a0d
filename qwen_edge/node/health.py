"""What the node says about itself, and only when it is true: its status, its load figures, its
proof of pool membership, and systemd's watchdog.

Status (retained, on {prefix}/{node}/status): `starting` on every connect while the model loads;
`online` once the model is loaded and every subscription is acknowledged (and, in a fleet, a
probe came back through the shared subscription), so a request sent from then on is served;
`offline` as the Last Will or on a clean stop. The pool probe lives here because it decides two
facts of the status: whether `online` is true yet, and whether `group` is in it.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable

import structlog

from ..protocol import NodeState, PoolProbe, Stats, Status
from ..settings import Settings
from ..topics import FleetTopics, Topics
from . import systemd_notify
from .homeassistant import Announcer
from .link import MqttLink
from .scheduler import Scheduler

log = structlog.get_logger("qwen_edge.node.health")

# Seconds the pool probe may take to come back through the shared subscription (milliseconds on
# a working broker) before the node gives up the pool.
PROBE_TIMEOUT = 5.0


def status_payload(
    settings: Settings,
    version: str,
    group: str | None,
    state: NodeState,
    *,
    slots: int | None = None,
    pid: int | None = None,
    reason: str | None = None,
) -> bytes:
    """The node's status message. `group`: in a pool (members count one another by it: the
    failover's leader, `qwen-edge fleet`); None once the pool probe failed, or no fleet."""
    return Status(
        state=state,
        node=settings.node_id,
        model=settings.model.display_name,
        version=version,
        group=group,
        slots=slots,
        pid=pid,
        reason=reason,
    ).encode()


def stats_payload(settings: Settings, uptime: float, scheduler: Scheduler, rate: float) -> bytes:
    """The node's load figures message."""
    active, queued = scheduler.load
    return Stats(
        node=settings.node_id,
        model=settings.model.display_name,
        uptime_s=round(uptime, 1),
        slots=settings.model.slots,
        active_slots=active,
        queue_depth=queued,
        tokens_per_s=round(rate, 2),
        requests_done=scheduler.requests_done,
        ts=round(time.time(), 3),
    ).encode()


class Health:
    def __init__(
        self,
        settings: Settings,
        topics: Topics,
        fleet: FleetTopics | None,
        link: MqttLink,
        stop: threading.Event,
        *,
        version: str,
        homeassistant: Announcer,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.fleet = fleet
        self.version = version
        self._link = link
        self._stop = stop
        self._homeassistant = homeassistant  # discovery configs, on every connect
        self._started = time.monotonic()
        # A late "starting" can never follow "online": both are decided under it.
        self._lock = threading.Lock()
        self._scheduler: Scheduler | None = None  # set by loaded()
        self._online = False  # "online" published on this connection of the main link
        self._pool_link: MqttLink | None = None  # None: no fleet, or the probe failed
        self._pool_proven = False  # the probe came back through the shared subscription
        self._pool_failed = False  # it did not: this node serves its own topics only
        self._probe_nonce = secrets.token_hex(8)
        self._probe_back = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- status --------------------------------------------------------------------------------

    def status(
        self, state: NodeState, *, slots: int | None = None, reason: str | None = None
    ) -> bytes:
        """`starting` and `online` carry the pid (`doctor` finds the daemon's memory by it)."""
        group = self.fleet.group if self.fleet and not self._pool_failed else None
        pid = None if state is NodeState.OFFLINE else os.getpid()
        return status_payload(
            self.settings, self.version, group, state, slots=slots, pid=pid, reason=reason
        )

    def on_connected(self) -> None:
        """Each connect of the main link: `starting` while the model loads (`online` waits for
        the SUBACKs), then the Home Assistant discovery configs (or their removal once, after
        the feature was turned off)."""
        self.announce(starting=True)
        for topic, payload in self._homeassistant.messages():
            self._link.publish_retained(topic, payload)

    def on_link_lost(self) -> None:
        self._online = False  # to be said again once this connection is subscribed

    def loaded(self, scheduler: Scheduler, settings: Settings) -> None:
        """The model is loaded and the intake open: `online` may come true from now on.
        `settings`: what the node runs (the memory plan may have changed the slots)."""
        with self._lock:
            self.settings = settings
            self._scheduler = scheduler

    def announce(self, starting: bool = False) -> None:
        """Publish the status when it is true: `starting` (on connect, model loading), or
        `online` once the model is loaded and serving() holds: a request sent from now on is
        served. Called whenever one of those may have become true. The will covers loss."""
        with self._lock:
            if self._stop.is_set() or not self._link.connected.is_set():
                return
            if self._scheduler is None:
                if starting:
                    self._link.publish_status(self.status(NodeState.STARTING))
            elif not self._online and self.serving():
                self._online = True
                self._link.publish_status(
                    self.status(NodeState.ONLINE, slots=self.settings.model.slots)
                )

    def serving(self) -> bool:
        """Every subscription is acknowledged (and the pool proven): requests sent from now
        on reach this node."""
        if not self._link.subscribed.is_set():
            return False
        if self.fleet is None or self._pool_failed:
            return True
        pool = self._pool_link  # None until prove_pool() took it: not yet serving the pool
        return pool is not None and pool.subscribed.is_set() and self._pool_proven

    @property
    def pool_link(self) -> MqttLink | None:
        """The pool link while this node is a member (None after a failed probe)."""
        return self._pool_link

    # -- the pool probe ------------------------------------------------------------------------

    def on_probe(self, payload: bytes, echoed: bool) -> None:
        """A pool probe (paho's thread), never served: ours back (proof that the shared
        subscription works), or another member's, which the pool handed to us: returned to
        its sender."""
        assert self.fleet is not None
        probe = PoolProbe.parse(payload)
        if probe is None:
            return
        node, nonce = probe.probe, probe.nonce
        if node == self.settings.node_id:
            if nonce == self._probe_nonce:
                self._probe_back.set()
        elif not echoed:
            self._link.publish(self.fleet.probe_echo(node), payload)

    def prove_pool(self, pool_link: MqttLink) -> None:
        """Send a probe through the shared subscription and wait for it to come back (to this
        node, or via the member the pool gave it to). A broker that takes `$share/...` for a
        plain filter (NATS 2.9) never delivers it: then this node leaves the pool, serves its
        own topics only and drops `group` from its status, with one error."""
        assert self.fleet is not None
        self._pool_link = pool_link
        probe = PoolProbe(probe=self.settings.node_id, nonce=self._probe_nonce).encode()
        while not self._stop.is_set():
            if not pool_link.subscribed.wait(0.05):
                continue
            self._probe_back.clear()
            pool_link.publish(self.fleet.probe_request, probe)
            if not self._probe_returned():
                if self._stop.is_set() or not pool_link.subscribed.is_set():
                    continue  # stopping, or the link dropped meanwhile: no verdict
                self._leave_pool(pool_link)
                return
            self._pool_proven = True
            log.info("pool_joined", group=self.fleet.group)
            return

    def _probe_returned(self) -> bool:
        deadline = time.monotonic() + PROBE_TIMEOUT
        while not self._probe_back.wait(0.05):  # in steps: a stop must not wait for it
            if self._stop.is_set() or time.monotonic() >= deadline:
                return False
        return True

    def _leave_pool(self, pool_link: MqttLink) -> None:
        assert self.fleet is not None
        log.error(
            "pool_unavailable",
            group=self.fleet.group,
            subscription=self.fleet.shared_requests,
            reason=f"a probe sent to the pool did not come back within {PROBE_TIMEOUT:g} s: "
            "the broker does not deliver this shared subscription",
            consequence="serving this node's own topics only; not a member of the pool",
        )
        with self._lock:
            self._pool_failed = True
            self._pool_link = None
        pool_link.stop()

    # -- threads: load figures and the watchdog ------------------------------------------------

    def start_watchdog(self) -> None:
        self._start(self._watchdog, "watchdog")

    def start_stats(self) -> None:
        self._start(self._publish_stats, "stats")

    def _start(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name)
        thread.start()
        self._threads.append(thread)

    def join(self) -> None:
        """After the stop: both threads end at once."""
        for thread in self._threads:
            thread.join()

    def _publish_stats(self) -> None:
        """Retained load figures on {prefix}/{node}/stats, at once and every stats_interval."""
        scheduler = self._scheduler
        assert scheduler is not None
        interval = self.settings.fleet.stats_interval
        if interval <= 0:
            return
        tokens, since = scheduler.tokens_generated, time.monotonic()
        rate = 0.0
        while True:
            uptime = time.monotonic() - self._started
            self._link.publish_retained(
                self.topics.stats, stats_payload(self.settings, uptime, scheduler, rate)
            )
            if self._stop.wait(interval):
                return
            # Tokens generated since the last report, by every slot: the node's decode rate.
            now, count = time.monotonic(), scheduler.tokens_generated
            rate = (count - tokens) / (now - since) if now > since else 0.0
            tokens, since = count, now

    def _watchdog(self) -> None:
        """Ping systemd while the inference loop is alive; go quiet when it is stuck."""
        scheduler = self._scheduler
        assert scheduler is not None
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
