"""The README's first command, scripts/demo, really streams a reply (setup is already done)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_streams_a_reply_and_cleans_up() -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "demo"), "Name two planets."],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "online" in result.stderr
    assert result.stdout.strip()  # the streamed reply
    assert "[stop" in result.stderr or "[length" in result.stderr
