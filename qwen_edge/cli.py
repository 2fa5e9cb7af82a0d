"""Command line: `qwen-edge serve | config | chat | fleet | model | doctor | homeassistant`.

Thin: parse, load settings, run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .settings import ConfigError, Settings, load_settings

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    # Options every command takes, before or after its name. No default (SUPPRESS): a
    # subcommand's would overwrite one given before its name; parse_args supplies None.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="TOML settings file (default: /etc/qwen-edge/config.toml if it exists)",
    )
    parents = [common]
    parser = argparse.ArgumentParser(
        prog="qwen-edge",
        description="Local chat model streaming replies over MQTT.",
        parents=parents,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=parents, help="run the daemon")
    sub.add_parser("config", parents=parents, help="print the effective settings (secrets masked)")

    _add_chat(sub, parents)
    _add_tools(sub, parents)

    from .tools.models import add_parser as add_model_parser

    add_model_parser(sub, parents)
    return parser


def _add_chat(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    chat = sub.add_parser("chat", parents=parents, help="talk to a node from the terminal")
    chat.add_argument("message", nargs="*", help="send this one message, print the reply, exit")
    chat.add_argument(
        "--node",
        help="node to talk to (default: this node's node_id); the pool's name (fleet.group, "
        "e.g. pool) asks any node and keeps the conversation on the one that answers",
    )
    chat.add_argument(
        "--client-id", default=None, help="client id (default: mqtt.username, else chat-<user>)"
    )
    chat.add_argument("--conversation", default="default", help="conversation id")
    chat.add_argument("--system", default=None, help="system prompt for this conversation")
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.add_argument(
        "--tools",
        type=Path,
        default=None,
        help="JSON file: an array of tools the model may call (docs/protocol.md, Tool calls); "
        "the calls it makes are shown, not run",
    )
    chat.add_argument("--tool-choice", default=None, choices=["auto", "none", "required"])
    chat.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the reply's next message before giving up",
    )


def _add_tools(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """fleet, doctor and homeassistant."""
    fleet = sub.add_parser(
        "fleet", parents=parents, help="list the nodes on the broker: state, model, load"
    )
    fleet.add_argument(
        "--wait", type=float, default=1.0, help="seconds to gather status messages (default 1)"
    )
    fleet.add_argument("--json", action="store_true", help="print JSON instead of a table")

    doctor = sub.add_parser(
        "doctor", parents=parents, help="check broker, credentials, model, CPU and memory"
    )
    doctor.add_argument("--json", action="store_true", help="print JSON instead of lines")
    doctor.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the broker (default 5)"
    )
    doctor.add_argument(
        "--secrets",
        type=Path,
        help="the service's environment file, read like systemd does "
        "(default: /etc/qwen-edge/secrets.env)",
    )

    ha = sub.add_parser(
        "homeassistant",
        parents=parents,
        help="print this node's Home Assistant discovery configs, or remove them",
    )
    ha.add_argument(
        "--remove", action="store_true", help="publish empty retained configs (node stopped)"
    )
    ha.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker")
    ha.add_argument(
        "--secrets", type=Path, help="the service's environment file, read like systemd does"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return _parser().parse_args(argv, argparse.Namespace(config=None))


def _settings(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(args.config)
    except ConfigError as exc:
        print(f"qwen-edge: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0911 (a return per command)
    args = parse_args(argv)
    if args.command == "doctor":  # reports a bad configuration itself, among its checks
        from .tools.doctor import run_doctor

        return run_doctor(args)
    if args.command == "homeassistant" and args.secrets is not None:
        from .tools.doctor import use_secrets

        use_secrets(args.secrets)  # the broker password of the service
    settings = _settings(args)
    if args.command == "config":
        print(json.dumps(settings.masked(), indent=2, ensure_ascii=False))
        return 0
    if args.command == "chat":
        from .tools.chat import run_chat

        return run_chat(settings, args)
    if args.command == "fleet":
        from .tools.fleet import run_fleet

        return run_fleet(settings, args)
    if args.command == "homeassistant":
        from .node.homeassistant import run_homeassistant

        return run_homeassistant(settings, args)
    if args.command == "model":
        from .tools.models import run_model

        return run_model(settings, args)

    from . import logs
    from .node.service import Service

    logs.configure(settings.service.log_format, settings.service.log_level)
    return Service(settings).run()


if __name__ == "__main__":
    sys.exit(main())
