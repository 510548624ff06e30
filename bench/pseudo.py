"""Pseudo-label precision: would "BM25 and the model agree on the top document" label a query well?

    python -m bench.pseudo --data DIR [--split train] [--out FILE.json]

Issue 12 allows pseudo-labels for logged queries no one reviewed only if their precision,
measured on train qrels, justifies it. For every judged query of `--split` (train: never the
test split), the off-the-shelf model's top document and BM25's top document are found over the
whole corpus (one passage per document, as `evalset_from_beir` reads it); where they agree, the
agreed document would become the query's positive. Printed: coverage (the share of queries
that would get a label), precision (the share of those labels that the qrels judge relevant),
and for reference the precision of each system's top document alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from bench.common import emit, probe_args
from loop.config import bundled_model_path
from loop.embed import Embedder
from loop.evalsets import evalset_from_beir
from loop.lexical import Lexical
from loop.metrics import exact_search


def probe(folder: Path, split: str = "train") -> dict:
    evalset = evalset_from_beir(folder, split)
    docs = evalset.passage_ids
    emb = Embedder(bundled_model_path(), "base")
    q = np.asarray(emb.encode(list(evalset.queries)), dtype=np.float32)
    d = np.asarray(emb.encode(list(evalset.passages)), dtype=np.float32)
    dense_idx, dense_scores = exact_search(q, d, 2)
    bm_top = [row[0] if row else None for row in Lexical(docs, list(evalset.passages)).search(list(evalset.queries), 1)]
    dense_top = [docs[int(row[0])] for row in np.asarray(dense_idx)]
    margin = np.asarray(dense_scores)[:, 0] - np.asarray(dense_scores)[:, 1]
    rel = [evalset.qrels[qid] for qid in evalset.query_ids]
    hit = lambda tops: [rel[i].get(t, 0) > 0 for i, t in enumerate(tops)]  # noqa: E731
    dense_hit, bm_hit = hit(dense_top), hit(bm_top)
    agree = [a == b for a, b in zip(dense_top, bm_top, strict=True)]
    n = len(agree)

    def labelled(keep: list[bool]) -> dict:
        """The labels `keep` would give: share of queries, count, precision against the qrels."""
        hits = [h for h, k in zip(dense_hit, keep, strict=True) if k]
        return {"coverage": round(len(hits) / n, 4), "labels": len(hits),
                "precision": round(float(np.mean(hits)), 4) if hits else None}

    out = {"dataset": folder.name, "split": split, "queries": n,
           "dense_top1_precision": round(float(np.mean(dense_hit)), 4),
           "bm25_top1_precision": round(float(np.mean(bm_hit)), 4),
           "agree": labelled(agree)}
    # The same, keeping only agreements where the model's top document leads its second clearly.
    for cut in (0.02, 0.05):
        out[f"agree_margin_{cut:g}"] = labelled([a and m >= cut for a, m in zip(agree, margin, strict=True)])
    return out


def main(argv: list[str] | None = None) -> int:
    args = probe_args("python -m bench.pseudo", __doc__).parse_args(argv)
    return emit(probe(args.data, args.split), args.out)


if __name__ == "__main__":
    sys.exit(main())
