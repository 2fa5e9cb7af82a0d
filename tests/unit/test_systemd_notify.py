"""sd_notify never raises and never waits: a vanished or stalled NOTIFY_SOCKET must not stall the
watchdog thread or the shutdown (a daemon once hung on SIGTERM when STOPPING=1 raised)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from qwen_edge.node import systemd_notify


def test_a_notification_reaches_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert systemd_notify.notify("READY=1", "STATUS=serving")
        assert receiver.recv(100) == b"READY=1\nSTATUS=serving"


def test_no_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd_notify.notify("READY=1") is False


def test_a_vanished_socket_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).bind(str(path))  # bound, then closed: refused
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert systemd_notify.notify("STOPPING=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "never-there"))
    assert systemd_notify.notify("STOPPING=1") is False


def test_a_receiver_that_stopped_reading_does_not_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        results: list[bool] = []

        def ping() -> None:
            results.extend(systemd_notify.notify("WATCHDOG=1") for _ in range(2000))

        pinger = threading.Thread(target=ping, daemon=True)
        pinger.start()
        pinger.join(timeout=30)
        assert not pinger.is_alive(), "notify blocked on a full queue"
        assert results[0] and not results[-1]  # the queue filled up; later pings were dropped
