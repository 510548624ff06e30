"""Chroma: one collection per model version, supplied embeddings only.

Collections are created with `embedding_function=None`, so Chroma can never fall back to its
default embedding function (which would try to download a model); every write and query passes
vectors. Each collection records the model version that built it, and `search` refuses a query
embedded by another version. Which collection is active is DuckDB's business (`loop.indexing`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import chromadb
import numpy as np
from chromadb.config import Settings as ChromaSettings

from storage.errors import IndexMismatchError, VectorIndexError

log = logging.getLogger("embedloop.index")
MAX_HITS_PER_QUERY_CALL = 10_000  # query rows x k per Chroma call; SQLite allows 32,766 variables
# HNSW search breadth of every collection this project creates. Chroma's default (100) is not
# exact, and Chroma builds its graph with several threads, so two builds of the same vectors
# answered ~10% of scifact's queries with different top-20 lists (recall 0.994): the same round
# showed different cards. At 400: recall 0.9999, 4 of 1,109 lists differ, ~1 ms per query
# instead of ~0.5 (`python -m bench.ann`; bench/README, "Chroma's search breadth").
EF_SEARCH = 400


def collection_name(model_version: str, workspace_id: str) -> str:
    """Chroma-legal collection name for a workspace's model version: `passages.<workspace>.<version>`.

    The workspace id keeps workspaces that share one Chroma server apart. Callers take names
    from `loop.indexing.collection_for`, which also keeps the names already on record.
    """
    def safe(part: str, default: str) -> str:
        part = re.sub(r"[^a-zA-Z0-9._-]", "-", part)
        # Chroma also rejects two consecutive periods, and a name that does not end alphanumeric
        # (which truncation could leave behind).
        return re.sub(r"\.{2,}", ".", part).strip("-._") or default

    return f"passages.{safe(workspace_id, 'workspace')}.{safe(model_version, 'model')}"[:500].rstrip("-._")


class VectorIndex:
    """A Chroma client: embedded persistent (`path`) or a server (`url`)."""

    def __init__(self, path: str | Path | None = None, url: str | None = None):
        settings = ChromaSettings(anonymized_telemetry=False, allow_reset=False)
        try:
            if url:
                u = urlparse(url)
                self.client = chromadb.HttpClient(
                    host=u.hostname or "127.0.0.1",
                    port=u.port or (443 if u.scheme == "https" else 8000),
                    ssl=u.scheme == "https",
                    settings=settings,
                )
                self.client.heartbeat()
                self.location = url
            elif path is not None:
                Path(path).mkdir(parents=True, exist_ok=True)
                self.client = chromadb.PersistentClient(path=str(path), settings=settings)
                self.location = str(path)
            else:
                self.client = chromadb.EphemeralClient(settings=settings)
                self.location = ":memory:"
        except Exception as e:  # chromadb raises many types: connection, corrupt files, versions
            where = url or path or "memory"
            raise VectorIndexError(f"Cannot open the Chroma index at {where}: {e}") from e
        self._max_batch = max(1, min(5000, int(self.client.get_max_batch_size()) - 1))

    def close(self) -> None:
        """Release the client (chromadb keeps one system per folder per process until closed)."""
        close = getattr(self.client, "close", None)
        if close is not None:
            close()

    def check(self, names: Sequence[str] | None = None) -> None:
        """List the collections and read one record of each of `names` (default: all).

        Raises:
            VectorIndexError: Chroma's files are damaged (chromadb opens a folder whose segment
                files are garbage without complaint, and fails on the first read).
        """
        try:
            present = self.collections()
            for name in present if names is None else [n for n in names if n in present]:
                col = self.client.get_collection(name, embedding_function=None)
                col.count()
                col.get(limit=1, include=[])  # loads the vector segment: a damaged one fails here
        except Exception as e:  # chromadb's InternalError and friends, from the Rust bindings
            raise VectorIndexError(f"The Chroma index at {self.location} cannot be read: {e}") from e

    @classmethod
    def open_embedded(cls, path: str | Path, probe: Sequence[str] | None = None
                      ) -> tuple[VectorIndex, Path | None, str | None]:
        """Open the embedded index at `path`; a damaged folder is moved aside, a fresh one opened.

        `probe` names the collections to read once at open (default: all of them; reading one
        loads its vectors, so a caller with large kept-for-rollback collections names the active).

        Nothing is deleted: the damaged folder is renamed `<name>.corrupt-<timestamp>` next to it.
        The caller rebuilds the collections it needs from its own records (DuckDB).

        Returns:
            The index, the folder the damaged index was moved to (None when it was sound), and
            what was wrong with it.
        """
        path = Path(path)
        try:
            index = cls(path=path)
        except VectorIndexError as e:
            problem = str(e)
            _forget_system(path)  # chromadb caches the half-started system by folder
        else:
            try:
                index.check(probe)
                return index, None, None
            except VectorIndexError as e:
                problem = str(e)
                index.close()
        if not path.is_dir() or not any(path.iterdir()):
            raise VectorIndexError(problem)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = path.with_name(f"{path.name}.corrupt-{stamp}")
        n = 1
        while moved.exists():
            moved = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
            n += 1
        path.rename(moved)
        log.info("%s. Moved it to %s; a new index is built in its place.", problem, moved)
        return cls(path=path), moved, problem

    # Collections -------------------------------------------------------------------------
    def collections(self) -> list[str]:
        return sorted(c.name if hasattr(c, "name") else str(c) for c in self.client.list_collections())

    def _get(self, name: str):
        try:
            return self.client.get_collection(name, embedding_function=None)
        except Exception as e:
            raise VectorIndexError(f"The Chroma collection {name!r} does not exist at {self.location}.") from e

    def create(self, name: str, model_version: str, dim: int, *, ef_search: int = EF_SEARCH) -> None:
        """Create an empty collection for `model_version`, replacing a leftover of the same name.

        `ef_search` is the HNSW search breadth; only `bench.ann` sets another one, to measure it."""
        if name in self.collections():
            self.client.delete_collection(name)
        self.client.create_collection(
            name,
            embedding_function=None,
            configuration={"hnsw": {"space": "cosine", "ef_search": ef_search}},
            metadata={"model_version": model_version, "dim": dim},
        )

    def widen_search(self, names: Sequence[str], ef_search: int = EF_SEARCH) -> list[str]:
        """Raise the HNSW search breadth of each of `names` that Chroma holds with less than
        `ef_search` (collections created before `EF_SEARCH` was raised); returns those changed.

        The breadth is a search setting: Chroma changes it in place and keeps the vectors."""
        present = set(self.collections())
        changed = []
        for name in names:
            if name not in present:
                continue
            col = self._get(name)
            hnsw = (col.configuration or {}).get("hnsw") or {}
            if hnsw.get("ef_search", ef_search) < ef_search:
                try:
                    col.modify(configuration={"hnsw": {"ef_search": ef_search}})
                except Exception as e:  # chromadb's errors, from the Rust bindings or the server
                    raise VectorIndexError(f"Could not raise the search breadth of {name!r} at {self.location}: {e}") from e
                changed.append(name)
        return changed

    def drop(self, name: str) -> None:
        if name in self.collections():
            self.client.delete_collection(name)

    def model_version(self, name: str) -> str:
        return str((self._get(name).metadata or {}).get("model_version", ""))

    def count(self, name: str) -> int:
        return int(self._get(name).count())

    def ids(self, name: str) -> set[str]:
        col = self._get(name)
        out: set[str] = set()
        offset = 0
        while True:
            got = col.get(include=[], limit=self._max_batch, offset=offset)
            out.update(got["ids"])
            if len(got["ids"]) < self._max_batch:
                return out
            offset += self._max_batch

    def embeddings(self, name: str, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of `ids`, in that order.

        Raises:
            VectorIndexError: some ids are not in the collection.
        """
        col = self._get(name)
        ids = list(ids)
        found: dict[str, np.ndarray] = {}
        for s in self.batches(len(ids)):
            got = col.get(ids=ids[s], include=["embeddings"])
            found.update(zip(got["ids"], np.asarray(got["embeddings"], dtype=np.float32), strict=True))
        missing = len(ids) - len(found)
        if missing:
            raise VectorIndexError(f"{missing} of {len(ids)} passages have no vector in {name}.")
        return np.stack([found[i] for i in ids]) if ids else np.zeros((0, 0), dtype=np.float32)

    # Writes ------------------------------------------------------------------------------
    def batches(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self._max_batch):
            yield slice(start, min(n, start + self._max_batch))

    def upsert(self, name: str, ids: Sequence[str], embeddings: np.ndarray, documents: Sequence[str]) -> None:
        """Write vectors in batches below the server's max batch size."""
        if len(ids) != len(embeddings) or len(ids) != len(documents):
            raise ValueError("ids, embeddings and documents must have the same length")
        col = self._get(name)
        emb = np.asarray(embeddings, dtype=np.float32)
        for s in self.batches(len(ids)):
            col.upsert(ids=list(ids[s]), embeddings=emb[s], documents=list(documents[s]))

    def delete(self, name: str, ids: Sequence[str]) -> None:
        col = self._get(name)
        ids = list(ids)
        for s in self.batches(len(ids)):
            col.delete(ids=ids[s])

    # Reads -------------------------------------------------------------------------------
    def search(
        self, name: str, query_embeddings: np.ndarray, query_model_version: str, k: int = 10
    ) -> list[list[tuple[str, float, str]]]:
        """Top-k (passage id, cosine similarity, text) per query.

        Raises:
            IndexMismatchError: the collection was built by another model version.
        """
        built_by = self.model_version(name)
        if built_by != query_model_version:
            raise IndexMismatchError(query_model_version, built_by)
        col = self._get(name)
        n = col.count()
        if n == 0:
            return [[] for _ in range(len(query_embeddings))]
        k = min(k, n)
        q = np.asarray(query_embeddings, dtype=np.float32)
        out: list[list[tuple[str, float, str]]] = []
        # Chroma fetches the documents of all hits in one SQLite statement: many queries x k
        # overflow its variable limit (32,766), e.g. a query log of 2,000+ lines at k = 20.
        step = max(1, MAX_HITS_PER_QUERY_CALL // k)
        for s in range(0, len(q), step):
            res: dict[str, Any] = col.query(query_embeddings=q[s : s + step], n_results=k,
                                            include=["distances", "documents"])
            out.extend(
                [(pid, 1.0 - float(d), doc or "") for pid, d, doc in zip(ids, dists, docs, strict=True)]
                for ids, dists, docs in zip(res["ids"], res["distances"], res["documents"], strict=True)
            )
        return out


def _forget_system(path: Path) -> None:
    """Drop chromadb's cached client system for `path` after it failed to start.

    chromadb registers a folder's system before starting it and keeps it when the start fails,
    so every later client for that folder (even a fresh one) would reuse the broken system.
    """
    try:
        from chromadb.api.shared_system_client import SharedSystemClient

        SharedSystemClient._identifier_to_system.pop(str(path), None)
        SharedSystemClient._identifier_to_refcount.pop(str(path), None)
    except (ImportError, AttributeError):  # another chromadb layout: nothing cached to drop
        pass
