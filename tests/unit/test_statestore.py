"""The state store (SQLite in the state directory) and the request journal on top of it: what
survives a restart, bounds, idempotent request ids, and every way the file can be unusable."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from qwen_edge.node import conversations, statestore
from qwen_edge.node.conversations import ConversationStore
from qwen_edge.node.journal import RequestJournal
from qwen_edge.node.replies import ReplyStream
from qwen_edge.node.statestore import FILE_NAME, Outcome, StateStore, state_directory
from qwen_edge.protocol import ErrorCode, FinishReason

TOPIC = "qwen-edge/n/request/dev1"


def outcome(request_id: str = "r1", n: int = 3, correlation: bytes | None = None) -> Outcome:
    messages = tuple(b'{"type":"chunk","seq":%d,"text":"\\n\xe4\xb8\xad"}' % i for i in range(n))
    return Outcome("dev1", request_id, "qwen-edge/n/reply/dev1/c", correlation, messages)


def aside(state_dir: Path, *, sides: bool = False) -> list[Path]:
    """The files moved aside (without their -wal/-shm companions unless `sides`)."""
    return sorted(
        p
        for p in state_dir.iterdir()
        if ".corrupt-" in p.name and (sides or not p.name.endswith(("-wal", "-shm")))
    )


def events(logs: list[dict[str, Any]], level: str | None = None) -> list[str]:
    return [e["event"] for e in logs if level is None or e["log_level"] == level]


# -- what survives ----------------------------------------------------------------------------


def test_history_outcomes_and_inbox_survive_reopening(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    first = store.accept(TOPIC, b'{"a":1}', None, None)
    second = store.accept(TOPIC, b'{"b":2}', "qwen-edge/n/reply/dev1/x", b"\x00corr")
    third = store.accept(TOPIC, b'{"c":3}', None, None)
    assert first is not None and second is not None and third is not None
    store.started(first)
    store.finish(third, outcome("r3", correlation=b"\xff"))
    store.save_conversation(("dev1", "c1"), "Be brief.", [("hi", "hello"), ("中文", "好")])
    store.close()

    again = StateStore(tmp_path)
    assert again.durable
    queued, interrupted = again.recover()
    assert [(e.id, e.payload, e.response_topic, e.correlation) for e in queued] == [
        (second, b'{"b":2}', "qwen-edge/n/reply/dev1/x", b"\x00corr")
    ]
    assert [e.id for e in interrupted] == [first]
    assert again.recover() == (queued, [])  # interrupted ones are gone, queued ones stay
    assert again.outcome("dev1", "r3") == outcome("r3", correlation=b"\xff")
    assert again.outcome("dev1", "r1") is None
    assert again.outcome("dev2", "r3") is None  # request ids are per client
    (saved,) = again.load_conversations(10, 3600)
    assert (saved.client_id, saved.conversation_id, saved.system) == ("dev1", "c1", "Be brief.")
    assert saved.turns == [("hi", "hello"), ("中文", "好")]
    assert 0 <= saved.idle < 5


def test_outcomes_are_bounded_by_age_and_count(tmp_path: Path) -> None:
    store = StateStore(tmp_path, outcomes_max=3, outcomes_ttl=0.5)
    store.finish(None, outcome("old"))
    time.sleep(0.6)
    assert store.outcome("dev1", "old") is None  # expired, though still in the file
    for i in range(5):
        store.finish(None, outcome(f"r{i}"))
    store.close()
    store = StateStore(tmp_path, outcomes_max=3, outcomes_ttl=3600)
    store.load_conversations(10, 3600)  # prunes on start
    kept = [i for i in range(5) if store.outcome("dev1", f"r{i}") is not None]
    assert kept == [2, 3, 4]
    assert store.outcome("dev1", "old") is None


def test_conversations_are_bounded_by_age_and_count_on_load(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for i in range(5):
        store.save_conversation(("dev1", f"c{i}"), None, [("q", f"a{i}")])
        time.sleep(0.01)
    assert [c.conversation_id for c in store.load_conversations(3, 3600)] == ["c2", "c3", "c4"]
    assert [c.conversation_id for c in store.load_conversations(10, 3600)] == ["c2", "c3", "c4"]
    time.sleep(0.3)
    assert store.load_conversations(10, 0.2) == []


class Ticks:
    """time.time for qwen_edge.node.statestore: one tick further on every call."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        self.now += 1
        return self.now


def client_outcome(client_id: str, request_id: str) -> Outcome:
    return Outcome(client_id, request_id, f"qwen-edge/n/reply/{client_id}/c", None, (b"{}",))


def test_a_client_finishing_many_requests_evicts_only_its_own_outcomes(tmp_path: Path) -> None:
    store = StateStore(tmp_path, outcomes_max=1000, outcomes_per_client=100)
    for i in range(3):
        store.finish(None, client_outcome("alice", f"a{i}"))
    for i in range(1200):
        store.finish(None, client_outcome("mallory", f"m{i}"))
    assert all(store.outcome("alice", f"a{i}") is not None for i in range(3))
    kept = [i for i in range(1200) if store.outcome("mallory", f"m{i}") is not None]
    assert kept == list(range(1100, 1200))  # its newest hundred


def test_a_full_outcome_table_takes_from_the_client_holding_most(tmp_path: Path) -> None:
    store = StateStore(tmp_path, outcomes_max=6, outcomes_per_client=6)
    for client, n in (("big", 4), ("small", 2), ("new", 1)):
        for i in range(n):
            store.finish(None, client_outcome(client, str(i)))
    held = {c: [i for i in range(4) if store.outcome(c, str(i))] for c in ("big", "small", "new")}
    assert held == {"big": [1, 2, 3], "small": [0, 1], "new": [0]}


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    total=st.integers(1, 8),
    per_client=st.integers(1, 5),
    clients=st.lists(st.integers(0, 3), max_size=30),
)
def test_outcomes_and_conversations_are_kept_by_the_same_rule(
    monkeypatch: pytest.MonkeyPatch,
    total: int,
    per_client: int,
    clients: list[int],
) -> None:
    """The SQL pruning of outcomes and the in-memory conversation table, fed the same new
    entries, keep the same ones: one fairness rule, documented once."""
    monkeypatch.setattr(statestore, "time", Ticks())
    monkeypatch.setattr(conversations, "time", _Monotonic(statestore.time))
    db = StateStore(None, outcomes_max=total, outcomes_per_client=per_client)
    table = ConversationStore(total, 1e9, max_per_client=per_client)
    for n, client_n in enumerate(clients):
        key = (f"c{client_n}", str(n))
        db.finish(None, client_outcome(*key))
        table.get(key)
    sent = [(f"c{c}", str(n)) for n, c in enumerate(clients)]
    assert [k for k in sent if db.outcome(*k)] == [k for k in sent if k in table]
    db.close()


class _Monotonic:
    def __init__(self, ticks: Ticks) -> None:
        self._ticks = ticks

    def monotonic(self) -> float:
        return self._ticks.time()


def test_conversations_on_load_are_kept_by_client_shares(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for i in range(2):
        store.save_conversation(("alice", f"a{i}"), None, [("q", "a")])
    for i in range(10):
        store.save_conversation(("mallory", f"m{i}"), None, [("q", "a")])
    kept = store.load_conversations(6, 3600, max_per_client=4)
    assert sorted(c.conversation_id for c in kept) == ["a0", "a1", "m6", "m7", "m8", "m9"]


def test_conversation_store_writes_through_and_restores(tmp_path: Path) -> None:
    db = StateStore(tmp_path)
    conversations = ConversationStore(2, 3600, persist=db)
    conversations.record(("dev1", "a"), "sys", 0, "one", "1")
    conversations.record(("dev1", "a"), "sys", 1, "two", "2")  # the first turn no longer fits
    conversations.record(("dev1", "b"), None, 0, "x", "y")
    conversations.get(("dev1", "b"), reset=True)  # a reset forgets the saved history too
    conversations.record(("dev1", "c"), None, 0, "p", "q")
    conversations.record(("dev2", "d"), None, 0, "r", "s")  # evicts the least recent, "a"
    saved = {(c.client_id, c.conversation_id): c.turns for c in db.load_conversations(9, 3600)}
    assert saved == {("dev1", "c"): [("p", "q")], ("dev2", "d"): [("r", "s")]}

    restored = ConversationStore(2, 3600)
    for c in db.load_conversations(9, 3600):
        restored.restore((c.client_id, c.conversation_id), c.system, c.turns, c.idle)
    assert restored.get(("dev1", "c")).turns == [("p", "q")]
    assert len(restored) == 2


def test_restore_skips_conversations_older_than_the_ttl() -> None:
    store = ConversationStore(5, 60)
    store.restore(("dev1", "old"), None, [("q", "a")], idle=61)
    store.restore(("dev1", "new"), None, [("q", "a")], idle=59)
    assert len(store) == 1
    assert store.get(("dev1", "new")).turns == [("q", "a")]


def test_state_directory_setting_then_systemd_then_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/from-systemd")
    assert state_directory(tmp_path) == tmp_path
    assert state_directory(None) == Path("/var/lib/from-systemd")
    monkeypatch.delenv("STATE_DIRECTORY")
    assert state_directory(None) == Path("/var/lib/qwen-edge")


# -- an unusable file is moved aside, never a crash --------------------------------------------


def _usable(store: StateStore) -> None:
    entry = store.accept(TOPIC, b"{}", None, None)
    assert entry is not None
    store.finish(entry, outcome())
    assert store.outcome("dev1", "r1") == outcome()


@pytest.mark.parametrize(
    "damage",
    ["garbage", "garbage_after_header", "wrong_version", "foreign_tables", "directory", "empty"],
)
def test_unusable_file_is_moved_aside_with_one_warning(tmp_path: Path, damage: str) -> None:
    path = tmp_path / FILE_NAME
    if damage == "garbage":
        path.write_bytes(os.urandom(8192))
    elif damage == "garbage_after_header":
        first = StateStore(tmp_path)
        first.save_conversation(("d", "c"), None, [("q", "a")] * 200)
        first.close()
        data = bytearray(path.read_bytes())
        data[4096:] = os.urandom(len(data) - 4096)
        path.write_bytes(bytes(data))
        for side in tmp_path.glob(FILE_NAME + "-*"):
            side.unlink()
    elif damage == "wrong_version":
        StateStore(tmp_path).close()
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA user_version = 99")
    elif damage == "foreign_tables":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE something_else (x)")
    elif damage == "directory":
        path.mkdir()
    elif damage == "empty":
        path.write_bytes(b"")  # an empty file is a valid, empty database: no move
    with capture_logs() as logs:
        store = StateStore(tmp_path)
    _usable(store)
    assert store.durable and store.path == path
    if damage == "empty":
        assert aside(tmp_path) == [] and events(logs) == []
        return
    assert len(aside(tmp_path)) == 1
    assert events(logs, "warning") == ["state_store_moved_aside"]
    assert events(logs, "error") == []
    store.close()
    assert StateStore(tmp_path).outcome("dev1", "r1") == outcome()  # the fresh one persists


def test_a_stale_wal_is_not_replayed_into_the_fresh_file(tmp_path: Path) -> None:
    old = StateStore(tmp_path)
    old._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    old._db.execute("PRAGMA wal_autocheckpoint = 0")
    old.save_conversation(("dev1", "old"), None, [("q", "a")])
    wal = (tmp_path / f"{FILE_NAME}-wal").read_bytes()
    assert wal  # the turn is only in the WAL
    main = bytearray((tmp_path / FILE_NAME).read_bytes())
    old.close()
    main[:100] = b"x" * 100  # header destroyed
    (tmp_path / FILE_NAME).write_bytes(bytes(main))
    (tmp_path / f"{FILE_NAME}-wal").write_bytes(wal)
    store = StateStore(tmp_path)
    assert len(aside(tmp_path)) == 1
    assert store.load_conversations(9, 3600) == []
    _usable(store)


def test_state_dir_that_cannot_exist_runs_in_memory_with_one_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the state directory should be")
    with capture_logs() as logs:
        store = StateStore(blocker / "state")
    assert not store.durable
    assert events(logs, "error") == ["state_store_in_memory"]
    _usable(store)  # still works, for this process's life


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes any file")
def test_unreadable_file_is_moved_aside(tmp_path: Path) -> None:
    StateStore(tmp_path).close()
    (tmp_path / FILE_NAME).chmod(0)
    store = StateStore(tmp_path)
    _usable(store)
    assert len(aside(tmp_path)) == 1


def test_disk_full_on_write_goes_on_in_memory(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save_conversation(("dev1", "kept"), None, [("q", "a")])
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # as full as a full disk
    with capture_logs() as logs:
        store.save_conversation(("dev1", "big"), None, [("q", "x" * 100_000)])
    assert events(logs, "error") == ["state_store_in_memory"]
    assert "SQLITE_FULL" in logs[0]["error"]
    assert not store.durable
    _usable(store)
    assert aside(tmp_path) == []  # nothing wrong with the file: next start uses it again
    reopened = StateStore(tmp_path)
    assert [c.conversation_id for c in reopened.load_conversations(9, 3600)] == ["kept"]


def test_file_corrupted_while_running_is_moved_aside(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    for i in range(50):
        store.save_conversation(("dev1", f"c{i}"), None, [("q", "a" * 2000)])
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    path = tmp_path / FILE_NAME
    with path.open("r+b") as f:  # another process scribbles over the pages
        f.seek(4096)
        f.write(os.urandom(path.stat().st_size - 4096))
    store._db.execute("PRAGMA shrink_memory")  # forget the cached pages: read the damage
    with capture_logs() as logs:
        for i in range(50):
            store.save_conversation(("dev1", f"c{i}"), None, [("q", "b")])
            store.load_conversations(100, 3600)
    assert events(logs, "warning") == ["state_store_moved_aside"]
    assert "SQLITE_CORRUPT" in logs[0]["error"]
    assert len(aside(tmp_path)) == 1
    assert store.durable
    _usable(store)


# -- the journal: a reply's record, idempotent request ids ------------------------------------


class Sent:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def __call__(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        self.messages.append(payload)


def test_reply_is_recorded_before_its_final_message_and_replayed_byte_for_byte(
    tmp_path: Path,
) -> None:
    journal = RequestJournal(StateStore(tmp_path))
    inbox = journal.accept(TOPIC, b"{}", None, None)
    sent = Sent()
    entry = journal.entry("dev1", "r1", "reply/topic", b"corr", inbox)
    stream = ReplyStream(sent, "reply/topic", "r1", b"corr", journal=entry)
    stream.start("n", "m")
    queued, interrupted = journal.recover()  # as after a crash now:
    assert queued == [] and [e.id for e in interrupted] == [inbox]  # never run again
    stream.chunk("Hel")
    stream.chunk("lo\n")
    # A duplicate now is in flight: admit asks the scheduler, which says so.
    assert journal.admit("dev1", "r1", lambda: ErrorCode.DUPLICATE) is ErrorCode.DUPLICATE
    stream.done(FinishReason.STOP, 5, 2, 1.0, 2.0)
    recorded = journal.admit("dev1", "r1", lambda: pytest.fail("must not be generated again"))
    assert isinstance(recorded, Outcome)
    assert list(recorded.messages) == sent.messages
    assert (recorded.topic, recorded.correlation) == ("reply/topic", b"corr")


@pytest.mark.parametrize(
    "code",
    [
        ErrorCode.BUSY,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.RATE_LIMITED,
        ErrorCode.TOO_MANY_CONVERSATIONS,
    ],
)
def test_refusals_asking_to_retry_are_not_outcomes(tmp_path: Path, code: ErrorCode) -> None:
    journal = RequestJournal(StateStore(tmp_path))
    inbox = journal.accept(TOPIC, b"{}", None, None)
    stream = ReplyStream(
        Sent(), "t", "r1", None, journal=journal.entry("dev1", "r1", "t", None, inbox)
    )
    stream.error(code, "later")
    assert journal.admit("dev1", "r1", lambda: None) is None  # served when sent again
    assert journal.recover() == ([], [])  # and no longer in the inbox


@pytest.mark.parametrize("code", [ErrorCode.CONTEXT_OVERFLOW, ErrorCode.INTERNAL])
def test_errors_after_acceptance_are_outcomes(tmp_path: Path, code: ErrorCode) -> None:
    journal = RequestJournal(StateStore(tmp_path))
    sent = Sent()
    stream = ReplyStream(
        sent, "t", "r1", None, journal=journal.entry("dev1", "r1", "t", None, None)
    )
    stream.start("n", "m")
    stream.error(code, "no")
    recorded = journal.admit("dev1", "r1", lambda: None)
    assert isinstance(recorded, Outcome) and list(recorded.messages) == sent.messages


class RecordingJournal:
    def __init__(self, sent: Sent) -> None:
        self._sent = sent
        self.calls: list[tuple[Any, ...]] = []

    def opening(self) -> None:
        self.calls.append(("opening", len(self._sent.messages)))

    def closing(self, messages: list[bytes], code: ErrorCode | None) -> None:
        self.calls.append(("closing", len(self._sent.messages), list(messages), code))


def test_stream_tells_its_journal_before_the_first_and_before_the_final_message() -> None:
    sent = Sent()
    journal = RecordingJournal(sent)
    stream = ReplyStream(sent, "t", "r1", None, journal=journal)
    stream.start("n", "m")
    stream.chunk("a")
    stream.chunk("b")
    stream.done(FinishReason.STOP, 1, 2, None, None)
    stream.error(ErrorCode.INTERNAL, "after the end: nothing")
    assert len(sent.messages) == 4
    assert journal.calls == [("opening", 0), ("closing", 3, sent.messages, None)]


def test_a_lone_error_is_only_a_closing() -> None:
    sent = Sent()
    journal = RecordingJournal(sent)
    ReplyStream(sent, "t", "r1", None, journal=journal).error(ErrorCode.BUSY, "later")
    assert journal.calls == [("closing", 0, sent.messages, ErrorCode.BUSY)]


@pytest.mark.parametrize("bounds", [{"outcomes_max": 0}, {"outcomes_ttl": 0}])
def test_no_outcomes_are_kept_when_the_bounds_are_zero(
    tmp_path: Path, bounds: dict[str, float]
) -> None:
    store = StateStore(tmp_path, **bounds)  # type: ignore[arg-type]
    entry = store.accept(TOPIC, b"{}", None, None)
    assert entry is not None
    store.finish(entry, outcome())
    assert store.outcome("dev1", "r1") is None
    assert store.recover() == ([], [])


def test_checkpoints_run_on_their_own_thread_and_keep_the_wal_small(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    main, wal = tmp_path / FILE_NAME, tmp_path / f"{FILE_NAME}-wal"
    before = main.stat().st_size
    for i in range(300):
        store.finish(None, outcome(f"r{i}", n=400))
    assert wal.stat().st_size > 4 << 20  # commits only append to the WAL...
    assert main.stat().st_size == before
    store.start_checkpoints(interval=0.05)
    deadline = time.monotonic() + 10
    while main.stat().st_size == before:  # ...the checkpoint thread copies it back
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)
    store.finish(None, outcome("after"))  # and the next writer starts the WAL afresh
    assert wal.stat().st_size <= 4 << 20
    store.close()
    assert StateStore(tmp_path).outcome("dev1", "r299") == outcome("r299", n=400)


def test_a_write_that_fails_for_another_reason_is_lost_alone(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store._db.execute("PRAGMA busy_timeout = 100")
    other = sqlite3.connect(tmp_path / FILE_NAME, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # someone holds the file's write lock
    with capture_logs() as logs:
        store.save_conversation(("dev1", "c"), None, [("q", "a")])
    assert events(logs) == ["state_write_failed"]
    assert "SQLITE_BUSY" in logs[0]["error"]
    other.execute("ROLLBACK")
    other.close()
    assert store.durable and aside(tmp_path) == []  # the file is fine: keep using it
    _usable(store)
