"""structlog set-up: key=value on a terminal, journald fields under systemd, else JSON lines."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}


def _under_journald() -> bool:
    # systemd sets JOURNAL_STREAM to "dev:inode" of the stream it connected to stderr.
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


class _JournalRenderer:
    """Sends each event to journald with its key/values as structured fields."""

    def __init__(self) -> None:
        self._send = importlib.import_module("systemd.journal").send

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        message = str(event.pop("event", ""))
        level = str(event.pop("level", method))
        event.pop("timestamp", None)
        text = " ".join([message, *(f"{k}={v}" for k, v in event.items())])
        fields = {k.upper(): str(v) for k, v in event.items() if k.isidentifier()}
        self._send(text, PRIORITY=_PRIORITY.get(level, 6), SYSLOG_IDENTIFIER="qwen-edge", **fields)
        raise structlog.DropEvent


def configure(fmt: str = "auto", level: str = "info") -> None:
    if fmt == "auto":
        if sys.stderr.isatty():
            fmt = "console"
        elif _under_journald():
            fmt = "journald"
        else:
            fmt = "json"
    if fmt == "journald":
        try:
            renderer: Any = _JournalRenderer()
        except ImportError:
            fmt = "json"
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    elif fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.format_exc_info,
    ]
    if fmt != "journald":
        processors.insert(2, structlog.processors.TimeStamper(fmt="iso", utc=True))
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
