"""scripts/bench as smoke runs (every section runs and reports; no speed thresholds here: targets
live in the full benchmark), its arithmetic on made-up rounds, and the fake engine it runs a
fleet on."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.bench import TARGETS, evaluate, history_message, rounds_summary, steady_tps
from devtools.harness import QWEN_TINY, ROOT, Broker, Daemon, Probe

# As the docs run it: from a shell without the venv active (the script finds the venv itself).
FRESH_SHELL = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
BENCH = ROOT / "scripts" / "bench"


def run_bench(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [str(BENCH), "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=FRESH_SHELL,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = out if out.exists() else out.with_name("fleet.json")
    return json.loads(written.read_text()), result.stdout


@pytest.mark.slow
def test_quick_bench_reports_every_figure_over_three_rounds(tmp_path: Path) -> None:
    # One thread: two OpenMP threads on a loaded 2-core machine wait for each other at every
    # graph node, and even the tiny model then crawls.
    report, stdout = run_bench(
        tmp_path, "--quick", "--model", str(QWEN_TINY), "--no-peer", "--threads", "1"
    )
    assert len(report["rounds"]) == 3
    for r in report["rounds"]:
        assert set(r) == {"ceiling", "edge"}
        assert r["ceiling"]["batched4_aggregate_tokens_per_s"] > 0
        assert r["edge"]["streams4_steady_tokens_per_s"] > 0
        # The follow-up keeps its history (~400 tokens with --quick), not only the template's
        # first tokens (24 of 25 before: the cold requests pushed the history conversations out).
        e = r["edge"]
        assert e["follow_up_cached_tokens"] > 300, e
        assert 5 < e["follow_up_new_tokens"] < 40, e  # the new turn's own tokens, no fewer
        assert e["returning_cached_tokens"] >= 0
        assert r["ceiling"]["follow_up_first_token_ms"] > 0
    names = {t["name"] for t in report["targets"]}
    # Without the peer, its rows are missing, and only they.
    assert len(names) == len(TARGETS) - sum("peer." in t.reference for t in TARGETS) == 7
    assert report["peak_rss_mb"] > report["model_mb"]
    assert report["machine"]["cpu"] and "llama_cpp" in report["machine"]
    assert "single-stream decode vs low-level loop" in stdout
    assert "peak RSS" in stdout


@pytest.mark.slow
def test_fleet_bench_shows_nodes_receive_claims_not_each_others_tokens(tmp_path: Path) -> None:
    report, stdout = run_bench(
        tmp_path, "--fleet", "--fleet-sizes", "1", "2", "--fleet-slots", "2",
        "--fleet-interval", "50", "--fleet-window", "3",
    )  # fmt: skip
    by_size = {s["nodes"]: s for s in report["sizes"]}
    assert set(by_size) == {1, 2}
    for n, s in by_size.items():
        assert sum(s["busy_slots"].values()) == 2 * n
        # Watching every node's tokens would be N x S x 20 messages/s into each node; with
        # claims (docs/protocol.md, "Claims") a node receives only starts and ends of replies,
        # and none start or end within the window.
        assert s["expected_per_node_per_s"] == n * 2 * 20
        assert s["received_per_node_per_s"] < 0.05 * s["expected_per_node_per_s"]
        assert s["cpu_percent_per_node"]["median"] > 0
    assert "msgs in/node/s" in stdout


def test_fake_engine_node_streams_at_its_pace_without_a_model(
    broker: Broker, tmp_path: Path
) -> None:
    d = Daemon(tmp_path / "d", broker, Path("fake://30ms"), None)
    d.start()
    probe = Probe(broker)
    try:
        probe.subscribe(probe.reply_topic())
        began = time.monotonic()
        messages = probe.collect(probe.request("Hi", max_tokens=20), timeout=30)
        took = time.monotonic() - began
    finally:
        probe.close()
        d.stop()
    assert [m["type"] for m in messages] == ["start"] + ["chunk"] * 20 + ["done"]
    assert messages[-1]["usage"]["completion_tokens"] == 20
    assert "".join(m["text"] for m in messages if m["type"] == "chunk").startswith(" ")
    assert took >= 19 * 0.030  # one token per step, a step every 30 ms


def rounds_of(**series: list[float]) -> list[dict[str, dict[str, float]]]:
    """Rounds from series keyed `section__figure`."""
    n = len(next(iter(series.values())))
    rounds: list[dict[str, dict[str, float]]] = [{} for _ in range(n)]
    for key, values in series.items():
        section, name = key.split("__")
        for r, v in zip(rounds, values, strict=True):
            r.setdefault(section, {})[name] = v
    return rounds


def test_ratios_are_medians_of_per_round_ratios_with_their_range() -> None:
    rounds = rounds_of(
        edge__single_decode_tokens_per_s=[50.0, 40.0, 60.0],
        ceiling__single_decode_tokens_per_s=[50.0, 50.0, 60.0],
    )
    (row,) = evaluate(rounds)
    assert row["name"] == "single-stream decode vs low-level loop"
    assert row["ratio"] == {"median": 1.0, "min": 0.8, "max": 1.0, "n": 3}
    assert row["value"]["median"] == 50.0 and row["reference"]["median"] == 50.0
    assert row["met"]  # 1.0 >= 0.98


def test_steady_rate_counts_only_while_every_stream_streams() -> None:
    # Stream a: chunks at 0..10 s; b starts at 2 s and ends at 8 s. Between 2 and 8 s a sends 6
    # chunks and b 6 (one token each): 12 tokens in 6 s.
    a = ([float(t) for t in range(11)], 11)
    b = ([float(t) for t in range(2, 9)], 7)
    assert steady_tps([a, b]) == pytest.approx(2.0)
    # A chunk carrying two tokens' text (b: 14 tokens in 7 chunks) counts as two.
    assert steady_tps([a, (b[0], 14)]) == pytest.approx(3.0)
    # No moment with both streaming, or a stream with no chunk: no figure.
    assert steady_tps([([0.0, 1.0], 2), ([2.0, 3.0], 2)]) is None
    assert steady_tps([a, ([], 0)]) is None


def test_rows_without_a_limit_are_shown_not_judged() -> None:
    rounds = rounds_of(
        edge__streams4_aggregate_tokens_per_s=[90.0, 90.0, 90.0],
        ceiling__batched4_aggregate_tokens_per_s=[100.0, 100.0, 100.0],
    )
    (row,) = evaluate(rounds)
    assert row["name"].strip().startswith("whole run")
    assert row["met"] is None and row["target"] == ""


def test_latency_targets_are_met_below_their_limit() -> None:
    rounds = rounds_of(
        edge__follow_up_first_chunk_ms=[160.0, 170.0, 180.0],
        edge__fresh_first_chunk_ms=[100.0, 100.0, 100.0],
    )
    (row,) = evaluate(rounds)
    assert row["target"] == "<= 1.5"
    assert row["ratio"]["median"] == pytest.approx(1.7)
    assert not row["met"]
    assert rounds_summary(rounds)["edge"]["fresh_first_chunk_ms"]["max"] == 100.0


def test_history_conversations_share_no_text_a_follow_up_could_borrow() -> None:
    """One device may reuse its own prefixes across its conversations: with one history text
    for all, a follow-up reused its sibling's KV (1 new token of 1,490), not its own history."""
    a, b = (history_message(1500, c) for c in ("hist-0", "hist-1"))
    assert len(a) > 3000 and len(b) > 3000
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert a[:shared] == "hist-"
