"""The one place a paho client is made from settings: protocol version, client id, TLS and
credentials (tls.py), session (clean start, expiry) and Last Will.

Used by the daemon's links (node/link.py), the client library (client/, and `chat` on it), `fleet`,
`doctor` and `homeassistant --remove`. Callbacks, reconnect delays and queue limits stay with
each user: they differ by job, the connection's identity does not.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import uuid
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .settings import MqttSettings
from .tls import apply_credentials


@dataclass(frozen=True, slots=True)
class Session:
    """What the broker keeps of this client while its link is down.

    `expiry_s` 0: nothing, the session ends with the connection (MQTT 3.1.1 clean session).
    `resume`: the first connect takes up a session an earlier process left (the daemon's queued
    requests across a restart); else the first connect starts afresh and reconnects resume."""

    expiry_s: int = 0
    resume: bool = False

    def clean_start(self, v5: bool) -> paho.CleanStartOption:
        """paho's `clean_start` for connect(): MQTT 5 only (paho refuses any other value on
        3.1.1, where Client's clean_session says it)."""
        if not v5:
            return paho.MQTT_CLEAN_START_FIRST_ONLY
        if self.resume:
            return False
        return True if self.expiry_s == 0 else paho.MQTT_CLEAN_START_FIRST_ONLY

    def clean_session(self, v5: bool) -> bool | None:
        """paho's `clean_session` (MQTT 3.1.1 only) for Client(). 3.1.1 has no expiry: a kept
        session would outlive the client for good, so only a resuming one keeps it."""
        return None if v5 else not self.resume


TRANSIENT: Final = Session()  # the tools: connect, look, leave


@dataclass(frozen=True, slots=True)
class Will:
    """A retained QoS 1 message the broker publishes when the link is lost uncleanly."""

    topic: str
    payload: bytes


def client_id_for(mqtt: MqttSettings, stem: str) -> str:
    """The MQTT client id of a tool or device: with an account, the account name, since a broker
    that binds device accounts to their name refuses any other (docs/security.md); anonymous,
    `stem` and a random suffix, so several programs can run side by side."""
    return mqtt.username or f"{stem}-{uuid.uuid4().hex[:8]}"


def new_client(
    mqtt: MqttSettings,
    client_id: str,
    *,
    session: Session = TRANSIENT,
    will: Will | None = None,
    tls: ssl.SSLContext | None = None,
) -> paho.Client:
    """A paho client for `mqtt`, not yet connected; connect it with connect().
    `tls`: a context already built by tls.client_context(mqtt), so it is not built twice.
    ConfigError when the TLS files cannot be used."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if mqtt.protocol == "5" else paho.MQTTv311,
        clean_session=session.clean_session(mqtt.protocol == "5"),
    )
    apply_credentials(client, mqtt, tls)
    client.on_socket_open = no_delay
    if will is not None:
        client.will_set(will.topic, will.payload, qos=1, retain=True)
    return client


def no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Every packet out at once (TCP_NODELAY), as mosquitto's `set_tcp_nodelay` does on its side.
    paho leaves Nagle's algorithm on: a PUBLISH written while the PUBACK just sent is not yet
    acknowledged waits for the broker's delayed ACK, 40 ms on Linux (a reply's `start` right
    after the request's PUBACK; a device's request after its own PUBACK)."""
    with contextlib.suppress(AttributeError, OSError):  # not a TCP socket (a unix socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect(
    client: paho.Client,
    mqtt: MqttSettings,
    *,
    session: Session = TRANSIENT,
    background: bool = False,
) -> None:
    """Connect `client` (made by new_client with the same session) to the broker of `mqtt`.
    `background`: return at once and let paho's loop connect and keep reconnecting; else
    OSError when the broker cannot be reached."""
    v5 = mqtt.protocol == "5"
    properties = None
    if v5 and session.expiry_s > 0:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = session.expiry_s
    clean_start = session.clean_start(v5)
    if background:
        client.connect_async(
            mqtt.host,
            mqtt.port,
            keepalive=mqtt.keepalive,
            clean_start=clean_start,
            properties=properties,
        )
    else:
        client.connect(
            mqtt.host,
            mqtt.port,
            keepalive=mqtt.keepalive,
            clean_start=clean_start,
            properties=properties,
        )


def disconnect(client: paho.Client, mqtt: MqttSettings, *, end_session: bool = False) -> None:
    """Disconnect; `end_session` (MQTT 5): the broker drops a kept session at once, as nothing
    will come back for it."""
    properties = None
    if end_session and mqtt.protocol == "5":
        properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
    client.disconnect(properties=properties)
