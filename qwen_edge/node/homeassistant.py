"""Home Assistant MQTT discovery: the retained configs that make a node appear as a device.

The entities read the node's own retained status and stats topics through templates, so the node
publishes nothing for Home Assistant but these configs (docs/homeassistant.md). What a node has
announced is remembered in its state directory, so that turning the feature off, renaming the
node or moving the discovery prefix removes exactly what was announced, and a node that never
announced anything never publishes under the discovery prefix.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import threading
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import structlog

from ..protocol import encode
from ..settings import Settings
from ..topics import Topics

log = structlog.get_logger("qwen_edge.node.homeassistant")

RECORD_FILE = "homeassistant.json"  # in the state directory: the config topics announced
MANUFACTURER = "qwen-edge"

# Home Assistant's object ids (and so our topic levels) allow [a-zA-Z0-9_-] only.
_NOT_ID = re.compile(r"[^a-zA-Z0-9_-]")

# The node is available while its status says online; "starting" (model loading) and "offline"
# make the figures unavailable, since nothing is being measured then.
_ONLINE = "{{ 'online' if value_json.state == 'online' else 'offline' }}"
# The connectivity sensor itself must stay readable while the node is offline (that is what it
# reports): it is unavailable only when there is no readable status at all.
_KNOWN = "{{ 'online' if value_json is defined and value_json.state is defined else 'offline' }}"


@dataclass(frozen=True, slots=True)
class Entity:
    key: str  # the last part of unique_id and object_id
    component: str  # binary_sensor or sensor
    name: str
    topic: str  # "status" or "stats": which of the node's topics it reads
    options: tuple[tuple[str, Any], ...]


ENTITIES = (
    Entity(
        "online",
        "binary_sensor",
        "Online",
        "status",
        (
            ("device_class", "connectivity"),
            ("value_template", "{{ 'ON' if value_json.state == 'online' else 'OFF' }}"),
        ),
    ),
    Entity(
        "tokens_per_s",
        "sensor",
        "Decode speed",
        "stats",
        (
            ("value_template", "{{ value_json.tokens_per_s }}"),
            ("unit_of_measurement", "tokens/s"),
            ("state_class", "measurement"),
            ("suggested_display_precision", 1),
            ("icon", "mdi:speedometer"),
        ),
    ),
    Entity(
        "requests_generating",
        "sensor",
        "Requests generating",
        "stats",
        (
            ("value_template", "{{ value_json.active_slots }}"),
            ("unit_of_measurement", "requests"),
            ("state_class", "measurement"),
            ("icon", "mdi:message-processing-outline"),
        ),
    ),
    Entity(
        "requests_queued",
        "sensor",
        "Requests queued",
        "stats",
        (
            ("value_template", "{{ value_json.queue_depth }}"),
            ("unit_of_measurement", "requests"),
            ("state_class", "measurement"),
            ("icon", "mdi:tray-full"),
        ),
    ),
    Entity(
        "requests_served",
        "sensor",
        "Requests served",
        "stats",
        (
            ("value_template", "{{ value_json.requests_done }}"),
            ("unit_of_measurement", "requests"),
            # Counted since the node started: a restart's drop to 0 is a reset, not a decrease.
            ("state_class", "total_increasing"),
            ("icon", "mdi:counter"),
        ),
    ),
)


def package_version() -> str:
    try:
        return version("qwen-edge")
    except PackageNotFoundError:
        return "0+unknown"


def device_id(node_id: str) -> str:
    """`qwen_edge_<node>`: a node id with characters Home Assistant does not take gets them
    replaced and a short hash of the original appended, so that two nodes never share one."""
    slug = _NOT_ID.sub("_", node_id)
    if slug != node_id:
        slug += "_" + hashlib.sha256(node_id.encode("utf-8")).hexdigest()[:8]
    return f"qwen_edge_{slug}"


def config_topic(discovery_prefix: str, node_id: str, entity: Entity) -> str:
    return f"{discovery_prefix}/{entity.component}/{device_id(node_id)}_{entity.key}/config"


def config_topics(settings: Settings) -> list[str]:
    """Every config topic this node's settings name, whether or not it is enabled."""
    prefix, node = settings.homeassistant.discovery_prefix, settings.node_id
    return [config_topic(prefix, node, entity) for entity in ENTITIES]


def configs(settings: Settings, model_name: str, version: str) -> list[tuple[str, bytes]]:
    """(topic, retained payload) for every entity. Without stats (fleet.stats_interval 0) the
    sensors would never get a value, so theirs are empty payloads: Home Assistant removes them."""
    topics = Topics(settings.topic_prefix, settings.node_id)
    ident = device_id(settings.node_id)
    device = {
        "identifiers": [ident],
        "name": f"qwen-edge {settings.node_id}",
        "model": model_name,
        "sw_version": version,
        "manufacturer": MANUFACTURER,
    }
    origin = {"name": "qwen-edge", "sw_version": version}
    has_stats = settings.fleet.stats_interval > 0
    messages = []
    for entity in ENTITIES:
        topic = config_topic(settings.homeassistant.discovery_prefix, settings.node_id, entity)
        if entity.topic == "stats" and not has_stats:
            messages.append((topic, b""))
            continue
        config = {
            "name": entity.name,
            "unique_id": f"{ident}_{entity.key}",
            "state_topic": topics.status if entity.topic == "status" else topics.stats,
            **dict(entity.options),
            "availability": [
                {
                    "topic": topics.status,
                    "value_template": _KNOWN if entity.topic == "status" else _ONLINE,
                }
            ],
            "qos": 1,
            "device": device,
            "origin": origin,
        }
        messages.append((topic, encode(config)))
    return messages


def removals(topics: list[str]) -> list[tuple[str, bytes]]:
    """Empty retained payloads: Home Assistant deletes the entities, the broker the configs."""
    return [(topic, b"") for topic in topics]


class Announcer:
    """What the node publishes for Home Assistant on each connect of its main link, and the
    record of it in the state directory (RECORD_FILE)."""

    def __init__(self, settings: Settings, model_name: str, version: str, state_dir: Path) -> None:
        self.settings = settings
        self.model_name = model_name
        self.version = version
        self.record = state_dir / RECORD_FILE
        self._lock = threading.Lock()

    def messages(self) -> list[tuple[str, bytes]]:
        """Enabled: every config, and removals for topics announced before but no longer named
        (node or prefix renamed). Disabled: removals for what was announced, once."""
        with self._lock:
            announced = read_record(self.record)
            if not self.settings.homeassistant.enabled:
                if announced:
                    forget_record(self.record)
                    log.info("homeassistant_removed", configs=len(announced))
                return removals(announced)
            current = configs(self.settings, self.model_name, self.version)
            named = [topic for topic, _ in current]
            if sorted(named) != sorted(announced):
                # Written before publishing: a crash in between leaves a record of too much,
                # which only costs an empty publish later, never a config nobody removes.
                write_record(self.record, named)
            stale = [topic for topic in announced if topic not in named]
            return removals(stale) + current


def read_record(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        # Never announced; or no usable state directory, which the state store reports.
        return []
    except (OSError, ValueError) as exc:
        log.warning("homeassistant_record_unreadable", path=str(path), error=str(exc))
        return []
    topics = data.get("topics") if isinstance(data, dict) else None
    return [t for t in topics if isinstance(t, str) and t] if isinstance(topics, list) else []


def write_record(path: Path, topics: list[str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps({"topics": topics}) + "\n", encoding="utf-8")
        scratch.replace(path)
    except OSError as exc:
        # Announced anyway; only the removal after disabling would need a hand (README).
        log.warning(
            "homeassistant_record_unwritable",
            path=str(path),
            error=str(exc),
            consequence="disabling will not remove the configs; run qwen-edge homeassistant "
            "--remove",
        )


def forget_record(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("homeassistant_record_not_removed", path=str(path), error=str(exc))


# -- `qwen-edge homeassistant --remove` ------------------------------------------------------------


def run_homeassistant(settings: Settings, args: argparse.Namespace) -> int:
    """Print the configs an enabled node announces; with --remove, publish the removals for
    this node's configs (those its settings name and those its record names) and forget the
    record: for scripts/install --uninstall, with the node stopped. Without a record and with
    the feature off there is nothing to remove, and no broker traffic."""
    from .. import mqttclient
    from .statestore import state_directory

    if not args.remove:
        for topic, payload in configs(settings, settings.model.display_name, package_version()):
            print(topic, payload.decode("utf-8") or "(empty: removed)")
        return 0
    record = state_directory(settings.service.state_dir) / RECORD_FILE
    announced = read_record(record)
    topics = list(dict.fromkeys(announced + config_topics(settings)))
    if not announced and not settings.homeassistant.enabled:
        print("homeassistant: nothing announced by this node; nothing to remove")
        return 0
    mqtt = settings.mqtt
    # The node's own account (not bound to a client id) and a name of the node's.
    client = mqttclient.new_client(mqtt, f"qwen-edge-{settings.node_id}-homeassistant")
    try:
        mqttclient.connect(client, mqtt)
    except OSError as exc:
        print(f"homeassistant: cannot reach {mqtt.host}:{mqtt.port}: {exc}", file=sys.stderr)
        return 1
    client.loop_start()
    try:
        infos = [client.publish(t, payload, qos=1, retain=True) for t, payload in removals(topics)]
        for info in infos:
            info.wait_for_publish(args.timeout)
        confirmed = all(info.is_published() for info in infos)
    except (RuntimeError, ValueError):  # the link went down meanwhile
        confirmed = False
    finally:
        client.disconnect()
        client.loop_stop()
    if not confirmed:
        print(
            f"homeassistant: the broker at {mqtt.host}:{mqtt.port} did not confirm the removal "
            f"within {args.timeout:g} s (refused credentials?); `qwen-edge doctor` checks them",
            file=sys.stderr,
        )
        return 1
    forget_record(record)
    print(f"homeassistant: removed {len(topics)} discovery configs of node {settings.node_id}")
    return 0
