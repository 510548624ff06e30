"""`embedloop ...`: headless commands over the same functions the app uses."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from loop.errors import EmbedloopError, InputError


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
    from loop.readers import Fields

    if not args.paths and not args.demo:
        raise InputError("nothing to ingest: give one or more PATHs, or --demo")
    with _open(args) as ws:
        reports = []
        if args.demo:
            from loop.demo import ingest_demo

            corpus, log = ingest_demo(ws, _progress("indexing"))
            reports.append(corpus)
            print(f"{log.path}: {log.queries_added} queries added (the demo's query log)")
        if args.paths:
            fields = Fields(id=args.id_field, title=args.title_field, text=args.text_field)
            reports += ws.ingest(args.paths, fields, _progress("indexing"))
        for r in reports:
            print(f"{r.path}: {r.documents_added} documents added, {r.documents_updated} updated, "
                  f"{r.documents_unchanged} unchanged; {r.passages_added} passages added; {r.indexed} vectors indexed")
            if r.documents_empty:
                print(f"  {len(r.documents_empty)} documents have no text (kept, without passages): "
                      f"{', '.join(r.documents_empty[:10])}", file=sys.stderr)
    return 0


def cmd_pairs_import(args: argparse.Namespace) -> int:
    with _open(args) as ws:
        r = ws.import_pairs(args.file, split=args.split, limit=args.limit, seed=args.seed)
        print(f"{r.path}: {r.pairs_added} pairs added ({args.split}), {r.pairs_unchanged} already present"
              + (f", {r.pairs_skipped} skipped (their document has no text)" if r.pairs_skipped else ""))
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
        print(f"pairs {source + ':':<10}{', '.join(f'{k} {v}' for k, v in by_status.items())}")
    print(f"decisions      {st['decisions']}")
    print(f"active model   {st['active_model']['version']}")
    if idx.get("problem"):
        print(f"active index   {idx['collection']} (unreadable: {idx['problem']})")
    else:
        line = f"active index   {idx.get('collection', '(none)')} ({idx.get('count', 0)} vectors)"
        if idx and idx["count"] != st["passages"]:
            line += f"; the corpus has {st['passages']} passages: `embedloop init` brings the index in line"
        print(line)
    for r in st["rounds"]:
        line = f"round {r['round']:<9}{r['state']}"
        if r.get("ndcg@10"):
            n = r["ndcg@10"]
            line += f"; NDCG@10 base {n['base']:.4f} -> candidate {n['candidate']:.4f}"
            line += f" ({'promoted' if r.get('promoted') else 'not promoted'})"
        if r.get("resolution"):
            res = r["resolution"]
            more = res["more_queries_for_0.02"]
            line += (f"; held-out set of {res['n_queries']} queries resolves +-{res['half_width']:.3f}"
                     + (f": {more} more verified queries would resolve +0.02" if more else ""))
        if r.get("error"):
            line += f"; {r['error']}"
        print(line)
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


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rounds(ws, args: argparse.Namespace):
    from loop.rounds import Rounds, loop_config

    config = loop_config(ws.settings.loop, review_budget=getattr(args, "review_budget", None))
    return Rounds(ws, config, log=_log, llm=ws.llm())


def _advance(args: argparse.Namespace, until: str, through: bool = False) -> int:
    """Run the open round (or a new one) until `until` is the next step (`through`: until it ran).

    Exit 0 when the round got there (or finished: a refused promotion ends the round without a
    re-index); 1 when it did not: it failed, training stopped, or a step cannot run yet
    (cards pending review, too few labels), with the reason.
    """
    from loop.rounds import STATES, RoundError

    if through:
        until = STATES[STATES.index(until) + 1]
    with _open(args) as ws:
        rounds = _rounds(ws, args)
        try:
            r = rounds.advance(until=until, force=args.force)
            why = r.error
        except RoundError as e:  # the round stays where it was
            r, why = rounds.current(), str(e)
        print(f"round {r.round}: state {r.state}" + (f" ({why})" if why else ""))
        if getattr(args, "json", False):
            _print_json(r.model_dump(mode="json", exclude_none=True))
    reached = r.state != "failed" and STATES.index(r.state) >= STATES.index(until)
    return 0 if reached else 1


def cmd_round(args: argparse.Namespace) -> int:
    return _advance(args, args.until)


def cmd_review_list(args: argparse.Namespace) -> int:
    from loop.review import pending

    with _open(args) as ws:
        cards = pending(ws.store, args.limit)
    if args.json:
        _print_json([c.model_dump() for c in cards])
        return 0
    for c in cards:
        print(f"{c.pair_id}  [{c.source}] {c.anchor[:70]!r}  -> {c.positive_id}  ({c.reason})")
    print(f"{len(cards)} pending", file=sys.stderr)
    return 0


def cmd_review_apply(args: argparse.Namespace) -> int:
    from loop.review import apply_decisions

    with _open(args) as ws:
        print(f"{apply_decisions(ws.store, args.file, ws.max_bytes)} decisions applied")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from loop.evalsets import evalset_from_beir
    from loop.evaluate import compare_all, evaluate, intervals

    with _open(args) as ws:
        n_dev = 0
        if args.beir:
            evalset = evalset_from_beir(args.beir, args.split)
            reports = {v: evaluate(ws.embedder(v), evalset) for v in dict.fromkeys([ws.base_version, ws.active_model])}
        else:
            rounds = _rounds(ws, args)
            evalset = rounds.heldout.evalset()
            n_dev = len(rounds.heldout.folds()[0])
            reports = {v: rounds.heldout.report_for(v, evalset) for v in dict.fromkeys([ws.base_version, ws.active_model])}
        base = reports[ws.base_version]
        out = {"evalset": evalset.name, "n_queries": len(evalset.query_ids), "n_dev_queries": n_dev, "models": {}}
        for v, rep in reports.items():
            # 95% bootstrap intervals of every metric: of the mean, and of the difference to the base
            entry = {"metrics": rep.metrics, "intervals": {m: list(ci) for m, ci in intervals(rep).items()},
                     "matryoshka": rep.matryoshka}
            if v != ws.base_version:
                every = {m: c.model_dump() for m, c in compare_all(base, rep).items()}
                entry["vs_base"] = every["ndcg@10"]
                entry["vs_base_by_metric"] = every
            out["models"][v] = entry
        if args.target is not None:
            out["recommendation"] = _rounds(ws, args).heldout.recommend(args.target).model_dump()
    if args.json:
        _print_json(out)
        return 0
    print(f"{out['evalset']}: {out['n_queries']} queries" + (
        f" (the promotion set; {n_dev} more held-out queries are the development fold)" if n_dev else ""))
    for v, e in out["models"].items():
        print(f"{v}{'' if 'vs_base' in e else '  (base)'}")
        for name, (mean, lo, hi) in e["intervals"].items():
            line = f"  {name:<11}{mean:.4f} [{lo:.4f}, {hi:.4f}]"
            if "vs_base_by_metric" in e:
                c = e["vs_base_by_metric"][name]
                line += f"  vs base {c['delta']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
            print(line)
    print("(95% bootstrap intervals over the queries; vs base: paired)")
    if "recommendation" in out:
        rec = out["recommendation"]
        verdict = "fine-tune" if rec["finetune"] else "generate pairs first" if rec["generate_first"] else "keep the model"
        print(f"\nRecommendation: {verdict}")
        for reason in rec["reasons"]:
            print(f"  - {reason}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from loop import indexing

    with _open(args) as ws:
        name = indexing.rollback(ws.store, ws.index, ws.embedder, to=args.to, progress=_progress("syncing"))
        print(f"active index is now {name} (model {ws.active_model})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from loop.export import export

    with _open(args) as ws:
        version = ws.active_model
        path = ws.store.scalar("SELECT path FROM model_versions WHERE version = ?", [version])
        info = export(ws.store, version, path, args.directory)
    print(f"exported model {info['model']} and {info['pairs']} pairs to {info['directory']}")
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
    s.add_argument("--demo", action="store_true",
                   help="ingest the bundled demo corpus (Python docs topics) and its query log")
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
    for step, help_ in [
        ("generate", "generate synthetic pairs when accepted pairs are scarce"),
        ("select", "mine the query log, score candidates, fill the review queue"),
        ("train", "train a candidate model on the accepted pairs (subprocess, resumable)"),
        ("promote", "evaluate the candidate and promote it if it beats the active model beyond noise"),
        ("reindex", "re-embed the corpus with the promoted model, verify, switch"),
    ]:
        s = sub.add_parser(step, help=f"{help_} (runs the open round up to this step)")
        s.add_argument("--force", action="store_true", help="train even with cards still pending review")
        s.add_argument("--review-budget", type=int, default=None)
        s.set_defaults(func=lambda a, _step=step: _advance(a, _step, through=True))

    s = sub.add_parser("round", help="run the open round (or a new one) until a step")
    s.add_argument("--until", default="done", choices=["review", "train", "evaluate", "done"])
    s.add_argument("--force", action="store_true", help="train even with cards still pending review")
    s.add_argument("--review-budget", type=int, default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_round)

    review = sub.add_parser("review", help="the review queue").add_subparsers(dest="review_command", required=True)
    s = review.add_parser("list", help="pending cards, highest expected value first")
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_review_list)
    s = review.add_parser("apply", help="apply JSONL decisions: pair_id, action (accept/reject/edit/pick/mark), "
                                        "query (edit), passage_id (pick), passage_ids + shown (mark), reviewer")
    s.add_argument("file", type=Path)
    s.set_defaults(func=cmd_review_apply)

    s = sub.add_parser("evaluate", help="base and active model on the held-out set (or a BEIR split) with 95%% CIs")
    s.add_argument("--beir", type=Path, default=None, help="a BEIR folder to evaluate on instead")
    s.add_argument("--split", default="test")
    s.add_argument("--target", type=float, default=None,
                   help="the NDCG@10 you need: adds the should-I-fine-tune recommendation")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("rollback", help="switch back to the previous index and model (synced and verified first)")
    s.add_argument("--to", metavar="VERSION", default=None,
                   help="any earlier model version whose index is kept (default: the previous one)")
    s.set_defaults(func=cmd_rollback)

    s = sub.add_parser("export", help="the active model (with a model card) and the accepted pairs")
    s.add_argument("directory", type=Path)
    s.set_defaults(func=cmd_export)
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
