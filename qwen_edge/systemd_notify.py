"""sd_notify for Type=notify units: systemd-python when installed, else a plain datagram socket.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op, so the daemon runs anywhere.
"""

from __future__ import annotations

import importlib
import os
import socket
from typing import Any

_sd_daemon: Any
try:
    _sd_daemon = importlib.import_module("systemd.daemon")
except ImportError:  # a developer laptop without systemd-python
    _sd_daemon = None


def notify(*lines: str) -> bool:
    """Send 'KEY=value' lines to systemd; True when a notification socket took them."""
    state = "\n".join(lines)
    if _sd_daemon is not None:
        return bool(_sd_daemon.notify(state))
    return _notify_socket(state)


def _notify_socket(state: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode("utf-8"))
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
