"""Home Assistant MQTT discovery: what a node announces, how it reads in Home Assistant's
templates, and that turning it off (or `qwen-edge homeassistant --remove`) takes it all back.

Home Assistant renders value_template and the availability template with Jinja2, `value_json`
being the parsed payload; jinja2 (a dependency of llama-cpp-python) renders them the same way here.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import jinja2
import pytest

from qwen_edge.node.homeassistant import (
    ENTITIES,
    RECORD_FILE,
    Announcer,
    config_topics,
    configs,
    device_id,
)
from qwen_edge.settings import ConfigError, Settings, load_settings

pytestmark = pytest.mark.usefixtures("clean_env")

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
