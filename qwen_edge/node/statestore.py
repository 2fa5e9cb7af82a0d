"""What survives a restart, in one SQLite file in the state directory: conversation history, the
inbox of accepted requests not yet finished, and the outcomes of finished requests.

WAL with synchronous=NORMAL: a committed transaction survives the process being killed (SIGKILL,
a crash, systemd's watchdog); only a power loss may undo the last few. A store that cannot be
read or written is moved aside (`history.db.corrupt-<time>`) for a fresh one; when even that
fails the store runs in memory. Neither stops the node: it keeps serving, only forgets more.

Every method is safe from any thread (one connection behind a lock); no method raises on a
database fault. A commit only appends to the WAL (~0.1 ms); copying the WAL back into the file,
with its fsyncs (~40 ms, more on an SD card), is left to a thread of its own (start_checkpoints),
so the inference thread, which commits each finished turn, never waits for that.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from ..settings import DEFAULT_STATE_DIR
from .conversations import ToolTurn, Turn

log = structlog.get_logger("qwen_edge.node.statestore")

FILE_NAME = "history.db"
SCHEMA_VERSION = 1
_WAL_LIMIT = 4 << 20  # bytes the WAL file is cut back to after a checkpoint
# What a failed write says about the file (primary result codes, sqlite3.SQLITE_*).
_DAMAGED = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_UNWRITABLE = frozenset(
    {
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PERM,
    }
)
_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE conversations (
    client_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    system TEXT,
    turns TEXT NOT NULL,            -- JSON [[user, assistant], ...]
    updated REAL NOT NULL,          -- Unix time of the last turn
    PRIMARY KEY (client_id, conversation_id)
) WITHOUT ROWID;
CREATE INDEX conversations_updated ON conversations (updated);
CREATE TABLE inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,            -- the request as delivered
    payload BLOB NOT NULL,
    response_topic TEXT,
    correlation BLOB,
    started INTEGER NOT NULL DEFAULT 0,  -- its first reply message may have gone out
    received REAL NOT NULL
);
CREATE TABLE outcomes (
    client_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    correlation BLOB,
    messages BLOB NOT NULL,         -- zlib of the reply's payloads joined by newlines
    finished REAL NOT NULL,         -- Unix time
    PRIMARY KEY (client_id, request_id)
);
CREATE INDEX outcomes_finished ON outcomes (finished);
"""
# Added after schema version 1 was released; created on open where it is missing. Lets the
# fair-share pruning below rank each client's rows without reading their messages.
_INDEXES = "CREATE INDEX IF NOT EXISTS outcomes_client ON outcomes (client_id, finished);"

# The rule of the outcome and conversation tables' bounds, applied at once (on start; a write
# applies it one row at a time, see _bound_outcomes): keep at most :per_client rows of each
# client (its newest) and :total in all, taken newest of each client first: every client's
# newest, then every client's second newest, ... So a client's rows are only dropped for a client
# holding fewer, and with K clients one holding at most total / K rows keeps them all.
_FAIR_PRUNE = """
WITH ranked AS (
    SELECT client_id, {key} AS key, {time} AS time,
           ROW_NUMBER() OVER (PARTITION BY client_id ORDER BY {time} DESC, {key} DESC) AS rank
    FROM {table}
), kept AS (
    SELECT client_id, key FROM ranked WHERE rank <= :per_client
    ORDER BY rank, time DESC
    LIMIT :total
)
DELETE FROM {table} WHERE (client_id, {key}) NOT IN kept
"""
_PRUNE_OUTCOMES = _FAIR_PRUNE.format(table="outcomes", key="request_id", time="finished")
_PRUNE_CONVERSATIONS = _FAIR_PRUNE.format(
    table="conversations", key="conversation_id", time="updated"
)
_TABLES = {"conversations", "inbox", "outcomes"}


@dataclass(frozen=True, slots=True)
class Outcome:
    """Every message of a finished reply, as sent, to send again for a duplicate."""

    client_id: str
    request_id: str
    topic: str
    correlation: bytes | None
    messages: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """A request accepted (and acknowledged to the broker) but not finished."""

    id: int
    topic: str
    payload: bytes
    response_topic: str | None
    correlation: bytes | None


@dataclass(frozen=True, slots=True)
class SavedConversation:
    client_id: str
    conversation_id: str
    system: str | None
    turns: list[Turn]
    idle: float  # seconds since its last turn


class StateStore:
    def __init__(
        self,
        state_dir: Path | None,
        *,
        outcomes_max: int = 1000,
        outcomes_per_client: int | None = None,
        outcomes_ttl: float = 3600.0,
    ) -> None:
        """`state_dir` None: in memory from the start (tests, or no state directory)."""
        self._lock = threading.Lock()
        self.path = None if state_dir is None else state_dir / FILE_NAME
        self._outcomes_max = outcomes_max
        self._outcomes_per_client = (
            outcomes_max if outcomes_per_client is None else outcomes_per_client
        )
        self._outcomes_ttl = outcomes_ttl
        self._db = self._open()
        self._checkpoints: threading.Thread | None = None
        self._closing = threading.Event()

    @property
    def durable(self) -> bool:
        """False once the store runs in memory: nothing written now survives a restart."""
        return self.path is not None

    # -- opening and faults --------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        if self.path is None:
            return _connect(":memory:")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return _connect(str(self.path))
        except (sqlite3.Error, OSError, _Unusable) as exc:
            return self._replace(_describe(exc))

    def _replace(self, problem: str) -> sqlite3.Connection:
        """Move the file aside and start a fresh one; in memory if that fails too. One log
        line either way."""
        assert self.path is not None
        try:
            aside = _move_aside(self.path)
            db = _connect(str(self.path))
        except (sqlite3.Error, OSError, _Unusable) as exc:
            log.error(
                "state_store_in_memory",
                path=str(self.path),
                error=problem,
                fresh_file_error=_describe(exc),
                consequence="history and request outcomes are lost when the node stops",
            )
            self.path = None
            return _connect(":memory:")
        log.warning(
            "state_store_moved_aside", path=str(self.path), error=problem, moved_to=str(aside)
        )
        return db

    def _write(self, action: Callable[[sqlite3.Connection], _T], default: _T) -> _T:
        """Run one write. If the file turned out damaged or unwritable, replace the store and
        try once more; any other failure only loses this write."""
        with self._lock:
            try:
                return action(self._db)
            except sqlite3.Error as exc:
                if not self._recover_from(exc):
                    log.error("state_write_failed", error=_describe(exc))
                    return default
            try:
                return action(self._db)
            except sqlite3.Error as exc:
                log.error("state_write_failed", error=_describe(exc))
                return default

    def _read(self, action: Callable[[sqlite3.Connection], _T], default: _T) -> _T:
        with self._lock:
            try:
                return action(self._db)
            except sqlite3.Error as exc:
                log.error("state_read_failed", error=_describe(exc))
                return default

    def _recover_from(self, exc: sqlite3.Error) -> bool:
        """A file that turned corrupt is moved aside for a fresh one; one that cannot be
        written (disk full, read-only, I/O error) is left as it is, for the next start, and the
        store goes on in memory. False (nothing done) for other failures, and in memory.
        Called with the lock held."""
        code = getattr(exc, "sqlite_errorcode", None)
        primary = None if code is None else code & 0xFF
        if self.path is None or primary not in _DAMAGED | _UNWRITABLE:
            return False
        with suppress(sqlite3.Error):
            self._db.close()
        if primary in _DAMAGED:
            self._db = self._replace(_describe(exc))
            return True
        log.error(
            "state_store_in_memory",
            path=str(self.path),
            error=_describe(exc),
            consequence="what happens from now on is lost when the node stops",
        )
        self.path = None
        self._db = _connect(":memory:")
        return True

    def start_checkpoints(self, interval: float = 5.0) -> None:
        """Copy the WAL into the database file every `interval` seconds, on a thread of its own
        (joined by close())."""
        # A daemon thread, so that an unexpected exit is never held up by it: it holds no
        # state, and a checkpoint cut short is safe (SQLite redoes it).
        self._checkpoints = threading.Thread(
            target=self._checkpoint_loop, args=(interval,), name="state-checkpoint", daemon=True
        )
        self._checkpoints.start()

    def _checkpoint_loop(self, interval: float) -> None:
        failing = False
        while not self._closing.wait(interval):
            path = self.path
            if path is None:
                continue
            try:
                _checkpoint(path)
                failing = False
            except sqlite3.Error as exc:
                if not failing:  # once per spell of failures, not every interval
                    log.warning("state_checkpoint_failed", error=_describe(exc))
                failing = True

    def close(self) -> None:
        self._closing.set()
        if self._checkpoints is not None:
            self._checkpoints.join()
        with self._lock, suppress(sqlite3.Error):
            self._db.close()

    # -- inbox ---------------------------------------------------------------------------------

    def accept(
        self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None
    ) -> int | None:
        """Keep a request until it finishes; its id, or None if it could not be kept."""

        def insert(db: sqlite3.Connection) -> int | None:
            cur = db.execute(
                "INSERT INTO inbox (topic, payload, response_topic, correlation, received)"
                " VALUES (?, ?, ?, ?, ?)",
                (topic, payload, response_topic, correlation, time.time()),
            )
            return cur.lastrowid

        return self._write(insert, None)

    def started(self, entry_id: int) -> None:
        """The request's first reply message is about to go out: never run it again."""
        self._write(
            lambda db: db.execute("UPDATE inbox SET started = 1 WHERE id = ?", (entry_id,)), None
        )

    def discard(self, entry_id: int) -> None:
        """The request was answered without a reply worth keeping (refused, invalid)."""
        self._write(lambda db: db.execute("DELETE FROM inbox WHERE id = ?", (entry_id,)), None)

    def recover(self) -> tuple[list[InboxEntry], list[InboxEntry]]:
        """After a restart: (requests to serve again, requests interrupted mid-reply). The
        interrupted ones are removed: their reply is not resumed (docs/protocol.md)."""

        def take(db: sqlite3.Connection) -> tuple[list[InboxEntry], list[InboxEntry]]:
            rows = db.execute(
                "SELECT id, topic, payload, response_topic, correlation, started"
                " FROM inbox ORDER BY id"
            ).fetchall()
            db.execute("DELETE FROM inbox WHERE started = 1")
            queued: list[InboxEntry] = []
            interrupted: list[InboxEntry] = []
            for row in rows:
                entry = InboxEntry(row[0], row[1], bytes(row[2]), row[3], _blob(row[4]))
                (interrupted if row[5] else queued).append(entry)
            return queued, interrupted

        nothing: tuple[list[InboxEntry], list[InboxEntry]] = ([], [])
        return self._write(take, nothing)

    # -- outcomes ------------------------------------------------------------------------------

    def finish(self, entry_id: int | None, outcome: Outcome | None) -> None:
        """One transaction: the request leaves the inbox and its outcome (if any) is kept."""

        if self._outcomes_max <= 0 or self._outcomes_ttl <= 0:
            outcome = None  # duplicates of finished requests are generated again

        def commit(db: sqlite3.Connection) -> None:
            now = time.time()
            with _transaction(db):
                if entry_id is not None:
                    db.execute("DELETE FROM inbox WHERE id = ?", (entry_id,))
                if outcome is not None:
                    db.execute(
                        "INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            outcome.client_id,
                            outcome.request_id,
                            outcome.topic,
                            outcome.correlation,
                            zlib.compress(b"\n".join(outcome.messages), 1),
                            now,
                        ),
                    )
                    db.execute(
                        "DELETE FROM outcomes WHERE finished < ?", (now - self._outcomes_ttl,)
                    )
                    per_client, total = self._outcomes_per_client, self._outcomes_max
                    _bound_outcomes(db, per_client, total, outcome.client_id, outcome.request_id)

        self._write(commit, None)

    def outcome(self, client_id: str, request_id: str) -> Outcome | None:
        def find(db: sqlite3.Connection) -> Outcome | None:
            row = db.execute(
                "SELECT topic, correlation, messages FROM outcomes"
                " WHERE client_id = ? AND request_id = ? AND finished >= ?",
                (client_id, request_id, time.time() - self._outcomes_ttl),
            ).fetchone()
            if row is None:
                return None
            messages = tuple(zlib.decompress(row[2]).split(b"\n"))
            return Outcome(client_id, request_id, row[0], _blob(row[1]), messages)

        try:
            return self._read(find, None)
        except zlib.error as exc:
            log.error("state_read_failed", error=str(exc))
            return None

    # -- conversations -------------------------------------------------------------------------

    def save_conversation(
        self, key: tuple[str, str], system: str | None, turns: list[Turn]
    ) -> None:
        # A plain turn as [user, assistant] (as before tools), a tool turn as {"messages": [...]}.
        text = json.dumps(
            [{"messages": t.messages} if isinstance(t, ToolTurn) else t for t in turns],
            ensure_ascii=False,
        )
        self._write(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO conversations VALUES (?, ?, ?, ?, ?)",
                (key[0], key[1], system, text, time.time()),
            ),
            None,
        )

    def delete_conversation(self, key: tuple[str, str]) -> None:
        self._write(
            lambda db: db.execute(
                "DELETE FROM conversations WHERE client_id = ? AND conversation_id = ?", key
            ),
            None,
        )

    def load_conversations(
        self, max_count: int, idle_ttl: float, max_per_client: int | None = None
    ) -> list[SavedConversation]:
        """The conversations still within the bounds (kept fairly, as ConversationStore does),
        least recently used first; the others are deleted. Also prunes the outcomes."""

        def load(db: sqlite3.Connection) -> list[SavedConversation]:
            now = time.time()
            with _transaction(db):
                db.execute("DELETE FROM conversations WHERE updated < ?", (now - idle_ttl,))
                db.execute(
                    _PRUNE_CONVERSATIONS,
                    {
                        "per_client": max_count if max_per_client is None else max_per_client,
                        "total": max_count,
                    },
                )
                db.execute("DELETE FROM outcomes WHERE finished < ?", (now - self._outcomes_ttl,))
                _bound_outcomes(db, self._outcomes_per_client, self._outcomes_max)
            saved = []
            for client_id, conversation_id, system, turns, updated in db.execute(
                "SELECT client_id, conversation_id, system, turns, updated FROM conversations"
                " ORDER BY updated"
            ):
                try:
                    pairs = [_turn(t) for t in json.loads(turns)]
                except (ValueError, TypeError, KeyError):
                    log.warning("conversation_unreadable", conversation_id=conversation_id)
                    continue
                saved.append(
                    SavedConversation(
                        client_id, conversation_id, system, pairs, max(0.0, now - updated)
                    )
                )
            return saved

        return self._write(load, [])


def _turn(saved: Any) -> Turn:
    if isinstance(saved, dict):
        messages = saved["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("a tool turn's messages are not a list of objects")
        return ToolTurn(tuple(messages))
    user, assistant = saved
    return (str(user), str(assistant))


def _connect(target: str) -> sqlite3.Connection:
    db = sqlite3.connect(target, isolation_level=None, check_same_thread=False, timeout=5.0)
    try:
        if target != ":memory:":
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise _Unusable(f"journal mode {mode}, not wal")
            db.execute("PRAGMA wal_autocheckpoint=0")  # see start_checkpoints
            db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")
        db.execute("PRAGMA synchronous=NORMAL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        tables.discard("sqlite_sequence")
        if version == 0 and not tables:
            db.executescript(f"BEGIN;{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
        elif version != SCHEMA_VERSION or not tables >= _TABLES:
            raise _Unusable(f"schema version {version}, tables {sorted(tables)}")
        db.executescript(_INDEXES)
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise _Unusable(f"integrity check: {check}")
        # Reading every table once finds a file that is garbage past its first page.
        for table in _TABLES:
            db.execute(f"SELECT count(*) FROM {table}").fetchone()
    except BaseException:
        db.close()
        raise
    return db


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    n = 0
    while aside.exists():
        n += 1
        aside = aside.with_name(f"{aside.name.split('~')[0]}~{n}")
    if path.exists() or path.is_symlink():
        path.rename(aside)
    # A stale WAL must not be replayed into the fresh file: keep it with the old one.
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(aside.with_name(aside.name + suffix))
    return aside


def _checkpoint(path: Path) -> None:
    """Copy the WAL into the database file, on a connection of its own, so writers go on
    meanwhile (PASSIVE waits for nobody)."""
    db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None, timeout=1.0)
    try:
        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        db.close()


def _bound_outcomes(
    db: sqlite3.Connection,
    per_client: int,
    total: int,
    client_id: str | None = None,
    request_id: str | None = None,
) -> None:
    """Prune to the outcome bounds, by _FAIR_PRUNE's rule, after `client_id` wrote
    `request_id` (None: prune everything over, as on start).

    One new row leaves at most one row too many, so after a write one row goes, found
    through the index in well under a millisecond: ranking the whole table takes several.
    """
    if client_id is None:
        db.execute(
            _PRUNE_OUTCOMES,
            {"per_client": per_client, "total": total},
        )
        return
    oldest = "SELECT rowid FROM outcomes WHERE client_id = ? ORDER BY finished, request_id"
    mine = db.execute("SELECT count(*) FROM outcomes WHERE client_id = ?", (client_id,)).fetchone()[
        0
    ]
    if mine > per_client:
        db.execute(f"DELETE FROM outcomes WHERE rowid = ({oldest} LIMIT 1)", (client_id,))
        return
    if db.execute("SELECT count(*) FROM outcomes").fetchone()[0] <= total:
        return
    # The client holding the most; on a tie the writer, then the one with the oldest row.
    victim, held = db.execute(
        "SELECT client_id, count(*) AS held FROM outcomes GROUP BY client_id"
        " ORDER BY held DESC, client_id = ? DESC, min(finished) LIMIT 1",
        (client_id,),
    ).fetchone()
    if victim == client_id and held == 1:  # everyone holds one: the oldest of all goes
        db.execute(
            "DELETE FROM outcomes WHERE rowid = (SELECT rowid FROM outcomes"
            " WHERE NOT (client_id = ? AND request_id = ?) ORDER BY finished LIMIT 1)",
            (client_id, request_id),
        )
    else:
        db.execute(f"DELETE FROM outcomes WHERE rowid = ({oldest} LIMIT 1)", (victim,))


class _Unusable(Exception):
    """A database file that opens but is not ours, or not whole."""


def _blob(value: object) -> bytes | None:
    return None if value is None else bytes(value)  # type: ignore[call-overload]


def _describe(exc: BaseException) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    return f"{name}: {exc}" if name else f"{type(exc).__name__}: {exc}"


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def state_directory(configured: Path | None) -> Path:
    """The configured directory, else systemd's $STATE_DIRECTORY, else DEFAULT_STATE_DIR."""
    if configured is not None:
        return configured
    from_systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(from_systemd) if from_systemd else DEFAULT_STATE_DIR
