"""The workspace: one owner of its DuckDB file and Chroma index, and the entry point that the
CLI and the app share. `Workspace.open()` takes the single-writer lock and applies migrations.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from loop import indexing
from loop.config import CONFIG_FILE, Settings, load_settings
from loop.embed import ONNX_CACHE_ENV, Embedder, model_hash
from loop.errors import ConfigError, InputError, NotFoundError, VectorIndexError
from loop.ingest import hf_offsets, import_pairs, import_queries, prefixed, store_documents
from loop.lexical import Lexical, interleave
from loop.readers import Fields, is_plain_folder, read_documents
from loop.records import Document, IngestReport, RoundRecord, SearchHit
from storage.db import Store
from storage.index import VectorIndex

log = logging.getLogger("embedloop.workspace")

_CONFIG_TEMPLATE = """\
# embedloop workspace settings. Environment variables EMBEDLOOP_<NAME> override these.
# base_model = "/path/to/a/local/sentence-transformers/model"   # empty: bundled all-MiniLM-L6-v2
# chroma_url = "http://127.0.0.1:8000"                          # empty: embedded Chroma in ./chroma
# max_file_mb = 200
# chunk_tokens = 0          # 0: the model's max sequence length
# chunk_overlap = 32
# llm_base_url = "http://127.0.0.1:8080/v1"   # any OpenAI-compatible endpoint; the key: never here, set
#                                             # OPENAI_API_KEY (or EMBEDLOOP_LLM_API_KEY) in the environment
# llm_model = "gpt-4o-mini"
#
# [loop]                    # round settings (loop.rounds.LoopConfig)
# review_budget = 200       # cards queued for review per round
# domain = "contracts read by in-house lawyers"   # for the LLM prompt
# [loop.train]              # training overrides (loop.train.TrainConfig)
# epochs = 3
"""


class Workspace:
    """Open with `Workspace.open(path)`; close when done (or use as a context manager)."""

    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self._embedders: dict[str, Embedder] = {}
        self._embedders_lock = threading.Lock()  # a job and a page may ask at once
        self.index_recovery: str | None = None  # set when a damaged Chroma folder was rebuilt
        self._lexical: tuple[tuple, Lexical] | None = None  # (the passages' signature, BM25 over them)
        self._lexical_lock = threading.Lock()

    @classmethod
    def open(cls, workspace: str | Path | None = None, **overrides: Any) -> Workspace:
        settings = load_settings(workspace, **overrides)
        settings.workspace.mkdir(parents=True, exist_ok=True)
        cfg = settings.workspace / CONFIG_FILE
        if not cfg.exists():
            cfg.write_text(_CONFIG_TEMPLATE, encoding="utf-8")
        ws = cls(settings, Store.open(settings.db_path))
        try:
            ws._register_base_model()
        except Exception:
            ws.close()
            raise
        return ws

    def close(self) -> None:
        if "index" in self.__dict__:  # opened lazily
            self.index.close()
            del self.__dict__["index"]
        self.store.close()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Models ------------------------------------------------------------------------------
    def _register_base_model(self) -> None:
        path = self.settings.base_model_path.resolve()
        if not path.is_dir():
            raise ConfigError(f"base_model {path} is not a folder; point it at a local sentence-transformers model.")
        known = self.store.rows("SELECT version FROM model_versions WHERE path = ? AND parent IS NULL", [str(path)])
        if known:
            version = known[0]["version"]
        else:
            digest = model_hash(path)
            version = f"base-{digest[:10]}"
            self.store.execute(
                "INSERT OR IGNORE INTO model_versions (version, path, sha256, status) VALUES (?, ?, ?, 'base')",
                [version, str(path), digest],
            )
        if not self.store.pointer(indexing.ACTIVE_MODEL):
            self.store.set_pointer(indexing.ACTIVE_MODEL, version)
        self.base_version = version

    def embedder(self, version: str | None = None) -> Embedder:
        """The embedder of a model version (default: the active one), loaded once per process."""
        version = version or self.active_model
        with self._embedders_lock:
            return self._embedder(version)

    def _embedder(self, version: str) -> Embedder:
        if version not in self._embedders:
            rows = self.store.rows("SELECT path FROM model_versions WHERE version = ?", [version])
            if not rows:
                raise ConfigError(f"Unknown model version {version!r}.")
            self._embedders[version] = Embedder(
                rows[0]["path"], version, self.settings.device, self.settings.encode_batch_size,
                backend=self.settings.encode_backend,
                cache_dir=os.environ.get(ONNX_CACHE_ENV) or self.settings.workspace / "onnx",
            )
        return self._embedders[version]

    @property
    def active_model(self) -> str:
        return self.store.pointer(indexing.ACTIVE_MODEL) or self.base_version

    @cached_property
    def index(self) -> VectorIndex:
        """The Chroma index, opened on first use. A damaged embedded index is detected here, moved
        aside (`chroma.corrupt-<timestamp>`) and rebuilt from DuckDB for the active model.
        Collections created before `storage.index.EF_SEARCH` was raised get its search breadth."""
        index = self._open_index()
        try:
            widened = indexing.widen_search(self.store, index)
        except VectorIndexError as e:  # searches still work, at the breadth the collection has
            log.warning("%s", e)
        else:
            if widened:
                log.info("Raised the search breadth of %s to the current default.", ", ".join(widened))
        return index

    def _open_index(self) -> VectorIndex:
        s = self.settings
        if s.chroma_url:
            return VectorIndex(url=s.chroma_url)
        active = self.store.pointer(indexing.ACTIVE_INDEX)
        index, moved, problem = VectorIndex.open_embedded(s.chroma_path, probe=[active] if active else [])
        if moved is not None:
            self.index_recovery = (
                f"{problem}. It was moved to {moved} and the index is being rebuilt from DuckDB for "
                f"model {self.active_model}; earlier index versions are not kept for rollback."
            )
            log.warning("%s", self.index_recovery)
            self.__dict__["index"] = index  # so the rebuild (and anything it calls) sees this one
            try:
                indexing.sync(self.store, index, self.embedder())
            except BaseException:
                del self.__dict__["index"]
                index.close()
                raise
        return index

    # Ingestion ---------------------------------------------------------------------------
    def _chunk_args(self) -> tuple[Any, int, int]:
        emb = self.embedder()
        limit = emb.max_seq_length - 2  # room for [CLS] and [SEP]
        max_tokens = min(self.settings.chunk_tokens or limit, limit)
        return hf_offsets(emb.tokenizer), max_tokens, self.settings.chunk_overlap

    @property
    def max_bytes(self) -> int:
        return int(self.settings.max_file_mb * 2**20)

    def add_documents(self, docs: list[Document], label: str, progress: indexing.Progress | None = None,
                      old_ids: dict[str, str] | None = None) -> IngestReport:
        tokenize, max_tokens, overlap = self._chunk_args()
        report, _removed = store_documents(self.store, docs, tokenize, max_tokens, overlap, label, old_ids)
        written = indexing.sync(self.store, self.index, self.embedder(), progress)
        return report.model_copy(update={"indexed": written})

    def ingest(self, paths: Sequence[str | Path], fields: Fields = Fields(),
               progress: indexing.Progress | None = None) -> list[IngestReport]:
        """Ingest each path (file, folder or BEIR folder) in its own transaction, then index.

        All paths are read and validated before anything is written, so one bad file leaves
        the workspace unchanged. A plain folder's documents are named `<folder>/<path inside
        it>` (`ingest.folder_prefix`); a single file by its name; a .jsonl/.csv/BEIR record by its id.
        """
        if not paths:
            raise InputError("nothing to ingest: give at least one file or folder")
        loaded = [(p, read_documents(p, fields, self.max_bytes)) for p in paths]
        reports = []
        for p, docs in loaded:
            old_ids = None
            if is_plain_folder(p):  # prefixed here, after the paths before it are stored
                docs, old_ids = prefixed(self.store, Path(p), docs)
            reports.append(self.add_documents(docs, str(p), progress, old_ids))
        return reports

    def import_pairs(self, path: str | Path, **kw: Any) -> IngestReport:
        return import_pairs(self.store, path, max_bytes=self.max_bytes, **kw)

    def import_queries(self, path: str | Path, **kw: Any) -> IngestReport:
        return import_queries(self.store, path, max_bytes=self.max_bytes, **kw)

    def ensure_index(self, progress: indexing.Progress | None = None) -> int:
        """Bring the active index in line with the corpus (rebuilds a lost Chroma folder)."""
        return indexing.sync(self.store, self.index, self.embedder(), progress)

    def llm(self, endpoint: dict[str, Any] | None = None, api_key: str | None = None, **overrides: Any):
        """The LLM client, or None when there is no endpoint and no key (the offline generator is used).

        The one place an LLM client is built: the CLI, the rounds and the app all get theirs here.

        Args:
            endpoint: base_url, model, concurrency, requests_per_minute to use instead of the
                settings' (the app's Generate page tries and saves endpoints this way).
            api_key: a key from elsewhere (Streamlit secrets), used when the settings hold none.
            **overrides: passed to `LLMSettings` (e.g. a short timeout for a connection test).
        """
        from loop.llm import LLMClient, LLMSettings
        from storage.llm_cache import LLMCache

        s = self.settings
        if s.llm_api_key is not None and s.llm_api_key.get_secret_value():
            api_key = s.llm_api_key.get_secret_value()
        ep = endpoint if endpoint is not None else {
            "base_url": s.llm_base_url, "model": s.llm_model, "concurrency": s.llm_concurrency,
            "requests_per_minute": s.llm_requests_per_minute}
        if not (ep["base_url"] or api_key):
            return None
        limits = {k: ep[k] for k in ("concurrency", "requests_per_minute") if ep.get(k) is not None}
        settings = LLMSettings(base_url=ep["base_url"], model=ep["model"] or "gpt-4o-mini", api_key=api_key or None,
                               **{**limits, **overrides})
        return LLMClient(settings, LLMCache(self.store))

    # Training runs (a run folder's files, written by the trainer: see loop.train) ----------------
    @staticmethod
    def training_progress(run_dir: str | Path) -> list[dict[str, Any]]:
        """The trainer's progress events so far (start, step, log, checkpoint, end ...)."""
        from loop import train

        return train.read_progress(run_dir)

    @staticmethod
    def training_result(run_dir: str | Path) -> dict[str, Any] | None:
        """The finished run's result.json, or None while it runs (or when it died without one)."""
        from loop import train

        return train.read_result(run_dir)

    @staticmethod
    def stop_training(run_dir: str | Path) -> None:
        """Ask the trainer to stop at its next step; it keeps its best checkpoint."""
        from loop import train

        train.request_stop(run_dir)

    def encode_speed(self, sample: int = 64) -> float:
        """Passages per second the active model encodes here, measured on a sample of the corpus."""
        import time

        texts = [t for (t,) in self.store.execute(
            f"SELECT text FROM passages USING SAMPLE reservoir({int(sample)} ROWS) REPEATABLE (0)"
        ).fetchall()]
        if not texts:
            return float("nan")
        emb = self.embedder()
        emb.encode(texts[:2])  # load and warm up outside the timing
        t0 = time.perf_counter()
        emb.encode(texts)
        return len(texts) / max(time.perf_counter() - t0, 1e-9)

    # Queries -----------------------------------------------------------------------------
    def search(self, query: str, k: int = 10, version: str | None = None) -> list[SearchHit]:
        """Top-k passages for `query`: by the active model on the active index, or by model `version`
        on its own kept collection (NotFoundError when that collection is not kept)."""
        if not query.strip():
            raise InputError("the query is empty")
        if not 1 <= k <= 1000:
            raise InputError("k must be between 1 and 1000")
        if version is None or version == self.active_model:
            return indexing.search(self.store, self.index, self.embedder(), [query], k)[0]
        name = indexing.collection_for(self.store, version)
        if name not in self.index.collections():
            raise NotFoundError(f"The collection of {version} is not kept in this index, so it cannot be searched.")
        return indexing.search(self.store, self.index, self.embedder(version), [query], k, collection=name)[0]

    def lexical(self) -> Lexical:
        """BM25 over the workspace's passages, built once per process and again when they change."""
        sig = self.store.execute("SELECT count(*), coalesce(sum(hash(passage_id)), 0) FROM passages").fetchone()
        with self._lexical_lock:
            if self._lexical is None or self._lexical[0] != sig:
                rows = self.store.execute("SELECT passage_id, text FROM passages ORDER BY passage_id").fetchall()
                self._lexical = (sig, Lexical([r[0] for r in rows], [r[1] for r in rows]))
            return self._lexical[1]

    def review_pool(self, queries: list[str], k: int, pool: str = "interleaved") -> list[list[SearchHit]]:
        """The passages a card of each query shows (`LoopConfig.review_pool`): the active model's
        top `k` ("model"), or that ranking interleaved with BM25's ("interleaved", the model first:
        a reviewer can mark an answer the model misses, `loop.lexical`)."""
        if pool not in ("interleaved", "model"):
            raise InputError(f"review_pool must be 'interleaved' or 'model', not {pool!r}")
        if not queries:
            return []
        dense = indexing.search(self.store, self.index, self.embedder(), queries, k)
        if pool == "model":
            return dense
        lexical = self.lexical().scored(queries, k)
        ids = sorted({pid for row in lexical for pid, _ in row})
        docs, texts = self.store.docs_of_passages(ids), self.store.passages(ids)
        out = []
        for hits, row in zip(dense, lexical, strict=True):
            by_id = {h.passage_id: h for h in hits}
            for pid, score in row:
                by_id.setdefault(pid, SearchHit(passage_id=pid, score=round(score, 6), text=texts[pid],
                                                doc_ids=docs.get(pid, []), found_by="bm25"))
            out.append([by_id[pid] for pid in interleave([[h.passage_id for h in hits], [p for p, _ in row]], k)])
        return out

    def rounds(self) -> list[RoundRecord]:
        """Every round, oldest first, as typed records."""
        return [RoundRecord.from_row(r) for r in self.store.rounds()]

    def status(self) -> dict[str, Any]:
        counts = self.store.counts()
        active_index = self.store.pointer(indexing.ACTIVE_INDEX)
        index_info: dict[str, Any] | None = None
        if active_index:
            row = self.store.rows(
                "SELECT collection, model_version, status, count FROM index_versions WHERE collection = ?",
                [active_index],
            )
            index_info = row[0] if row else {"collection": active_index}
            try:  # what the index really holds, not what DuckDB recorded
                index_info["count"] = self.index.count(active_index)
            except VectorIndexError as e:
                index_info.update(count=None, problem=str(e))
        model = self.store.rows(
            "SELECT version, path, status, parent, round FROM model_versions WHERE version = ?", [self.active_model]
        )
        rounds = []
        for r in self.rounds():
            m = r.manifest
            entry: dict[str, Any] = {"round": r.round, "state": r.state, "error": r.error}
            if m.metrics and m.vs_base:
                entry["ndcg@10"] = {k: m.metrics[k]["ndcg@10"] for k in ("base", "active", "candidate")}
                entry["vs_base"] = {k: m.vs_base[k] for k in ("delta", "ci_low", "ci_high")}
            if m.promotion:
                entry["promoted"] = m.promotion.promote
                if m.promotion.resolution:
                    entry["resolution"] = m.promotion.resolution
            if m.model:
                entry["model"] = m.model.version
            rounds.append(entry)
        return {
            "workspace": str(self.settings.workspace.resolve()),
            **counts,
            "active_model": model[0] if model else {"version": self.active_model},
            "active_index": index_info,
            "chroma": self.settings.chroma_url or str(self.settings.chroma_path),
            "rounds": rounds,
        }
