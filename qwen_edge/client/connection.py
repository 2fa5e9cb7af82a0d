"""The client's one MQTT connection: connects, subscribes, publishes requests and cancels, and
routes each reply message, parsed on paho's network thread, to the request it belongs to."""

from __future__ import annotations

import contextlib
import queue
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .. import mqttclient
from ..protocol import CancelRequest, ErrorCode, ErrorMessage, ReplyMessage, Status, parse_reply
from ..settings import MqttSettings
from ..topics import Leaf, Topics, TopicTree, WatchKind, node_filters, parse_node_topic

# How long the broker keeps this client's session (subscriptions, reply messages queued for it)
# while its link is down, e.g. across a broker restart. Dropped at once by close().
SESSION_EXPIRY_S: Final = 600
SESSION: Final = mqttclient.Session(expiry_s=SESSION_EXPIRY_S)


# -- what the network thread hands to a waiting request ------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrived:
    payload: bytes
    message: ReplyMessage


class LinkEvent(Enum):
    """A change of the link that the waiting requests act on."""

    RECONNECTED = "reconnected"
    CLOSED = "closed"


Item = Arrived | LinkEvent
Sink = Callable[[Item], None]


class Connection:
    """One paho client: connects, subscribes, publishes, and routes reply messages by request id
    (or the MQTT 5 correlation data, which the node copies from the request)."""

    def __init__(
        self,
        mqtt: MqttSettings,
        client_id: str,
        prefix: str,
        resend_after: float,
    ) -> None:
        self.mqtt = mqtt
        self.client_id = client_id
        self.prefix = prefix
        self.resend_after = resend_after
        self.v5 = mqtt.protocol == "5"
        # MQTT 5: replies come to an inbox of this client object, not to every process that uses
        # the same client id (a kiosk and a terminal on one account see only their own).
        self.inbox = f"inbox-{uuid.uuid4().hex[:12]}"
        self._routes: dict[str, tuple[Sink, str, int]] = {}  # request id -> sink, target, bytes
        self._lock = threading.Lock()
        self._statuses: dict[str, Status] = {}
        self._first: queue.Queue[str | None] = queue.Queue()  # None, or why the broker refused
        self._subscribe_mid: int | None = None
        self._connected_once = False
        self.connected = threading.Event()
        # A broker that binds a device account to the client id of its name (docs/security.md)
        # refuses any other; an anonymous one lets several programs share a client_id. On 3.1.1
        # the session is not kept: replies missed across a broker restart come back by
        # resending (a replay).
        self._client = mqttclient.new_client(
            mqtt, mqttclient.client_id_for(mqtt, client_id), session=SESSION
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # -- life cycle -----------------------------------------------------------------------------

    def connect(self, timeout: float) -> None:
        """Connect and subscribe; OSError (ConnectionError when refused) if that fails."""
        # Clean start the first time only: reconnects resume the session.
        mqttclient.connect(self._client, self.mqtt, session=SESSION)
        self._client.loop_start()
        try:
            refused = self._first.get(timeout=timeout)
        except queue.Empty:
            refused = f"no answer within {timeout:g} s"
        if refused is not None:
            self._client.disconnect()
            self._client.loop_stop()
            raise ConnectionError(f"the broker refused the connection: {refused}")

    def close(self) -> None:
        # Nothing is waiting for this session any more.
        mqttclient.disconnect(self._client, self.mqtt, end_session=True)
        self._client.loop_stop()
        with self._lock:
            sinks = [sink for sink, _, _ in self._routes.values()]
            self._routes.clear()
        for sink in sinks:
            sink(LinkEvent.CLOSED)

    # -- requests -------------------------------------------------------------------------------

    def register(self, request_id: str, sink: Sink, target: str, size: int) -> None:
        with self._lock:
            self._routes[request_id] = (sink, target, size)

    def unregister(self, request_id: str) -> None:
        with self._lock:
            self._routes.pop(request_id, None)

    def topics(self, target: str) -> Topics:
        return Topics(self.prefix, target)

    def send_request(self, target: str, request_id: str, payload: bytes) -> None:
        properties = None
        if self.v5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.ResponseTopic = self.topics(target).reply_namespace(self.client_id) + (
                self.inbox
            )
            properties.CorrelationData = request_id.encode()
        # QoS 1; paho queues it while the link is down and sends it on reconnect.
        self._client.publish(
            self.topics(target).request(self.client_id), payload, qos=1, properties=properties
        )

    def send_cancel(self, target: str, request_id: str) -> None:
        self._client.publish(
            self.topics(target).cancel(self.client_id),
            CancelRequest(request_id=request_id).encode(),
            qos=1,
        )

    def status(self, node: str) -> Status | None:
        return self._statuses.get(node)

    # -- paho callbacks (network thread): parse, hand over, never block ----------------------------

    def _subscriptions(self) -> list[tuple[str, int]]:
        every = self.topics("+")
        replies = every.reply(self.client_id, self.inbox if self.v5 else "#")
        return [(replies, 1), (every.error(self.client_id), 1), (node_filters(self.prefix)[0], 1)]

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:  # e.g. a wrong password
            if not self._connected_once:
                self._first.put(str(reason))
            return
        _, self._subscribe_mid = client.subscribe(self._subscriptions())
        self.connected.set()
        if self._connected_once:
            # Whatever was missed while away: every waiting request is sent again, same id.
            with self._lock:
                sinks = [sink for sink, _, _ in self._routes.values()]
            for sink in sinks:
                sink(LinkEvent.RECONNECTED)

    def _on_disconnect(self, *args: Any) -> None:
        self.connected.clear()

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if mid == self._subscribe_mid and not self._connected_once:
            self._connected_once = True
            refused = [str(rc) for rc in reason_codes if rc.is_failure]
            self._first.put(f"subscription refused: {refused[0]}" if refused else None)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        # An exception escaping a paho callback would stop its network thread; a message that
        # cannot be routed is not ours.
        with contextlib.suppress(Exception):
            self._route(msg)

    def _route(self, msg: paho.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        watched = parse_node_topic(self.prefix, msg.topic)
        if watched is not None:
            if watched.kind is WatchKind.STATUS:
                self._on_status(watched.name, payload)
            return
        message = parse_reply(payload)
        if message is None:
            return
        correlation = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        request_id = correlation.decode("utf-8", "replace") if correlation else message.request_id
        with self._lock:
            if request_id is not None:
                route = self._routes.get(request_id)
                sinks = [route[0]] if route is not None else []
            else:
                sinks = self._unnamed_error_sinks(msg.topic, message)
        for sink in sinks:
            sink(Arrived(payload, message))

    def _unnamed_error_sinks(self, topic: str, message: ReplyMessage) -> list[Sink]:
        """Whose request an error without request id answers. The node names none only when it
        could not read it: the client's ids are always valid, so that is `too_large`, whose
        `size` field gives the refused payload's bytes (the node could not read its id)."""
        if not isinstance(message, ErrorMessage) or message.code != ErrorCode.TOO_LARGE:
            return []
        address = TopicTree(self.prefix).parse(topic)
        if address is None or address.leaf is not Leaf.ERROR or address.args != (self.client_id,):
            return []
        target = address.target
        size = message.size if message.size is not None else -1
        return [
            sink
            for sink, sent_to, sent_size in self._routes.values()
            if sent_to == target and sent_size == size
        ]

    def _on_status(self, node: str, payload: bytes) -> None:
        status = Status.parse(payload)
        if status is not None:
            self._statuses[node] = status
        elif not payload:  # cleared: nothing known of the node any more
            self._statuses.pop(node, None)
