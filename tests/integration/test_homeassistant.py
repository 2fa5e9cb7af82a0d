"""Home Assistant MQTT discovery: what a node announces, how it reads in Home Assistant's
templates, and that turning it off (or `qwen-edge homeassistant --remove`) takes it all back.

Home Assistant renders value_template and the availability template with Jinja2, `value_json`
being the parsed payload; jinja2 (a dependency of llama-cpp-python) renders them the same way here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from devtools.harness import NODE, PREFIX, SMOLLM, Broker, Daemon, Probe, free_port
from qwen_edge.node.homeassistant import (
    ENTITIES,
    RECORD_FILE,
    Announcer,
)

from ..unit.test_homeassistant import DISCOVERY, render, settings


def retained(broker: Broker, topic_filter: str, settle: float = 1.0) -> dict[str, bytes]:
    """The retained messages a new subscriber gets (mosquitto sends them right after SUBACK)."""
    probe = Probe(broker, client_id=f"ha-{time.monotonic_ns()}")
    try:
        probe.subscribe(topic_filter)
        time.sleep(settle)
        return dict(probe.raw)
    finally:
        probe.close()


def wait_stats(broker: Broker, done: int, timeout: float = 30.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        payload = retained(broker, f"{PREFIX}/{NODE}/stats", 0.3).get(f"{PREFIX}/{NODE}/stats")
        if payload and json.loads(payload)["requests_done"] >= done:
            return payload
    raise TimeoutError(f"no stats with requests_done >= {done}")


def test_node_appears_in_home_assistant_and_leaves_when_disabled(
    broker: Broker, tmp_path: Path
) -> None:
    watcher = Probe(broker, client_id="ha-watcher")
    watcher.subscribe(f"{DISCOVERY}/#")
    node = Daemon(
        tmp_path / "node",
        broker,
        SMOLLM,
        QWEN_EDGE_HOMEASSISTANT__ENABLED="true",
        QWEN_EDGE_FLEET__STATS_INTERVAL="1",
    )
    node.start()
    try:
        found = retained(broker, f"{DISCOVERY}/#")
        assert len(found) == len(ENTITIES)
        entities = {json.loads(p)["unique_id"]: json.loads(p) for p in found.values()}
        online = entities[f"qwen_edge_{NODE}_online"]
        assert online["device"]["model"] == SMOLLM.name.removesuffix(".gguf")

        status = retained(broker, f"{PREFIX}/{NODE}/status")[f"{PREFIX}/{NODE}/status"]
        assert render(online["value_template"], status) == "ON"
        for config in entities.values():
            assert render(config["availability"][0]["value_template"], status) == "online"

        client = Probe(broker, client_id="dev1")
        client.subscribe(client.reply_topic())
        client.collect(client.request("Say hi.", max_tokens=16, temperature=0))
        client.close()
        stats = wait_stats(broker, done=1)
        values = {
            key: render(entities[f"qwen_edge_{NODE}_{key}"]["value_template"], stats)
            for key in ("tokens_per_s", "requests_generating", "requests_queued", "requests_served")
        }
        assert float(values["tokens_per_s"]) >= 0
        assert int(values["requests_served"]) >= 1
        assert int(values["requests_generating"]) >= 0 and int(values["requests_queued"]) >= 0
    finally:
        node.stop()
    # Stopped: the connectivity sensor says so, and stays available to say it.
    status = retained(broker, f"{PREFIX}/{NODE}/status")[f"{PREFIX}/{NODE}/status"]
    assert render(online["value_template"], status) == "OFF"
    assert render(online["availability"][0]["value_template"], status) == "online"

    watcher.raw.clear()
    disabled = Daemon(tmp_path / "node", broker, SMOLLM)  # same state directory, feature off
    disabled.start()
    time.sleep(1.0)
    assert sorted(watcher.raw) == sorted((t, b"") for t in found)  # Home Assistant deletes them
    assert retained(broker, f"{DISCOVERY}/#") == {}
    disabled.stop()

    watcher.raw.clear()
    disabled.start()  # nothing left to remove: nothing published under the discovery prefix
    time.sleep(1.0)
    disabled.stop()
    watcher.close()
    assert watcher.raw == []


def remove_command(
    broker_port: int, state_dir: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")}
    environ.update(
        QWEN_EDGE_MQTT__HOST="127.0.0.1",
        QWEN_EDGE_MQTT__PORT=str(broker_port),
        QWEN_EDGE_NODE_ID=NODE,
        QWEN_EDGE_SERVICE__STATE_DIR=str(state_dir),
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "qwen_edge", "homeassistant", "--remove", "--timeout", "3", *args],
        env=environ,
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_remove_command_clears_what_a_stopped_node_announced(
    broker: Broker, tmp_path: Path
) -> None:
    """What scripts/install --uninstall runs once the service is stopped."""
    state = tmp_path / "state"
    topics = [t for t, _ in Announcer(settings(NODE), "m", "1", state).messages()]
    probe = Probe(broker, client_id="announcer")
    for topic in topics:  # as the node would have
        probe.client.publish(topic, b"{}", qos=1, retain=True).wait_for_publish(5)
    probe.close()
    assert len(retained(broker, f"{DISCOVERY}/#")) == len(ENTITIES)

    done = remove_command(broker.port, state)  # the config says enabled=false by now
    assert done.returncode == 0, done.stderr
    assert retained(broker, f"{DISCOVERY}/#") == {}
    assert not (state / RECORD_FILE).exists()

    # Nothing recorded, feature off: done without a broker (none listens on this port).
    again = remove_command(free_port(), state)
    assert again.returncode == 0, again.stderr
    assert "nothing to remove" in again.stdout


def test_remove_command_fails_without_a_broker_and_keeps_the_record(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Announcer(settings(NODE), "m", "1", state).messages()
    done = remove_command(free_port(), state)
    assert done.returncode == 1
    assert (state / RECORD_FILE).exists()  # kept, so that a second try still knows the topics


def test_remove_command_authenticates_with_the_services_password(tmp_path: Path) -> None:
    """scripts/install passes the service's secrets.env and its credentials directory."""
    broker_dir = Path(__file__).resolve().parents[1] / "broker"
    conf = tmp_path / "auth-base.conf"
    conf.write_text(
        (broker_dir / "auth.conf").read_text() + f"password_file {broker_dir / 'auth.passwd'}\n"
    )
    broker = Broker(tmp_path / "auth-broker", base_conf=conf)
    broker.start()
    try:
        state = tmp_path / "state"
        Announcer(settings(NODE), "m", "1", state).messages()
        secrets = tmp_path / "secrets.env"
        account = {"QWEN_EDGE_MQTT__USERNAME": "qwen-edge"}

        secrets.write_text("QWEN_EDGE_MQTT__PASSWORD=wrong-password\n")
        refused = remove_command(broker.port, state, "--secrets", str(secrets), **account)
        assert refused.returncode == 1
        assert "did not confirm the removal" in refused.stderr
        assert (state / RECORD_FILE).exists()

        secrets.write_text("# as systemd reads it\nQWEN_EDGE_MQTT__PASSWORD='right-password'\n")
        done = remove_command(broker.port, state, "--secrets", str(secrets), **account)
        assert done.returncode == 0, done.stderr
        assert not (state / RECORD_FILE).exists()

        # scripts/install's way for LoadCredential=mqtt-password:/etc/qwen-edge/mqtt-password.
        Announcer(settings(NODE), "m", "1", state).messages()
        etc = tmp_path / "etc"
        etc.mkdir()
        (etc / "mqtt-password").write_text("right-password\n")
        absent = str(tmp_path / "absent.env")
        done = remove_command(
            broker.port, state, "--secrets", absent, CREDENTIALS_DIRECTORY=str(etc), **account
        )
        assert done.returncode == 0, done.stderr
        assert not (state / RECORD_FILE).exists()
    finally:
        broker.stop()
