"""The broker link: paho-mqtt 2.x with MQTT 5 (3.1.1 selectable), a Last Will, retained status,
reconnect with exponential backoff, resubscribe on every connect, and a persistent session.

paho's network loop runs on its own thread; callbacks here only parse and hand over, never block.
QoS 1 messages published while the link is down are queued by paho and sent on reconnect.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .settings import MqttSettings

log = structlog.get_logger("qwen_edge.mqtt")

# How long the broker keeps the daemon's session (its subscriptions and queued QoS 1 requests)
# while the daemon is away, e.g. during a restart.
SESSION_EXPIRY_S = 3600
MAX_QUEUED_OUT = 20_000  # bounded memory when the broker is unreachable for long


@dataclass(frozen=True, slots=True)
class Inbound:
    topic: str
    payload: bytes
    response_topic: str | None
    correlation: bytes | None


OnMessage = Callable[[Inbound], None]


class MqttLink:
    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        subscriptions: tuple[str, ...],
        status_topic: str,
        will_payload: bytes,
        on_message: OnMessage,
        on_connected: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._subscriptions = subscriptions
        self._status_topic = status_topic
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected
        self.v5 = settings.protocol == "5"
        self.connected = threading.Event()

        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
            clean_session=None if self.v5 else False,
        )
        if settings.username is not None:
            password = settings.password.get_secret_value() if settings.password else None
            client.username_pw_set(settings.username, password)
        client.will_set(status_topic, will_payload, qos=1, retain=True)
        client.reconnect_delay_set(
            min_delay=max(1, round(settings.reconnect_min_delay)),
            max_delay=max(1, round(settings.reconnect_max_delay)),
        )
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(MAX_QUEUED_OUT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting until stop()."""
        properties = None
        if self.v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
        self._client.connect_async(
            self._settings.host,
            self._settings.port,
            keepalive=self._settings.keepalive,
            clean_start=False,
            properties=properties,
        )
        self._client.loop_start()

    def stop(self, final_status: bytes, timeout: float = 5.0) -> None:
        """Publish the final retained status, wait for queued messages, disconnect."""
        info = self._client.publish(self._status_topic, final_status, qos=1, retain=True)
        if self.connected.is_set():
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.warning("final_status_not_sent")
        self._client.disconnect()
        self._client.loop_stop()

    def wait_flushed(self, timeout: float) -> bool:
        """Wait until paho holds no unacknowledged outgoing message, or `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self._client._out_messages:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    # -- sending -------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, correlation: bytes | None = None) -> None:
        """QoS 1 publish; safe from any thread. Queued by paho while disconnected."""
        properties = None
        if correlation is not None and self.v5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation
        info = self._client.publish(topic, payload, qos=1, properties=properties)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            log.warning("publish_dropped_queue_full", topic=topic)

    def publish_status(self, payload: bytes) -> None:
        self._client.publish(self._status_topic, payload, qos=1, retain=True)

    # -- paho callbacks (network thread) ---------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error("broker_refused", reason=str(reason_code))
            return
        log.info(
            "broker_connected",
            host=self._settings.host,
            port=self._settings.port,
            session_present=flags.session_present,
        )
        client.subscribe([(topic, 1) for topic in self._subscriptions])
        self.connected.set()
        if self._on_connected_cb is not None:
            self._on_connected_cb()

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
        if was_connected:
            log.warning("broker_disconnected", reason=str(reason_code))

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            props = msg.properties
            response_topic = getattr(props, "ResponseTopic", None) if props else None
            correlation = getattr(props, "CorrelationData", None) if props else None
            self._on_message_cb(Inbound(msg.topic, bytes(msg.payload), response_topic, correlation))
        except Exception:
            # An exception escaping a paho callback would stop the network thread.
            log.exception("message_handler_failed")
