"""Security with a real mosquitto made by scripts/broker-setup --tls, as production brokers are.

The broker fixture runs broker-setup into a temporary directory (listeners on 127.0.0.1, free
ports) with the certificates of scripts/make-certs, and adds only `log_type all` so that the
broker's log records every PUBLISH it receives (which is how the tests see everything the daemon
sent). tests/test_broker_setup.py tries the same set-up as a hostile device would.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devtools.harness import NODE, PREFIX, ROOT, SMOLLM, Broker, Daemon, free_port

BROKER_SETUP = ROOT / "scripts" / "broker-setup"
MAKE_CERTS = ROOT / "scripts" / "make-certs"
DAEMON_USER = "qwen-edge"
PASSWORDS = {DAEMON_USER: "d@emon-Secret-93", "devA": "pw-devA", "devB": "pw-devB", "devC": "x"}
DAEMON_CLIENT_ID = f"qwen-edge-{NODE}"
NOT_AUTHORIZED = 0x87

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto_ctrl") is None or shutil.which("openssl") is None,
    reason="needs mosquitto_ctrl and openssl",
)


def make_certs(directory: Path, *clients: str) -> Path:
    args = [str(MAKE_CERTS), str(directory), "-s", "localhost", "-s", "127.0.0.1"]
    for client in clients:
        args += ["-c", client]
    subprocess.run(args, check=True, capture_output=True, timeout=60)
    return directory


class SecureBroker(Broker):
    """mosquitto as scripts/broker-setup --tls makes it (see the module docstring)."""

    def __init__(self, workdir: Path, certs: Path, *, mutual_tls: bool = False) -> None:
        self.port = free_port()
        self.ws_port = free_port()
        self.workdir = workdir
        self.proc = None
        # make-certs (which broker-setup runs) keeps a CA and broker certificate already there.
        shutil.copytree(certs, workdir / "certs")
        args = [str(BROKER_SETUP), "--dir", str(workdir), "--tls", "--bind", "127.0.0.1"]
        args += ["--port", str(self.port), "--wss-port", str(self.ws_port)]
        for user in PASSWORDS:
            args += ["--daemon" if user == DAEMON_USER else "--device", user]
        lines = "".join(f"{user}:{password}\n" for user, password in PASSWORDS.items())
        done = subprocess.run(
            [*args, "--passwords", "-"],
            input=lines,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        snippet = workdir / "conf.d" / "qwen-edge.conf"
        if mutual_tls:
            text = snippet.read_text()
            # Right after the first listener's TLS settings: the MQTT listener's.
            text = text.replace(
                "tls_version tlsv1.2\n", "tls_version tlsv1.2\nrequire_certificate true\n", 1
            )
            snippet.write_text(text)
        self.conf = workdir / "mosquitto.conf"
        with self.conf.open("a") as conf:
            conf.write("log_type all\n")

    def log(self) -> str:
        return (self.workdir / "mosquitto.log").read_text(errors="replace")

    def publishes_from(self, client_id: str) -> list[str]:
        """Topics of every PUBLISH the broker received from `client_id`."""
        pattern = re.compile(
            rf"Received PUBLISH from {re.escape(client_id)} \(d\d, q\d, r\d, m\d+, '([^']*)'"
        )
        return pattern.findall(self.log())


class Device:
    """A device over TLS with its own account; records messages and PUBACK reason codes."""

    def __init__(
        self,
        broker: SecureBroker,
        certs: Path,
        user: str,
        *,
        client_id: str | None = None,
        subscribe: tuple[str, ...] = (),
        certificate: str | None = None,
    ) -> None:
        self.user = user
        self.messages: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.pubacks: dict[int, int] = {}
        self._acked: queue.Queue[int] = queue.Queue()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or user,  # the broker binds a device's client id to its name
            protocol=paho.MQTTv5,
        )
        keyfile = certfile = None
        if certificate is not None:
            certfile, keyfile = str(certs / f"{certificate}.crt"), str(certs / f"{certificate}.key")
        self.client.tls_set(ca_certs=str(certs / "ca.crt"), certfile=certfile, keyfile=keyfile)
        self.client.username_pw_set(user, PASSWORDS[user])
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = lambda *a: self._acked.put(-1)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        for topic in subscribe:
            self.client.subscribe(topic, qos=1)
            assert self._acked.get(timeout=10) == -1

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            data = json.loads(msg.payload)
        except ValueError:
            data = {"_raw": msg.payload}
        self.messages.put((msg.topic, data))

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        self.pubacks[mid] = reason.value
        self._acked.put(mid)

    def publish(self, topic: str, body: dict[str, Any], props: Properties | None = None) -> int:
        """Publish at QoS 1 and return the broker's PUBACK reason code."""
        info = self.client.publish(topic, json.dumps(body), qos=1, properties=props)
        info.wait_for_publish(10)
        deadline = time.monotonic() + 10
        while info.mid not in self.pubacks and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.pubacks[info.mid]

    def ask(self, as_client: str | None = None, **fields: Any) -> tuple[str, int]:
        rid = uuid.uuid4().hex[:12]
        body = {"request_id": rid, "message": "Say yes.", "max_tokens": 4, **fields}
        topic = f"{PREFIX}/{NODE}/request/{as_client or self.user}"
        return rid, self.publish(topic, body)

    def reply(self, rid: str, timeout: float = 120) -> list[tuple[str, dict[str, Any]]]:
        got: list[tuple[str, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while not got or got[-1][1].get("type") not in ("done", "error"):
            topic, data = self.messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            if data.get("request_id") == rid:
                got.append((topic, data))
        return got

    def drain(self, seconds: float) -> list[tuple[str, dict[str, Any]]]:
        got = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                got.append(self.messages.get(timeout=max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                break
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def daemon_env(certs: Path, secrets: Path, **extra: str) -> dict[str, str]:
    password_file = secrets / "mqtt-password"
    password_file.write_text(PASSWORDS[DAEMON_USER] + "\n")
    return {
        "QWEN_EDGE_MQTT__CA_FILE": str(certs / "ca.crt"),
        "QWEN_EDGE_MQTT__USERNAME": DAEMON_USER,
        "QWEN_EDGE_MQTT__PASSWORD_FILE": str(password_file),
        "QWEN_EDGE_MODEL__THREADS": "1",
        **extra,
    }


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"), "devA", DAEMON_USER)


@pytest.fixture(scope="module")
def secure_broker(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    broker = SecureBroker(tmp_path_factory.mktemp("secure-broker"), certs)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def secure_daemon(
    secure_broker: SecureBroker, certs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("secure-daemon")
    d = Daemon(work, secure_broker, SMOLLM, **daemon_env(certs, work))
    d.start()
    yield d
    d.stop()


@pytest.fixture
def devices(secure_broker: SecureBroker, certs: Path) -> Iterator[Any]:
    made: list[Device] = []

    def make(user: str, **kw: Any) -> Device:
        device = Device(secure_broker, certs, user, **kw)
        made.append(device)
        return device

    yield make
    for device in made:
        device.close()


def connack(client: paho.Client, port: int, timeout: float = 10.0) -> int | None:
    """The broker's CONNACK reason code, or None when the connection ended without one."""
    got: queue.Queue[int | None] = queue.Queue()
    client.on_connect = lambda c, u, f, rc, p: got.put(rc.value)
    client.on_disconnect = lambda *a: got.put(None)
    client.on_connect_fail = lambda *a: got.put(None)
    try:
        client.connect("127.0.0.1", port)
    except OSError:
        return None
    client.loop_start()
    try:
        return got.get(timeout=timeout)
    finally:
        client.disconnect()
        client.loop_stop()


def own_topics(user: str) -> tuple[str, ...]:
    return (f"{PREFIX}/+/reply/{user}/#", f"{PREFIX}/+/error/{user}")


# -- isolation between devices -----------------------------------------------------------------


def test_device_gets_its_reply_and_another_device_sees_none_of_it(
    secure_daemon: Daemon, devices: Any
) -> None:
    dev_a = devices("devA", subscribe=own_topics("devA"))
    # devB asks for everything under the prefix: the broker refuses that filter and grants only
    # what devB may read.
    dev_b = devices("devB", subscribe=(f"{PREFIX}/#", f"{PREFIX}/+/status", f"{PREFIX}/+/stats"))
    rid, ack = dev_a.ask(conversation_id="c1")
    assert ack == 0
    reply = dev_a.reply(rid)
    assert reply[0][1]["type"] == "start" and reply[-1][1]["type"] == "done"
    assert {topic for topic, _ in reply} == {f"{PREFIX}/{NODE}/reply/devA/c1"}
    seen = [topic for topic, _ in dev_b.drain(2.0)]
    assert seen, "devB should at least see the node's retained status and stats"
    assert all(t in (f"{PREFIX}/{NODE}/status", f"{PREFIX}/{NODE}/stats") for t in seen), seen


def test_device_cannot_publish_into_another_devices_request_or_cancel_topic(
    secure_daemon: Daemon, secure_broker: SecureBroker, devices: Any
) -> None:
    dev_a = devices("devA", subscribe=own_topics("devA"))
    dev_b = devices("devB", subscribe=own_topics("devB"))
    rid, ack = dev_b.ask(as_client="devA")
    assert ack == NOT_AUTHORIZED  # MQTT 5 PUBACK: not authorized; the message went nowhere
    cancel_ack = dev_b.publish(f"{PREFIX}/{NODE}/cancel/devA", {"request_id": rid})
    assert cancel_ack == NOT_AUTHORIZED
    # Nor into the node's status (which would make the fleet think the node went offline).
    status_ack = dev_b.publish(f"{PREFIX}/{NODE}/status", {"state": "offline"})
    assert status_ack == NOT_AUTHORIZED
    time.sleep(2.0)
    assert not dev_a.drain(0.5) and not dev_b.drain(0.5)
    assert rid not in secure_daemon.log()  # the daemon never saw it
    # devB's own request still works.
    rid, ack = dev_b.ask()
    assert ack == 0 and dev_b.reply(rid)[-1][1]["type"] == "done"


def test_daemon_never_publishes_outside_the_requesters_namespace(
    secure_daemon: Daemon, secure_broker: SecureBroker, devices: Any, certs: Path
) -> None:
    # devC is the victim: it never sends anything, so nothing may ever be published for it.
    victim = devices("devC", subscribe=own_topics("devC"))
    dev_a = devices("devA", subscribe=(*own_topics("devA"), "elsewhere/#"))
    hostile_response_topics = [
        f"{PREFIX}/{NODE}/reply/devC/inbox",
        f"{PREFIX}/{NODE}/error/devC",
        f"{PREFIX}/{NODE}/status",
        f"{PREFIX}/{NODE}/reply/devA",  # the namespace itself, no conversation level
        f"{PREFIX}/{NODE}/reply/devA/+",
        f"{PREFIX}/{NODE}/reply/devA/#",
        f"{PREFIX}/pool/reply/devA/inbox",  # the pool's namespace, not this node's
        "elsewhere/devA",
    ]
    for topic in hostile_response_topics:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = topic
        props.CorrelationData = b"job"
        rid = uuid.uuid4().hex[:12]
        body = {"request_id": rid, "conversation_id": "c2", "message": "Hi", "max_tokens": 4}
        assert dev_a.publish(f"{PREFIX}/{NODE}/request/devA", body, props) == 0
        reply = dev_a.reply(rid)
        assert [(t, m["type"], m.get("code")) for t, m in reply] == [
            (f"{PREFIX}/{NODE}/reply/devA/c2", "error", "forbidden")
        ], topic
    # Payload tricks: fields naming another client or topic are not part of the protocol.
    tricks: list[dict[str, Any]] = [
        {"client_id": "devC", "reply_topic": f"{PREFIX}/{NODE}/reply/devC/x"},
        {"conversation_id": "../devC"},  # not a valid id: bad_request on the error topic
        {"conversation_id": "devC/x"},
    ]
    for fields in tricks:
        rid, ack = dev_a.ask(**fields)
        assert ack == 0
        end = dev_a.reply(rid)[-1]
        assert end[0].startswith((f"{PREFIX}/{NODE}/reply/devA/", f"{PREFIX}/{NODE}/error/devA"))
    # An MQTT client id that names another device: the broker refuses the connection.
    sneaky = paho.Client(CallbackAPIVersion.VERSION2, client_id="devC", protocol=paho.MQTTv5)
    sneaky.tls_set(ca_certs=str(certs / "ca.crt"))
    sneaky.username_pw_set("devA", PASSWORDS["devA"])
    assert connack(sneaky, secure_broker.port) == NOT_AUTHORIZED

    time.sleep(1.0)
    assert not victim.drain(0.5)
    assert not [m for m in dev_a.drain(0.5) if m[0].startswith("elsewhere/")]
    # Everything the daemon ever published on this broker, from the broker's own log.
    topics = secure_broker.publishes_from(DAEMON_CLIENT_ID)
    assert topics
    allowed = re.compile(rf"^{PREFIX}/{NODE}/(status|stats|reply/dev[AB]/[^/+#]+|error/dev[AB])$")
    assert [t for t in topics if not allowed.match(t)] == []
    # The pool link publishes only its start-up probe (docs/protocol.md, "The pool probe").
    probe = f"{PREFIX}/pool/request/$probe"
    assert set(secure_broker.publishes_from(f"{DAEMON_CLIENT_ID}-pool")) <= {probe}


# -- TLS and credentials -----------------------------------------------------------------------


def test_daemon_password_appears_in_no_log(secure_daemon: Daemon) -> None:
    assert secure_daemon.log_events(), "the daemon logged nothing?"
    assert PASSWORDS[DAEMON_USER] not in secure_daemon.log()


def test_config_masks_a_password_read_from_a_file(tmp_path: Path, certs: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")}
    env.update(daemon_env(certs, tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "qwen_edge", "config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert PASSWORDS[DAEMON_USER] not in done.stdout + done.stderr
    mqtt = json.loads(done.stdout)["mqtt"]
    assert mqtt["password"] == "***"
    assert mqtt["password_file"] == str(tmp_path / "mqtt-password")
    assert mqtt["tls"] == "auto" and mqtt["ca_file"] == str(certs / "ca.crt")


def failures_per_link(d: Daemon, event: str, links: int = 2) -> dict[str, list[dict[str, Any]]]:
    """Wait until each broker link (main and pool) has logged `event`, then a little longer
    (paho retries every 0.5-1 s meanwhile), and return the lines by client id."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if len({e["client_id"] for e in d.log_events() if e.get("event") == event}) >= links:
            break
        time.sleep(0.2)
    time.sleep(4.0)
    lines: dict[str, list[dict[str, Any]]] = {}
    for e in d.log_events():
        if e.get("event") == event:
            lines.setdefault(e["client_id"], []).append(e)
    return lines


def test_wrong_ca_daemon_does_not_connect_and_says_so_in_one_line(
    secure_broker: SecureBroker, tmp_path: Path, certs: Path
) -> None:
    other_ca = make_certs(tmp_path / "other-ca")
    env = daemon_env(certs, tmp_path, QWEN_EDGE_MQTT__CA_FILE=str(other_ca / "ca.crt"))
    d = Daemon(tmp_path / "daemon", secure_broker, SMOLLM, **env, QWEN_EDGE_NODE_ID="wrongca")
    handshakes_failed = secure_broker.log().count("alert unknown ca")
    d.start(wait_ready=False)
    try:
        lines = failures_per_link(d, "broker_unreachable")
        # paho keeps trying (the broker logs each failed handshake): wait for a few retries.
        deadline = time.monotonic() + 60
        while secure_broker.log().count("alert unknown ca") - handshakes_failed < 5:
            assert time.monotonic() < deadline, secure_broker.log()[-2000:]
            time.sleep(0.2)
        lines = failures_per_link(d, "broker_unreachable")
        # One line per connection (the node's and its pool link), however often paho retried.
        assert {k: len(v) for k, v in lines.items()} == {
            "qwen-edge-wrongca": 1,
            "qwen-edge-wrongca-pool": 1,
        }, d.log()
        for [line] in lines.values():
            assert "certificate verify failed" in line["reason"], line
            assert line["tls"] is True
        assert d.notify is not None and "READY=1" not in d.notify.lines()
        assert "qwen-edge-wrongca" not in secure_broker.log()  # no CONNECT ever got through
    finally:
        d.stop()
    assert PASSWORDS[DAEMON_USER] not in d.log()


def test_wrong_password_is_refused_and_logged_once_without_the_password(
    secure_broker: SecureBroker, tmp_path: Path, certs: Path
) -> None:
    env = daemon_env(certs, tmp_path, QWEN_EDGE_NODE_ID="badpw")
    (tmp_path / "mqtt-password").write_text("not-the-password\n")
    d = Daemon(tmp_path / "daemon", secure_broker, SMOLLM, **env)
    refusals = secure_broker.log().count("disconnected, not authorised")
    d.start(wait_ready=False)
    try:
        failures_per_link(d, "broker_refused")
        deadline = time.monotonic() + 60  # a few retries, each refused again
        while secure_broker.log().count("disconnected, not authorised") - refusals < 5:
            assert time.monotonic() < deadline, secure_broker.log()[-2000:]
            time.sleep(0.2)
        lines = failures_per_link(d, "broker_refused")
        assert {k: len(v) for k, v in lines.items()} == {
            "qwen-edge-badpw": 1,
            "qwen-edge-badpw-pool": 1,
        }, d.log()
        assert all("Not authorized" in v[0]["reason"] for v in lines.values()), lines
    finally:
        d.stop()
    assert "not-the-password" not in d.log()


def test_chat_and_fleet_commands_work_over_tls_with_a_device_account(
    secure_daemon: Daemon, secure_broker: SecureBroker, certs: Path, tmp_path: Path
) -> None:
    password_file = tmp_path / "pw"
    password_file.write_text(PASSWORDS["devA"])  # no line end: also fine
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")}
    env.update(
        QWEN_EDGE_MQTT__HOST="127.0.0.1",
        QWEN_EDGE_MQTT__PORT=str(secure_broker.port),
        QWEN_EDGE_MQTT__CA_FILE=str(certs / "ca.crt"),
        QWEN_EDGE_MQTT__USERNAME="devA",
        QWEN_EDGE_MQTT__PASSWORD_FILE=str(password_file),
    )
    chat = subprocess.run(
        [sys.executable, "-m", "qwen_edge", "chat", "--node", NODE, "--max-tokens", "8", "Hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()
    assert "[stop" in chat.stderr or "[length" in chat.stderr
    fleet = subprocess.run(
        [sys.executable, "-m", "qwen_edge", "fleet", "--json", "--wait", "0.5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert {n["node"]: n["state"] for n in json.loads(fleet.stdout)}[NODE] == "online"
    # A wrong password: refused by the broker, said in one line, the password in none.
    password_file.write_text("wrong-pw-123\n")
    wrong = subprocess.run(
        [sys.executable, "-m", "qwen_edge", "chat", "--node", NODE, "Hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert wrong.returncode == 1
    assert wrong.stderr.strip().splitlines() == [
        f"qwen-edge chat: cannot reach 127.0.0.1:{secure_broker.port}: "
        "the broker refused the connection: Not authorized"
    ]
    password_file.write_text(PASSWORDS["devA"])
    # Without the CA the same command refuses the broker's certificate, in one line.
    del env["QWEN_EDGE_MQTT__CA_FILE"]
    env["QWEN_EDGE_MQTT__TLS"] = "true"  # the system's CAs, which do not know ours
    refused = subprocess.run(
        [sys.executable, "-m", "qwen_edge", "chat", "--node", NODE, "Hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 1
    assert "certificate verify failed" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_kiosk_page_reaches_the_broker_over_secure_websockets(
    secure_daemon: Daemon, secure_broker: SecureBroker, certs: Path
) -> None:
    got: queue.Queue[bytes] = queue.Queue()
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="devA", transport="websockets", protocol=paho.MQTTv5
    )
    client.tls_set(ca_certs=str(certs / "ca.crt"))
    client.username_pw_set("devA", PASSWORDS["devA"])
    client.on_connect = lambda c, *a: c.subscribe(f"{PREFIX}/{NODE}/status", qos=1)
    client.on_message = lambda c, u, msg: got.put(msg.payload)
    client.connect("127.0.0.1", secure_broker.ws_port)
    client.loop_start()
    try:
        assert json.loads(got.get(timeout=10))["state"] == "online"
    finally:
        client.disconnect()
        client.loop_stop()


def test_anonymous_and_plain_tcp_clients_are_refused(
    secure_broker: SecureBroker, certs: Path
) -> None:
    anonymous = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    anonymous.tls_set(ca_certs=str(certs / "ca.crt"))
    assert connack(anonymous, secure_broker.port) == NOT_AUTHORIZED
    wrong = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    wrong.tls_set(ca_certs=str(certs / "ca.crt"))
    wrong.username_pw_set("devA", PASSWORDS["devB"])
    assert connack(wrong, secure_broker.port) in (NOT_AUTHORIZED, 0x86)  # 0x86: bad password
    # Plain MQTT on the TLS port: never a CONNACK.
    plain = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    plain.username_pw_set("devA", PASSWORDS["devA"])
    assert connack(plain, secure_broker.port) is None
    # The right credentials do connect (so the refusals above are not a broken broker).
    right = paho.Client(CallbackAPIVersion.VERSION2, client_id="devA", protocol=paho.MQTTv5)
    right.tls_set(ca_certs=str(certs / "ca.crt"))
    right.username_pw_set("devA", PASSWORDS["devA"])
    assert connack(right, secure_broker.port) == 0


# -- mutual TLS --------------------------------------------------------------------------------


def test_mutual_tls_with_the_client_key_as_a_systemd_credential(
    certs: Path, tmp_path: Path
) -> None:
    broker = SecureBroker(tmp_path / "broker", certs, mutual_tls=True)
    broker.start()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    # What systemd's LoadCredential= provides: the password and the client key.
    shutil.copy(certs / f"{DAEMON_USER}.key", credentials / "mqtt-client-key")
    (credentials / "mqtt-password").write_text(PASSWORDS[DAEMON_USER] + "\n")
    d = Daemon(
        tmp_path / "daemon",
        broker,
        SMOLLM,
        CREDENTIALS_DIRECTORY=str(credentials),
        QWEN_EDGE_MQTT__CA_FILE=str(certs / "ca.crt"),
        QWEN_EDGE_MQTT__CERTFILE=str(certs / f"{DAEMON_USER}.crt"),
        QWEN_EDGE_MQTT__USERNAME=DAEMON_USER,
        QWEN_EDGE_MODEL__THREADS="1",
    )
    device = None
    try:
        d.start()
        device = Device(broker, certs, "devA", subscribe=own_topics("devA"), certificate="devA")
        rid, ack = device.ask()
        assert ack == 0 and device.reply(rid)[-1][1]["type"] == "done"
        # Without a client certificate the broker ends the connection before any CONNACK.
        bare = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        bare.tls_set(ca_certs=str(certs / "ca.crt"))
        bare.username_pw_set("devB", PASSWORDS["devB"])
        assert connack(bare, broker.port) is None
    finally:
        if device is not None:
            device.close()
        d.stop()
        broker.stop()
    assert PASSWORDS[DAEMON_USER] not in d.log()


# -- client ids are bound to accounts -----------------------------------------------------------


def test_device_cannot_take_the_daemons_client_id(
    secure_daemon: Daemon, secure_broker: SecureBroker, devices: Any, certs: Path
) -> None:
    """A device's account is bound to its own client id: the daemon's is refused before the
    broker touches the daemon's session (no takeover, no Last Will)."""
    dev_a = devices("devA", subscribe=(*own_topics("devA"), f"{PREFIX}/+/status"))
    dev_a.drain(0.5)
    drops = [e["event"] for e in secure_daemon.log_events()].count("broker_lost")
    for client_id in (DAEMON_CLIENT_ID, f"{DAEMON_CLIENT_ID}-pool"):
        thief = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        thief.tls_set(ca_certs=str(certs / "ca.crt"))
        thief.username_pw_set("devB", PASSWORDS["devB"])
        assert connack(thief, secure_broker.port) == NOT_AUTHORIZED
    rid, ack = dev_a.ask()
    assert ack == 0 and dev_a.reply(rid)[-1][1]["type"] == "done"
    assert [m for t, m in dev_a.drain(0.5) if t.endswith("/status")] == []
    assert [e["event"] for e in secure_daemon.log_events()].count("broker_lost") == drops


# -- unusable secrets and certificates stop start-up -------------------------------------------


def run_config(**env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")}
    base.pop("CREDENTIALS_DIRECTORY", None)
    return subprocess.run(
        [sys.executable, "-m", "qwen_edge", "config"],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _bad_configs(tmp: Path, certs: Path) -> list[tuple[str, dict[str, str], str]]:
    (tmp / "empty").write_text("")
    (tmp / "garbage.pem").write_text("not a certificate\n")
    (tmp / "secret").write_text("s3cr3t-value\n")
    unreadable = tmp / "unreadable"
    unreadable.mkdir()  # a directory cannot be read as a file, even by root
    other = make_certs(tmp / "other", "devA")
    return [
        (
            "missing password file",
            {"QWEN_EDGE_MQTT__PASSWORD_FILE": str(tmp / "nope")},
            "PASSWORD_FILE",
        ),
        (
            "unreadable password file",
            {"QWEN_EDGE_MQTT__PASSWORD_FILE": str(unreadable)},
            "PASSWORD_FILE",
        ),
        ("empty password file", {"QWEN_EDGE_MQTT__PASSWORD_FILE": str(tmp / "empty")}, "empty"),
        (
            "password twice",
            {
                "QWEN_EDGE_MQTT__PASSWORD": "s3cr3t-value",
                "QWEN_EDGE_MQTT__PASSWORD_FILE": str(tmp / "secret"),
            },
            "PASSWORD_FILE",
        ),
        ("missing CA", {"QWEN_EDGE_MQTT__CA_FILE": str(tmp / "nope.crt")}, "CA_FILE"),
        ("garbage CA", {"QWEN_EDGE_MQTT__CA_FILE": str(tmp / "garbage.pem")}, "CA_FILE"),
        (
            "key of another certificate",
            {
                "QWEN_EDGE_MQTT__CERTFILE": str(certs / "devA.crt"),
                "QWEN_EDGE_MQTT__KEYFILE": str(other / "devA.key"),
            },
            "CERTFILE",
        ),
        (
            "key without certificate",
            {"QWEN_EDGE_MQTT__KEYFILE": str(certs / "devA.key")},
            "KEYFILE",
        ),
        (
            "TLS off with a CA",
            {"QWEN_EDGE_MQTT__TLS": "false", "QWEN_EDGE_MQTT__CA_FILE": str(certs / "ca.crt")},
            "QWEN_EDGE_MQTT__TLS",
        ),
        (
            "credential key without certificate",
            {"CREDENTIALS_DIRECTORY": str(_credential_dir(tmp, certs))},
            "mqtt-client-key",
        ),
    ]


def _credential_dir(tmp: Path, certs: Path) -> Path:
    path = tmp / "creds"
    path.mkdir(exist_ok=True)
    shutil.copy(certs / "devA.key", path / "mqtt-client-key")
    return path


def test_unusable_secret_or_certificate_files_exit_2_with_one_line(
    tmp_path: Path, certs: Path
) -> None:
    for case, env, named in _bad_configs(tmp_path, certs):
        done = run_config(**env)
        assert done.returncode == 2, (case, done.stdout, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("qwen-edge: "), (case, done.stderr)
        assert named in lines[0], (case, lines[0])
        assert "s3cr3t-value" not in done.stderr, case
        assert done.stdout == ""


def test_password_comes_from_the_systemd_credential_unless_configured(
    tmp_path: Path,
) -> None:
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "mqtt-password").write_text("from-credential\r\n")
    from_credential = run_config(
        CREDENTIALS_DIRECTORY=str(credentials), QWEN_EDGE_MQTT__USERNAME="u"
    )
    assert from_credential.returncode == 0, from_credential.stderr
    assert json.loads(from_credential.stdout)["mqtt"]["password"] == "***"
    assert "from-credential" not in from_credential.stdout
    # An explicit setting wins over the credential (and is just as masked).
    (tmp_path / "pw").write_text("from-file\n")
    explicit = run_config(
        CREDENTIALS_DIRECTORY=str(credentials), QWEN_EDGE_MQTT__PASSWORD_FILE=str(tmp_path / "pw")
    )
    assert explicit.returncode == 0, explicit.stderr
    assert "from-file" not in explicit.stdout


def test_password_file_and_credential_are_read_as_their_first_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwen_edge.settings import load_settings

    for name in list(os.environ):
        if name.startswith("QWEN_EDGE_"):
            monkeypatch.delenv(name)
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "mqtt-password").write_text(" spaced pass \r\nsecond line\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    settings = load_settings()
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == " spaced pass "
    assert "spaced" not in repr(settings) + str(settings.masked())
    (tmp_path / "pw").write_text("file-pass")
    monkeypatch.setenv("QWEN_EDGE_MQTT__PASSWORD_FILE", str(tmp_path / "pw"))
    settings = load_settings()
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "file-pass"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), ("true", True), ("false", False), ("1", True), ("off", False)],
)
def test_tls_setting_is_a_switch_or_auto(
    value: str, expected: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwen_edge.settings import load_settings

    monkeypatch.setenv("QWEN_EDGE_MQTT__TLS", value)
    mqtt = load_settings().mqtt
    assert mqtt.tls == expected
    assert mqtt.use_tls is (expected is True)  # auto without ca_file or certfile: off


def test_tls_auto_is_on_with_a_ca_file(certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen_edge.settings import load_settings
    from qwen_edge.tls import client_context

    monkeypatch.setenv("QWEN_EDGE_MQTT__CA_FILE", str(certs / "ca.crt"))
    mqtt = load_settings().mqtt
    assert mqtt.use_tls
    context = client_context(mqtt)
    assert context is not None and context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    monkeypatch.setenv("QWEN_EDGE_MQTT__TLS_CHECK_HOSTNAME", "false")
    context = client_context(load_settings().mqtt)
    # Only the name check goes; the chain is still verified.
    assert context is not None and not context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_invalid_tls_value_exits_2_naming_it() -> None:
    done = run_config(QWEN_EDGE_MQTT__TLS="maybe")
    assert done.returncode == 2
    assert done.stderr.startswith("qwen-edge: invalid setting QWEN_EDGE_MQTT__TLS")
