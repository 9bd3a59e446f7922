"""Where the books live: SQLite by default (WAL, synchronous=FULL), PostgreSQL by URL.

One writer at a time: SQLite's `BEGIN IMMEDIATE` (with a busy timeout) and PostgreSQL's
transaction-scoped advisory lock serialise every movement, across threads and processes, so
that a balance check and the postings it allows are one atomic step. Statements are written
once with `?` placeholders and rewritten for PostgreSQL. Opening a database creates the tables
it lacks and adds the columns added since it was made (`ADDED_COLUMNS`), so older ledgers keep
working.

URLs: `sqlite:///relative/path.db`, `sqlite:////absolute/path.db`, a plain file path,
`sqlite://:memory:` (one process, tests), `postgresql://user@host/db` (needs psycopg).
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from neuro_dask.errors import ConfigError
from neuro_dask.ledger.errors import LedgerConnectionError
from neuro_dask.security.redact import redact_secrets, redact_url

_ADVISORY_KEY = 0x4E4555524F  # "NEURO"

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, owner TEXT NOT NULL DEFAULT '', balance BIGINT NOT NULL DEFAULT 0,
    CHECK (balance >= 0 OR kind = 'issuance'));
CREATE TABLE IF NOT EXISTS entries (
    id {serial}, idem TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, cause TEXT NOT NULL DEFAULT '',
    at DOUBLE PRECISION NOT NULL, fingerprint TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS postings (
    entry_id BIGINT NOT NULL REFERENCES entries(id), debit TEXT NOT NULL REFERENCES accounts(name),
    credit TEXT NOT NULL REFERENCES accounts(name), amount BIGINT NOT NULL CHECK (amount > 0),
    CHECK (debit <> credit));
CREATE INDEX IF NOT EXISTS postings_debit ON postings(debit);
CREATE INDEX IF NOT EXISTS postings_credit ON postings(credit);
CREATE TABLE IF NOT EXISTS vesting (
    bucket TEXT PRIMARY KEY, total BIGINT NOT NULL, start DOUBLE PRECISION NOT NULL, months INTEGER NOT NULL,
    cliff_months INTEGER NOT NULL, released BIGINT NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS unbonding (
    id {serial}, provider TEXT NOT NULL, amount BIGINT NOT NULL CHECK (amount >= 0),
    release_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS holds (
    request TEXT PRIMARY KEY, client TEXT NOT NULL, amount BIGINT NOT NULL, settled INTEGER NOT NULL DEFAULT 0,
    fee BIGINT NOT NULL DEFAULT 0{hold_columns});
CREATE TABLE IF NOT EXISTS credits (
    worker TEXT NOT NULL, owner TEXT NOT NULL, epoch BIGINT NOT NULL, units BIGINT NOT NULL,
    PRIMARY KEY (worker, epoch));
CREATE TABLE IF NOT EXISTS emissions (epoch BIGINT PRIMARY KEY, amount BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS slashes (
    id {serial}, provider TEXT NOT NULL, amount BIGINT NOT NULL, bps INTEGER NOT NULL, cause TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS params (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS param_changes (
    id {serial}, name TEXT NOT NULL, old BIGINT NOT NULL, new BIGINT NOT NULL, proposal BIGINT NOT NULL,
    at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS proposals (
    id {serial}, proposer TEXT NOT NULL, param TEXT NOT NULL, value BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, ends_at DOUBLE PRECISION NOT NULL, status TEXT NOT NULL,
    yes BIGINT NOT NULL DEFAULT 0, no BIGINT NOT NULL DEFAULT 0, idem TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS adoptions (
    proposal BIGINT PRIMARY KEY, channel TEXT NOT NULL, model TEXT NOT NULL, at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS votes (
    proposal BIGINT NOT NULL, voter TEXT NOT NULL, yes INTEGER NOT NULL, weight BIGINT NOT NULL,
    at DOUBLE PRECISION NOT NULL, PRIMARY KEY (proposal, voter));
CREATE TABLE IF NOT EXISTS grants (
    id {serial}, account TEXT NOT NULL, client TEXT NOT NULL, granted_at DOUBLE PRECISION NOT NULL,
    grant_idem TEXT NOT NULL UNIQUE, revoked_at DOUBLE PRECISION, revoke_idem TEXT UNIQUE);
CREATE UNIQUE INDEX IF NOT EXISTS grants_live ON grants(account, client) WHERE revoked_at IS NULL;
"""
# Columns added to a table after ledgers were made with it: (table, column, definition, what old
# rows mean). A new ledger gets them in CREATE TABLE; an old one gets them when it is opened (the
# tables themselves are CREATE ... IF NOT EXISTS), so an old database keeps working.
ADDED_COLUMNS: tuple[tuple[str, str, str, str | None], ...] = (
    # Holds made before expiry existed expire at once: the scheduler that made them is gone, and
    # whatever it counted for them was in its memory.
    ("holds", "held_at", "DOUBLE PRECISION NOT NULL DEFAULT 0", None),
    ("holds", "expires_at", "DOUBLE PRECISION NOT NULL DEFAULT 0", None),
    ("holds", "state", "TEXT NOT NULL DEFAULT 'open'", "UPDATE holds SET state = 'settled' WHERE settled = 1"),
    ("holds", "tier", "TEXT NOT NULL DEFAULT 'standard'", None),
    ("holds", "charged_by", "TEXT NOT NULL DEFAULT ''", None),
    ("holds", "quoted", "BIGINT NOT NULL DEFAULT 0", None),
    ("holds", "expert_tokens", "BIGINT NOT NULL DEFAULT 0", None),
    ("holds", "private_tokens", "BIGINT NOT NULL DEFAULT 0", None),
)
# Indexes on added columns: made once the columns are there, old ledger or new.
ADDED_INDEXES = ("CREATE INDEX IF NOT EXISTS holds_expiry ON holds(state, expires_at)",)


class Database:
    def __init__(self, url: str | Path):
        url = str(url)
        self.url = url
        if url.startswith(("postgresql://", "postgres://")):
            self.dialect = "postgres"
            self._target = url
        else:
            self.dialect = "sqlite"
            path = url.removeprefix("sqlite://")
            if url.startswith("sqlite://"):
                path = path[1:] if path.startswith("/") else path  # sqlite:///rel, sqlite:////abs
            self._target = path or ":memory:"
            if self._target != ":memory:":
                Path(self._target).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._shared: Any = None  # the one connection of an in-memory database
        self._shared_lock = threading.RLock()
        columns = "".join(f", {column} {definition}" for _, column, definition, _ in ADDED_COLUMNS)
        with self.write() as cur:
            for statement in SCHEMA.format(serial=self._serial, hold_columns=columns).split(";"):
                if statement.strip():
                    cur.execute(statement)
            self._add_columns(cur)
            for statement in ADDED_INDEXES:
                cur.execute(statement)

    def __repr__(self) -> str:  # the URL may hold a password: never in a log line or a traceback
        return f"Database({redact_url(self.url)!r})"

    def _columns(self, cur: Cursor, table: str) -> set[str]:
        if self.dialect == "postgres":
            return {
                r[0]
                for r in cur.execute(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = ?",
                    (table,),
                ).all()
            }
        return {r[1] for r in cur.execute(f"PRAGMA table_info({table})").all()}

    def _add_columns(self, cur: Cursor) -> None:
        """ADDED_COLUMNS that an old ledger lacks, inside the schema's own transaction (so that two
        processes opening one old ledger at once add each column once)."""
        have: dict[str, set[str]] = {}
        for table, column, definition, backfill in ADDED_COLUMNS:
            if table not in have:
                have[table] = self._columns(cur, table)
            if column not in have[table]:
                cur.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                have[table].add(column)
                if backfill:
                    cur.execute(backfill)

    @property
    def _serial(self) -> str:
        # AUTOINCREMENT: SQLite would otherwise reuse a deleted row's id, and ids name entries
        return "BIGSERIAL PRIMARY KEY" if self.dialect == "postgres" else "INTEGER PRIMARY KEY AUTOINCREMENT"

    def _connect(self):
        if self.dialect == "postgres":
            try:
                import psycopg
            except ImportError:
                raise ConfigError("a postgresql:// ledger URL needs psycopg: pip install 'psycopg[binary]'") from None
            try:
                return psycopg.connect(self._target, autocommit=True)
            except psycopg.Error as exc:  # its message may quote the URL, password included
                detail = " ".join(redact_secrets(exc, self._target).split())
                raise LedgerConnectionError(redact_url(self.url), detail) from None
        conn = sqlite3.connect(self._target, timeout=60.0, isolation_level=None, check_same_thread=False)
        if self._target != ":memory:":
            # Switching a new file to WAL takes an exclusive lock and SQLite answers "database is
            # locked" at once, without its busy timeout, while another connection (a second
            # process opening the same new ledger) holds any lock: retry for the same 60 s.
            deadline = time.monotonic() + 60.0
            while True:
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        conn.close()
                        raise
                    time.sleep(0.01)  # poll: nothing to wait on but the other connection's lock
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        if self.dialect == "sqlite" and self._target == ":memory:":
            with self._shared_lock:
                if self._shared is None:
                    self._shared = self._connect()
                yield self._shared
            return
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        yield conn

    @contextlib.contextmanager
    def write(self) -> Iterator[Cursor]:
        """One serialised transaction: committed on exit, rolled back (nothing written) on error."""
        with self._connection() as conn:
            cur = Cursor(conn.cursor(), self.dialect)
            if self.dialect == "sqlite":
                cur.execute("BEGIN IMMEDIATE")
            else:
                cur.execute("BEGIN")
                cur.execute("SELECT pg_advisory_xact_lock(?)", (_ADVISORY_KEY,))
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    @contextlib.contextmanager
    def read(self) -> Iterator[Cursor]:
        """A consistent snapshot for reports and checks."""
        with self._connection() as conn:
            cur = Cursor(conn.cursor(), self.dialect)
            cur.execute("BEGIN" if self.dialect == "sqlite" else "BEGIN ISOLATION LEVEL REPEATABLE READ")
            try:
                yield cur
            finally:
                cur.execute("COMMIT")

    def integrity_check(self) -> str:
        if self.dialect != "sqlite":
            return "ok"
        with self._connection() as conn:
            return conn.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        if self._shared is not None:
            self._shared.close()
            self._shared = None


class Cursor:
    """A DB-API cursor that speaks `?` placeholders on both dialects."""

    _PLACEHOLDER = re.compile(r"\?")

    def __init__(self, cursor: Any, dialect: str):
        self._cursor = cursor
        self._dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        if self._dialect == "postgres":
            sql = self._PLACEHOLDER.sub("%s", sql)
        self._cursor.execute(sql, tuple(params))
        return self

    def one(self) -> tuple | None:
        return self._cursor.fetchone()

    def all(self) -> list[tuple]:
        return self._cursor.fetchall()

    def scalar(self, default: Any = None) -> Any:
        row = self._cursor.fetchone()
        return default if row is None or row[0] is None else row[0]

    @property
    def lastrowid(self) -> int:
        return self._cursor.lastrowid
