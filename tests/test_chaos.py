"""scripts/chaos in short: conversations stream while the broker is killed and restarted; every
request must end with a complete done or an explicit error, nothing lost, nothing generated twice.
Also the soak mode's report, briefly, and what a resend of a finished request does."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from devtools import chaos
from devtools.harness import NODE, PREFIX, SMOLLM, Broker, Daemon, Probe

ROOT = Path(__file__).resolve().parent.parent
# As the docs run it: from a shell without the venv active (the script finds the venv itself).
FRESH_SHELL = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
CHAOS = ROOT / "scripts" / "chaos"


def run_chaos(tmp_path: Path, *args: str, timeout: float = 300) -> dict[str, Any]:
    out = tmp_path / "chaos.json"
    result = subprocess.run(
        [str(CHAOS), "--threads", "1", "--json", str(out), *args],
        capture_output=True,
        text=True,
        env=FRESH_SHELL,
        timeout=timeout,
        check=False,
    )
    assert out.exists(), result.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.read_text())
    report["_returncode"] = result.returncode
    report["_stdout"] = result.stdout
    report["_stderr"] = result.stderr
    return report


@pytest.fixture(scope="module")
def chaos_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("chaos")
    return run_chaos(
        tmp,
        "--conversations", "12",
        "--restarts", "3",
        "--turns", "2",
        "--max-tokens", "8",
        "--resend-after", "20",
        "--seed", "7",
        "--workdir", str(tmp / "run"),
    )  # fmt: skip


@pytest.mark.slow
def test_every_request_ends_with_complete_done_or_explicit_error(
    chaos_report: dict[str, Any],
) -> None:
    r = chaos_report
    assert r["broker_restarts"] == 3
    assert [e["signal"] for e in r["restarts"]] == ["SIGKILL", "SIGTERM", "SIGKILL"]
    assert r["requests_sent"] >= 24  # 12 conversations x at least 2 turns
    assert r["lost"] == 0, r["lost_ids"]
    assert r["with_gaps"] == 0, r["gap_ids"]
    assert r["completed"] + r["errored"] == r["requests_sent"]
    assert r["malformed"] == r["unknown_messages"] == r["unreadable_messages"] == 0
    assert r["daemon_alive"]
    assert r["daemon_exit"] == 0
    assert r["daemon"]["errors_logged"] == 0


@pytest.mark.slow
def test_no_duplicate_reaches_a_deduplicating_client(chaos_report: dict[str, Any]) -> None:
    r = chaos_report
    assert r["duplicates_after_dedup"] == 0, r["duplicate_ids"]
    assert r["daemon"]["duplicate_generations"] == 0


@pytest.mark.slow
def test_report_is_a_table_json_and_exit_status(chaos_report: dict[str, Any]) -> None:
    r = chaos_report
    assert r["passed"] is (r["failures"] == [])
    assert r["_returncode"] == (0 if r["passed"] else 1), r["_stderr"][-3000:]
    assert r["failures"] == []
    for row in ("requests sent", "completed", "errored", "lost", "duplicates after dedup"):
        assert row in r["_stdout"]


@pytest.mark.slow
def test_soak_reports_rss_after_warm_up(tmp_path: Path) -> None:
    r = run_chaos(
        tmp_path,
        "--soak", "0.3",
        "--concurrency", "2",
        "--max-tokens", "4",
        "--sample-every", "0.5",
        "--warmup", "0.25",
        "--warmup-requests", "5",
        "--rss-limit", "1000",
    )  # fmt: skip
    m = r["memory"]
    assert m["samples_after_warmup"] >= 10
    assert 20 < m["rss_mb_min"] <= m["rss_mb_max"] < 4000
    assert m["rss_spread_pct"] >= 0
    assert r["lost"] == 0
    assert r["completed"] > 10
    assert r["_returncode"] == 0, r["_stderr"][-3000:]


def test_resend_of_a_finished_request_is_not_generated_again(
    broker: Broker, tmp_path: Path
) -> None:
    """A device whose `done` was lost (broker killed before delivering it) sends the request
    again with the same request_id; the reply it then gets must be the same reply, not a new one
    under the same (request_id, seq) that a de-duplicating client would mix into the first."""
    d = Daemon(tmp_path / "daemon", broker, SMOLLM, QWEN_EDGE_MODEL__THREADS="1")
    d.start()
    dev = Probe(broker, "resender", persistent=True)
    try:
        dev.subscribe(dev.reply_topic("c1"))
        body = {"conversation_id": "c1", "max_tokens": 6, "temperature": 0.9, "seed": 5}
        first = dev.collect(dev.request("Name a fruit.", request_id="r1", **body), timeout=60)
        assert first[-1]["type"] == "done"
        seen = {m["seq"]: m for m in first}
        dev.request("Name a fruit.", request_id="r1", **body)
        again = dev.collect("r1", timeout=10)
        for m in again:
            assert m == seen.get(m["seq"], m) and m["seq"] in seen, m
    except TimeoutError:
        pass  # nothing came back for the resend: no second reply
    finally:
        dev.close()
        d.stop()
    done = [e for e in d.log_events() if e.get("event") == "request_done"]
    assert len(done) == 1, f"{PREFIX}/{NODE}: generated {len(done)} times"


def test_request_redelivered_after_a_broker_crash_is_not_generated_again(tmp_path: Path) -> None:
    """What the chaos run hits by chance, made certain: mosquitto saves its state now and then
    (here only on a clean stop); killed, it restarts from the last save, in which a request the
    daemon has since served and acknowledged is still waiting for it, and delivers it again."""
    conf = tmp_path / "rare-saves.conf"
    conf.write_text(
        (ROOT / "tests" / "broker" / "plain.conf")
        .read_text()
        .replace("autosave_interval 1", "autosave_interval 3600")
    )
    broker = Broker(tmp_path / "broker", base_conf=conf)
    broker.start()
    env = {"QWEN_EDGE_MODEL__THREADS": "1"}
    first = Daemon(tmp_path / "d1", broker, SMOLLM, **env)
    first.start()
    first.stop()  # its session, with its subscriptions, stays in the broker
    dev = Probe(broker, "crash", persistent=True)
    d = Daemon(tmp_path / "d2", broker, SMOLLM, **env)
    try:
        dev.subscribe(dev.reply_topic("c1"))
        rid = dev.request("Name a fruit.", conversation_id="c1", max_tokens=4, temperature=0)
        broker.stop(signal.SIGTERM)  # saved: the request waits in the daemon's session
        broker.start()
        d.start()
        assert dev.collect(rid, timeout=60)[-1]["type"] == "done"
        broker.stop(signal.SIGKILL)  # back to the last save: the request is waiting again
        broker.start()
        time.sleep(8)  # both reconnect (1-2 s) and a second reply would be done
    finally:
        dev.close()
        d.stop()
        broker.stop()
    done = [e for e in d.log_events() if e.get("event") == "request_done"]
    assert len(done) == 1, f"generated {len(done)} times"


# -- the script's accounting, on made-up message sequences ----------------------------------------


def msg(kind: str, seq: int, **fields: Any) -> tuple[int, dict[str, Any], bytes]:
    data = {"type": kind, "request_id": "r1", "seq": seq, **fields}
    return seq, data, json.dumps(data).encode()


def feed(*messages: tuple[int, dict[str, Any], bytes]) -> Any:
    request = chaos.Request("r1", "t", b"{}", time.monotonic())
    for m in messages:
        request.on_message(*m)
    return request


def test_accounting_complete_reply_with_redelivered_copies() -> None:
    r = feed(msg("start", 0), msg("chunk", 1, text="a"), msg("chunk", 1, text="a"), msg("done", 2))
    assert (r.outcome, r.copies, r.conflicting, r.after_final) == ("completed", 1, 0, 0)
    assert r.complete.is_set()


def test_accounting_second_generation_is_a_duplicate_after_dedup() -> None:
    r = feed(
        msg("start", 0),
        msg("chunk", 1, text="a"),
        msg("done", 2, usage=1),
        msg("start", 0),  # the same bytes: cannot be told apart
        msg("chunk", 1, text="b"),
        msg("chunk", 2, text="c"),
        msg("chunk", 3, text="d"),
        msg("done", 4, usage=2),
    )
    assert r.outcome == "completed"
    assert (r.copies, r.conflicting, r.after_final) == (1, 2, 2)


def test_accounting_gaps_lost_errors_and_malformed() -> None:
    assert feed(msg("start", 0), msg("done", 2)).outcome == "gaps"
    assert feed(msg("start", 0), msg("chunk", 1, text="a")).outcome == "lost"
    assert feed(msg("error", 0, code="busy")).outcome == "errored"
    assert feed(msg("chunk", 0, text="a"), msg("start", 1), msg("done", 2)).malformed == 2


class FakeDevice:
    """Drops the first `drop` publishes of a request, answers the next one at once."""

    def __init__(self, drop: int) -> None:
        self.drop = drop
        self.published = 0
        self.request: Any = None

    def send(self, request_id: str, conversation_id: str, **fields: Any) -> Any:
        self.request = chaos.Request(request_id, "t", b"{}", time.monotonic())
        self.publish(self.request)
        return self.request

    def publish(self, request: Any) -> None:
        self.published += 1
        if self.published > self.drop:
            for seq, kind in enumerate(("start", "done")):
                data = {"type": kind, "request_id": request.request_id, "seq": seq}
                request.on_message(seq, data, json.dumps(data).encode())


@pytest.mark.parametrize(("drop", "outcome", "resends"), [(0, "completed", 0), (2, "completed", 2),
                                                          (5, "lost", 3)])  # fmt: skip
def test_a_request_met_with_silence_is_sent_again_up_to_max_resends(
    drop: int, outcome: str, resends: int
) -> None:
    device = FakeDevice(drop)
    traffic = chaos.Traffic(1, 4, 0.0, resend_after=0.3, max_resends=3, think=0.0)
    chaos.converse(device, "c0", random.Random(1), traffic, lambda turns: turns < 1)
    assert device.request.outcome == outcome
    assert device.request.resends == resends
    assert device.published == 1 + resends
