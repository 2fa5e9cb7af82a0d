"""The one MQTT client factory: identity and session semantics against a real mosquitto."""

from __future__ import annotations

import queue
import socket
import threading
import uuid
from typing import Any

import paho.mqtt.client as paho
import pytest
from pydantic import SecretStr

from devtools.harness import Broker
from qwen_edge import mqttclient
from qwen_edge.mqttclient import TRANSIENT, Session
from qwen_edge.settings import MqttSettings

DAEMON = Session(expiry_s=60, resume=True)
DEVICE = Session(expiry_s=60)


def test_with_an_account_the_client_id_is_the_account_name() -> None:
    # A broker that binds device accounts to their name refuses any other (docs/security.md).
    mqtt = MqttSettings(username="devA", password=SecretStr("pw"))
    assert mqttclient.client_id_for(mqtt, "qwen-edge-fleet") == "devA"


def test_anonymous_tools_get_distinct_client_ids() -> None:
    mqtt = MqttSettings()
    ids = {mqttclient.client_id_for(mqtt, "qwen-edge-fleet") for _ in range(20)}
    assert len(ids) == 20
    assert all(i.startswith("qwen-edge-fleet-") for i in ids)


def _session_client(
    mqtt: MqttSettings, client_id: str, session: Session, topic: str, got: queue.Queue[bytes]
) -> paho.Client:
    client = mqttclient.new_client(mqtt, client_id, session=session)
    subscribed = threading.Event()

    def on_connect(c: paho.Client, *_: Any) -> None:
        c.subscribe(topic, qos=1)

    client.on_connect = on_connect
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = lambda c, u, msg: got.put(bytes(msg.payload))
    mqttclient.connect(client, mqtt, session=session)
    client.loop_start()
    assert subscribed.wait(5)
    return client


def _close(client: paho.Client) -> None:
    client.disconnect()
    client.loop_stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize(
    ("session", "kept"), [(DAEMON, True), (TRANSIENT, False)], ids=["daemon", "tool"]
)
def test_a_resumed_session_gets_what_was_sent_while_away(
    module_broker: Broker, protocol: str, session: Session, kept: bool
) -> None:
    """The daemon's session outlives its process (requests queued across a restart); a tool's
    ends with its connection."""
    mqtt = MqttSettings(host="127.0.0.1", port=module_broker.port, protocol=protocol)
    client_id = f"s-{uuid.uuid4().hex[:8]}"
    topic = f"test/{client_id}"
    got: queue.Queue[bytes] = queue.Queue()
    _close(_session_client(mqtt, client_id, session, topic, got))

    sender = mqttclient.new_client(mqtt, f"sender-{uuid.uuid4().hex[:8]}")
    mqttclient.connect(sender, mqtt)
    sender.loop_start()
    sender.publish(topic, b"while away", qos=1).wait_for_publish(5)
    _close(sender)

    # A new client object, as a new process would make: it has only the broker's session.
    again = _session_client(mqtt, client_id, session, topic, got)
    try:
        if kept:
            assert got.get(timeout=5) == b"while away"
        else:
            with pytest.raises(queue.Empty):
                got.get(timeout=1)
    finally:
        _close(again)


def test_a_device_session_ends_when_it_says_so(module_broker: Broker) -> None:
    """The client library keeps its session across link drops, and drops it at close()."""
    mqtt = MqttSettings(host="127.0.0.1", port=module_broker.port)
    client_id = f"d-{uuid.uuid4().hex[:8]}"
    topic = f"test/{client_id}"
    got: queue.Queue[bytes] = queue.Queue()
    first = _session_client(mqtt, client_id, DEVICE, topic, got)
    mqttclient.disconnect(first, mqtt, end_session=True)
    first.loop_stop()

    sender = mqttclient.new_client(mqtt, f"sender-{uuid.uuid4().hex[:8]}")
    mqttclient.connect(sender, mqtt)
    sender.loop_start()
    sender.publish(topic, b"nobody waits", qos=1).wait_for_publish(5)
    _close(sender)

    # Resuming on purpose: had the session been kept, its queued message would come now.
    again = _session_client(mqtt, client_id, DAEMON, topic, got)
    try:
        with pytest.raises(queue.Empty):
            got.get(timeout=1)
    finally:
        _close(again)


@pytest.mark.parametrize("background", [False, True], ids=["connect", "connect_async"])
def test_packets_leave_at_once_nagle_off(module_broker: Broker, background: bool) -> None:
    """paho leaves Nagle's algorithm on: a PUBLISH written while the client's last PUBACK was
    unacknowledged waited for the broker's delayed ACK (40 ms), which every reply's first chunk
    paid. Every client the factory makes (the daemon's links, the client library, the tools)
    sets TCP_NODELAY, also on a reconnect's new socket."""
    mqtt = MqttSettings(host="127.0.0.1", port=module_broker.port)
    client = mqttclient.new_client(mqtt, f"nd-{uuid.uuid4().hex[:8]}")
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    mqttclient.connect(client, mqtt, background=background)
    client.loop_start()
    try:
        for _ in range(2):  # the first connection, then a reconnect's socket
            assert connected.wait(10)
            sock = client.socket()
            assert isinstance(sock, socket.socket)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            connected.clear()
            sock.shutdown(socket.SHUT_RDWR)  # paho reconnects
    finally:
        _close(client)
