"""`embedloop ...`: headless commands over the same functions the app uses."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from loop.errors import EmbedloopError


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str, ensure_ascii=False))


def _progress(label: str):
    start = time.monotonic()

    def report(done: int, total: int) -> None:
        rate = done / max(time.monotonic() - start, 1e-9)
        print(f"\r{label}: {done}/{total} passages ({rate:.0f}/s)", end="" if done < total else "\n",
              file=sys.stderr, flush=True)

    return report


def _open(args: argparse.Namespace):
    from loop.workspace import Workspace

    return Workspace.open(args.workspace)


def cmd_init(args: argparse.Namespace) -> int:
    with _open(args) as ws:
        ws.ensure_index()
        st = ws.status()
        print(f"Workspace ready at {st['workspace']} (model {st['active_model']['version']}, "
              f"index {st['active_index']['collection']}).")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from loop.ingest import Fields

    if not args.paths and not args.demo:
        raise SystemExit("embedloop ingest: give one or more PATHs, or --demo")
    with _open(args) as ws:
        reports = []
        if args.demo:
            from loop.demo import DEMO_SOURCE, demo_documents

            reports.append(ws.add_documents(demo_documents(), DEMO_SOURCE, _progress("indexing")))
        if args.paths:
            fields = Fields(id=args.id_field, title=args.title_field, text=args.text_field)
            reports += ws.ingest(args.paths, fields, _progress("indexing"))
        for r in reports:
            print(f"{r.path}: {r.documents_added} documents added, {r.documents_updated} updated, "
                  f"{r.documents_unchanged} unchanged; {r.passages_added} passages added; {r.indexed} vectors indexed")
    return 0


def cmd_pairs_import(args: argparse.Namespace) -> int:
    with _open(args) as ws:
        r = ws.import_pairs(args.file, split=args.split, limit=args.limit, seed=args.seed)
        print(f"{r.path}: {r.pairs_added} pairs added ({args.split}), {r.pairs_unchanged} already present")
    return 0


def cmd_queries_import(args: argparse.Namespace) -> int:
    with _open(args) as ws:
        r = ws.import_queries(args.file, split=args.split)
        print(f"{r.path}: {r.queries_added} queries added")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _open(args) as ws:
        st = ws.status()
    if args.json:
        _print_json(st)
        return 0
    idx = st["active_index"] or {}
    print(f"workspace      {st['workspace']}")
    print(f"documents      {st['documents']}")
    print(f"passages       {st['passages']}")
    print(f"queries        {st['queries']}")
    for source, by_status in st["pairs"].items():
        print(f"pairs {source:<9}{', '.join(f'{k} {v}' for k, v in by_status.items())}")
    print(f"decisions      {st['decisions']}")
    print(f"active model   {st['active_model']['version']}")
    print(f"active index   {idx.get('collection', '(none)')} ({idx.get('count', 0)} vectors)")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    with _open(args) as ws:
        hits = ws.search(args.query, k=args.k)
        model = ws.active_model
    if args.json:
        _print_json({"query": args.query, "model_version": model, "hits": [h.model_dump() for h in hits]})
        return 0
    for i, h in enumerate(hits, 1):
        snippet = " ".join(h.text.split())[:160]
        print(f"{i:>2}. {h.score:.3f}  {', '.join(h.doc_ids) or h.passage_id}\n    {snippet}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embedloop", description="Fine-tune embedding models on your own domain.")
    p.add_argument("--workspace", "-w", type=Path, default=None,
                   help="workspace folder (default: $EMBEDLOOP_WORKSPACE or ./workspace)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="create the workspace and its (empty) index")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("ingest", help="import documents: files, folders, .jsonl/.csv or BEIR folders")
    s.add_argument("paths", nargs="*", type=Path)
    s.add_argument("--demo", action="store_true", help="ingest the bundled demo corpus (Python docs topics)")
    s.add_argument("--id-field", default="_id")
    s.add_argument("--title-field", default="title")
    s.add_argument("--text-field", default="text")
    s.set_defaults(func=cmd_ingest)

    pairs = sub.add_parser("pairs", help="labelled pairs").add_subparsers(dest="pairs_command", required=True)
    s = pairs.add_parser("import", help="import pairs from JSONL/CSV (anchor, positive, negative, score) or BEIR qrels")
    s.add_argument("file", type=Path)
    s.add_argument("--split", default="train", choices=["train", "eval", "test"])
    s.add_argument("--limit", type=int, default=None, help="import a seeded random sample of at most N pairs")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_pairs_import)

    queries = sub.add_parser("queries", help="query logs").add_subparsers(dest="queries_command", required=True)
    s = queries.add_parser("import", help="import unlabelled queries (.txt one a line, .jsonl, .csv, BEIR folder)")
    s.add_argument("file", type=Path)
    s.add_argument("--split", default=None, help="for a BEIR folder: only the queries of qrels/SPLIT.tsv")
    s.set_defaults(func=cmd_queries_import)

    s = sub.add_parser("status", help="counts, active model and index")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("search", help="search the active index")
    s.add_argument("query")
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_search)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EmbedloopError as e:
        print(f"embedloop: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("embedloop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
