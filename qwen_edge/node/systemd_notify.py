"""sd_notify for Type=notify units, over the datagram socket systemd names in NOTIFY_SOCKET.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op, so the daemon runs anywhere. A failed
notification is logged once and never raised or waited for: libsystemd's sd_notify (behind
systemd-python's `daemon.notify`) blocks while the receiver's queue is full and raises when the
socket is gone, and either would stall the watchdog thread or the shutdown behind it.
systemd-python is still what writes to the journal (logs.py).
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("qwen_edge.node.systemd_notify")

_warned = False


def notify(*lines: str) -> bool:
    """Send 'KEY=value' lines to systemd; True when the notification socket took them."""
    global _warned  # one warning per process, not one per watchdog ping
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.connect(address)
            sock.send("\n".join(lines).encode("utf-8"))
    except OSError as exc:  # gone, refused, or its queue full (BlockingIOError)
        if not _warned:
            _warned = True
            log.warning("sd_notify_failed", error=f"{type(exc).__name__}: {exc}", socket=address)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings systemd expects (half its timeout), or None if off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None
