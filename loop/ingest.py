"""Documents -> passages, and labelled pairs / query logs into the store.

The files are read by loop/readers.py (pure readers); this module chunks and writes.

Every import of one PATH is one transaction: a bad record anywhere means a clear `InputError`
naming the file and line, and nothing of that path is imported. Re-importing the same data
changes nothing (documents, passages, pairs and queries are keyed by id or content hash).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from loop.errors import InputError, validation_problems
from loop.pair_status import ACCEPTED
from loop.readers import is_beir, iter_csv, iter_jsonl, read_beir_queries, read_qrels, read_queries
from loop.records import Document, IngestReport, Pair, PairIn, content_hash
from storage.db import Store


# Folder document ids -------------------------------------------------------------------------
def folder_prefix(store: Store, folder: Path) -> str:
    """The id prefix of a folder's documents, unique per folder in the workspace.

    `read_documents` names a folder's documents by their path inside it; they are stored as
    `<prefix>/<that path>`, so `x/a.txt` and `y/a.txt` are two documents. The prefix is the
    folder's name, or `<name>~2`, `<name>~3`, ... when a folder of the same name elsewhere (told
    apart by the stored absolute sources) holds the name already. The same folder always gets
    the same prefix, so re-ingesting it changes nothing.
    """
    root = folder.resolve()
    name = root.name or "root"
    for n in range(1, 10_000):
        prefix = name if n == 1 else f"{name}~{n}"
        source = store.scalar("SELECT any_value(source) FROM documents WHERE starts_with(doc_id, ?)", [prefix + "/"])
        if source is None or Path(source).is_relative_to(root):
            return prefix
    raise InputError(f"too many different folders named {name!r} in this workspace", folder)


def prefixed(store: Store, folder: Path, docs: list[Document]) -> tuple[list[Document], dict[str, str]]:
    """A plain folder's documents with their stored ids, and {stored id: id without the prefix}
    (the id such a document had before prefixes: `store_documents` adopts those rows)."""
    prefix = folder_prefix(store, folder)
    named = [d.model_copy(update={"doc_id": f"{prefix}/{d.doc_id}"}) for d in docs]
    return named, {n.doc_id: d.doc_id for n, d in zip(named, docs, strict=True)}


# Chunking ----------------------------------------------------------------------------------
_SENTENCE_END = (".", "!", "?", ";", ":", "\n")


def chunk_text(text: str, tokenize: Callable[[str], list[tuple[int, int]]], max_tokens: int, overlap: int) -> list[tuple[str, int]]:
    """Split `text` into (chunk, n_tokens) windows of at most `max_tokens` tokens.

    Consecutive windows share `overlap` tokens; a window ends at a sentence end in its last
    quarter when there is one, so passages rarely stop mid-sentence.

    Args:
        tokenize: text -> character offsets (start, end) of each token, no special tokens.
    """
    if max_tokens <= 0:
        raise ValueError("max_tokens must be positive")
    overlap = min(overlap, max_tokens // 2)
    offsets = tokenize(text)
    if len(offsets) <= max_tokens:
        return [(text, len(offsets))] if text.strip() else []
    chunks: list[tuple[str, int]] = []
    start = 0
    while start < len(offsets):
        end = min(start + max_tokens, len(offsets))
        if end < len(offsets):
            for j in range(end - 1, start + (3 * max_tokens) // 4, -1):
                tail = text[offsets[j][1] - 1 : offsets[j][1]] if offsets[j][1] else ""
                after = text[offsets[j][1] : offsets[j][1] + 1]
                if tail in _SENTENCE_END and (not after or after.isspace()):
                    end = j + 1
                    break
        piece = text[offsets[start][0] : offsets[end - 1][1]].strip()
        if piece:
            chunks.append((piece, end - start))
        if end >= len(offsets):
            break
        start = max(end - overlap, start + 1)
    return chunks


def hf_offsets(tokenizer: Any) -> Callable[[str], list[tuple[int, int]]]:
    """A `tokenize` function for `chunk_text` from a Hugging Face fast tokenizer."""

    def tokenize(text: str) -> list[tuple[int, int]]:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False)
        return [tuple(o) for o in enc["offset_mapping"]]

    return tokenize


# Storing documents ---------------------------------------------------------------------------
def _adoptable(store: Store, docs: list[Document], old_ids: dict[str, str],
               existing: dict[str, str]) -> dict[str, str]:
    """{new id: old id} of rows stored under an earlier id of the same document: the same file
    (the old source, resolved against the current folder when relative) or the same content."""
    wanted = {old_ids[d.doc_id] for d in docs if d.doc_id in old_ids and d.doc_id not in existing}
    wanted &= existing.keys()
    if not wanted:
        return {}
    sources = dict(store.execute("SELECT doc_id, source FROM documents WHERE doc_id IN (SELECT unnest(?::VARCHAR[]))",
                                 [sorted(wanted)]).fetchall())
    out = {}
    for d in docs:
        old = old_ids.get(d.doc_id)
        if old in sources and (Path(sources[old]).resolve() == Path(d.source).resolve()
                               or existing[old] == content_hash(d.full_text)):
            out[d.doc_id] = old
    return out


def store_documents(
    store: Store, docs: list[Document], tokenize: Callable[[str], list[tuple[int, int]]],
    max_tokens: int, overlap: int, path: str, old_ids: dict[str, str] | None = None,
) -> tuple[IngestReport, list[str]]:
    """Chunk and store `docs` in one transaction; unchanged documents are skipped.

    Args:
        old_ids: {doc id: the id the same document may be stored under from before} (a folder's
            documents before ids named their folder): such a row takes the new id instead of
            leaving a duplicate, and counts as unchanged when its content is.

    Returns:
        The report, and the ids of passages that no document uses any more (a changed
        document dropped them) and that were deleted — the caller removes them from the index.
    """
    existing = dict(store.execute("SELECT doc_id, content_hash FROM documents").fetchall())
    adopt = _adoptable(store, docs, old_ids or {}, existing)
    new_docs, changed_docs, renamed, unchanged = [], [], [], 0
    for d in docs:
        h = content_hash(d.full_text)
        old = existing.get(adopt.get(d.doc_id, d.doc_id))
        if old == h:
            unchanged += 1
            if d.doc_id in adopt:
                renamed.append((d, h))  # rewritten under its new id
        elif old is None:
            new_docs.append((d, h))
        else:
            changed_docs.append((d, h))
    doc_rows, map_rows, passage_rows = [], [], {}
    for d, h in new_docs + changed_docs + renamed:
        doc_rows.append({"doc_id": d.doc_id, "source": d.source or path, "title": d.title,
                         "content_hash": h, "n_chars": len(d.full_text)})
        for i, (chunk, n_tok) in enumerate(chunk_text(d.full_text, tokenize, max_tokens, overlap)):
            pid = content_hash(chunk)
            passage_rows.setdefault(pid, {"passage_id": pid, "text": chunk, "n_tokens": n_tok})
            map_rows.append({"doc_id": d.doc_id, "ordinal": i, "passage_id": pid})
    removed: list[str] = []
    with store.transaction() as cur:
        ids = [adopt.get(d.doc_id, d.doc_id) for d, _ in changed_docs + renamed]
        if ids:
            cur.execute("DELETE FROM documents WHERE doc_id IN (SELECT unnest(?::VARCHAR[]))", [ids])
            cur.execute("DELETE FROM doc_passages WHERE doc_id IN (SELECT unnest(?::VARCHAR[]))", [ids])
        Store.insert_ignore(cur, "documents", doc_rows)
        Store.insert_ignore(cur, "doc_passages", map_rows)
        added = Store.insert_ignore(cur, "passages", list(passage_rows.values()))
        if changed_docs:
            # Passages no document maps to any more, and no pair refers to, leave the corpus.
            removed = [r[0] for r in cur.execute(
                "SELECT passage_id FROM passages p WHERE NOT EXISTS "
                "(SELECT 1 FROM doc_passages m WHERE m.passage_id = p.passage_id) AND NOT EXISTS "
                "(SELECT 1 FROM pairs q WHERE q.positive_id = p.passage_id OR q.negative_id = p.passage_id)"
            ).fetchall()]
            if removed:
                cur.execute("DELETE FROM passages WHERE passage_id IN (SELECT unnest(?::VARCHAR[]))", [removed])
    report = IngestReport(
        path=path, documents_added=len(new_docs), documents_updated=len(changed_docs),
        documents_unchanged=unchanged, passages_added=added,
        documents_empty=sorted({d.doc_id for d, _ in new_docs + changed_docs} - {m["doc_id"] for m in map_rows}),
    )
    return report, removed


# Pairs and queries ---------------------------------------------------------------------------
class _EmptyDocument(Exception):
    """A pair names a document that has no text: the pair is skipped and counted."""


class _Resolver:
    """Turns a pair field into (passage id or None, text), by passage id, document id or text."""

    def __init__(self, store: Store, path: Path):
        self.store, self.path = store, path
        self._cache: dict[str, tuple[str, str] | None] = {}

    def lookup(self, ref: str, line: int) -> tuple[str, str] | None:
        if ref not in self._cache:
            hit = self.store.passages([ref])
            if hit:
                self._cache[ref] = (ref, hit[ref])
            else:
                doc = self._document(ref, line)
                first = self.store.first_passage_of_docs([doc]).get(doc) if doc else None
                self._cache[ref] = (first, self.store.passages([first])[first]) if first else None
        return self._cache[ref]

    def _document(self, ref: str, line: int) -> str | None:
        """A document id, or a folder document's path inside its folder (its id before ids
        named their folder: `a.txt` for `docs/a.txt`) when exactly one folder has it."""
        if self.store.scalar("SELECT count(*) FROM documents WHERE doc_id = ?", [ref]):
            return ref
        ids = [d for (d,) in self.store.execute(
            "SELECT doc_id FROM documents WHERE ends_with(doc_id, ?) ORDER BY doc_id", ["/" + ref]).fetchall()
            if "/" not in d[: -len(ref) - 1]]
        if len(ids) > 1:
            raise InputError(f"{ref!r} names a document in several folders ({', '.join(ids[:5])}); "
                             "use the full document id", self.path, line)
        return ids[0] if ids else None

    def resolve(self, value: str | None, explicit_id: str | None, name: str, line: int) -> tuple[str | None, str | None]:
        if explicit_id is not None:
            found = self.lookup(explicit_id.strip(), line)
            if found is None and self._document(explicit_id.strip(), line):
                raise _EmptyDocument(explicit_id)
            if found is None:
                raise InputError(
                    f"{name}_id {explicit_id!r} is neither a passage id nor a document id "
                    "(ingest the corpus first)", self.path, line,
                )
            return found
        if value is None:
            return None, None
        value = value.strip()
        if not value:
            raise InputError(f"{name} is empty", self.path, line)
        if len(value) <= 200 and " " not in value:
            found = self.lookup(value, line)
            if found is not None:
                return found
        # A text: link it to the corpus passage with the same content, when there is one.
        pid = content_hash(value)
        return (pid if self.store.passages([pid]) else None), value


def _pair_rows(
    store: Store, items: Iterable[tuple[int, dict[str, Any]]], path: Path, split: str, origin: str
) -> tuple[list[dict[str, Any]], int]:
    """Validated, resolved pair rows, and how many were skipped for naming a document without text."""
    resolver = _Resolver(store, path)
    rows: dict[str, dict[str, Any]] = {}
    empty = 0
    for line, rec in items:
        rec = {k: (None if v == "" else v) for k, v in rec.items() if k in PairIn.model_fields}
        if "score" in rec and rec["score"] is not None:
            try:
                rec["score"] = float(rec["score"])
            except (TypeError, ValueError):
                raise InputError(f"score {rec['score']!r} is not a number between 0 and 1", path, line) from None
        try:
            p = PairIn(**{k: (str(v) if k != "score" and v is not None else v) for k, v in rec.items()})
        except ValidationError as e:
            msg = validation_problems(e)
            raise InputError(msg, path, line) from None
        try:
            pos_id, pos_text = resolver.resolve(p.positive, p.positive_id, "positive", line)
            if pos_text is None:
                raise InputError("missing positive (text or passage id)", path, line)
            neg_id, neg_text = resolver.resolve(p.negative, p.negative_id, "negative", line)
        except _EmptyDocument:
            empty += 1
            continue
        if neg_text is not None and (neg_text == pos_text or (neg_id and neg_id == pos_id)):
            raise InputError("negative is the same passage as positive", path, line)
        pair_id = Pair.make_id(p.anchor, pos_text)
        rows.setdefault(pair_id, {
            "pair_id": pair_id, "anchor": p.anchor, "positive_id": pos_id, "positive_text": pos_text,
            "negative_id": neg_id, "negative_text": neg_text, "score": p.score, "source": "seed",
            "status": ACCEPTED, "split": split, "origin": origin,
        })
    if not rows:
        raise InputError("no pairs in this file" + (f" ({empty} name documents without text)" if empty else ""), path)
    return list(rows.values()), empty


def import_pairs(
    store: Store, path: str | Path, *, split: str = "train", limit: int | None = None,
    seed: int = 0, max_bytes: int = 200 * 2**20,
) -> IngestReport:
    """Import labelled pairs (JSONL, CSV or a BEIR folder's qrels) as accepted seed pairs.

    Args:
        split: train (may be trained on), eval or test (held out, never trained on).
        limit: import a random sample of at most this many pairs (seeded), e.g. for a budget.
    """
    path = Path(path)
    if split not in {"train", "eval", "test"}:
        raise InputError(f"split must be train, eval or test, not {split!r}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, not {limit}")
    if path.is_dir():
        if not is_beir(path):
            raise InputError("a folder of pairs must be a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)", path)
        queries = read_beir_queries(path, max_bytes)
        qsplit = {"train": "train", "eval": "dev", "test": "test"}[split]
        qrels_path = path / "qrels" / f"{qsplit}.tsv"
        items = []
        for n, qid, cid, _score in read_qrels(path, qsplit, max_bytes):
            if qid not in queries:
                raise InputError(f"query id {qid!r} is not in queries.jsonl", qrels_path, n)
            items.append((n, {"anchor": queries[qid], "positive_id": cid}))
        path = qrels_path
        origin = f"{path.parent.parent.name}/qrels/{qsplit}"
    elif path.suffix.lower() == ".jsonl":
        items, origin = list(iter_jsonl(path, max_bytes)), path.name
    elif path.suffix.lower() == ".csv":
        items, origin = list(iter_csv(path, max_bytes, ["anchor"])), path.name
    else:
        raise InputError("pairs must be a .jsonl or .csv file, or a BEIR folder", path)
    rows, empty = _pair_rows(store, items, path, split, origin)
    if limit is not None and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    with store.transaction() as cur:
        added = Store.insert_ignore(cur, "pairs", rows)
    return IngestReport(path=str(path), pairs_added=added, pairs_unchanged=len(rows) - added, pairs_skipped=empty)


def import_queries(store: Store, path: str | Path, *, split: str | None = None, max_bytes: int = 200 * 2**20) -> IngestReport:
    """Import unlabelled queries (a query log). Duplicates are ignored."""
    path = Path(path)
    queries = read_queries(path, max_bytes, split)
    rows = {qid: {"query_id": qid, "text": text, "source": path.name} for qid, text in queries}
    with store.transaction() as cur:
        added = Store.insert_ignore(cur, "queries", list(rows.values()))
    return IngestReport(path=str(path), queries_added=added)


def corpus_stats(store: Store) -> dict[str, Any]:
    """Documents and characters per source, and passage lengths in tokens."""
    sources = store.rows(
        "SELECT source, count(*) AS documents, sum(n_chars) AS characters FROM documents GROUP BY source ORDER BY source"
    )
    lengths = store.rows(
        "SELECT count(*) AS passages, min(n_tokens) AS min, avg(n_tokens) AS mean, "
        "quantile_cont(n_tokens, 0.5) AS median, max(n_tokens) AS max FROM passages"
    )[0]
    return {"sources": sources, "tokens": lengths}
