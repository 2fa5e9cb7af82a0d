"""The README's first command, scripts/demo, really streams a reply (setup is already done)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def demo(message: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / "scripts" / "demo"), message],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **env},
    )


def test_demo_streams_a_reply_and_cleans_up() -> None:
    result = demo("Name two planets.")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "online" in result.stderr
    assert result.stdout.strip()  # the streamed reply
    assert "[stop" in result.stderr or "[length" in result.stderr


def test_a_node_that_cannot_start_is_reported_at_once_with_its_log() -> None:
    """The demo waits for the node as long as it runs (minutes under emulation), so a node that
    exits must end the wait at once, not after the whole QWEN_EDGE_DEMO_WAIT."""
    began = time.monotonic()
    result = demo("Hi", QWEN_EDGE_LIMITS__BURST="0", QWEN_EDGE_DEMO_WAIT="120")
    assert result.returncode == 1
    assert "the daemon exited before it came online" in result.stderr
    assert "QWEN_EDGE_LIMITS__BURST" in result.stderr  # its log
    assert time.monotonic() - began < 60
