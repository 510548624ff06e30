"""How exact and how repeatable the Chroma index's top-k is: the same vectors indexed several times.

    python -m bench.ann --data DIR [--k 20] [--builds 3] [--ef 100 400] [--out FILE.json]

The corpus and the queries of a BEIR folder are encoded once with the bundled model; then, for each
`hnsw:ef_search` value, the vectors are written `--builds` times into a fresh embedded Chroma
collection the way the product builds its index (`VectorIndex.create` with that ef_search, then
`upsert`) and every query is searched with the product's `search`. Printed per ef: the top-k
recall against exact cosine search, how many queries' top-k lists differ from the first build's,
and the search's milliseconds per query (all queries in one call). Chroma builds its HNSW graph
with several threads, so two builds of the same vectors can differ; this is what makes two runs
of one round with the same seed and reviews see slightly different cards.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Beir, machine, write_json
from loop.config import bundled_model_path
from loop.embed import Embedder
from storage.index import VectorIndex


def build_and_search(doc_ids: list[str], docs: np.ndarray, queries: np.ndarray, k: int,
                     ef: int) -> tuple[list[list[str]], float]:
    """Index `docs` in a fresh collection (HNSW `ef_search` = ef); each query's top-k ids, and the search's seconds."""
    with tempfile.TemporaryDirectory(prefix="bench-ann-") as tmp:
        index = VectorIndex(path=tmp)
        try:
            index.create("probe", "probe", docs.shape[1], ef_search=ef)
            index.upsert("probe", doc_ids, docs, [""] * len(doc_ids))
            t0 = time.perf_counter()
            hits = index.search("probe", queries, "probe", k)
            return [[hit[0] for hit in row] for row in hits], time.perf_counter() - t0
        finally:
            index.close()


def run(data: Path, k: int, builds: int, efs: list[int]) -> dict[str, Any]:
    beir = Beir.read(data, splits=())
    doc_ids = list(beir.corpus)
    emb = Embedder(bundled_model_path(), "base")
    docs = np.asarray(emb.encode([beir.corpus[d] for d in doc_ids]), dtype=np.float32)
    queries = np.asarray(emb.encode(list(beir.queries.values())), dtype=np.float32)
    exact = [[doc_ids[j] for j in row] for row in np.argsort(-(queries @ docs.T), axis=1, kind="stable")[:, :k]]
    out: dict[str, Any] = {"dataset": data.name, "docs": len(doc_ids), "queries": len(queries), "k": k,
                           "builds": builds, "ef_search": {}}
    for ef in efs:
        built = [build_and_search(doc_ids, docs, queries, k, ef) for _ in range(builds)]
        lists = [b[0] for b in built]
        ms = [1000 * b[1] / len(queries) for b in built]
        recall = [float(np.mean([len(set(a) & set(b)) / k for a, b in zip(run_, exact, strict=True)])) for run_ in lists]
        differ = [sum(a != b for a, b in zip(run_, lists[0], strict=True)) for run_ in lists[1:]]
        out["ef_search"][str(ef)] = {"recall_vs_exact": [round(r, 5) for r in recall],
                                     "queries_differing_from_build_1": differ,
                                     "search_ms_per_query": [round(m, 3) for m in ms]}
        print(f"ef_search {ef}: recall@{k} vs exact {', '.join(f'{r:.4f}' for r in recall)}; "
              f"queries whose top-{k} differs from build 1: {differ} of {len(queries)}; "
              f"search {', '.join(f'{m:.2f}' for m in ms)} ms per query", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ann", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a BEIR folder (corpus.jsonl, queries.jsonl)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--builds", type=int, default=3)
    p.add_argument("--ef", type=int, nargs="+", default=[100, 400], help="hnsw ef_search values (Chroma's default: 100)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.builds < 2 or args.k < 1 or min(args.ef) < 1:
        p.error("--builds must be at least 2, and --k and every --ef at least 1")
    out = {"machine": machine(), "command": "python -m bench.ann " + " ".join(argv or sys.argv[1:]),
           **run(args.data, args.k, args.builds, args.ef)}
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
