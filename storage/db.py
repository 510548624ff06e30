"""DuckDB store: one read-write connection per process, a cursor per thread, migrations on open.

DuckDB is single-writer per file. The process that opens a workspace takes an exclusive lock
file beside the database (holding its pid and command line), so a second process gets a clear
`WorkspaceLockedError` naming the owner instead of DuckDB's raw lock trace.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from storage.errors import EmbedloopError, WorkspaceLockedError
from storage.migrations import MIGRATIONS


class _WorkspaceLock:
    """An exclusive `flock` on `<db>.lock`, held for the life of the process's Store."""

    def __init__(self, db_path: Path):
        self.path = db_path.with_suffix(db_path.suffix + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 4096).decode("utf-8", "replace").strip().split("\n", 1)
            os.close(fd)
            pid = int(owner[0]) if owner and owner[0].isdigit() else None
            raise WorkspaceLockedError(self.path.parent, pid, owner[1] if len(owner) > 1 else None) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{' '.join(sys.argv)[:500]}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Store:
    """The workspace database. Use `Store.open(path)` for a file, `Store.memory()` in tests."""

    def __init__(self, conn: duckdb.DuckDBPyConnection, lock: _WorkspaceLock | None = None):
        self._conn = conn
        self._lock = lock
        self._local = threading.local()
        self._migrate()
        # Stable for the life of the workspace: its Chroma collections are named after it, so
        # workspaces sharing one Chroma server never write into each other's collections.
        self.workspace_id: str = self.scalar("SELECT workspace_id FROM workspace_info")

    # Opening and closing -----------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> Store:
        """Open (creating if needed) the database at `path` and apply pending migrations.

        Raises:
            WorkspaceLockedError: another process has this database open.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _WorkspaceLock(path)
        lock.acquire()
        try:
            conn = duckdb.connect(str(path))
        except duckdb.IOException as e:
            lock.release()
            # Someone bypassed the lock file (e.g. a DuckDB CLI): report the pid DuckDB names.
            msg = str(e)
            pid = None
            if "PID " in msg:
                digits = msg.split("PID ", 1)[1].split(")", 1)[0]
                pid = int(digits) if digits.isdigit() else None
            raise WorkspaceLockedError(path.parent, pid, None) from e
        try:
            return cls(conn, lock)
        except Exception:
            conn.close()
            lock.release()
            raise

    @classmethod
    def memory(cls) -> Store:
        return cls(duckdb.connect(":memory:"))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None  # type: ignore[assignment]
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Connections -------------------------------------------------------------------------
    def cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's cursor on the one connection (DuckDB connections are not thread-safe)."""
        if self._conn is None:
            raise EmbedloopError("The store is closed.")
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._conn.cursor()
            self._local.cursor = cur
        return cur

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """All-or-nothing: commits on success, rolls back on any exception. Not re-entrant."""
        cur = self.cursor()
        cur.execute("BEGIN TRANSACTION")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> duckdb.DuckDBPyConnection:
        return self.cursor().execute(sql, params or [])

    def rows(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        cur = self.execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def scalar(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        rows = self.execute(sql, params).fetchall()
        return rows[0][0] if rows else None

    @staticmethod
    def insert_ignore(cur: duckdb.DuckDBPyConnection, table: str, records: list[dict[str, Any]]) -> int:
        """Bulk-insert `records` (all with the same keys), skipping rows whose key exists.

        Returns:
            How many rows were new.
        """
        if not records:
            return 0
        cols = list(records[0])
        data = pa.Table.from_pylist(records)
        name = f"_in_{table}_{threading.get_ident()}"
        before = cur.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
        cur.register(name, data)
        try:
            collist = ", ".join(cols)
            cur.execute(f"INSERT OR IGNORE INTO {table} ({collist}) SELECT {collist} FROM {name}")
        finally:
            cur.unregister(name)
        return cur.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0] - before

    @staticmethod
    def update_from(cur: duckdb.DuckDBPyConnection, table: str, key: str, records: list[dict[str, Any]],
                    assignments: str) -> None:
        """Bulk UPDATE `table` from `records` (exposed as `u`), matching on `key`.

        `assignments` is the SET clause, e.g. "status = u.status, reason = u.reason".
        """
        if not records:
            return
        name = f"_upd_{table}_{threading.get_ident()}"
        cur.register(name, pa.Table.from_pylist(records))
        try:
            cur.execute(f"UPDATE {table} SET {assignments} FROM {name} u WHERE {table}.{key} = u.{key}")
        finally:
            cur.unregister(name)

    # Migrations --------------------------------------------------------------------------
    def _migrate(self) -> None:
        cur = self.cursor()
        cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP DEFAULT current_timestamp)"
        )
        done = {r[0] for r in cur.execute("SELECT version FROM schema_migrations").fetchall()}
        for number, name, sql in MIGRATIONS:
            if number in done:
                continue
            with self.transaction() as tx:
                tx.execute(sql)
                tx.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [number, name])

    @property
    def schema_version(self) -> int:
        return int(self.scalar("SELECT coalesce(max(version), 0) FROM schema_migrations"))

    # Pointers (active model / index) -----------------------------------------------------
    def pointer(self, name: str) -> str | None:
        return self.scalar("SELECT value FROM pointers WHERE name = ?", [name])

    def set_pointer(self, name: str, value: str, cur: duckdb.DuckDBPyConnection | None = None) -> None:
        (cur or self.cursor()).execute(
            "INSERT OR REPLACE INTO pointers (name, value, updated_at) VALUES (?, ?, current_timestamp)",
            [name, value],
        )

    # Passages ----------------------------------------------------------------------------
    def passage_ids(self) -> list[str]:
        return [r[0] for r in self.execute("SELECT passage_id FROM passages ORDER BY passage_id").fetchall()]

    def passages(self, ids: Sequence[str]) -> dict[str, str]:
        """Texts of the given passage ids (missing ids are absent from the result)."""
        if not ids:
            return {}
        rows = self.execute(
            "SELECT passage_id, text FROM passages WHERE passage_id IN (SELECT unnest(?::VARCHAR[]))", [list(ids)]
        ).fetchall()
        return dict(rows)

    def docs_of_passages(self, ids: Sequence[str]) -> dict[str, list[str]]:
        if not ids:
            return {}
        rows = self.execute(
            "SELECT passage_id, list(doc_id ORDER BY doc_id) FROM doc_passages "
            "WHERE passage_id IN (SELECT unnest(?::VARCHAR[])) GROUP BY passage_id",
            [list(ids)],
        ).fetchall()
        return dict(rows)

    def first_passage_of_docs(self, doc_ids: Sequence[str]) -> dict[str, str]:
        if not doc_ids:
            return {}
        rows = self.execute(
            "SELECT doc_id, passage_id FROM doc_passages WHERE ordinal = 0 "
            "AND doc_id IN (SELECT unnest(?::VARCHAR[]))",
            [list(doc_ids)],
        ).fetchall()
        return dict(rows)

    # Decisions (append-only) -------------------------------------------------------------
    def append_decision(
        self, pair_id: str, reviewer: str, action: str, payload: dict[str, Any] | None = None,
        cur: duckdb.DuckDBPyConnection | None = None,
    ) -> int:
        row = (cur or self.cursor()).execute(
            "INSERT INTO decisions (pair_id, reviewer, action, payload) VALUES (?, ?, ?, ?) RETURNING decision_id",
            [pair_id, reviewer, action, json.dumps(payload or {})],
        ).fetchall()
        return int(row[0][0])

    # Rounds ------------------------------------------------------------------------------
    def rounds(self) -> list[dict[str, Any]]:
        """Every round, oldest first, with its manifest parsed."""
        rows = self.rows("SELECT round, state, error, manifest, started_at, updated_at FROM rounds ORDER BY round")
        for r in rows:
            r["manifest"] = json.loads(r["manifest"] or "{}")
        return rows

    # Status ------------------------------------------------------------------------------
    def counts(self) -> dict[str, Any]:
        pairs: dict[str, dict[str, int]] = {}
        for source, status, n in self.execute(
            "SELECT source, status, count(*) FROM pairs GROUP BY ALL ORDER BY ALL"
        ).fetchall():
            pairs.setdefault(source, {})[status] = n
        splits = dict(self.execute("SELECT split, count(*) FROM pairs GROUP BY ALL ORDER BY ALL").fetchall())
        return {
            "documents": self.scalar("SELECT count(*) FROM documents"),
            "passages": self.scalar("SELECT count(*) FROM passages"),
            "queries": self.scalar("SELECT count(*) FROM queries"),
            "pairs": pairs,
            "pairs_by_split": splits,
            "decisions": self.scalar("SELECT count(*) FROM decisions"),
            "schema_version": self.schema_version,
        }
