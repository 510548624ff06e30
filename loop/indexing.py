"""Index lifecycle: build a collection for a model version, verify it, switch, roll back, sync.

A new collection becomes active only after verification (its count equals the number of
passages, and canary passages come back as their own nearest neighbour). The previous one is
kept, `retired`, for rollback; rolling back syncs it with the corpus and verifies it again first,
since ingestion only updates the active collection. The active pointers live in DuckDB
(`pointers` table); `model_versions.status` follows every switch.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from loop.embed import Embedder
from loop.errors import VectorIndexError
from loop.records import SearchHit
from storage.db import Store
from storage.index import VectorIndex, collection_name

Progress = Callable[[int, int], None]
ACTIVE_INDEX, ACTIVE_MODEL = "active_index", "active_model"
ENCODE_SLICE = 2048  # passages encoded (and written) at a time: memory stays flat, progress is reported


def collection_for(store: Store, version: str) -> str:
    """The Chroma collection of this workspace for model `version`: the one on record, else a new
    name carrying the workspace id (so workspaces sharing a Chroma server never collide).

    Collections named before workspace ids existed (`passages.<version>`) keep their names.
    """
    known = store.scalar(
        "SELECT collection FROM index_versions WHERE model_version = ? ORDER BY created_at DESC LIMIT 1", [version]
    )
    return known or collection_name(version, store.workspace_id)


def _embed_and_write(
    index: VectorIndex, name: str, embedder: Embedder, ids: list[str], texts: list[str], progress: Progress | None
) -> None:
    """Encode and write in slices, streamed: while one slice is written to Chroma (a writer
    thread), the next one is encoded (here). At most one write is in flight, so memory stays
    flat; each slice's progress is reported (here, where a cancel raised by `progress` stops the
    build) once its write is done. An error on either side ends the build: a write's at the next
    slice, an encode's (or a cancel) after the write in flight has finished, so no thread outlives it.
    """
    step = ENCODE_SLICE
    # Leaving the `with` waits for the write in flight, on an error too: no write outlives the build.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-writer") as writer:
        pending: tuple[Future, int] | None = None
        for start in range(0, len(ids), step):
            end = min(start + step, len(ids))
            emb = embedder.encode(texts[start:end])
            if pending:
                _written(pending, len(ids), progress)
            pending = (writer.submit(index.upsert, name, ids[start:end], emb, texts[start:end]), end)
        if pending:
            _written(pending, len(ids), progress)


def _written(pending: tuple[Future, int], total: int, progress: Progress | None) -> None:
    future, end = pending
    future.result()  # re-raises the writer's error
    if progress:
        progress(end, total)


def verify(store: Store, index: VectorIndex, name: str, embedder: Embedder, canaries: int = 5) -> None:
    """Raise VectorIndexError unless `name` holds every passage and canaries find themselves."""
    expected = store.scalar("SELECT count(*) FROM passages")
    got = index.count(name)
    if got != expected:
        raise VectorIndexError(f"Index {name} holds {got} vectors but the corpus has {expected} passages.")
    ids = store.passage_ids()
    if not ids:
        return
    sample = random.Random(0).sample(ids, min(canaries, len(ids)))
    texts = store.passages(sample)
    k = 3
    hits = index.search(name, embedder.encode([texts[i] for i in sample]), embedder.version, k=k)
    for pid, top in zip(sample, hits, strict=True):
        # A passage must be its own nearest neighbour: its id among the hits, scoring as high as
        # the best one (ties with identical vectors allowed, also when more than k of them tie).
        # A high-scoring hit under another id means vectors are attached to the wrong passages.
        own = next((s for p, s, _ in top if p == pid), None)
        all_tied = len(top) == k and top[-1][1] >= top[0][1] - 1e-3
        if not top or (own is None and not all_tied) or (own is not None and own < top[0][1] - 1e-3):
            raise VectorIndexError(f"Index {name} failed its canary check: passage {pid} is not its own top hit.")


def build(
    store: Store, index: VectorIndex, embedder: Embedder, progress: Progress | None = None,
    precomputed: dict[str, np.ndarray] | None = None,
) -> str:
    """Embed every passage into a fresh collection for `embedder.version`, verified. Not yet active.

    Args:
        precomputed: passage id -> vector by this same model (e.g. from its evaluation), so
            the corpus is not encoded twice in a round; passages not in it are encoded.
    """
    name = collection_for(store, embedder.version)
    if name == store.pointer(ACTIVE_INDEX):
        raise VectorIndexError(f"{name} is the active index; use sync() to refresh it in place.")
    store.execute(
        "INSERT OR REPLACE INTO index_versions (collection, model_version, status, count) VALUES (?, ?, 'building', 0)",
        [name, embedder.version],
    )
    index.create(name, embedder.version, embedder.dim)
    rows = store.execute("SELECT passage_id, text FROM passages ORDER BY length(text)").fetchall()
    known = precomputed or {}
    try:
        have = [r for r in rows if r[0] in known]
        if have:
            ids = [r[0] for r in have]
            index.upsert(name, ids, np.stack([known[i] for i in ids]), [r[1] for r in have])
        todo = [r for r in rows if r[0] not in known]
        _embed_and_write(index, name, embedder, [r[0] for r in todo], [r[1] for r in todo], progress)
        verify(store, index, name, embedder)
    except Exception as e:
        store.execute("UPDATE index_versions SET status = 'failed', detail = ? WHERE collection = ?", [str(e), name])
        raise
    store.execute("UPDATE index_versions SET status = 'verified', count = ? WHERE collection = ?", [len(rows), name])
    return name


def activate(store: Store, name: str) -> None:
    """Switch the active index (and model) to a verified collection; the old one is retired.

    The model switched to becomes 'active' in `model_versions`, the one left 'retired' (the
    base model keeps 'base').

    Raises:
        VectorIndexError: the collection is not verified, or its count at its last verification
            is not the number of passages now (it missed an ingest: `sync` it first).
    """
    row = store.rows("SELECT model_version, status, count FROM index_versions WHERE collection = ?", [name])
    if not row or row[0]["status"] not in {"verified", "retired", "active"}:
        raise VectorIndexError(f"Index {name} is not verified; it cannot become active.")
    passages = store.scalar("SELECT count(*) FROM passages")
    if row[0]["count"] != passages:
        raise VectorIndexError(
            f"Index {name} held {row[0]['count']} vectors when last verified but the corpus has {passages} "
            f"passages; it is stale and cannot become active. `embedloop rollback` brings a kept index up "
            f"to date before switching to it."
        )
    version, previous = row[0]["model_version"], store.pointer(ACTIVE_MODEL)
    with store.transaction() as cur:
        cur.execute("UPDATE index_versions SET status = 'retired' WHERE status = 'active' AND collection <> ?", [name])
        cur.execute(
            "UPDATE index_versions SET status = 'active', activated_at = current_timestamp WHERE collection = ?", [name]
        )
        store.set_pointer(ACTIVE_INDEX, name, cur)
        store.set_pointer(ACTIVE_MODEL, version, cur)
        if previous and previous != version:
            cur.execute("UPDATE model_versions SET status = 'retired' WHERE version = ? AND status <> 'base'",
                        [previous])
        cur.execute("UPDATE model_versions SET status = 'active' WHERE version = ? AND status <> 'base'", [version])


def rollback(store: Store, index: VectorIndex, embedder_of: Callable[[str], Embedder], to: str | None = None,
             progress: Progress | None = None) -> str:
    """Switch back to a kept (retired) collection: the one active before, or model version `to`'s.

    The collection is first brought in line with the corpus (passages ingested since it was
    active are embedded, removed ones deleted) and verified (count and canaries); when that
    fails, nothing switches.

    Args:
        embedder_of: the embedder of a model version (e.g. `Workspace.embedder`).

    Returns:
        The collection now active.

    Raises:
        VectorIndexError: nothing is kept to roll back to, `to` has no kept collection or is
            already active, or the kept collection fails verification.
    """
    present = set(index.collections())
    kept = [r for r in store.rows(
        "SELECT collection, model_version FROM index_versions WHERE status = 'retired' "
        "ORDER BY activated_at DESC NULLS LAST"
    ) if r["collection"] in present]
    if to is None:
        if not kept:
            raise VectorIndexError("Nothing to roll back to: no earlier index is kept.")
        target = kept[0]
    else:
        if to == store.pointer(ACTIVE_MODEL):
            raise VectorIndexError(f"Model {to!r} is already active; nothing to roll back.")
        target = next((r for r in kept if r["model_version"] == to), None)
        if target is None:
            versions = ", ".join(dict.fromkeys(r["model_version"] for r in kept)) or "none"
            raise VectorIndexError(
                f"There is no kept index for model {to!r}. Versions you can roll back to: {versions}."
            )
    _sync(store, index, target["collection"], embedder_of(target["model_version"]), progress)
    return target["collection"]


def widen_search(store: Store, index: VectorIndex) -> list[str]:
    """The workspace's collections that a search can reach (active, kept for rollback, verified)
    searched as breadth `EF_SEARCH`: those created with less are raised in place; returns them."""
    names = [r["collection"] for r in store.rows(
        "SELECT collection FROM index_versions WHERE status IN ('active', 'retired', 'verified') ORDER BY collection"
    )]
    return index.widen_search(names)


def sync(store: Store, index: VectorIndex, embedder: Embedder, progress: Progress | None = None) -> int:
    """Make the collection of `embedder`'s model hold exactly the corpus's passages, verify it, and
    make it active; returns vectors written.

    Creates the collection when it is missing (first start, or a lost/corrupted Chroma folder:
    it is rebuilt from DuckDB for the active model).
    """
    return _sync(store, index, collection_for(store, embedder.version), embedder, progress)


def _sync(store: Store, index: VectorIndex, name: str, embedder: Embedder, progress: Progress | None) -> int:
    if name not in index.collections():
        index.create(name, embedder.version, embedder.dim)
        # Keep the row (and its 'active' status) of a collection that is being rebuilt after
        # Chroma lost it: the active pointer still names it, and a later switch must retire it.
        store.execute(
            "INSERT INTO index_versions (collection, model_version, status, count) VALUES (?, ?, 'building', 0) "
            "ON CONFLICT (collection) DO UPDATE SET model_version = excluded.model_version, count = 0, "
            "status = CASE WHEN index_versions.status = 'active' THEN 'active' ELSE 'building' END",
            [name, embedder.version],
        )
    elif index.model_version(name) != embedder.version:
        raise VectorIndexError(f"Collection {name} was built by another model; refusing to mix versions.")
    want = set(store.passage_ids())
    have = index.ids(name)
    missing = sorted(want - have)
    extra = sorted(have - want)
    if extra:
        index.delete(name, extra)
    texts = store.passages(missing)
    _embed_and_write(index, name, embedder, missing, [texts[i] for i in missing], progress)
    verify(store, index, name, embedder)
    store.execute(
        "UPDATE index_versions SET count = ?, "
        "status = CASE WHEN status = 'active' THEN 'active' ELSE 'verified' END WHERE collection = ?",
        [len(want), name],
    )
    if store.pointer(ACTIVE_INDEX) != name:
        activate(store, name)
    return len(missing)


def search(store: Store, index: VectorIndex, embedder: Embedder, queries: list[str], k: int = 10,
           collection: str | None = None) -> list[list[SearchHit]]:
    """Top-k passages for each query: of the active index, embedded by the active model, or of
    `collection`, embedded by the embedder of that collection's model (the index refuses a mix)."""
    name = collection or store.pointer(ACTIVE_INDEX)
    if not name:
        raise VectorIndexError("There is no active index yet: ingest documents first (`embedloop ingest PATH`).")
    try:
        hits = index.search(name, embedder.encode(queries), embedder.version, k=k)
    except VectorIndexError as e:
        if name in index.collections():
            raise
        raise VectorIndexError(
            f"The active index {name} is missing from the Chroma index at {index.location} (a lost or reset "
            f"folder?). Rebuild it from DuckDB with `embedloop init` (Workspace.ensure_index())."
        ) from e
    docs = store.docs_of_passages(sorted({pid for h in hits for pid, _, _ in h}))
    return [
        [SearchHit(passage_id=pid, score=round(float(s), 6), text=t, doc_ids=docs.get(pid, [])) for pid, s, t in h]
        for h in hits
    ]


