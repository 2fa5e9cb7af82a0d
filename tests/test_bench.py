"""scripts/bench --quick as a smoke run: every section runs and reports; no thresholds here
(speed targets live in the full benchmark, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_bench_runs_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ceiling"]["decode_tokens_per_s"] > 0
    edge = report["qwen_edge"]
    assert edge["single"]["decode_tokens_per_s"] > 0
    assert edge["follow_up"]["history_tokens_cached_median"] > 0
    assert {c["streams"] for c in edge["concurrency"]} == {1, 4}
    assert edge["late_arrival"]["ttft_ms_while_3_stream"] > 0
    assert edge["peak_rss_mb"] > 0
    assert {t["name"] for t in report["targets"]} >= {"e2e decode / ceiling decode"}
    assert "e2e decode / ceiling decode" in result.stdout
