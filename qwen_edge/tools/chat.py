"""`qwen-edge chat`: a terminal client on qwen_edge.client that sends a message and prints the
reply as it streams. Asked of the pool (`--node` = the pool's name), a conversation stays on the
node that answered its first message.

Ctrl-C while a reply streams sends a cancel; Ctrl-C or Ctrl-D at the prompt quits. With `--tools`
the model may call tools; a reply of calls is shown as `[call NAME ARGUMENTS id ID]` lines.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from ..client import EdgeClient, EdgeError, Reply, Stream
from ..protocol import NodeState
from ..settings import Settings


def _note(reply: Reply, pooled: bool) -> str:
    parts = [reply.finish_reason]
    if pooled:
        parts.append(f"node {reply.node}")
    if reply.timings.get("tokens_per_s"):
        parts.append(f"{reply.timings['tokens_per_s']:.1f} tokens/s")
    if reply.timings.get("ttft_ms") is not None:
        parts.append(f"first token {reply.timings['ttft_ms']:.0f} ms")
    return f"[{', '.join(parts)}]"


def _restarted() -> None:
    print("\n[the node serving this reply went away; asked again]", file=sys.stderr)


def _print_calls(reply: Reply) -> None:
    """A reply of tool calls has no text: show each call (chat does not run them)."""
    for call in reply.tool_calls:
        arguments = json.dumps(call.arguments, ensure_ascii=False)
        print(f"[call {call.name} {arguments} id {call.id}]")


def _print_reply(stream: Stream, timeout: float, pooled: bool) -> int:
    """Print chunks in place until the reply ends; returns an exit code."""
    cancelled = False
    while True:
        try:
            text = next(stream)
        except StopIteration:
            assert stream.reply is not None
            _print_calls(stream.reply)
            print(f"\n{_note(stream.reply, pooled)}", file=sys.stderr)
            return 0
        except EdgeError as exc:
            print(f"\n[error {exc.code}: {exc.message}]", file=sys.stderr)
            return 1
        except TimeoutError:
            print(f"\n[no reply within {timeout:.0f}s; is the node online?]", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            if cancelled:
                stream.close()
                raise
            stream.cancel()  # the reply ends with finish_reason cancelled
            cancelled = True
            continue
        sys.stdout.write(text)
        sys.stdout.flush()


def run_chat(settings: Settings, args: argparse.Namespace) -> int:
    # With broker ACLs a device may only use its own account name as client id in topics.
    client_id = args.client_id or settings.mqtt.username or f"chat-{getpass.getuser()}"
    target = args.node or settings.node_id
    pooled = settings.fleet.enabled and target == settings.fleet.group
    client = EdgeClient.from_settings(
        settings, client_id=client_id, node=None if pooled else target
    )
    try:
        client.connect()
    except OSError as exc:
        print(
            f"qwen-edge chat: cannot reach {settings.mqtt.host}:{settings.mqtt.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    tools = json.loads(args.tools.read_text()) if args.tools is not None else None
    options: dict[str, Any] = {
        "tools": tools,
        "tool_choice": args.tool_choice,
        "system": args.system,
        "temperature": args.temperature,
        "max_tokens": args.max_tokens,
        "timeout": args.timeout,
        "on_restart": _restarted,
    }
    try:
        if args.message:
            stream = client.stream(" ".join(args.message), args.conversation, **options)
            return _print_reply(stream, args.timeout, pooled)
        where = (
            f"the pool {settings.topic_prefix}/{target}"
            if pooled
            else (f"{settings.topic_prefix}/{target}")
        )
        print(f"talking to {where} as {client_id}; Ctrl-D quits", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            if not line.strip():
                continue
            node = client.pinned_node(args.conversation) if pooled else target
            status = client.node_status(node) if node is not None else None
            if not pooled and status is not None and status.state == NodeState.OFFLINE:
                print("[the node is offline; the request waits for it]", file=sys.stderr)
            _print_reply(client.stream(line, args.conversation, **options), args.timeout, pooled)
            options["system"] = None  # sent once; the conversation keeps it
    finally:
        client.close()
