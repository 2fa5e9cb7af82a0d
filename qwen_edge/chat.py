"""`qwen-edge chat`: a terminal client that sends a message and prints the reply as it streams.

Ctrl-C while a reply streams sends a cancel; Ctrl-C or Ctrl-D at the prompt quits.
"""

from __future__ import annotations

import argparse
import getpass
import json
import queue
import sys
import uuid
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from .protocol import Topics, encode
from .settings import Settings
from .tls import apply_credentials


class ChatClient:
    def __init__(self, settings: Settings, node: str, client_id: str, conversation: str) -> None:
        self.topics = Topics(settings.topic_prefix, node)
        self.client_id = client_id
        self.conversation = conversation
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.status: dict[str, Any] = {}
        self._subscribed: queue.Queue[str | None] = queue.Queue()  # None, or why not
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{client_id}-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        apply_credentials(client, settings.mqtt)
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *a: self._subscribed.put(None)
        client.on_message = self._on_message
        self._client = client
        self._host, self._port = settings.mqtt.host, settings.mqtt.port

    def connect(self, timeout: float) -> None:
        self._client.connect(self._host, self._port, keepalive=30)
        self._client.loop_start()
        refused = self._subscribed.get(timeout=timeout)
        if refused is not None:
            self.close()
            raise OSError(f"the broker refused the connection: {refused}")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, *_: Any
    ) -> None:
        if reason.is_failure:  # e.g. bad user name or password
            self._subscribed.put(str(reason))
            return
        client.subscribe(
            [
                (self.topics.reply(self.client_id, self.conversation), 1),
                (self.topics.error(self.client_id), 1),
                (self.topics.status, 1),
            ]
        )

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            data = json.loads(msg.payload)
        except ValueError:
            return
        if msg.topic == self.topics.status:
            self.status = data
        else:
            self.events.put(data)

    def ask(self, message: str, **options: Any) -> str:
        request_id = uuid.uuid4().hex[:16]
        body = {"request_id": request_id, "conversation_id": self.conversation, "message": message}
        body.update({k: v for k, v in options.items() if v is not None})
        self._client.publish(self.topics.request(self.client_id), encode(body), qos=1)
        return request_id

    def cancel(self, request_id: str) -> None:
        self._client.publish(
            self.topics.cancel(self.client_id), encode({"request_id": request_id}), qos=1
        )


def _stream_reply(client: ChatClient, request_id: str, timeout: float) -> int:
    """Print chunks in place until done/error; returns an exit code."""
    seen: set[int] = set()
    cancelled = False
    while True:
        try:
            event = client.events.get(timeout=timeout)
        except queue.Empty:
            print(f"\n[no reply within {timeout:.0f}s; is the node online?]", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            if cancelled:
                raise
            client.cancel(request_id)
            cancelled = True
            continue
        if event.get("request_id") not in (request_id, None):
            continue
        seq = event.get("seq")
        if isinstance(seq, int):
            if seq in seen:  # QoS 1 may deliver twice
                continue
            seen.add(seq)
        kind = event.get("type")
        if kind == "chunk":
            sys.stdout.write(event.get("text", ""))
            sys.stdout.flush()
        elif kind == "done":
            timings = event.get("timings") or {}
            note = f"[{event.get('finish_reason')}"
            if timings.get("tokens_per_s"):
                note += f", {timings['tokens_per_s']:.1f} tokens/s"
            if timings.get("ttft_ms") is not None:
                note += f", first token {timings['ttft_ms']:.0f} ms"
            print(f"\n{note}]", file=sys.stderr)
            return 0
        elif kind == "error":
            print(f"\n[error {event.get('code')}: {event.get('message')}]", file=sys.stderr)
            return 1


def run_chat(settings: Settings, args: argparse.Namespace) -> int:
    # With broker ACLs a device may only use its own account name as client id in topics.
    client_id = args.client_id or settings.mqtt.username or f"chat-{getpass.getuser()}"
    client = ChatClient(settings, args.node or settings.node_id, client_id, args.conversation)
    try:
        client.connect(timeout=10)
    except (OSError, queue.Empty) as exc:
        print(
            f"qwen-edge chat: cannot reach {settings.mqtt.host}:{settings.mqtt.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    options = {
        "system": args.system,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
    }
    try:
        if args.message:
            request_id = client.ask(" ".join(args.message), **options)
            return _stream_reply(client, request_id, args.timeout)
        print(f"talking to {client.topics.base} as {client_id}; Ctrl-D quits", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            if not line.strip():
                continue
            if client.status.get("state") == "offline":
                print("[the node is offline; the request waits for it]", file=sys.stderr)
            request_id = client.ask(line, **options)
            _stream_reply(client, request_id, args.timeout)
            options["system"] = None  # sent once; the conversation keeps it
    finally:
        client.close()
