"""loop.indexing: build / verify / activate / rollback / sync, over a real workspace with fakes."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

from loop import indexing
from loop.errors import IndexMismatchError, VectorIndexError
from tests.fakes import FakeEmbedder
from tests.reliability_report import case

DOCS = {
    "contracts.txt": "Indemnification clauses allocate losses between the parties.",
    "lease.txt": "The tenant pays rent to the landlord on the first day of every month.",
    "weather.txt": "Force majeure excuses performance when floods or storms strike.",
    "law.txt": "This agreement is governed by the law of the state of Delaware.",
}


def _ingest(ws, tmp_path, docs=DOCS):
    src = tmp_path / "docs"
    src.mkdir(exist_ok=True)
    paths = []
    for name, text in docs.items():
        (src / name).write_text(text + "\n", encoding="utf-8")
        paths.append(src / name)
    return ws.ingest(paths)


def _register(ws, version: str, tmp_path) -> FakeEmbedder:
    """A second model version, as a fine-tuning round would register it."""
    path = tmp_path / "models" / version
    path.mkdir(parents=True, exist_ok=True)
    ws.store.execute(
        "INSERT INTO model_versions (version, path, parent, sha256, status) VALUES (?, ?, ?, ?, 'candidate')",
        [version, str(path), ws.base_version, "0" * 64],
    )
    emb = FakeEmbedder(version)
    ws._embedders[version] = emb
    return emb


def _status(ws) -> dict[str, str]:
    return dict(ws.store.execute("SELECT collection, status FROM index_versions").fetchall())


@pytest.fixture
def ingested(workspace, tmp_path):
    _ingest(workspace, tmp_path)
    return workspace


def test_ingest_activates_the_base_index(ingested):
    ws = ingested
    base = indexing.collection_for(ws.store, ws.base_version)
    assert base == f"passages.{ws.store.workspace_id}.{ws.base_version}"
    assert ws.store.pointer(indexing.ACTIVE_INDEX) == base
    assert ws.store.pointer(indexing.ACTIVE_MODEL) == ws.base_version
    assert _status(ws) == {base: "active"}
    n = ws.store.scalar("SELECT count(*) FROM passages")
    assert n == len(DOCS)
    assert ws.index.count(base) == n
    assert ws.index.ids(base) == set(ws.store.passage_ids())
    assert ws.store.scalar("SELECT count FROM index_versions WHERE collection = ?", [base]) == n


def test_build_activate_rollback(ingested, tmp_path):
    ws = ingested
    base = indexing.collection_for(ws.store, ws.base_version)
    v2 = _register(ws, "ft-r1", tmp_path)
    written: list[tuple[int, int]] = []

    name = indexing.build(ws.store, ws.index, v2, progress=lambda done, total: written.append((done, total)))
    assert name == indexing.collection_for(ws.store, "ft-r1") != base
    assert written and written[-1] == (len(DOCS), len(DOCS))
    # Built and verified, but nothing switched yet.
    assert _status(ws) == {base: "active", name: "verified"}
    assert ws.store.pointer(indexing.ACTIVE_INDEX) == base
    assert ws.store.pointer(indexing.ACTIVE_MODEL) == ws.base_version
    assert ws.index.count(name) == len(DOCS)
    assert ws.index.model_version(name) == "ft-r1"
    assert ws.search("tenant rent", k=1)[0].doc_ids == ["lease.txt"]  # still served by the base

    indexing.activate(ws.store, name)
    assert ws.store.pointer(indexing.ACTIVE_INDEX) == name
    assert ws.store.pointer(indexing.ACTIVE_MODEL) == "ft-r1"
    assert ws.active_model == "ft-r1"
    assert _status(ws) == {base: "retired", name: "active"}
    assert base in ws.index.collections()  # kept for rollback
    assert ws.index.count(base) == len(DOCS)
    calls = v2.calls
    assert ws.search("floods storms", k=1)[0].doc_ids == ["weather.txt"]
    assert v2.calls == calls + 1  # the query went through the new model

    assert indexing.rollback(ws.store, ws.index, ws.embedder) == base
    assert ws.store.pointer(indexing.ACTIVE_INDEX) == base
    assert ws.store.pointer(indexing.ACTIVE_MODEL) == ws.base_version
    assert _status(ws) == {base: "active", name: "retired"}
    assert ws.search("Delaware law", k=1)[0].doc_ids == ["law.txt"]

    # And forward again: the most recently retired collection comes back.
    assert indexing.rollback(ws.store, ws.index, ws.embedder) == name
    assert ws.store.pointer(indexing.ACTIVE_INDEX) == name


def test_build_refuses_the_active_collection(ingested):
    ws = ingested
    with pytest.raises(VectorIndexError, match="active index"):
        indexing.build(ws.store, ws.index, ws.embedder())
    assert _status(ws) == {indexing.collection_for(ws.store, ws.base_version): "active"}


def test_activate_refuses_unverified(ingested, tmp_path):
    ws = ingested
    with pytest.raises(VectorIndexError, match="not verified"):
        indexing.activate(ws.store, "passages.never-built")
    ws.store.execute(
        "INSERT INTO index_versions (collection, model_version, status) VALUES ('passages.half', 'x', 'building')"
    )
    with pytest.raises(VectorIndexError, match="not verified"):
        indexing.activate(ws.store, "passages.half")
    assert ws.store.pointer(indexing.ACTIVE_INDEX) == indexing.collection_for(ws.store, ws.base_version)


def test_rollback_without_a_retired_collection(ingested, tmp_path):
    ws = ingested
    with pytest.raises(VectorIndexError, match="Nothing to roll back"):
        indexing.rollback(ws.store, ws.index, ws.embedder)
    # A retired collection that Chroma lost is skipped too.
    v2 = _register(ws, "ft-r1", tmp_path)
    indexing.activate(ws.store, indexing.build(ws.store, ws.index, v2))
    ws.index.drop(indexing.collection_for(ws.store, ws.base_version))
    with pytest.raises(VectorIndexError, match="Nothing to roll back"):
        indexing.rollback(ws.store, ws.index, ws.embedder)
    assert ws.store.pointer(indexing.ACTIVE_INDEX) == indexing.collection_for(ws.store, "ft-r1")


def test_verify_fails_when_count_differs(ingested):
    ws = ingested
    name = ws.store.pointer(indexing.ACTIVE_INDEX)
    emb = ws.embedder()
    indexing.verify(ws.store, ws.index, name, emb)  # healthy
    victim = ws.store.passage_ids()[0]
    ws.index.delete(name, [victim])
    with pytest.raises(VectorIndexError, match=f"holds {len(DOCS) - 1} vectors but the corpus has {len(DOCS)}"):
        indexing.verify(ws.store, ws.index, name, emb)
    # An extra vector is as wrong as a missing one.
    ws.index.upsert(name, [victim, "stray"], emb.encode(["a", "b"]), ["a", "b"])
    with pytest.raises(VectorIndexError, match="holds"):
        indexing.verify(ws.store, ws.index, name, emb)


def test_verify_fails_canary_on_wrong_vectors(ingested):
    ws = ingested
    name = ws.store.pointer(indexing.ACTIVE_INDEX)
    emb = ws.embedder()
    ids = ws.store.passage_ids()
    texts = ws.store.passages(ids)
    # Right count, right vectors, wrong ids: each passage holds its neighbour's vector.
    rolled = np.roll(emb.encode([texts[i] for i in ids]), 1, axis=0)
    ws.index.upsert(name, ids, rolled, [texts[i] for i in ids])
    assert ws.index.count(name) == len(ids)
    with pytest.raises(VectorIndexError, match="canary"):
        indexing.verify(ws.store, ws.index, name, emb)


def test_verify_allows_ties_between_identical_vectors(workspace, tmp_path):
    # Same words in another order: the bag-of-words fake gives both passages the same vector.
    ws = workspace
    _ingest(ws, tmp_path, {"a.txt": "alpha beta gamma", "b.txt": "gamma beta alpha"})
    name = ws.store.pointer(indexing.ACTIVE_INDEX)
    indexing.verify(ws.store, ws.index, name, ws.embedder())
    assert ws.index.count(name) == 2


def test_failed_build_is_recorded_and_not_activatable(ingested, tmp_path, monkeypatch):
    ws = ingested
    v2 = _register(ws, "ft-broken", tmp_path)
    real_upsert = ws.index.upsert

    def misattached(name, ids, embeddings, documents):  # a writer that shifts vectors by one
        real_upsert(name, ids, np.roll(np.asarray(embeddings), 1, axis=0), documents)

    monkeypatch.setattr(ws.index, "upsert", misattached)
    with pytest.raises(VectorIndexError, match="canary"):
        indexing.build(ws.store, ws.index, v2)
    name = indexing.collection_for(ws.store, "ft-broken")
    row = ws.store.rows("SELECT status, detail FROM index_versions WHERE collection = ?", [name])[0]
    assert row["status"] == "failed" and "canary" in row["detail"]
    with pytest.raises(VectorIndexError, match="not verified"):
        indexing.activate(ws.store, name)
    assert ws.store.pointer(indexing.ACTIVE_INDEX) == indexing.collection_for(ws.store, ws.base_version)


def test_failed_build_on_missing_vectors(ingested, tmp_path, monkeypatch):
    ws = ingested
    v2 = _register(ws, "ft-short", tmp_path)
    real_upsert = ws.index.upsert
    monkeypatch.setattr(ws.index, "upsert", lambda n, i, e, d: real_upsert(n, i[1:], e[1:], d[1:]))
    with pytest.raises(VectorIndexError, match="holds"):
        indexing.build(ws.store, ws.index, v2)
    assert _status(ws)[indexing.collection_for(ws.store, "ft-short")] == "failed"


def test_search_with_another_model_version_raises(ingested):
    ws = ingested
    other = FakeEmbedder("someone-else")
    with pytest.raises(IndexMismatchError) as info:
        indexing.search(ws.store, ws.index, other, ["tenant rent"], k=3)
    assert info.value.index_model == ws.base_version and info.value.query_model == "someone-else"
    hits = indexing.search(ws.store, ws.index, ws.embedder(), ["tenant rent"], k=3)[0]
    assert len(hits) == 3 and hits[0].doc_ids == ["lease.txt"]


def test_search_without_an_active_index(workspace):
    with pytest.raises(VectorIndexError, match="no active index"):
        indexing.search(workspace.store, workspace.index, workspace.embedder(), ["x"])


def test_lost_chroma_folder_is_rebuilt_from_duckdb(workspace, tmp_path):
    from loop.workspace import Workspace

    ws = workspace
    _ingest(ws, tmp_path)
    base = indexing.collection_for(ws.store, ws.base_version)
    n = ws.index.count(base)
    assert n == len(DOCS)
    ids = ws.index.ids(base)
    ws_path, chroma_dir = ws.settings.workspace, ws.settings.chroma_path
    ws.close()  # releases the Chroma client too, so the reopen below sees the folder as it is
    shutil.rmtree(chroma_dir)

    ws2 = Workspace.open(ws_path)
    try:
        ws2._embedders[ws2.active_model] = FakeEmbedder(ws2.active_model)
        assert base not in ws2.index.collections()
        assert ws2.ensure_index() == n  # every passage re-embedded
        assert ws2.index.count(base) == n
        assert ws2.index.ids(base) == ids
        assert ws2.store.pointer(indexing.ACTIVE_INDEX) == base
        # The rebuilt collection is still the *active* one in DuckDB's records.
        assert _status(ws2) == {base: "active"}
        assert ws2.search("Delaware law", k=1)[0].doc_ids == ["law.txt"]
        assert ws2.ensure_index() == 0  # nothing left to do
    finally:
        ws2.close()


def test_reopening_a_workspace_raises_its_older_collections_search_breadth(workspace, tmp_path):
    """Collections built before `EF_SEARCH` was raised (active and kept for rollback) get it at
    the next open; a collection this workspace does not record is left as it is."""
    from loop.workspace import Workspace
    from storage.index import EF_SEARCH

    ws = workspace
    _ingest(ws, tmp_path)
    base = indexing.collection_for(ws.store, ws.base_version)
    v2 = _register(ws, "ft-r1", tmp_path)
    tuned = indexing.build(ws.store, ws.index, v2)
    indexing.activate(ws.store, tuned)
    ws.index.create("passages.someone-else", v2.version, v2.dim, ef_search=100)
    for name in (base, tuned):  # as an earlier version created them
        ws.index._get(name).modify(configuration={"hnsw": {"ef_search": 100}})
    before = ws.search("Delaware law", k=4)
    ws_path = ws.settings.workspace
    ws.close()

    ws2 = Workspace.open(ws_path)
    try:
        ws2._embedders[ws2.base_version] = FakeEmbedder(ws2.base_version)
        ws2._embedders["ft-r1"] = FakeEmbedder("ft-r1")
        breadth = {n: ws2.index._get(n).configuration["hnsw"]["ef_search"] for n in (base, tuned, "passages.someone-else")}
        assert breadth == {base: EF_SEARCH, tuned: EF_SEARCH, "passages.someone-else": 100}
        assert _status(ws2) == {base: "retired", tuned: "active"}
        assert ws2.search("Delaware law", k=4) == before
        assert ws2.search("Delaware law", k=1, version=ws2.base_version)[0].doc_ids == ["law.txt"]
    finally:
        ws2.close()


def test_rebuilt_active_index_can_still_be_retired_and_rolled_back(workspace, tmp_path):
    """A rebuild must not lose the 'active' status, or the next switch cannot retire it."""
    ws = workspace
    _ingest(ws, tmp_path)
    base = indexing.collection_for(ws.store, ws.base_version)
    ws.index.drop(base)  # lost
    assert ws.ensure_index() == len(DOCS)
    v2 = _register(ws, "ft-r1", tmp_path)
    indexing.activate(ws.store, indexing.build(ws.store, ws.index, v2))
    assert _status(ws) == {base: "retired", indexing.collection_for(ws.store, "ft-r1"): "active"}
    assert indexing.rollback(ws.store, ws.index, ws.embedder) == base


def test_changed_document_replaces_its_passages(ingested, tmp_path):
    ws = ingested
    name = ws.store.pointer(indexing.ACTIVE_INDEX)
    old_ids = set(ws.store.passage_ids())
    old_lease = ws.store.first_passage_of_docs(["lease.txt"])["lease.txt"]
    keep = {d: p for d, p in ws.store.first_passage_of_docs(list(DOCS)).items() if d != "lease.txt"}

    [report] = _ingest(ws, tmp_path, {"lease.txt": "Subletting the apartment requires written consent of the owner."})
    assert (report.documents_added, report.documents_updated) == (0, 1)
    new_lease = ws.store.first_passage_of_docs(["lease.txt"])["lease.txt"]
    assert new_lease != old_lease
    now = set(ws.store.passage_ids())
    assert old_lease not in now and new_lease in now
    assert now == (old_ids - {old_lease}) | {new_lease}
    assert ws.store.passages([old_lease]) == {}
    # The index holds exactly the corpus: the orphan is gone from Chroma as well.
    assert ws.index.ids(name) == now
    assert ws.index.count(name) == len(DOCS)
    assert ws.store.scalar("SELECT count(*) FROM doc_passages WHERE doc_id = 'lease.txt'") == 1
    # Unchanged documents keep their passages.
    assert {d: p for d, p in ws.store.first_passage_of_docs(list(DOCS)).items() if d != "lease.txt"} == keep
    hits = ws.search("subletting written consent", k=1)
    assert hits[0].passage_id == new_lease and hits[0].doc_ids == ["lease.txt"]
    assert all(h.passage_id != old_lease for h in ws.search("tenant pays rent landlord", k=len(DOCS)))


def test_sync_refuses_a_collection_built_by_another_model(ingested):
    ws = ingested
    name = ws.store.pointer(indexing.ACTIVE_INDEX)
    impostor = FakeEmbedder(ws.active_model)
    ws.index.create(name, "other-model", impostor.dim)
    with pytest.raises(VectorIndexError, match="another model"):
        indexing.sync(ws.store, ws.index, impostor)


# Rollback: verified, synced, to any kept version (issue 13) ----------------------------------
MORE = {
    "harbor.txt": "Ships dock at the harbor pier before the storm season.",
    "lease.txt": "Subletting the apartment requires written consent of the owner.",  # changed
}


def _model_status(ws) -> dict[str, str]:
    return dict(ws.store.execute("SELECT version, status FROM model_versions").fetchall())


def _promote(ws, emb) -> str:
    name = indexing.build(ws.store, ws.index, emb)
    indexing.activate(ws.store, name)
    return name


def test_rollback_syncs_a_stale_collection_before_switching(ingested, tmp_path):
    ws = ingested
    base = indexing.collection_for(ws.store, ws.base_version)
    _promote(ws, _register(ws, "ft-r1", tmp_path))
    _ingest(ws, tmp_path, MORE)  # only the active (ft-r1) collection follows this ingest
    want = set(ws.store.passage_ids())
    assert ws.index.ids(base) != want  # the kept one is stale: no harbor, the old lease

    assert indexing.rollback(ws.store, ws.index, ws.embedder) == base
    assert ws.store.pointer(indexing.ACTIVE_INDEX) == base
    assert ws.index.ids(base) == want  # missing passages embedded, removed ones gone
    assert ws.store.scalar("SELECT count FROM index_versions WHERE collection = ?", [base]) == len(want)
    assert ws.search("ships harbor pier", k=1)[0].doc_ids == ["harbor.txt"]
    assert ws.search("subletting written consent", k=1)[0].doc_ids == ["lease.txt"]


def test_rollback_refuses_a_kept_index_that_fails_its_canaries(ingested, tmp_path):
    ws = ingested
    base = indexing.collection_for(ws.store, ws.base_version)
    v2 = _promote(ws, _register(ws, "ft-r1", tmp_path))
    ids = ws.store.passage_ids()
    texts = ws.store.passages(ids)
    emb = ws.embedder(ws.base_version)
    # Right ids, right count, wrong vectors: each passage holds its neighbour's.
    ws.index.upsert(base, ids, np.roll(emb.encode([texts[i] for i in ids]), 1, axis=0), [texts[i] for i in ids])
    with pytest.raises(VectorIndexError, match="canary"):
        indexing.rollback(ws.store, ws.index, ws.embedder)
    assert ws.store.pointer(indexing.ACTIVE_INDEX) == v2
    assert ws.active_model == "ft-r1"
    assert _model_status(ws)["ft-r1"] == "active"


def test_rollback_to_any_earlier_version_keeps_model_status_true(ingested, tmp_path):
    ws = ingested
    base_version = ws.base_version
    base = indexing.collection_for(ws.store, base_version)
    r1 = _promote(ws, _register(ws, "ft-r1", tmp_path))
    assert _model_status(ws) == {base_version: "base", "ft-r1": "active"}
    r2 = _promote(ws, _register(ws, "ft-r2", tmp_path))
    assert _model_status(ws) == {base_version: "base", "ft-r1": "retired", "ft-r2": "active"}

    # Past the previous one, straight to the base model.
    assert indexing.rollback(ws.store, ws.index, ws.embedder, to=base_version) == base
    assert ws.active_model == base_version
    assert _status(ws) == {base: "active", r1: "retired", r2: "retired"}
    assert _model_status(ws) == {base_version: "base", "ft-r1": "retired", "ft-r2": "retired"}
    # Plain rollback goes to the previous one: the index just left.
    assert indexing.rollback(ws.store, ws.index, ws.embedder) == r2
    assert _model_status(ws) == {base_version: "base", "ft-r1": "retired", "ft-r2": "active"}
    assert indexing.rollback(ws.store, ws.index, ws.embedder, to="ft-r1") == r1
    assert ws.active_model == "ft-r1"
    assert _status(ws) == {base: "retired", r1: "active", r2: "retired"}
    assert _model_status(ws) == {base_version: "base", "ft-r1": "active", "ft-r2": "retired"}

    # A version that is active, unknown or never indexed: a clear error, nothing switched.
    with pytest.raises(VectorIndexError, match="already active"):
        indexing.rollback(ws.store, ws.index, ws.embedder, to="ft-r1")
    _register(ws, "ft-r3", tmp_path)
    for version in ("nope", "ft-r3"):
        with pytest.raises(VectorIndexError, match=f"no kept index for model '{version}'.*ft-r2"):
            indexing.rollback(ws.store, ws.index, ws.embedder, to=version)
    assert ws.store.pointer(indexing.ACTIVE_INDEX) == r1


def test_activate_refuses_a_collection_whose_count_differs_from_passages(ingested, tmp_path):
    ws = ingested
    base = ws.store.pointer(indexing.ACTIVE_INDEX)
    name = indexing.build(ws.store, ws.index, _register(ws, "ft-r1", tmp_path))
    _ingest(ws, tmp_path, {"harbor.txt": MORE["harbor.txt"]})  # the corpus grows after the build
    with pytest.raises(VectorIndexError, match=f"{name} held {len(DOCS)} vectors .* the corpus has {len(DOCS) + 1}"):
        indexing.activate(ws.store, name)
    assert ws.store.pointer(indexing.ACTIVE_INDEX) == base
    assert ws.active_model == ws.base_version


def test_status_reports_the_count_the_index_really_holds(ingested):
    ws = ingested
    name = ws.store.pointer(indexing.ACTIVE_INDEX)
    assert ws.status()["active_index"]["count"] == len(DOCS)
    ws.index.delete(name, ws.store.passage_ids()[:1])  # behind the workspace's back
    assert ws.status()["active_index"]["count"] == len(DOCS) - 1
    ws.index.drop(name)
    idx = ws.status()["active_index"]
    assert idx["count"] is None and "does not exist" in idx["problem"]


def test_collections_named_before_workspace_ids_keep_their_names(workspace, tmp_path):
    """A workspace from before workspace ids keeps using (and rolls back to) its `passages.<version>`
    collections; only collections built from now on carry the id."""
    from loop.workspace import Workspace
    from storage.migrations import MIGRATIONS

    ws = workspace
    _ingest(ws, tmp_path)
    # Make it look like a workspace created before migration 3: old collection name, no id.
    legacy = f"passages.{ws.base_version}"
    ws.index._get(ws.store.pointer(indexing.ACTIVE_INDEX)).modify(name=legacy)
    ws.store.execute("UPDATE index_versions SET collection = ?", [legacy])
    ws.store.set_pointer(indexing.ACTIVE_INDEX, legacy)
    ws.store.execute("DROP TABLE workspace_info")
    ws.store.execute("DROP TABLE trained_queries")  # migration 4 came later still
    ws.store.execute("DELETE FROM schema_migrations WHERE version >= 3")
    ws_path = ws.settings.workspace
    ws.close()

    ws2 = Workspace.open(ws_path)
    try:
        ws2._embedders[ws2.active_model] = FakeEmbedder(ws2.active_model)
        wid = ws2.store.workspace_id
        assert len(wid) == 8 and ws2.store.schema_version == max(n for n, _, _ in MIGRATIONS)
        assert indexing.collection_for(ws2.store, ws2.base_version) == legacy
        assert ws2.ensure_index() == 0  # nothing re-embedded: the old collection is used as it is
        assert ws2.store.pointer(indexing.ACTIVE_INDEX) == legacy
        assert ws2.status()["active_index"]["count"] == len(DOCS)
        assert ws2.search("Delaware law", k=1)[0].doc_ids == ["law.txt"]
        new = _promote(ws2, _register(ws2, "ft-r1", tmp_path))
        assert new == f"passages.{wid}.ft-r1"
        assert indexing.rollback(ws2.store, ws2.index, ws2.embedder) == legacy
    finally:
        ws2.close()
    with Workspace.open(ws_path) as ws3:
        assert ws3.store.workspace_id == wid  # stable across opens


# Re-index streaming: batch N+1 is encoded while batch N is written --------------------------

MANY = {f"doc{i}.txt": f"passage {i} about topic{i} and subject{i % 3} words{i}" for i in range(7)}


class _SignalingEmbedder(FakeEmbedder):
    """The fake encoder that records each call and can fail at one."""

    def __init__(self, version: str, fail_at: int | None = None):
        super().__init__(version)
        self.started = [threading.Event() for _ in range(64)]
        self.fail_at = fail_at

    def encode(self, texts, batch_size=None, show_progress=False):
        self.started[min(self.calls, 63)].set()
        if self.fail_at is not None and self.calls + 1 == self.fail_at:
            self.calls += 1
            raise RuntimeError("encoder broke at its call %d" % self.fail_at)
        return super().encode(texts, batch_size, show_progress)


def _streaming(ws, tmp_path, monkeypatch, version: str, **kw) -> _SignalingEmbedder:
    _ingest(ws, tmp_path, MANY)
    monkeypatch.setattr(indexing, "ENCODE_SLICE", 2)  # 7 passages: four slices
    emb = _SignalingEmbedder(version, **kw)
    ws._embedders[version] = emb
    _register(ws, version, tmp_path)
    ws._embedders[version] = emb
    return emb


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("index-writer")]


@case("What a user hits", "re-index encodes the next batch while the previous one is written to Chroma",
      "the second slice is encoded while the first write is still in progress; the collection holds "
      "exactly the vectors a sequential encode gives, every passage once")
def test_build_encodes_the_next_slice_while_the_previous_one_is_written(workspace, tmp_path, monkeypatch):
    ws = workspace
    emb = _streaming(ws, tmp_path, monkeypatch, "ft-stream")
    real_upsert = ws.index.upsert
    overlapped: list[bool] = []

    def slow_first_write(name, ids, embeddings, documents):
        if not overlapped:  # the first slice's write waits until the second slice is being encoded
            overlapped.append(emb.started[1].wait(timeout=10))
        real_upsert(name, ids, embeddings, documents)

    monkeypatch.setattr(ws.index, "upsert", slow_first_write)
    done: list[tuple[int, int]] = []
    name = indexing.build(ws.store, ws.index, emb, progress=lambda d, t: done.append((d, t)))
    assert overlapped == [True]
    n = ws.store.scalar("SELECT count(*) FROM passages")
    assert done == [(2, n), (4, n), (6, n), (n, n)]
    ids = ws.store.passage_ids()
    texts = ws.store.passages(ids)
    assert ws.index.ids(name) == set(ids) and ws.index.count(name) == n == len(MANY)
    want = FakeEmbedder("ft-stream").encode([texts[i] for i in ids])
    assert np.allclose(ws.index.embeddings(name, ids), want, atol=1e-6)
    assert _status(ws)[name] == "verified" and not _writer_threads()


@case("Stuck or wrong state", "a Chroma write fails during a streamed re-index",
      "the write's own error reaches the caller, the build is recorded failed, no more slices are written "
      "and no writer thread is left behind")
def test_an_error_in_the_index_writer_surfaces_and_stops_the_build(workspace, tmp_path, monkeypatch):
    ws = workspace
    emb = _streaming(ws, tmp_path, monkeypatch, "ft-writefail")
    real_upsert = ws.index.upsert
    writes: list[int] = []

    def failing_second_write(name, ids, embeddings, documents):
        writes.append(len(ids))
        if len(writes) == 2:
            raise VectorIndexError("Chroma refused the write (disk full)")
        real_upsert(name, ids, embeddings, documents)

    monkeypatch.setattr(ws.index, "upsert", failing_second_write)
    with pytest.raises(VectorIndexError, match="disk full"):
        indexing.build(ws.store, ws.index, emb)
    assert len(writes) == 2 and emb.calls <= 3  # nothing encoded or written past the failure but one slice
    name = indexing.collection_for(ws.store, "ft-writefail")
    assert _status(ws)[name] == "failed" and not _writer_threads()


@case("Stuck or wrong state", "the encoder fails, or the user cancels, during a streamed re-index",
      "the error (or the cancel raised by the progress callback) reaches the caller once the write in "
      "flight has finished; nothing is written after it and no writer thread is left behind")
def test_encoder_errors_and_cancel_stop_a_streamed_build(workspace, tmp_path, monkeypatch):
    ws = workspace
    emb = _streaming(ws, tmp_path, monkeypatch, "ft-encfail", fail_at=3)
    with pytest.raises(RuntimeError, match="encoder broke"):
        indexing.build(ws.store, ws.index, emb)
    name = indexing.collection_for(ws.store, "ft-encfail")
    assert ws.index.count(name) == 4 and _status(ws)[name] == "failed" and not _writer_threads()

    from loop.jobs import Cancelled

    emb2 = _SignalingEmbedder("ft-cancel")
    _register(ws, "ft-cancel", tmp_path)
    ws._embedders["ft-cancel"] = emb2

    def cancel(done, total):
        raise Cancelled("Cancelled by the user.")

    with pytest.raises(Cancelled):
        indexing.build(ws.store, ws.index, emb2, progress=cancel)
    name2 = indexing.collection_for(ws.store, "ft-cancel")
    assert ws.index.count(name2) == 2 and not _writer_threads()  # the first slice, and nothing after it
