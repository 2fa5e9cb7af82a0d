"""The broker scripts/broker-setup makes, run by a real mosquitto with the dynamic security plugin,
tried as a hostile device would: the pool, the node's client id, other devices' topics.

The broker is plain TCP on 127.0.0.1 (broker-setup without --tls) so that the tests stay quick;
TLS is the same listener with certificates from scripts/make-certs (tests/test_security.py).
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
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
from qwen_edge.tools import brokeradmin

from .procwatch import ProcessSampler

BROKER_SETUP = ROOT / "scripts" / "broker-setup"
GROUP = "pool"
DAEMON = ("qwen-edge", "d@emon-93")
PASSWORDS = {"devA": "pw-devA", "devB": "pw-devB", "devC": "pw-devC"}
HOME_ASSISTANT = ("hass", "pw-hass")
NOT_AUTHORIZED = 0x87
GRANTED_QOS1 = 1
ACCEPTED = (0, 0x10)  # PUBACK: success, or success with no subscriber
MAX_QUEUED_BYTES = 2 * 1024 * 1024

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto_ctrl") is None, reason="needs mosquitto_ctrl (mosquitto-clients)"
)


def broker_setup(
    *args: str, passwords: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """scripts/broker-setup ARGS, with `passwords` as USER:PASS lines on its stdin."""
    lines = "".join(f"{user}:{password}\n" for user, password in (passwords or {}).items())
    if passwords is not None:
        args = (*args, "--passwords", "-")
    return subprocess.run(
        [str(BROKER_SETUP), *args],
        input=lines,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class SetupBroker(Broker):
    """mosquitto -c DIR/mosquitto.conf, DIR as scripts/broker-setup wrote it."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc = None
        args = ["--dir", str(workdir), "--port", str(self.port), "--daemon", DAEMON[0]]
        for user in PASSWORDS:
            args += ["--device", user]
        args += ["--homeassistant", HOME_ASSISTANT[0]]
        done = broker_setup(
            *args,
            passwords={**PASSWORDS, DAEMON[0]: DAEMON[1], HOME_ASSISTANT[0]: HOME_ASSISTANT[1]},
        )
        assert done.returncode == 0, done.stderr
        self.conf = workdir / "mosquitto.conf"


class Client:
    """One MQTT 5 connection under an account; records messages, SUBACK and PUBACK codes."""

    def __init__(self, broker: Broker, user: str, password: str, client_id: str | None) -> None:
        self.messages: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or user, protocol=paho.MQTTv5
        )
        self.client.username_pw_set(user, password)
        self.client.on_connect = lambda c, u, f, rc, p: self._events.put(("connack", rc.value))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._events.put(
            ("suback", [r.value for r in rcs])
        )
        self.client.on_publish = lambda c, u, mid, rc, p: self._events.put(("puback", rc.value))
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.connack = self._next("connack")

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            data = json.loads(msg.payload)
        except ValueError:
            data = {"_raw": msg.payload}
        self.messages.put((msg.topic, data))

    def _next(self, kind: str, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got, value = self._events.get(timeout=max(deadline - time.monotonic(), 0.01))
            if got == kind:
                return value

    def subscribe(self, topic: str) -> int:
        """The SUBACK reason code: 1 (granted, QoS 1) or 0x87 (not authorized)."""
        self.client.subscribe(topic, qos=1)
        return int(self._next("suback")[0])

    def publish(self, topic: str, payload: Any, *, retain: bool = False) -> int:
        """Publish at QoS 1; the PUBACK reason code (0 or 0x87, not authorized)."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload)
        self.client.publish(topic, data, qos=1, retain=retain)
        return int(self._next("puback"))

    def ask(self, to: str, as_client: str, **fields: Any) -> tuple[str, int]:
        rid = uuid.uuid4().hex[:12]
        body = {"request_id": rid, "message": "Say yes.", "max_tokens": 4, **fields}
        return rid, self.publish(f"{PREFIX}/{to}/request/{as_client}", body)

    def ends(self, rids: set[str], timeout: float) -> dict[str, str]:
        """request_id -> type of the last message (done/error) for each of `rids`."""
        ended: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while set(ended) != rids and time.monotonic() < deadline:
            try:
                _, data = self.messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if data.get("request_id") in rids and data.get("type") in ("done", "error"):
                ended[data["request_id"]] = data["type"]
        return ended

    def drain(self, seconds: float) -> list[tuple[str, dict[str, Any]]]:
        got = []
        deadline = time.monotonic() + seconds
        while True:
            try:
                got.append(self.messages.get(timeout=max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def setup_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SetupBroker]:
    broker = SetupBroker(tmp_path_factory.mktemp("setup-broker"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def node(setup_broker: SetupBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """SmolLM2 on the daemon account, in the pool (fleet.enabled is the default)."""
    work = tmp_path_factory.mktemp("node")
    (work / "mqtt-password").write_text(DAEMON[1] + "\n")
    d = Daemon(
        work,
        setup_broker,
        SMOLLM,
        QWEN_EDGE_MQTT__USERNAME=DAEMON[0],
        QWEN_EDGE_MQTT__PASSWORD_FILE=str(work / "mqtt-password"),
        QWEN_EDGE_MODEL__THREADS="1",
        QWEN_EDGE_FLEET__GROUP=GROUP,
    )
    d.start()
    yield d
    d.stop()


@pytest.fixture
def connect(setup_broker: SetupBroker) -> Iterator[Any]:
    made: list[Client] = []

    def make(user: str, client_id: str | None = None, password: str | None = None) -> Client:
        secret = password or {**PASSWORDS, HOME_ASSISTANT[0]: HOME_ASSISTANT[1]}.get(user)
        secret = secret or DAEMON[1]
        client = Client(setup_broker, user, secret, client_id)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def own_topics(user: str) -> tuple[str, str]:
    return (f"{PREFIX}/+/reply/{user}/#", f"{PREFIX}/+/error/{user}")


def events(daemon: Daemon, name: str) -> int:
    return [e.get("event") for e in daemon.log_events()].count(name)


# -- the pool -----------------------------------------------------------------------------------


def test_device_cannot_join_any_shared_subscription(connect: Any) -> None:
    thief = connect("devB")
    assert thief.connack == 0
    for topic in (
        f"$share/{GROUP}/{PREFIX}/{GROUP}/request/+",
        f"$share/other/{PREFIX}/{GROUP}/request/+",
        f"$share/x/{PREFIX}/+/status",
        f"$share/x/{PREFIX}/+/reply/devB/#",  # even over its own topics
        f"{PREFIX}/{GROUP}/request/+",
        f"{PREFIX}/+/reply/+/#",
        "#",
    ):
        assert thief.subscribe(topic) == NOT_AUTHORIZED, topic
    for topic in (*own_topics("devB"), f"{PREFIX}/+/status", f"{PREFIX}/+/stats"):
        assert thief.subscribe(topic) == GRANTED_QOS1, topic


def test_a_device_in_the_pools_shared_subscription_steals_no_pooled_request(
    node: Daemon, connect: Any
) -> None:
    """Issue 11, item 1: with acl_file mosquitto grants the SUBSCRIBE and then drops the requests
    whose turn falls to the device (no read right): 6 to 8 of 12 vanished."""
    thief = connect("devB")
    shared = f"$share/{GROUP}/{PREFIX}/{GROUP}/request/+"
    thief.subscribe(shared)
    thief.subscribe(shared)
    thief.subscribe(f"$share/{GROUP}/{PREFIX}/+/request/+")
    device = connect("devA")
    for topic in own_topics("devA"):
        assert device.subscribe(topic) == GRANTED_QOS1
    rids = set()
    for _ in range(12):
        rid, ack = device.ask(GROUP, "devA")
        assert ack == 0
        rids.add(rid)
    assert device.ends(rids, timeout=180) == dict.fromkeys(rids, "done")
    assert [t for t, _ in thief.drain(0.5) if "/request/" in t] == []


# -- client ids ---------------------------------------------------------------------------------


def test_device_cannot_connect_with_a_nodes_client_id_and_the_node_goes_on(
    node: Daemon, connect: Any
) -> None:
    """Issue 11, item 2: a device that connected as qwen-edge-{node} made the broker publish the
    node's Last Will and took over its session."""
    watcher = connect("devA")
    assert watcher.subscribe(f"{PREFIX}/+/status") == GRANTED_QOS1
    for topic in own_topics("devA"):
        watcher.subscribe(topic)
    watcher.drain(0.5)  # the retained status
    drops = events(node, "broker_lost")
    for client_id in (f"qwen-edge-{NODE}", f"qwen-edge-{NODE}-pool", "devA", "kiosk-1"):
        assert connect("devB", client_id=client_id).connack == NOT_AUTHORIZED, client_id
    time.sleep(1.0)
    statuses = [m for t, m in watcher.drain(0.5) if t.endswith("/status")]
    assert [m for m in statuses if m.get("state") != "online"] == [], statuses
    assert events(node, "broker_lost") == drops
    rid, _ = watcher.ask(NODE, "devA")
    assert watcher.ends({rid}, timeout=60) == {rid: "done"}


def test_device_connects_only_with_its_own_name_as_client_id(connect: Any) -> None:
    assert connect("devA", client_id="devA").connack == 0
    assert connect("devA", client_id="devA-2").connack == NOT_AUTHORIZED
    assert connect("devA", client_id="devA", password="wrong").connack == NOT_AUTHORIZED


# -- one device against another -----------------------------------------------------------------


def test_device_cannot_write_into_or_read_from_another_devices_topics(
    node: Daemon, connect: Any
) -> None:
    victim = connect("devA")
    for topic in own_topics("devA"):
        victim.subscribe(topic)
    spy = connect("devC")
    for topic in (*own_topics("devA"), f"{PREFIX}/{NODE}/reply/devA/default"):
        assert spy.subscribe(topic) == NOT_AUTHORIZED, topic
    for topic in (
        f"{PREFIX}/{NODE}/request/devA",
        f"{PREFIX}/{GROUP}/request/devA",
        f"{PREFIX}/{NODE}/cancel/devA",
        f"{PREFIX}/{NODE}/status",
        f"{PREFIX}/{NODE}/stats",
        f"{PREFIX}/{NODE}/reply/devA/default",
        "homeassistant/binary_sensor/x/config",
    ):
        assert spy.publish(topic, {"request_id": "x", "message": "hi"}) == NOT_AUTHORIZED, topic
    rid, ack = victim.ask(NODE, "devA")
    assert ack == 0 and victim.ends({rid}, timeout=60) == {rid: "done"}
    assert [t for t, _ in spy.drain(0.5)] == []
    assert "'x'" not in node.log() and '"request_id": "x"' not in node.log()


# -- the daemon account -------------------------------------------------------------------------


def test_daemon_account_may_publish_home_assistant_discovery_configs(connect: Any) -> None:
    daemon = connect(DAEMON[0], client_id=f"qwen-edge-ha-{uuid.uuid4().hex[:6]}")
    assert daemon.connack == 0
    config = {"name": "testnode", "state_topic": f"{PREFIX}/{NODE}/status"}
    topic = f"homeassistant/binary_sensor/qwen-edge-{NODE}/connectivity/config"
    assert daemon.publish(topic, config, retain=True) in ACCEPTED
    assert daemon.publish(topic, b"", retain=True) in ACCEPTED  # removing it again
    assert daemon.subscribe("homeassistant/status") == GRANTED_QOS1  # Home Assistant's birth
    # Nothing beyond the prefixes.
    assert daemon.publish("elsewhere/config", config) == NOT_AUTHORIZED


def test_home_assistant_account_reads_discovery_and_status_and_writes_nothing_else(
    connect: Any,
) -> None:
    daemon = connect(DAEMON[0], client_id=f"qwen-edge-ha-{uuid.uuid4().hex[:6]}")
    hass = connect(HOME_ASSISTANT[0])
    assert hass.connack == 0
    for topic in ("homeassistant/#", f"{PREFIX}/+/status", f"{PREFIX}/+/stats"):
        assert hass.subscribe(topic) == GRANTED_QOS1
    config_topic = f"homeassistant/sensor/qwen_edge_{NODE}_x/config"
    assert daemon.publish(config_topic, {"name": "x"}, retain=True) in ACCEPTED
    seen: list[str] = []
    while config_topic not in seen:  # retained statuses of earlier tests' node may come first
        seen.append(hass.messages.get(timeout=10)[0])
    assert daemon.publish(config_topic, b"", retain=True) in ACCEPTED
    assert hass.publish("homeassistant/status", b"online") in ACCEPTED  # its birth message
    # No requests, no replies of devices, no discovery configs of its own, no node's client id.
    assert hass.publish(f"{PREFIX}/{NODE}/request/{HOME_ASSISTANT[0]}", {"x": 1}) == NOT_AUTHORIZED
    assert hass.publish(config_topic, {"name": "fake"}, retain=True) == NOT_AUTHORIZED
    assert hass.subscribe(f"{PREFIX}/+/reply/devA/#") == NOT_AUTHORIZED
    assert connect(HOME_ASSISTANT[0], client_id=f"qwen-edge-{NODE}").connack == NOT_AUTHORIZED


# -- broker memory ------------------------------------------------------------------------------


def test_a_persistent_session_away_queues_at_most_the_byte_limit(
    setup_broker: SetupBroker, connect: Any
) -> None:
    """Issue 11, item 14: without max_queued_bytes one device's sessions could fill the broker."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    away = paho.Client(CallbackAPIVersion.VERSION2, client_id="devC", protocol=paho.MQTTv5)
    away.username_pw_set("devC", PASSWORDS["devC"])
    subscribed: queue.Queue[int] = queue.Queue()
    away.on_subscribe = lambda *a: subscribed.put(1)
    away.connect("127.0.0.1", setup_broker.port, clean_start=True, properties=props)
    away.loop_start()
    away.subscribe(f"{PREFIX}/+/reply/devC/#", qos=1)
    subscribed.get(timeout=10)
    away.disconnect()
    away.loop_stop()

    daemon = connect(DAEMON[0], client_id=f"qwen-edge-flood-{uuid.uuid4().hex[:6]}")
    chunk = b"x" * 16384
    total = 0
    while total < 2 * MAX_QUEUED_BYTES:
        assert daemon.publish(f"{PREFIX}/{NODE}/reply/devC/flood", chunk) == 0
        total += len(chunk)

    received: list[int] = []
    back = paho.Client(CallbackAPIVersion.VERSION2, client_id="devC", protocol=paho.MQTTv5)
    back.username_pw_set("devC", PASSWORDS["devC"])
    back.on_message = lambda c, u, msg: received.append(len(msg.payload))
    back.connect("127.0.0.1", setup_broker.port, clean_start=False, properties=props)
    back.loop_start()
    time.sleep(3.0)
    back.disconnect()
    back.loop_stop()
    assert received, "the session kept nothing at all"
    assert sum(received) <= MAX_QUEUED_BYTES + len(chunk), sum(received)


def test_setup_bounds_broker_memory_in_its_config(setup_broker: SetupBroker) -> None:
    settings = {}
    for line in (setup_broker.workdir / "conf.d" / "qwen-edge.conf").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            settings.setdefault(key, value)
    assert settings["max_queued_bytes"] == str(MAX_QUEUED_BYTES)
    assert settings["persistent_client_expiration"] == "1d"
    assert settings["set_tcp_nodelay"] == "true"
    assert "persistence_location" not in settings  # Debian's stock mosquitto.conf sets it


# -- adding and removing a device -------------------------------------------------------------


def test_a_device_added_and_removed_on_the_running_broker(
    setup_broker: SetupBroker, node: Daemon, connect: Any
) -> None:
    added = broker_setup(
        "--dir", str(setup_broker.workdir), "--add-device", "devD", passwords={"devD": "pw-devD"}
    )
    assert added.returncode == 0, added.stderr
    device = connect("devD", password="pw-devD")
    assert device.connack == 0
    for topic in own_topics("devD"):
        assert device.subscribe(topic) == GRANTED_QOS1
    assert device.publish(f"{PREFIX}/{NODE}/request/devA", {}) == NOT_AUTHORIZED
    rid, ack = device.ask(NODE, "devD")
    assert ack == 0 and device.ends({rid}, timeout=60) == {rid: "done"}

    removed = broker_setup("--dir", str(setup_broker.workdir), "--remove-device", "devD")
    assert removed.returncode == 0, removed.stderr
    assert connect("devD", password="pw-devD").connack == NOT_AUTHORIZED
    # And it stays so after a broker restart: the plugin saved it.
    setup_broker.stop()
    setup_broker.start()
    assert connect("devD", password="pw-devD").connack == NOT_AUTHORIZED
    assert connect("devA").connack == 0


def test_setup_refuses_a_directory_it_already_made(setup_broker: SetupBroker) -> None:
    again = broker_setup(
        "--dir",
        str(setup_broker.workdir),
        *("--port", "1", "--daemon", "a", "--device", "c"),
        passwords={"a": "b", "c": "d"},
    )
    assert again.returncode == 2 and "--add-device" in again.stderr
    bad = broker_setup(
        "--dir", str(setup_broker.workdir / "x"), "--port", "1", "--daemon", "a/b", passwords={}
    )
    assert bad.returncode == 2 and "bad account name" in bad.stderr
    # A device bound to a node's client id could take over the node's session.
    node_named = str(setup_broker.workdir / "y")
    nodelike = broker_setup(
        "--dir",
        node_named,
        *("--port", "1", "--daemon", "a", "--device", f"qwen-edge-{NODE}"),
        passwords={"a": "b", f"qwen-edge-{NODE}": "pw"},
    )
    assert nodelike.returncode == 2 and not Path(node_named).exists(), nodelike.stderr


# -- secrets (issue 18, item 4) -------------------------------------------------------------------


def test_adding_and_removing_a_device_puts_no_password_on_any_command_line_or_environment(
    setup_broker: SetupBroker, connect: Any
) -> None:
    """Issue 18, item 4: broker-setup gave mosquitto_ctrl the admin and device passwords as
    arguments (any local user read them with ps) and took the device's as USER:PASS."""
    workdir = setup_broker.workdir
    admin = (workdir / "admin.password").read_text().strip()
    sweeper = (workdir / "sweeper.password").read_text().strip()
    secret = f"pw-{uuid.uuid4().hex}"
    with ProcessSampler() as sampler:
        added = broker_setup(
            "--dir", str(workdir), "--add-device", "devS", passwords={"devS": secret}
        )
        assert connect("devS", password=secret).connack == 0
        removed = broker_setup("--dir", str(workdir), "--remove-device", "devS")
    assert added.returncode == 0 and removed.returncode == 0, added.stderr + removed.stderr
    assert sampler.saw("brokeradmin") and sampler.saw("--add-device"), "the sampler saw nothing"
    assert sampler.leaks(secret, admin, sweeper) == []
    # The old form is refused, saying what to do instead, and changes nothing.
    old = broker_setup("--dir", str(workdir), "--add-device", f"devT:{secret}")
    assert old.returncode == 2 and "--passwords" in old.stderr and secret not in old.stderr
    assert connect("devT", password=secret).connack == NOT_AUTHORIZED


def test_password_files_others_can_read_are_refused(
    setup_broker: SetupBroker, tmp_path: Path
) -> None:
    lines = tmp_path / "passwords"
    lines.write_text("devU:pw-devU\n")
    lines.chmod(0o644)
    done = broker_setup(
        "--dir", str(setup_broker.workdir), "--add-device", "devU", "--passwords", str(lines)
    )
    assert done.returncode == 2 and "chmod 600" in done.stderr


# -- defaults (issue 18, item 7) ----------------------------------------------------------------


def control(setup_broker: SetupBroker) -> brokeradmin.Control:
    setup = brokeradmin.Setup.load(setup_broker.workdir)
    return brokeradmin.Control(setup.mqtt(brokeradmin.ADMIN_USER, brokeradmin.ADMIN_PASSWORD_FILE))


def test_every_default_is_deny_read_back_from_the_running_broker(setup_broker: SetupBroker) -> None:
    """Issue 18, item 7: setDefaultACLAccess publishClientReceive deny reported success and
    mosquitto 2.0.11 kept `allow`."""
    with control(setup_broker) as admin:
        defaults = admin.default_acl_access()
    assert defaults == {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": True,
    }


def test_a_device_receives_nothing_its_roles_do_not_grant_even_when_subscribed(
    setup_broker: SetupBroker, connect: Any
) -> None:
    """A subscribe right without a receive right delivers nothing: receiving is denied unless a
    role grants it (with mosquitto 2.0.11's stored `allow`, this account read devB's replies)."""
    role, spy_name, secret = "probe-subscribe-only", "spy", "pw-spy"
    with control(setup_broker) as admin:
        admin.run(
            [
                *brokeradmin.role_commands(
                    role, [("subscribePattern", f"{PREFIX}/+/reply/devB/#")]
                ),
                {
                    "command": "createClient",
                    "username": spy_name,
                    "password": secret,
                    "clientid": spy_name,
                    # In one command: a role added later kicks the account's connection.
                    "roles": [{"rolename": role}, {"rolename": "qwen-edge-device"}],
                },
            ]
        )
    try:
        spy, owner = connect(spy_name, password=secret), connect("devB")
        assert spy.subscribe(f"{PREFIX}/+/reply/devB/#") == GRANTED_QOS1
        assert spy.subscribe(f"{PREFIX}/+/stats") == GRANTED_QOS1
        for topic in own_topics("devB"):
            owner.subscribe(topic)
        daemon = connect(DAEMON[0], client_id=f"qwen-edge-rx-{uuid.uuid4().hex[:6]}")
        assert daemon.publish(f"{PREFIX}/{NODE}/reply/devB/c", {"type": "done"}) == 0
        assert owner.messages.get(timeout=10)[0] == f"{PREFIX}/{NODE}/reply/devB/c"
        marker = f"{PREFIX}/marker-{uuid.uuid4().hex[:6]}/stats"
        assert daemon.publish(marker, {"type": "marker"}) == 0
        # Everything the spy got up to the marker, which was sent after devB's reply.
        got = []
        while not got or got[-1] != marker:
            got.append(spy.messages.get(timeout=10)[0])
        assert [t for t in got if "/reply/" in t] == []
    finally:
        with control(setup_broker) as admin:
            admin.run(
                [
                    {"command": "deleteClient", "username": spy_name},
                    {"command": "deleteRole", "rolename": role},
                ]
            )


# -- retained data (issue 18, item 6) -------------------------------------------------------------

BIG = 200 * 1024


def retained_from(connect: Any, device: str) -> dict[str, int]:
    """topic -> size of every retained request or cancel of `device` that a fresh subscriber
    (the daemon account) gets."""
    probe = connect(DAEMON[0], client_id=f"qwen-edge-look-{uuid.uuid4().hex[:6]}")
    marker = f"{PREFIX}/{GROUP}/claims/look-{uuid.uuid4().hex[:6]}"
    for kind in ("request", "cancel"):
        assert probe.subscribe(f"{PREFIX}/+/{kind}/{device}") == GRANTED_QOS1
    assert probe.subscribe(marker) == GRANTED_QOS1
    assert probe.publish(marker, b"end") == 0  # comes after the retained ones
    found: dict[str, int] = {}
    while True:
        topic, data = probe.messages.get(timeout=10)
        if topic == marker:
            return found
        found[topic] = len(data.get("_raw", b"x"))


def test_removing_a_device_removes_the_retained_requests_it_left(
    setup_broker: SetupBroker, connect: Any
) -> None:
    """Issue 18, item 6: 100 x 200 KB retained requests were stored and outlived the account."""
    secret = "pw-devR"
    assert (
        broker_setup(
            "--dir", str(setup_broker.workdir), "--add-device", "devR", passwords={"devR": secret}
        ).returncode
        == 0
    )
    device = connect("devR", password=secret)
    topics = [f"{PREFIX}/park-{i}/request/devR" for i in range(5)] + [f"{PREFIX}/x/cancel/devR"]
    for topic in topics:
        assert device.publish(topic, b"\0" * BIG, retain=True) in ACCEPTED
    assert set(topics) <= set(retained_from(connect, "devR"))
    device.close()

    removed = broker_setup("--dir", str(setup_broker.workdir), "--remove-device", "devR")
    assert removed.returncode == 0, removed.stderr
    assert retained_from(connect, "devR") == {}


def test_the_sweeper_clears_each_retained_request_as_it_arrives(
    setup_broker: SetupBroker, connect: Any
) -> None:
    """With `--sweep --watch` running (the broker's sweeper service), a device's retained
    request lives until the sweeper's empty retained publish: one broker round trip."""
    watcher = subprocess.Popen(
        [str(BROKER_SETUP), "--dir", str(setup_broker.workdir), "--sweep", "--watch"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stderr is not None
        line = watcher.stderr.readline()
        assert "sweeper: watching" in line, line
        seen = connect(DAEMON[0], client_id=f"qwen-edge-see-{uuid.uuid4().hex[:6]}")
        assert seen.subscribe(f"{PREFIX}/+/request/devC") == GRANTED_QOS1
        device = connect("devC")
        topics = [f"{PREFIX}/flood-{i}/request/devC" for i in range(20)]
        started = time.monotonic()
        for topic in topics:
            assert device.publish(topic, b"\0" * BIG, retain=True) in ACCEPTED
        # Each one arrives, then its clearing (an empty payload).
        cleared: set[str] = set()
        while cleared != set(topics):
            topic, data = seen.messages.get(timeout=10)
            if data.get("_raw") == b"":
                cleared.add(topic)
        took = time.monotonic() - started
        assert retained_from(connect, "devC") == {}
        print(f"20 x 200 KB retained requests published and cleared in {took * 1000:.0f} ms")
    finally:
        watcher.terminate()
        watcher.wait(10)
