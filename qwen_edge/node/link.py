"""A broker link: paho-mqtt 2.x with MQTT 5 (3.1.1 selectable), reconnect with exponential
backoff (capped, 5 s by default) and resubscribe on every connect. The node's main link also has
a Last Will, retained status and a persistent session; its pool link has none of them (see
docs/protocol.md, "Fleet").

paho's network loop runs on its own thread; callbacks here only parse and hand over, never block.
QoS 1 messages published while the link is down are queued by paho and sent on reconnect.

A broker that drops the connection over one message (NATS's MQTT gateway does for a `.` in a
topic) would get it again on every reconnect, forever: a message that was the oldest one sent and
unacknowledged at REFUSED_AFTER disconnects in a row is given up, with its topic (see _blame).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from .. import mqttclient
from ..settings import MqttSettings

log = structlog.get_logger("qwen_edge.node.link")

# How long the broker keeps the daemon's session (its subscriptions and queued QoS 1 requests)
# while the daemon is away, e.g. during a restart.
SESSION_EXPIRY_S = 3600
# The main link's session outlives this process too: requests queued across a restart.
PERSISTENT = mqttclient.Session(expiry_s=SESSION_EXPIRY_S, resume=True)
MAX_QUEUED_OUT = 20_000  # bounded memory when the broker is unreachable for long
# Disconnects in a row with the same message sent and the oldest unacknowledged, before its
# topic counts as refused by the broker. A message caught by a lost link (broker restart,
# network) is sent again and acknowledged after one reconnect, so it never gets near.
REFUSED_AFTER = 3
MAX_REFUSED_TOPICS = 1024  # remembered refused topics; the oldest is forgotten first


@dataclass(frozen=True, slots=True)
class Subscription:
    topic: str
    # MQTT 5: deliver with the retain flag as the sender set it, not cleared, so a retained
    # request is recognised as one also when it arrives live (on 3.1.1 brokers always clear it).
    keep_retain_flag: bool = False


@dataclass(frozen=True, slots=True)
class Inbound:
    topic: str
    payload: bytes
    response_topic: str | None
    correlation: bytes | None
    retained: bool = False  # a retained message delivered because we (re)subscribed


OnMessage = Callable[[Inbound], None]


class MqttLink:
    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        subscriptions: tuple[Subscription, ...],
        on_message: OnMessage,
        on_connected: Callable[[], None] | None = None,
        on_subscribed: Callable[[], None] | None = None,
        on_disconnected: Callable[[], None] | None = None,
        status_topic: str | None = None,
        will_payload: bytes | None = None,
        persistent: bool = True,
        name: str = "main",
    ) -> None:
        """`persistent`: the broker keeps the session (subscriptions, queued QoS 1 messages) for
        SESSION_EXPIRY_S while the link is down; else it drops it the moment the link drops.
        `name`: "main" logs the broker's outages (broker_lost, broker_back); any other link
        logs them at debug level only, so an outage is one pair of lines per node."""
        self._settings = settings
        self._subscriptions = list(subscriptions)
        self._status_topic = status_topic
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected
        self._on_subscribed_cb = on_subscribed
        self._on_disconnected_cb = on_disconnected
        self._name = name
        self._log_outage = log.warning if name == "main" else log.debug
        self._log_return = log.info if name == "main" else log.debug
        self._ever_connected = False
        self._stopping = False  # stop() was called: the coming disconnect is ours, not an outage
        self._lost_at: float | None = None  # monotonic time the link dropped, until it is back
        # (message, disconnects in a row it was the oldest sent and unacknowledged): _blame
        self._blamed: tuple[paho.MQTTMessage, int] | None = None
        self._refused: OrderedDict[str, None] = OrderedDict()  # topics the broker refuses
        self._purge: set[str] = set()  # refused topics whose queued messages are still held
        self.v5 = settings.protocol == "5"
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # the broker acknowledged this connection's SUBSCRIBE
        self._subscribe_mid: int | None = None
        self._unsubscribed = threading.Event()
        self._client_id = client_id
        self._last_failure: str | None = None  # logged once until it changes or we connect

        self._session = PERSISTENT if persistent else mqttclient.TRANSIENT
        client = _paho_client(settings, client_id, self._session, status_topic, will_payload)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_pre_connect = self._on_pre_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        self._client = client

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting until stop()."""
        mqttclient.connect(self._client, self._settings, session=self._session, background=True)
        self._client.loop_start()

    def stop(self, final_status: bytes | None = None, timeout: float = 5.0) -> None:
        """Publish the final retained status (if any), wait for queued messages, disconnect."""
        self._stopping = True
        if final_status is not None:
            assert self._status_topic is not None
            info = self._client.publish(self._status_topic, final_status, qos=1, retain=True)
            if self.connected.is_set():
                try:
                    info.wait_for_publish(timeout)
                except (RuntimeError, ValueError):
                    log.warning("final_status_not_sent")
        self._client.disconnect()
        self._client.loop_stop()

    def unsubscribe(self, topic: str, timeout: float = 2.0) -> bool:
        """Drop one subscription, also for later reconnects; True once the broker confirmed."""
        self._subscriptions = [s for s in self._subscriptions if s.topic != topic]
        if not self.connected.is_set():
            return True  # gone with the (clean) session, and not renewed on reconnect
        self._unsubscribed.clear()
        self._client.unsubscribe(topic)
        return self._unsubscribed.wait(timeout)

    def wait_flushed(self, timeout: float) -> bool:
        """Wait until paho holds no unacknowledged outgoing message, or `timeout` seconds."""
        deadline = time.monotonic() + timeout
        # Private (SLF001): paho has no public count of unacknowledged messages.
        while self._client._out_messages:  # noqa: SLF001
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    # -- sending -------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, correlation: bytes | None = None) -> None:
        """QoS 1 publish; safe from any thread. Queued by paho while disconnected."""
        if topic in self._refused:  # the broker drops the link over it (logged once, in _blame)
            return
        properties = None
        if correlation is not None and self.v5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation
        info = self._client.publish(topic, payload, qos=1, properties=properties)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            log.warning("publish_dropped_queue_full", topic=topic)

    def publish_status(self, payload: bytes) -> None:
        assert self._status_topic is not None
        self._client.publish(self._status_topic, payload, qos=1, retain=True)

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """QoS 1 retained; skipped while disconnected (a later one will replace it anyway)."""
        if self.connected.is_set():
            self._client.publish(topic, payload, qos=1, retain=True)

    # -- paho callbacks (network thread) ---------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:  # e.g. bad user name or password, not authorised
            self._failed("broker_refused", str(reason_code))
            return
        self._last_failure = None
        if not self._ever_connected:
            self._ever_connected = True
            log.info(
                "broker_connected",
                link=self._name,
                host=self._settings.host,
                port=self._settings.port,
                session_present=flags.session_present,
            )
        elif self._lost_at is not None:
            self._log_return(
                "broker_back",
                link=self._name,
                after_s=round(time.monotonic() - self._lost_at, 1),
                session_present=flags.session_present,
            )
        self._lost_at = None
        if self._subscriptions:
            if self.v5:
                _, self._subscribe_mid = client.subscribe(
                    [
                        (sub.topic, SubscribeOptions(qos=1, retainAsPublished=sub.keep_retain_flag))
                        for sub in self._subscriptions
                    ]
                )
            else:
                _, self._subscribe_mid = client.subscribe(
                    [(s.topic, 1) for s in self._subscriptions]
                )
        self.connected.set()
        if self._on_connected_cb is not None:
            self._on_connected_cb()
        if not self._subscriptions:
            self._now_subscribed()

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError` around the connect, and passes nothing:
        # the exception being handled is the reason (refused, unreachable, TLS verification).
        exc = sys.exc_info()[1]
        self._failed("broker_unreachable", str(exc) if exc is not None else "unknown error")

    def _failed(self, event: str, reason: str) -> None:
        """One log line per distinct failure; paho retries with backoff meanwhile. Refusals
        (credentials, authorisation) are errors; unreachable is a warning, like a dropped link:
        it may pass (broker restarting, network down)."""
        if reason != self._last_failure:
            self._last_failure = reason
            (log.error if event == "broker_refused" else log.warning)(
                event,
                client_id=self._client_id,
                host=self._settings.host,
                port=self._settings.port,
                tls=self._settings.use_tls,
                reason=reason,
            )

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self.subscribed.clear()
        if was_connected and not self._stopping:
            self._blame()
            if self._lost_at is None:  # one line per outage, however many retries follow
                self._lost_at = time.monotonic()
                self._log_outage("broker_lost", link=self._name, reason=str(reason_code))
        if self._on_disconnected_cb is not None:
            self._on_disconnected_cb()

    def _blame(self) -> None:
        """The link dropped: if the same message was the oldest one sent and unacknowledged at
        REFUSED_AFTER disconnects in a row, the broker refuses its topic (NATS drops the link
        over a `.` in a topic, and paho sends the message again on every reconnect). The
        topic's queued messages are dropped and later ones not sent, with one error naming it.

        The oldest unacknowledged message is the culprit: paho resends in order, and the
        broker acknowledged those before it. Sent on three connections in a row and dropped
        each time without an acknowledgement is no accident of a restarting broker."""
        client = self._client
        # Private (SLF001): paho keeps its unacknowledged messages to itself; reading them is the
        # only way to see which one the broker keeps hanging up on. Its own lock guards them.
        with client._out_message_mutex:  # noqa: SLF001
            out = client._out_messages  # noqa: SLF001
            oldest = next(iter(out.values()), None)
            if oldest is None or oldest.state != paho.mqtt_ms_wait_for_puback:
                self._blamed = None  # nothing sent and unacknowledged on this connection
                return
            topic = oldest.topic
            count = self._blamed[1] + 1 if self._blamed and self._blamed[0] is oldest else 1
            self._blamed = (oldest, count)
            if count < REFUSED_AFTER:
                return
            self._blamed = None
            self._refused[topic] = None
            if len(self._refused) > MAX_REFUSED_TOPICS:
                self._refused.popitem(last=False)
            # Dropped before the next connection (_on_pre_connect), not here: paho may call
            # this from inside its own loop over the same messages (a resend that failed).
            self._purge.add(topic)
        log.error(
            "broker_refuses_topic",
            link=self._name,
            topic=topic,
            disconnects=REFUSED_AFTER,
            consequence="its messages are dropped, none sent to it again",
        )

    def _on_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        """Before each connection attempt (paho has just reset what is in flight, and resends
        in the CONNACK handler): drop the queued messages of topics found refused."""
        if not self._purge:
            return
        with client._out_message_mutex:  # noqa: SLF001  # as in _blame
            out = client._out_messages  # noqa: SLF001
            for mid in [mid for mid, m in out.items() if m.topic in self._purge]:
                del out[mid]
        self._purge.clear()

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            topics = [sub.topic for sub in self._subscriptions]
            log.error("subscription_refused", reasons=refused, topics=topics)
        if mid == self._subscribe_mid:
            self._now_subscribed()

    def _now_subscribed(self) -> None:
        self.subscribed.set()
        if self._on_subscribed_cb is not None:
            self._on_subscribed_cb()

    def _on_unsubscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._unsubscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            props = msg.properties
            response_topic = getattr(props, "ResponseTopic", None) if props else None
            correlation = getattr(props, "CorrelationData", None) if props else None
            self._on_message_cb(
                Inbound(msg.topic, bytes(msg.payload), response_topic, correlation, msg.retain)
            )
        except Exception:
            # An exception escaping a paho callback would stop the network thread.
            log.exception("message_handler_failed")


def _paho_client(
    settings: MqttSettings,
    client_id: str,
    session: mqttclient.Session,
    status_topic: str | None,
    will_payload: bytes | None,
) -> paho.Client:
    """A link's paho client: the factory's, with the daemon's reconnect back-off and bounds,
    and the Last Will when the link has a status."""
    will = None
    if status_topic is not None and will_payload is not None:
        will = mqttclient.Will(status_topic, will_payload)
    client = mqttclient.new_client(settings, client_id, session=session, will=will)
    client.reconnect_delay_set(
        min_delay=max(1, round(settings.reconnect_min_delay)),
        max_delay=max(1, round(settings.reconnect_max_delay)),
    )
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(MAX_QUEUED_OUT)
    return client
