"""A second broker: NATS's MQTT gateway (nats-server 2.9, MQTT 3.1.1 only). Its quirks stay
contained: a `.` in a conversation id costs a few reconnects, not a storm, and a pool that the
broker cannot serve (it takes `$share/...` for a plain filter) is noticed at start (issue 11)."""

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

from devtools.harness import NODE, PREFIX, SMOLLM, Daemon, free_port, wait_port
from qwen_edge.node.link import REFUSED_AFTER

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
pytestmark = pytest.mark.skipif(not Path(NATS_SERVER).exists(), reason="no nats-server")


class Nats:
    """A private nats-server with JetStream and its MQTT listener on free ports (never the
    machine's 4222). `port` is the MQTT port, which is all the daemon needs to know."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        self.conf = workdir / "nats.conf"
        self.conf.write_text(
            f"server_name: qwen_edge_test_{uuid.uuid4().hex[:6]}\n"
            f"listen: 127.0.0.1:{free_port()}\n"
            f'jetstream {{ store_dir: "{workdir / "js"}" }}\n'
            f"mqtt {{ host: 127.0.0.1, port: {self.port} }}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.workdir / "nats.log").open("ab")
        self.proc = subprocess.Popen([NATS_SERVER, "-c", str(self.conf)], stdout=log, stderr=log)
        wait_port(self.port, timeout=20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[Nats]:
    server = Nats(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


class Device:
    """An MQTT 3.1.1 client (all NATS speaks) that gathers what it receives."""

    def __init__(self, nats: Nats, client_id: str) -> None:
        self.client_id = client_id
        self.messages: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self._subacks: queue.Queue[int] = queue.Queue()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"dev-{client_id}-{uuid.uuid4().hex[:6]}",
            protocol=paho.MQTTv311,
        )
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, json.loads(m.payload)))
        self.client.on_subscribe = lambda *a: self._subacks.put(1)
        self.client.connect("127.0.0.1", nats.port)
        self.client.loop_start()

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        self._subacks.get(timeout=10)

    def request(self, conversation_id: str = "default", **fields: Any) -> str:
        rid = uuid.uuid4().hex[:10]
        body = {"request_id": rid, "message": "Hi", "conversation_id": conversation_id, **fields}
        topic = f"{PREFIX}/{NODE}/request/{self.client_id}"
        self.client.publish(topic, json.dumps(body), qos=1).wait_for_publish(10)
        return rid

    def end(self, rid: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            _, data = self.messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            if data.get("request_id") == rid and data.get("type") in ("done", "error"):
                return data

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _node(nats: Nats, workdir: Path, **env: str) -> Daemon:
    return Daemon(
        workdir,
        nats,  # type: ignore[arg-type]  # the Daemon needs only its port
        SMOLLM,
        QWEN_EDGE_MQTT__PROTOCOL="3.1.1",
        QWEN_EDGE_MODEL__THREADS="1",
        **env,
    )


def _events(node: Daemon, *names: str) -> list[dict[str, Any]]:
    return [e for e in node.log_events() if e.get("event") in names]


def test_a_dot_in_a_conversation_id_costs_a_few_reconnects_not_a_storm(
    nats: Nats, tmp_path: Path
) -> None:
    node = _node(nats, tmp_path / "node", QWEN_EDGE_FLEET__ENABLED="false")
    node.start()
    try:
        dotted, calm = Device(nats, "dotted"), Device(nats, "calm")
        dotted.subscribe(f"{PREFIX}/{NODE}/reply/dotted/#")
        calm.subscribe(f"{PREFIX}/{NODE}/reply/calm/#")
        dotted.request("v1.2", max_tokens=20)  # NATS drops the link over its reply topic
        # Another client's replies are delivered meanwhile and after.
        for _ in range(3):
            assert calm.end(calm.request(max_tokens=4), timeout=30)["type"] == "done"
        time.sleep(3)  # a storm would go on: one reconnect a second
        lost = _events(node, "broker_lost", "broker_disconnected")
        assert 1 <= len(lost) <= REFUSED_AFTER, node.log()
        refused = _events(node, "broker_refuses_topic")
        assert [e["topic"] for e in refused] == [f"{PREFIX}/{NODE}/reply/dotted/v1.2"]
        assert refused[0]["level"] == "error"
        assert calm.end(calm.request(max_tokens=4), timeout=30)["type"] == "done"
        assert "Traceback" not in node.log()  # paho's network thread survived it all
        dotted.close()
        calm.close()
    finally:
        node.stop()


def test_the_pool_probe_fails_on_nats_and_the_node_serves_its_own_topics(
    nats: Nats, tmp_path: Path
) -> None:
    node = _node(nats, tmp_path / "node")  # in the pool "pool", by default
    node.start()
    try:
        unavailable = _events(node, "pool_unavailable")
        assert len(unavailable) == 1 and unavailable[0]["level"] == "error", node.log()
        watcher = Device(nats, "watcher")
        watcher.subscribe(f"{PREFIX}/{NODE}/status")
        _, status = watcher.messages.get(timeout=10)
        assert status["state"] == "online" and "group" not in status, status
        watcher.subscribe(f"{PREFIX}/{NODE}/reply/watcher/#")
        assert watcher.end(watcher.request(max_tokens=4))["type"] == "done"
        watcher.close()
    finally:
        node.stop()
