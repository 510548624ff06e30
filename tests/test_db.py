"""storage.db: migrations, transactions, bulk inserts, per-thread cursors, pointers, counts, lock."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from loop.errors import EmbedloopError, WorkspaceLockedError
from storage.db import Store
from storage.migrations import MIGRATIONS

ROOT = Path(__file__).resolve().parent.parent
LATEST = max(n for n, _, _ in MIGRATIONS)


def _run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (a different process, so a different lock owner)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


# Migrations --------------------------------------------------------------------------------
def test_open_applies_all_migrations(tmp_path):
    path = tmp_path / "sub" / "db.duckdb"  # parent folder is created on open
    with Store.open(path) as s:
        assert s.schema_version == LATEST
        applied = s.rows("SELECT version, name FROM schema_migrations ORDER BY version")
        assert applied == [{"version": n, "name": name} for n, name, _ in MIGRATIONS]
        tables = {r[0] for r in s.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        assert {"documents", "passages", "doc_passages", "pairs", "decisions", "pointers",
                "index_versions", "model_versions"} <= tables
    assert path.exists()


def test_reopen_applies_nothing_new(tmp_path):
    path = tmp_path / "db.duckdb"
    with Store.open(path) as s:
        first = s.rows("SELECT version, applied_at FROM schema_migrations ORDER BY version")
        s.set_pointer("keep", "me")
    with Store.open(path) as s:
        again = s.rows("SELECT version, applied_at FROM schema_migrations ORDER BY version")
        assert again == first  # same rows, same timestamps: nothing re-applied
        assert s.schema_version == LATEST
        assert s.pointer("keep") == "me"  # data survived, tables were not re-created


def test_new_migration_is_applied_once_on_reopen(tmp_path, monkeypatch):
    path = tmp_path / "db.duckdb"
    Store.open(path).close()
    extra = (LATEST + 1, "add_notes", "CREATE TABLE notes (id INTEGER PRIMARY KEY, body VARCHAR);")
    monkeypatch.setattr("storage.db.MIGRATIONS", [*MIGRATIONS, extra])
    with Store.open(path) as s:
        assert s.schema_version == LATEST + 1
        s.execute("INSERT INTO notes VALUES (1, 'x')")
    with Store.open(path) as s:  # a second open must not run CREATE TABLE notes again
        assert s.scalar("SELECT count(*) FROM schema_migrations WHERE version = ?", [LATEST + 1]) == 1
        assert s.scalar("SELECT body FROM notes WHERE id = 1") == "x"


def test_memory_store_is_migrated_and_private():
    a, b = Store.memory(), Store.memory()
    try:
        assert a.schema_version == LATEST
        a.set_pointer("p", "1")
        assert a.pointer("p") == "1"
        assert b.pointer("p") is None  # each memory store is its own database
    finally:
        a.close()
        b.close()


def test_closed_store_raises_embedloop_error():
    s = Store.memory()
    s.close()
    s.close()  # idempotent
    with pytest.raises(EmbedloopError, match="closed"):
        s.cursor()


# Transactions ------------------------------------------------------------------------------
def test_transaction_rolls_back_on_exception(store):
    with pytest.raises(RuntimeError, match="boom"):
        with store.transaction() as cur:
            cur.execute("INSERT INTO queries (query_id, text) VALUES ('q1', 'hello')")
            store.set_pointer("active_index", "x", cur)
            store.append_decision("p1", "alice", "accept", cur=cur)
            # Visible inside the transaction ...
            assert cur.execute("SELECT count(*) FROM queries").fetchall()[0][0] == 1
            raise RuntimeError("boom")
    # ... and gone after it.
    assert store.scalar("SELECT count(*) FROM queries") == 0
    assert store.pointer("active_index") is None
    assert store.scalar("SELECT count(*) FROM decisions") == 0
    # The cursor is usable again (no transaction left open).
    store.execute("INSERT INTO queries (query_id, text) VALUES ('q2', 'after')")
    assert store.scalar("SELECT count(*) FROM queries") == 1


def test_transaction_commits_on_success(tmp_path):
    path = tmp_path / "db.duckdb"
    with Store.open(path) as s:
        with s.transaction() as cur:
            cur.execute("INSERT INTO queries (query_id, text) VALUES ('q1', 'a'), ('q2', 'b')")
            s.set_pointer("active_model", "m1", cur)
        assert s.scalar("SELECT count(*) FROM queries") == 2
    with Store.open(path) as s:  # durable
        assert s.scalar("SELECT count(*) FROM queries") == 2
        assert s.pointer("active_model") == "m1"


def test_transaction_rolls_back_on_sql_error(store):
    store.execute("INSERT INTO queries (query_id, text) VALUES ('q1', 'a')")
    with pytest.raises(Exception):
        with store.transaction() as cur:
            cur.execute("INSERT INTO queries (query_id, text) VALUES ('q2', 'b')")
            cur.execute("INSERT INTO queries (query_id, text) VALUES ('q1', 'duplicate key')")
    assert [r["query_id"] for r in store.rows("SELECT query_id FROM queries ORDER BY 1")] == ["q1"]


# insert_ignore -----------------------------------------------------------------------------
def _q(i: int, text: str = "") -> dict[str, str]:
    return {"query_id": f"q{i}", "text": text or f"text {i}", "source": "t"}


def test_insert_ignore_counts_new_rows_and_skips_existing(store):
    cur = store.cursor()
    assert Store.insert_ignore(cur, "queries", []) == 0
    assert Store.insert_ignore(cur, "queries", [_q(1), _q(2), _q(3)]) == 3
    # q2 and q3 exist: only q4 is new, and the existing rows keep their text.
    assert Store.insert_ignore(cur, "queries", [_q(2, "changed"), _q(3, "changed"), _q(4)]) == 1
    assert Store.insert_ignore(cur, "queries", [_q(1), _q(4)]) == 0
    rows = store.rows("SELECT query_id, text FROM queries ORDER BY query_id")
    assert rows == [
        {"query_id": "q1", "text": "text 1"},
        {"query_id": "q2", "text": "text 2"},
        {"query_id": "q3", "text": "text 3"},
        {"query_id": "q4", "text": "text 4"},
    ]


def test_insert_ignore_composite_key_and_inside_transaction(store):
    rows = [{"doc_id": "d", "ordinal": i, "passage_id": f"p{i}"} for i in range(5)]
    with store.transaction() as cur:
        assert Store.insert_ignore(cur, "doc_passages", rows) == 5
        assert Store.insert_ignore(cur, "doc_passages", rows[:2] + [{"doc_id": "e", "ordinal": 0, "passage_id": "p0"}]) == 1
    assert store.scalar("SELECT count(*) FROM doc_passages") == 6
    with pytest.raises(RuntimeError):
        with store.transaction() as cur:
            assert Store.insert_ignore(cur, "doc_passages", [{"doc_id": "f", "ordinal": 0, "passage_id": "x"}]) == 1
            raise RuntimeError
    assert store.scalar("SELECT count(*) FROM doc_passages") == 6


# Threads -----------------------------------------------------------------------------------
def test_cursor_is_per_thread(store):
    mine = store.cursor()
    assert store.cursor() is mine
    other: list[object] = []
    t = threading.Thread(target=lambda: other.append(store.cursor()))
    t.start()
    t.join()
    assert other and other[0] is not mine


def test_concurrent_append_decision_from_threads(tmp_path):
    n_threads, per_thread = 8, 25
    with Store.open(tmp_path / "db.duckdb") as s:
        ids: list[list[int]] = [[] for _ in range(n_threads)]
        errors: list[BaseException] = []
        start = threading.Barrier(n_threads)

        def work(t: int) -> None:
            try:
                start.wait()
                for i in range(per_thread):
                    ids[t].append(s.append_decision(f"pair-{t}-{i}", f"r{t}", "accept", {"i": i}))
            except BaseException as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        flat = [i for chunk in ids for i in chunk]
        assert len(flat) == n_threads * per_thread
        assert len(set(flat)) == len(flat)  # distinct ids
        assert s.scalar("SELECT count(*) FROM decisions") == n_threads * per_thread
        assert s.scalar("SELECT count(DISTINCT decision_id) FROM decisions") == n_threads * per_thread
        assert set(flat) == {r[0] for r in s.execute("SELECT decision_id FROM decisions").fetchall()}
        per_reviewer = dict(s.execute("SELECT reviewer, count(*) FROM decisions GROUP BY 1").fetchall())
        assert per_reviewer == {f"r{t}": per_thread for t in range(n_threads)}
        payload = s.scalar("SELECT payload->>'i' FROM decisions WHERE pair_id = 'pair-3-7'")
        assert payload == "7"


# Pointers and counts -----------------------------------------------------------------------
def test_pointers(store):
    assert store.pointer("active_index") is None
    store.set_pointer("active_index", "passages.a")
    store.set_pointer("active_model", "m-a")
    store.set_pointer("active_index", "passages.b")  # replaces, does not duplicate
    assert store.pointer("active_index") == "passages.b"
    assert store.pointer("active_model") == "m-a"
    assert store.scalar("SELECT count(*) FROM pointers WHERE name = 'active_index'") == 1


def test_counts(store):
    empty = store.counts()
    assert empty == {
        "documents": 0, "passages": 0, "queries": 0, "pairs": {}, "pairs_by_split": {},
        "decisions": 0, "schema_version": LATEST,
    }
    store.execute(
        "INSERT INTO documents (doc_id, source, content_hash, n_chars) VALUES ('d1', 's', 'h1', 3), ('d2', 's', 'h2', 4)"
    )
    store.execute("INSERT INTO passages (passage_id, text, n_tokens) VALUES ('p1', 'a', 1), ('p2', 'b', 1), ('p3', 'c', 1)")
    store.execute("INSERT INTO queries (query_id, text) VALUES ('q1', 'x')")
    pairs = [
        ("a", "seed", "accepted", "train"),
        ("b", "seed", "accepted", "eval"),
        ("c", "seed", "pending", "train"),
        ("d", "synthetic", "candidate", "train"),
        ("e", "mined", "rejected", "test"),
    ]
    for pid, source, status, split in pairs:
        store.execute(
            "INSERT INTO pairs (pair_id, anchor, positive_text, source, status, split) VALUES (?, 'q', 't', ?, ?, ?)",
            [pid, source, status, split],
        )
    store.append_decision("a", "alice", "accept")
    store.append_decision("b", "bob", "accept")
    c = store.counts()
    assert c["documents"] == 2 and c["passages"] == 3 and c["queries"] == 1 and c["decisions"] == 2
    assert c["pairs"] == {
        "seed": {"accepted": 2, "pending": 1},
        "synthetic": {"candidate": 1},
        "mined": {"rejected": 1},
    }
    assert c["pairs_by_split"] == {"train": 3, "eval": 1, "test": 1}
    assert c["schema_version"] == LATEST


# The single-writer lock across processes ---------------------------------------------------
_CHILD_OPEN = """
import sys
from storage.db import Store
from loop.errors import WorkspaceLockedError
try:
    s = Store.open(sys.argv[1])
except WorkspaceLockedError as e:
    print("PID", e.pid)
    print("MSG", e)
    sys.exit(3)
s.set_pointer("written_by", "child")
print("VERSION", s.schema_version)
s.close()
"""


def test_second_process_is_refused_with_owner_pid(tmp_path):
    path = tmp_path / "ws" / "embedloop.duckdb"
    s = Store.open(path)
    try:
        s.set_pointer("owner", "parent")
        res = _run_child(_CHILD_OPEN, str(path))
        assert res.returncode == 3, res.stdout + res.stderr
        assert f"PID {os.getpid()}" in res.stdout
        msg = res.stdout.split("MSG ", 1)[1]
        assert f"process {os.getpid()}" in msg
        assert str(path.parent) in msg
        # The owner is undisturbed: it still writes and reads.
        s.set_pointer("after", "child-was-refused")
        s.append_decision("p", "r", "accept")
        assert s.pointer("after") == "child-was-refused"
        assert s.pointer("written_by") is None
        assert s.scalar("SELECT count(*) FROM decisions") == 1
    finally:
        s.close()
    # Once the owner has closed, another process may open (and write).
    res = _run_child(_CHILD_OPEN, str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"VERSION {LATEST}" in res.stdout
    with Store.open(path) as s2:
        assert s2.pointer("written_by") == "child"
        assert s2.pointer("owner") == "parent"
        assert s2.scalar("SELECT count(*) FROM decisions") == 1


def test_same_process_second_open_is_refused_until_close(tmp_path):
    path = tmp_path / "db.duckdb"
    first = Store.open(path)
    try:
        with pytest.raises(WorkspaceLockedError) as info:
            Store.open(path)
        assert info.value.pid == os.getpid()
        first.set_pointer("still", "works")
        assert first.pointer("still") == "works"
    finally:
        first.close()
    with Store.open(path) as again:
        assert again.pointer("still") == "works"
