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
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from .. import mqttclient
from ..protocol import Stats, Status
from ..settings import Settings
from ..topics import WatchKind, node_filters, parse_node_topic


@dataclass(slots=True)
class NodeView:
    node: str
    status: Status | None = None
    stats: Stats | None = None

    @property
    def online(self) -> bool:
        return self.status is not None and self.status.online

    def as_json(self) -> dict[str, Any]:
        status, stats = self.status, self.stats or Stats()
        model = status.model if status is not None else None
        slots = status.slots if status is not None else None
        return {
            "node": self.node,
            "state": status.state if status is not None else None,
            "reason": status.reason if status is not None else None,
            "group": status.group if status is not None else None,
            "model": model or stats.model,
            "version": status.version if status is not None else None,
            "slots": slots if slots is not None else stats.slots,
            # Load figures are as of the last stats message; `stats_ts` says when that was.
            "active_slots": stats.active_slots,
            "queue_depth": stats.queue_depth,
            "tokens_per_s": stats.tokens_per_s,
            "requests_done": stats.requests_done,
            "uptime_s": stats.uptime_s,
            "stats_ts": stats.ts,
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
        payload = bytes(msg.payload)
        if where.kind is WatchKind.STATUS:
            status = Status.parse(payload)
            if status is None:
                return
            with lock:
                nodes.setdefault(where.name, NodeView(where.name)).status = status
        else:
            stats = Stats.parse(payload)
            if stats is None:
                return
            with lock:
                nodes.setdefault(where.name, NodeView(where.name)).stats = stats

    client = mqttclient.new_client(
        settings.mqtt, mqttclient.client_id_for(settings.mqtt, "qwen-edge-fleet")
    )
    client.on_connect = on_connect
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = on_message
    mqttclient.connect(client, settings.mqtt)
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
        live = view.online and view.stats is not None
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
