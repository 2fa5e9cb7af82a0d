"""Retained requests and cancels cleared from the broker, so that no device can park data there.

mosquitto 2.0 has no retain right per topic (the dynamic security plugin's ACLs know none, and
`retain_available` is global while the nodes' status needs it), so the broker keeps a retained
publish on any topic a device may publish to. The sweeper account (broker-setup) clears them with
an empty retained publish: sweep_once() subscribes to every request and cancel topic, clears each
retained message the broker hands out and leaves; watch() stays subscribed with Retain As
Published, so it sees a retained publish as it arrives and clears it at once, and sweeps in full
every `resweep_s` for what it may have missed (the broker bounds its queue too).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import uuid
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.subscribeoptions import SubscribeOptions

from .. import mqttclient
from ..settings import MqttSettings
from .brokeradmin import REPLY_TIMEOUT_S, SWEEPER_USER, SetupError

GRANTED_QOS1: Final = 1


def filters(prefix: str) -> tuple[str, str]:
    return (f"{prefix}/+/request/+", f"{prefix}/+/cancel/+")


def _subscriptions(prefix: str, *, no_local: bool) -> list[tuple[str, SubscribeOptions]]:
    # retainHandling 0: the broker sends every retained message, also on a repeated SUBSCRIBE.
    options = SubscribeOptions(qos=1, retainAsPublished=True, noLocal=no_local, retainHandling=0)
    return [(f, options) for f in filters(prefix)]


def _client(mqtt: MqttSettings) -> paho.Client:
    # Not bound to one client id, so a one-shot sweep never takes the watcher's connection.
    return mqttclient.new_client(mqtt, f"{SWEEPER_USER}-{uuid.uuid4().hex[:8]}")


def sweep_once(mqtt: MqttSettings, prefix: str) -> int:
    """Clear every retained request and cancel under `prefix`; how many there were."""
    marker = f"{prefix}/sweep-{uuid.uuid4().hex}/cancel/{SWEEPER_USER}"
    events: queue.Queue[tuple[str, object]] = queue.Queue()
    retained: set[str] = set()

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        if msg.topic == marker:
            events.put(("marker", None))
        elif msg.retain and msg.payload:
            retained.add(msg.topic)

    client = _client(mqtt)
    client.on_connect = lambda c, u, f, rc, p: events.put(("connack", rc.value))
    client.on_subscribe = lambda c, u, mid, rcs, p: events.put(("suback", [r.value for r in rcs]))
    client.on_message = on_message
    try:
        mqttclient.connect(client, mqtt)
    except OSError as exc:
        raise SetupError(f"sweep: cannot reach the broker ({exc})") from exc
    client.loop_start()
    try:
        _expect(events, "connack", 0)
        client.subscribe(_subscriptions(prefix, no_local=False))
        _expect(events, "suback", [GRANTED_QOS1, GRANTED_QOS1])
        # The broker queued every retained message for us before its SUBACK; what we publish
        # now comes back after them.
        client.publish(marker, b"", qos=1)
        _expect(events, "marker", None)
        infos = [client.publish(t, b"", qos=1, retain=True) for t in sorted(retained)]
        for info in infos:
            info.wait_for_publish(REPLY_TIMEOUT_S)
    finally:
        client.disconnect()
        client.loop_stop()
    return len(retained)


def _expect(events: queue.Queue[tuple[str, object]], kind: str, value: object) -> None:
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while True:
        try:
            got, what = events.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise SetupError(f"sweep: no {kind} from the broker") from None
        if got == kind:
            if what != value:
                raise SetupError(f"sweep: the broker refused the sweeper ({kind} {what})")
            return


class Watcher:
    """Stays subscribed and clears each retained request or cancel as it arrives."""

    def __init__(self, mqtt: MqttSettings, prefix: str) -> None:
        self.mqtt, self.prefix = mqtt, prefix
        self.cleared = 0
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.client = _client(mqtt)
        self.client.reconnect_delay_set(1, 10)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self._announced = False

    def _on_connect(self, client: paho.Client, u: object, f: object, rc: object, p: object) -> None:
        if getattr(rc, "value", 1) != 0:
            print(f"sweeper: refused by the broker ({rc})", file=sys.stderr, flush=True)
            return
        self.resweep()
        self.connected.set()

    def resweep(self) -> None:
        """Subscribe again: the broker hands out every retained message once more."""
        self.client.subscribe(_subscriptions(self.prefix, no_local=True))

    def _on_subscribe(self, client: paho.Client, u: object, mid: int, rcs: Any, p: object) -> None:
        if any(rc.value != GRANTED_QOS1 for rc in rcs):
            print(f"sweeper: subscription refused ({rcs})", file=sys.stderr, flush=True)
        elif not self._announced:  # what its service's log and the tests wait for
            self._announced = True
            topics = " and ".join(filters(self.prefix))
            print(f"sweeper: watching {topics}", file=sys.stderr, flush=True)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        if msg.retain and msg.payload:
            client.publish(msg.topic, b"", qos=1, retain=True)
            with self._lock:
                self.cleared += 1

    def take_count(self) -> int:
        with self._lock:
            count, self.cleared = self.cleared, 0
        return count


def watch(mqtt: MqttSettings, prefix: str, resweep_s: float) -> None:
    """Run until killed (the sweeper's service, or broker-setup --sweep --watch)."""
    watcher = Watcher(mqtt, prefix)
    mqttclient.connect(watcher.client, mqtt, background=True)
    watcher.client.loop_start()
    tick = threading.Event()
    while not tick.wait(resweep_s):  # a period, not a wait for an event: the full sweep's
        if watcher.connected.is_set():
            watcher.resweep()
        cleared = watcher.take_count()
        if cleared:
            print(f"sweeper: cleared {cleared} retained messages", file=sys.stderr, flush=True)
