"""`qwen-edge fleet`: every node on the broker, from its retained status and stats messages.

Retained messages arrive right after subscribing, so a short wait sees the whole fleet without
asking any node anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from .protocol import WatchKind, node_filters, parse_node_topic
from .settings import Settings
from .tls import apply_credentials


@dataclass(slots=True)
class NodeView:
    node: str
    status: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def online(self) -> bool:
        return self.status.get("state") == "online"

    def as_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "state": self.status.get("state"),
            "reason": self.status.get("reason"),
            "group": self.status.get("group"),
            "model": self.status.get("model") or self.stats.get("model"),
            "version": self.status.get("version"),
            "slots": self.status.get("slots", self.stats.get("slots")),
            # Load figures are as of the last stats message; `stats_ts` says when that was.
            "active_slots": self.stats.get("active_slots"),
            "queue_depth": self.stats.get("queue_depth"),
            "tokens_per_s": self.stats.get("tokens_per_s"),
            "requests_done": self.stats.get("requests_done"),
            "uptime_s": self.stats.get("uptime_s"),
            "stats_ts": self.stats.get("ts"),
        }


def collect(settings: Settings, wait: float) -> dict[str, NodeView]:
    """Subscribe to every node's status and stats for `wait` seconds; raises OSError when the
    broker cannot be reached."""
    nodes: dict[str, NodeView] = {}
    lock = threading.Lock()
    subscribed = threading.Event()
    prefix = settings.topic_prefix

    def on_connect(client: paho.Client, *_: Any) -> None:
        client.subscribe([(topic, 1) for topic in node_filters(prefix)])

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        where = parse_node_topic(prefix, msg.topic)
        if where is None:
            return
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        with lock:
            view = nodes.setdefault(where.name, NodeView(where.name))
            if where.kind is WatchKind.STATUS:
                view.status = data
            else:
                view.stats = data

    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"qwen-edge-fleet-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv5 if settings.mqtt.protocol == "5" else paho.MQTTv311,
    )
    apply_credentials(client, settings.mqtt)
    client.on_connect = on_connect
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = on_message
    client.connect(settings.mqtt.host, settings.mqtt.port, keepalive=30)
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise OSError("the broker did not confirm the subscription")
        time.sleep(wait)
    finally:
        client.disconnect()
        client.loop_stop()
    with lock:
        return dict(sorted(nodes.items()))


def _uptime(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def table(nodes: dict[str, NodeView]) -> str:
    header = ("NODE", "STATE", "MODEL", "SLOTS", "QUEUE", "TOK/S", "UPTIME")
    rows = [header]
    for view in nodes.values():
        v = view.as_json()
        live = view.online and bool(view.stats)
        slots = f"{v['active_slots']}/{v['slots']}" if live else f"-/{v['slots'] or '-'}"
        rate = v["tokens_per_s"]
        rows.append(
            (
                view.node,
                str(v["state"] or "?"),
                str(v["model"] or "?"),
                slots,
                str(v["queue_depth"]) if live else "-",
                f"{rate:.1f}" if live and isinstance(rate, int | float) else "-",
                _uptime(v["uptime_s"]) if live else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def run_fleet(settings: Settings, args: argparse.Namespace) -> int:
    try:
        nodes = collect(settings, args.wait)
    except OSError as exc:
        print(
            f"qwen-edge fleet: cannot reach {settings.mqtt.host}:{settings.mqtt.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps([v.as_json() for v in nodes.values()], indent=2, ensure_ascii=False))
    elif nodes:
        print(table(nodes))
    else:
        print(f"no qwen-edge node has published under {settings.topic_prefix}/", file=sys.stderr)
    return 0
