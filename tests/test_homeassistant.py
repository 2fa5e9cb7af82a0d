"""Home Assistant MQTT discovery: what a node announces, how it reads in Home Assistant's
templates, and that turning it off (or `qwen-edge homeassistant --remove`) takes it all back.

Home Assistant renders value_template and the availability template with Jinja2, `value_json`
being the parsed payload; jinja2 (a dependency of llama-cpp-python) renders them the same way here.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest

from devtools.harness import NODE, PREFIX, SMOLLM, Broker, Daemon, Probe, free_port
from qwen_edge import settings as settings_module
from qwen_edge.node.homeassistant import (
    ENTITIES,
    RECORD_FILE,
    Announcer,
    config_topics,
    configs,
    device_id,
)
from qwen_edge.settings import ConfigError, Settings, load_settings

DISCOVERY = "homeassistant"
# Payloads as docs/protocol.md shows them; the daemon test renders the real ones.
STATUS_ONLINE = {"state": "online", "node": "pi", "model": "m", "version": "0.1.0", "protocol": 1}
STATS = {
    "node": "pi",
    "model": "m",
    "uptime_s": 3605.2,
    "slots": 2,
    "active_slots": 1,
    "queue_depth": 3,
    "tokens_per_s": 27.41,
    "requests_done": 118,
    "ts": 1764070000.123,
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name.upper().startswith("QWEN_EDGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")
    yield
    Settings.toml_file = None


def settings(node: str = "pi", enabled: bool = True, **more: Any) -> Settings:
    return Settings(node_id=node, homeassistant={"enabled": enabled}, **more)


def render(template: str, payload: bytes) -> str:
    """Like Home Assistant: `value` is the payload, `value_json` the parsed JSON if it parses."""
    variables: dict[str, Any] = {"value": payload.decode("utf-8")}
    with contextlib.suppress(ValueError):
        variables["value_json"] = json.loads(payload)
    return jinja2.Environment().from_string(template).render(**variables)


def by_key(messages: list[tuple[str, bytes]]) -> dict[str, dict[str, Any]]:
    """The configs of configs(), keyed by the entity key (unique_id without the device)."""
    out = {}
    for topic, payload in messages:
        config = json.loads(payload)
        out[config["unique_id"].removeprefix(config["device"]["identifiers"][0] + "_")] = config
        assert topic.endswith(f"/{config['unique_id']}/config")
    return out


# -- the payloads -----------------------------------------------------------------------------


def test_each_entity_has_a_retained_config_under_the_discovery_prefix() -> None:
    messages = configs(settings(), "qwen2.5-0.5b", "0.1.0")
    assert [t for t, _ in messages] == [
        "homeassistant/binary_sensor/qwen_edge_pi_online/config",
        "homeassistant/sensor/qwen_edge_pi_tokens_per_s/config",
        "homeassistant/sensor/qwen_edge_pi_requests_generating/config",
        "homeassistant/sensor/qwen_edge_pi_requests_queued/config",
        "homeassistant/sensor/qwen_edge_pi_requests_served/config",
    ]
    found = by_key(messages)
    online = found["online"]
    assert online["device_class"] == "connectivity"
    assert online["state_topic"] == "qwen-edge/pi/status"
    for key in ("tokens_per_s", "requests_generating", "requests_queued", "requests_served"):
        assert found[key]["state_topic"] == "qwen-edge/pi/stats"
        assert found[key]["icon"].startswith("mdi:")
        assert found[key]["unit_of_measurement"]
    assert found["requests_served"]["state_class"] == "total_increasing"
    assert {found[k]["state_class"] for k in found if k not in ("online", "requests_served")} == {
        "measurement"
    }
    for config in found.values():
        assert config["device"] == {
            "identifiers": ["qwen_edge_pi"],
            "name": "qwen-edge pi",
            "model": "qwen2.5-0.5b",
            "sw_version": "0.1.0",
            "manufacturer": "qwen-edge",
        }
        assert config["availability"][0]["topic"] == "qwen-edge/pi/status"
        assert config["qos"] == 1


def test_unique_ids_are_stable_and_distinct_across_nodes() -> None:
    first = by_key(configs(settings("pi"), "a", "1"))
    again = by_key(configs(settings("pi"), "another model", "2"))
    other = by_key(configs(settings("pi-2"), "a", "1"))
    ids = [c["unique_id"] for c in first.values()]
    assert ids == [c["unique_id"] for c in again.values()]  # a new model or version: same entities
    assert len(set(ids)) == len(ENTITIES)
    assert not set(ids) & {c["unique_id"] for c in other.values()}


def test_node_ids_with_other_characters_get_valid_distinct_ids() -> None:
    # Home Assistant takes [a-zA-Z0-9_-] in object ids; "pi.1" and "pi_1" must not collide.
    ids = {device_id(n) for n in ("pi.1", "pi_1", "pi 1", "küche")}
    assert len(ids) == 4
    assert all(i.replace("_", "").replace("-", "").isalnum() and i.isascii() for i in ids)
    assert device_id("pi_1") == "qwen_edge_pi_1"


def test_topics_follow_the_prefixes() -> None:
    s = Settings(
        node_id="n1",
        topic_prefix="site/llm",
        homeassistant={"enabled": True, "discovery_prefix": "ha/disc"},
    )
    found = by_key(configs(s, "m", "1"))
    assert found["online"]["state_topic"] == "site/llm/n1/status"
    assert found["tokens_per_s"]["state_topic"] == "site/llm/n1/stats"
    assert all(t.startswith("ha/disc/") for t in config_topics(s))


def test_binary_sensor_template_is_on_only_while_online() -> None:
    online = by_key(configs(settings(), "m", "1"))["online"]
    for state, expected in (("online", "ON"), ("starting", "OFF"), ("offline", "OFF")):
        payload = json.dumps({**STATUS_ONLINE, "state": state}).encode()
        assert render(online["value_template"], payload) == expected
        # Stays available while offline: "Disconnected" is what it is there to say.
        assert render(online["availability"][0]["value_template"], payload) == "online"
    assert render(online["availability"][0]["value_template"], b"garbage") == "offline"


def test_sensor_templates_read_the_stats_and_are_unavailable_unless_online() -> None:
    found = by_key(configs(settings(), "m", "1"))
    payload = json.dumps(STATS).encode()
    values = {k: render(found[k]["value_template"], payload) for k in found if k != "online"}
    assert values == {
        "tokens_per_s": "27.41",
        "requests_generating": "1",
        "requests_queued": "3",
        "requests_served": "118",
    }
    availability = found["tokens_per_s"]["availability"][0]["value_template"]
    for state, expected in (("online", "online"), ("starting", "offline"), ("offline", "offline")):
        assert render(availability, json.dumps({"state": state}).encode()) == expected


def test_without_stats_the_sensors_are_removed() -> None:
    messages = dict(configs(settings(fleet={"stats_interval": 0}), "m", "1"))
    assert [t for t, p in messages.items() if p] == [
        "homeassistant/binary_sensor/qwen_edge_pi_online/config"
    ]
    assert len(messages) == len(ENTITIES)


def test_settings_come_from_the_environment_and_reject_wildcards(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert (Settings().homeassistant.enabled, Settings().homeassistant.discovery_prefix) == (
        False,
        "homeassistant",
    )
    monkeypatch.setenv("QWEN_EDGE_HOMEASSISTANT__ENABLED", "true")
    monkeypatch.setenv("QWEN_EDGE_HOMEASSISTANT__DISCOVERY_PREFIX", "ha")
    s = load_settings()
    assert (s.homeassistant.enabled, s.homeassistant.discovery_prefix) == (True, "ha")
    monkeypatch.setenv("QWEN_EDGE_HOMEASSISTANT__DISCOVERY_PREFIX", "ha/#")
    with pytest.raises(ConfigError, match="QWEN_EDGE_HOMEASSISTANT__DISCOVERY_PREFIX"):
        load_settings()


# -- what a node publishes on connect -----------------------------------------------------------


def test_a_disabled_node_that_never_announced_publishes_nothing(tmp_path: Path) -> None:
    announcer = Announcer(settings(enabled=False), "m", "1", tmp_path)
    assert announcer.messages() == []
    assert not (tmp_path / RECORD_FILE).exists()


def test_disabling_removes_what_was_announced_once(tmp_path: Path) -> None:
    enabled = Announcer(settings(), "m", "1", tmp_path)
    announced = enabled.messages()
    assert len(announced) == len(ENTITIES) and all(p for _, p in announced)
    assert enabled.messages() == announced  # every connect, the same configs
    disabled = Announcer(settings(enabled=False), "m", "1", tmp_path)
    assert disabled.messages() == [(t, b"") for t, _ in announced]
    assert disabled.messages() == []  # the next connect: nothing left to remove
    assert not (tmp_path / RECORD_FILE).exists()


def test_renaming_the_node_removes_the_old_entities(tmp_path: Path) -> None:
    old = [t for t, _ in Announcer(settings("pi"), "m", "1", tmp_path).messages()]
    renamed = Announcer(settings("kitchen"), "m", "1", tmp_path).messages()
    assert renamed[: len(old)] == [(t, b"") for t in old]
    assert all("qwen_edge_kitchen_" in t and p for t, p in renamed[len(old) :])


# -- a real node and broker -----------------------------------------------------------------------


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
    broker_dir = Path(__file__).resolve().parent / "broker"
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
