"""The review pool: how many judged queries would a reviewer be able to verify?

    python -m bench.pool --data DIR [--split train] [--k 10] [--out FILE.json]

A card of a logged query shows `k` passages (its own, the active model's top passage, and
`REVIEW_SHOWN` more); the reviewer can only mark an answer that is shown. For every judged query
of `--split` (train when tuning: never test), over the whole corpus (one passage per document,
as `evalset_from_beir` reads it), this compares two pools of `k`: the off-the-shelf model's top
`k` alone, and that ranking interleaved with BM25's (`loop.lexical.interleave`, the model first).
Printed per pool: coverage (share of queries with a relevant document shown: queries a reviewer
can verify), relevant documents shown per query, and the share of queries whose only shown
answers lie outside the model's top `k` (the ones that teach the model something it misses).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from bench.common import emit, probe_args
from loop.config import bundled_model_path
from loop.embed import Embedder
from loop.evalsets import evalset_from_beir
from loop.lexical import Lexical, interleave
from loop.metrics import exact_search
from loop.review import REVIEW_SHOWN


def probe(folder: Path, split: str = "train", k: int = REVIEW_SHOWN + 1) -> dict:
    evalset = evalset_from_beir(folder, split)
    docs = list(evalset.passage_ids)
    emb = Embedder(bundled_model_path(), "base")
    q = np.asarray(emb.encode(list(evalset.queries)), dtype=np.float32)
    d = np.asarray(emb.encode(list(evalset.passages)), dtype=np.float32)
    dense_idx, _ = exact_search(q, d, k)
    dense = [[docs[int(j)] for j in row] for row in np.asarray(dense_idx)]
    lexical = Lexical(docs, list(evalset.passages)).search(list(evalset.queries), k)
    hybrid = [interleave([a, b], k) for a, b in zip(dense, lexical, strict=True)]
    rel = [{d for d, g in evalset.qrels[qid].items() if g > 0} for qid in evalset.query_ids]
    n = len(rel)

    def pool_figures(pools: list[list[str]]) -> dict:
        found = [len(set(p) & r) for p, r in zip(pools, rel, strict=True)]
        only_outside = [bool(set(p) & r) and not (set(dn) & r) for p, dn, r in zip(pools, dense, rel, strict=True)]
        return {"coverage": round(float(np.mean([f > 0 for f in found])), 4),
                "relevant_shown_per_query": round(float(np.mean(found)), 4),
                "queries_only_outside_model_top": round(float(np.mean(only_outside)), 4)}

    return {"dataset": folder.name, "split": split, "queries": n, "k": k,
            "model": pool_figures(dense), "bm25": pool_figures(lexical), "interleaved": pool_figures(hybrid)}


def main(argv: list[str] | None = None) -> int:
    p = probe_args("python -m bench.pool", __doc__)
    p.add_argument("--k", type=int, default=REVIEW_SHOWN + 1, help="passages a card shows")
    args = p.parse_args(argv)
    return emit(probe(args.data, args.split, args.k), args.out)


if __name__ == "__main__":
    sys.exit(main())
