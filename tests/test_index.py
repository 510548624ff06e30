"""storage.index: the Chroma wrapper, embedded (a tmp folder) and against a real `chroma run` server."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from chromadb.api.models.Collection import Collection

from loop.errors import IndexMismatchError, VectorIndexError
from storage.index import EF_SEARCH, VectorIndex, collection_name
from tests.fakes import FakeEmbedder

TEXTS = [
    "indemnification clauses allocate losses between parties",
    "the tenant pays rent monthly to the landlord",
    "force majeure excuses performance after floods",
    "governing law is the law of delaware",
    "confidential information must not be disclosed",
]


def _write_search_verify(index: VectorIndex, emb: FakeEmbedder, name: str = "passages.fake-1") -> None:
    """The flow the app relies on, whichever Chroma backs `index`."""
    index.create(name, emb.version, emb.dim)
    assert name in index.collections()
    assert index.model_version(name) == emb.version
    assert index._get(name).configuration["hnsw"]["ef_search"] == EF_SEARCH  # a near-exact, repeatable top-k
    assert index.count(name) == 0
    assert index.search(name, emb.encode(["anything"]), emb.version, k=3) == [[]]  # empty: no error
    ids = [f"p{i}" for i in range(len(TEXTS))]
    index.upsert(name, ids, emb.encode(TEXTS), TEXTS)
    assert index.count(name) == len(TEXTS)
    assert index.ids(name) == set(ids)
    [hits] = index.search(name, emb.encode(["flood force majeure"]), emb.version, k=2)
    assert len(hits) == 2
    assert hits[0][0] == "p2" and hits[0][2] == TEXTS[2]
    assert hits[0][1] > hits[1][1]
    # Each passage is its own nearest neighbour, with cosine similarity ~1.
    for pid, top in zip(ids, index.search(name, emb.encode(TEXTS), emb.version, k=1), strict=True):
        assert top[0][0] == pid and top[0][1] == pytest.approx(1.0, abs=1e-4)
    # k larger than the collection returns everything.
    assert len(index.search(name, emb.encode(["rent"]), emb.version, k=50)[0]) == len(TEXTS)
    # Upsert replaces, never duplicates.
    index.upsert(name, ["p1"], emb.encode(["the tenant pays rent weekly"]), ["the tenant pays rent weekly"])
    assert index.count(name) == len(TEXTS)
    assert index.search(name, emb.encode(["weekly rent"]), emb.version, k=1)[0][0][2] == "the tenant pays rent weekly"
    index.delete(name, ["p0", "p4"])
    assert index.ids(name) == {"p1", "p2", "p3"}
    with pytest.raises(IndexMismatchError):
        index.search(name, emb.encode(["rent"]), "another-version", k=1)
    index.drop(name)
    assert name not in index.collections()


def _widen_search(index: VectorIndex, emb: FakeEmbedder) -> None:
    """A collection created at a narrower breadth is raised in place; its vectors stay."""
    narrow, wide = "passages.narrow", "passages.wide"
    index.create(narrow, emb.version, emb.dim, ef_search=100)
    index.create(wide, emb.version, emb.dim, ef_search=EF_SEARCH + 100)
    ids = [f"p{i}" for i in range(len(TEXTS))]
    index.upsert(narrow, ids, emb.encode(TEXTS), TEXTS)
    assert index.widen_search([narrow, wide, "passages.missing"]) == [narrow]
    assert index._get(narrow).configuration["hnsw"]["ef_search"] == EF_SEARCH
    assert index._get(wide).configuration["hnsw"]["ef_search"] == EF_SEARCH + 100  # never lowered
    assert index.ids(narrow) == set(ids)
    assert index.search(narrow, emb.encode([TEXTS[2]]), emb.version, k=1)[0][0][0] == "p2"
    assert index.widen_search([narrow]) == []  # once is enough
    index.drop(narrow)
    index.drop(wide)


@pytest.fixture
def index(tmp_path) -> VectorIndex:
    return VectorIndex(path=tmp_path / "chroma")


@pytest.fixture
def emb() -> FakeEmbedder:
    return FakeEmbedder("fake-1")


# Embedded ----------------------------------------------------------------------------------
def test_embedded_write_search_verify(index, emb, tmp_path):
    assert (tmp_path / "chroma").is_dir()
    assert index.location == str(tmp_path / "chroma")
    _write_search_verify(index, emb)


def test_widen_search_raises_an_older_collections_breadth(index, emb):
    _widen_search(index, emb)


def test_search_of_a_big_query_log_stays_under_sqlites_variable_limit(index, emb):
    """2,631 queries x k 20 made Chroma fail with 'too many SQL variables' (a scifact query log)."""
    import numpy as np

    index.create("passages.fake-1", emb.version, emb.dim)
    texts = [f"passage {i} about topic {i % 7}" for i in range(40)]
    index.upsert("passages.fake-1", [f"p{i}" for i in range(40)], emb.encode(texts), texts)
    q = np.repeat(emb.encode(["topic 3"]), 2_000, axis=0)
    hits = index.search("passages.fake-1", q, emb.version, k=20)
    assert len(hits) == 2_000 and all(len(h) == 20 for h in hits)
    assert hits[0] == hits[-1]  # the same query gets the same answer in every batch


def test_persists_across_clients(tmp_path, emb):
    a = VectorIndex(path=tmp_path / "chroma")
    a.create("passages.fake-1", emb.version, emb.dim)
    a.upsert("passages.fake-1", ["x", "y"], emb.encode(["alpha", "beta"]), ["alpha", "beta"])
    b = VectorIndex(path=tmp_path / "chroma")
    assert b.count("passages.fake-1") == 2
    assert b.model_version("passages.fake-1") == "fake-1"


def test_create_replaces_leftover_collection(index, emb):
    index.create("passages.fake-1", emb.version, emb.dim)
    index.upsert("passages.fake-1", ["a"], emb.encode(["alpha"]), ["alpha"])
    index.create("passages.fake-1", "fake-2", emb.dim)
    assert index.count("passages.fake-1") == 0
    assert index.model_version("passages.fake-1") == "fake-2"
    assert index.collections().count("passages.fake-1") == 1


def test_missing_collection_is_a_vector_index_error(index, emb):
    for call in (
        lambda: index.count("passages.nope"),
        lambda: index.ids("passages.nope"),
        lambda: index.model_version("passages.nope"),
        lambda: index.upsert("passages.nope", ["a"], emb.encode(["a"]), ["a"]),
        lambda: index.search("passages.nope", emb.encode(["a"]), "fake-1"),
    ):
        with pytest.raises(VectorIndexError, match="does not exist"):
            call()
    index.drop("passages.nope")  # dropping a missing collection is a no-op


def test_upsert_rejects_mismatched_lengths(index, emb):
    index.create("passages.fake-1", emb.version, emb.dim)
    with pytest.raises(ValueError, match="same length"):
        index.upsert("passages.fake-1", ["a", "b"], emb.encode(["a"]), ["a", "b"])
    with pytest.raises(ValueError, match="same length"):
        index.upsert("passages.fake-1", ["a"], emb.encode(["a"]), ["a", "b"])
    assert index.count("passages.fake-1") == 0


def test_writes_and_reads_in_batches_below_max(index, emb, monkeypatch):
    assert 1 <= index._max_batch <= 5000
    assert index._max_batch < index.client.get_max_batch_size()
    monkeypatch.setattr(index, "_max_batch", 7)
    sizes: dict[str, list[int]] = {"upsert": [], "delete": [], "get": []}
    real_upsert, real_delete, real_get = Collection.upsert, Collection.delete, Collection.get

    def upsert(self, *a, **kw):
        sizes["upsert"].append(len(kw["ids"]))
        return real_upsert(self, *a, **kw)

    def delete(self, *a, **kw):
        sizes["delete"].append(len(kw["ids"]))
        return real_delete(self, *a, **kw)

    def get(self, *a, **kw):
        out = real_get(self, *a, **kw)
        sizes["get"].append(len(out["ids"]))
        return out

    monkeypatch.setattr(Collection, "upsert", upsert)
    monkeypatch.setattr(Collection, "delete", delete)
    monkeypatch.setattr(Collection, "get", get)

    name = "passages.fake-1"
    index.create(name, emb.version, emb.dim)
    texts = [f"passage number {i} about topic{i}" for i in range(50)]
    ids = [f"id{i:03d}" for i in range(50)]
    index.upsert(name, ids, emb.encode(texts), texts)
    assert sizes["upsert"] == [7] * 7 + [1]
    assert index.count(name) == 50
    assert index.ids(name) == set(ids)  # paged with limit/offset: all 50 come back
    assert max(sizes["get"]) <= 7 and sum(sizes["get"]) == 50
    index.delete(name, ids[:20])
    assert sizes["delete"] == [7, 7, 6]
    assert index.ids(name) == set(ids[20:])
    assert list(index.batches(0)) == []
    assert [s.stop - s.start for s in index.batches(14)] == [7, 7]


def test_collections_have_no_embedding_function(index, emb):
    name = "passages.fake-1"
    index.create(name, emb.version, emb.dim)
    index.upsert(name, ["a"], emb.encode(["alpha"]), ["alpha"])
    col = index.client.get_collection(name)
    assert col.configuration.get("embedding_function") is None
    assert col.configuration["hnsw"]["space"] == "cosine"
    assert col.metadata == {"model_version": "fake-1", "dim": emb.dim}
    # A text query has nothing to embed it with: it must fail, not fetch a default model.
    with pytest.raises(Exception, match="(?i)embedding function"):
        index._get(name).query(query_texts=["alpha"], n_results=1)
    with pytest.raises(Exception, match="(?i)embedding function"):
        index._get(name).add(ids=["b"], documents=["beta"])
    assert index.count(name) == 1


def test_search_with_another_model_version_raises(index, emb):
    name = "passages.fake-1"
    index.create(name, emb.version, emb.dim)
    index.upsert(name, ["a"], emb.encode(["alpha"]), ["alpha"])
    other = FakeEmbedder("fake-2")
    with pytest.raises(IndexMismatchError) as info:
        index.search(name, other.encode(["alpha"]), other.version)
    assert info.value.query_model == "fake-2" and info.value.index_model == "fake-1"
    assert "fake-2" in str(info.value) and "fake-1" in str(info.value)


_LEGAL = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]$")


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("base-0123456789", "passages.1a2b3c4d.base-0123456789"),
        ("r1.ft_v2", "passages.1a2b3c4d.r1.ft_v2"),
        ("org/model:v1", "passages.1a2b3c4d.org-model-v1"),
        ("my model é", "passages.1a2b3c4d.my-model"),
        ("--x--", "passages.1a2b3c4d.x"),
        ("", "passages.1a2b3c4d.model"),
        ("///", "passages.1a2b3c4d.model"),
    ],
)
def test_collection_name_sanitising(version, expected):
    assert collection_name(version, "1a2b3c4d") == expected


@pytest.mark.parametrize(
    "version",
    ["a..b", "a...b.", "x" * 600, "a" * 490 + "-tail", "a" * 480 + "..tail", "._-", "v1/../v2"],
)
def test_collection_name_is_always_chroma_legal(index, version):
    name = collection_name(version, "1a2b3c4d")
    assert _LEGAL.match(name) and ".." not in name and len(name) <= 500, name
    index.create(name, version, 4)  # Chroma itself accepts it
    assert index.model_version(name) == version


def test_unreachable_server_is_a_vector_index_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(VectorIndexError, match="Cannot open the Chroma index"):
        VectorIndex(url=f"http://127.0.0.1:{port}")


# Server mode -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def chroma_server(tmp_path):
    exe = Path(sys.executable).parent / "chroma"
    if not exe.exists():
        pytest.skip(f"{exe} is not installed")
    port = _free_port()
    log = (tmp_path / "chroma-server.log").open("wb")
    proc = subprocess.Popen(
        [str(exe), "run", "--path", str(tmp_path / "server-data"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"chroma run exited with {proc.returncode}: {(tmp_path / 'chroma-server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/api/v2/heartbeat", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"chroma run did not answer within 60 s: {(tmp_path / 'chroma-server.log').read_text()}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


@pytest.mark.slow
def test_server_mode_index_and_workspace(chroma_server, tmp_path, monkeypatch):
    from loop.workspace import Workspace

    # The VectorIndex alone, over HTTP, with batches smaller than the data.
    index = VectorIndex(url=chroma_server)
    assert index.location == chroma_server
    emb = FakeEmbedder("fake-1")
    _write_search_verify(index, emb)
    _widen_search(index, emb)
    monkeypatch.setattr(index, "_max_batch", 7)
    texts = [f"server passage {i} topic{i}" for i in range(50)]
    index.create("passages.batched", emb.version, emb.dim)
    index.upsert("passages.batched", [f"s{i}" for i in range(50)], emb.encode(texts), texts)
    assert index.count("passages.batched") == 50
    assert index.ids("passages.batched") == {f"s{i}" for i in range(50)}
    with pytest.raises(Exception, match="(?i)embedding function"):
        index._get("passages.batched").query(query_texts=["server"], n_results=1)

    # A workspace whose config points at the server: nothing embedded on disk.
    doc_a, doc_b = tmp_path / "a.txt", tmp_path / "b.txt"
    doc_a.write_text("Indemnification clauses allocate losses between the parties.\n", encoding="utf-8")
    doc_b.write_text("The tenant pays rent to the landlord every month.\n", encoding="utf-8")
    ws = Workspace.open(tmp_path / "ws", chroma_url=chroma_server)
    try:
        ws._embedders[ws.active_model] = FakeEmbedder(ws.active_model)
        assert ws.index.location == chroma_server
        reports = ws.ingest([doc_a, doc_b])
        assert sum(r.indexed for r in reports) == 2
        name = ws.store.pointer("active_index")
        assert name == collection_name(ws.active_model, ws.store.workspace_id)
        assert ws.index.count(name) == ws.store.scalar("SELECT count(*) FROM passages") == 2
        assert ws.index.ids(name) == set(ws.store.passage_ids())
        assert ws.search("tenant rent landlord", k=1)[0].doc_ids == ["b.txt"]
        assert ws.ensure_index() == 0  # already in line
        assert ws.status()["chroma"] == chroma_server
        assert not (tmp_path / "ws" / "chroma").exists()
    finally:
        ws.close()
    # A fresh client sees what the workspace wrote: it lives on the server.
    assert VectorIndex(url=chroma_server).count(name) == 2


@pytest.mark.slow
def test_two_workspaces_on_one_chroma_server_keep_their_own_vectors(chroma_server, tmp_path, cranfield):
    """Issue 13: workspace B (same base model) used to write into, and empty, workspace A's collection."""
    from loop.workspace import Workspace

    corpus = tmp_path / "cranfield-100.jsonl"
    lines = (cranfield / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:100]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    folder = tmp_path / "b-docs"
    folder.mkdir()
    (folder / "lease.txt").write_text("The tenant pays rent to the landlord every month.\n", encoding="utf-8")
    query = "boundary layer flow over a flat plate"

    a = Workspace.open(tmp_path / "a", chroma_url=chroma_server)
    b = Workspace.open(tmp_path / "b", chroma_url=chroma_server)
    try:
        for ws in (a, b):
            ws._embedders[ws.active_model] = FakeEmbedder(ws.active_model)
        assert a.base_version == b.base_version
        a.ingest([corpus])
        n_a = a.store.scalar("SELECT count(*) FROM passages")
        hits_before = a.search(query, k=5)
        assert len(hits_before) == 5

        b.ingest([folder])
        a_name, b_name = a.store.pointer("active_index"), b.store.pointer("active_index")
        assert a_name != b_name and {a_name, b_name} <= set(a.index.collections())
        assert a.search(query, k=5) == hits_before
        assert a.index.count(a_name) == a.status()["active_index"]["count"] == n_a
        assert b.index.count(b_name) == b.status()["active_index"]["count"] == 1
        assert b.search("rent landlord", k=5)[0].doc_ids == [f"{folder.name}/lease.txt"]  # a folder names its documents
        assert len(b.search("rent landlord", k=5)) == 1  # none of A's passages

        # A keeps working on its own collection; B's is untouched.
        assert a.ensure_index() == 0
        assert b.index.ids(b_name) == set(b.store.passage_ids())
        assert a.store.workspace_id in a_name and b.store.workspace_id in b_name
    finally:
        a.close()
        b.close()
