"""The bodies of the app's jobs: each is `fn(ctx) -> value`, run by `JobRunner` in a thread.

They only chain engine calls and report progress; nothing here runs in a script thread.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from loop.errors import InputError
from loop.evaluate import score_distributions
from loop.jobs import Cancelled, JobContext
from loop.readers import extract_beir_zip
from loop.workspace import Workspace

UPLOAD_TYPES = {
    "documents": ["txt", "md", "markdown", "html", "htm", "pdf", "jsonl", "csv"],
    "pairs": ["jsonl", "csv"],
    "queries": ["txt", "jsonl", "csv"],
    "beir": ["zip"],
}


def _safe_name(name: str) -> str:
    base = PurePosixPath(name.replace("\\", "/")).name
    base = re.sub(r"[^\w.\- ]", "_", base).strip(" .") or "upload"
    return base[:120]


def save_uploads(ws: Workspace, files: Sequence[tuple[str, bytes]]) -> list[Path]:
    """Write uploaded files into a fresh folder under <workspace>/uploads; returns their paths."""
    folder = ws.settings.workspace / "uploads" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files:
        if len(data) > ws.max_bytes:
            raise InputError(f"the file is larger than max_file_mb ({ws.settings.max_file_mb:g} MiB)", name)
        path = folder / _safe_name(name)
        n = 1
        while path.exists():
            path = folder / f"{path.stem}-{n}{path.suffix}"
            n += 1
        path.write_bytes(data)
        paths.append(path)
    return paths


def import_uploads(ws: Workspace, kind: str, files: Sequence[tuple[str, bytes]], options: dict[str, Any]):
    """The job for an upload of `kind` (documents, pairs, queries, beir); returns the reports."""

    def run(ctx: JobContext) -> list[Any]:
        ctx.progress(0, 0, f"Saving {len(files)} uploaded file(s)")
        paths = save_uploads(ws, files)

        def progress(done: int, total: int) -> None:
            ctx.progress(done, total, "Indexing passages")

        reports: list[Any] = []
        if kind == "documents":
            reports = ws.ingest(paths, progress=progress)
        elif kind == "pairs":
            reports = [ws.import_pairs(p, split=options.get("split", "train")) for p in paths]
        elif kind == "queries":
            reports = [ws.import_queries(p) for p in paths]
        elif kind == "beir":
            for p in paths:
                folder = extract_beir_zip(p, ws.settings.max_file_mb)
                ctx.log(f"{p.name}: BEIR folder {folder.name}")
                reports += ws.ingest([folder], progress=progress)
                split = options.get("qrels_split")
                qrels_file = {"train": "train", "eval": "dev", "test": "test"}.get(split or "", "")
                if split and (folder / "qrels" / f"{qrels_file}.tsv").is_file():
                    reports.append(ws.import_pairs(folder, split=split))
                elif split:
                    ctx.log(f"No qrels/{qrels_file}.tsv in {folder.name}: no labelled pairs imported.")
                if options.get("queries") and (folder / "queries.jsonl").is_file():
                    reports.append(ws.import_queries(folder))
        else:
            raise InputError(f"unknown upload kind {kind!r}")
        for r in reports:
            ctx.log(describe_report(r))
        return reports

    return run


def describe_report(r: Any) -> str:
    parts = []
    for field, label in (("documents_added", "documents added"), ("documents_updated", "updated"),
                         ("documents_unchanged", "unchanged"), ("passages_added", "passages added"),
                         ("indexed", "vectors indexed"), ("pairs_added", "pairs added"),
                         ("pairs_unchanged", "pairs already present"), ("pairs_skipped", "pairs skipped"),
                         ("queries_added", "queries added")):
        v = getattr(r, field, 0)
        if v:
            parts.append(f"{v:,} {label}")
    return f"{Path(r.path).name}: {', '.join(parts) or 'nothing new'}"


def measure_baseline(ws: Workspace):
    """The off-the-shelf model on the held-out set (drawn here if not yet), its 95%
    interval, and the model's encoding speed on this machine (for the re-index estimate)."""
    from loop.rounds import Rounds

    def run(ctx: JobContext) -> dict[str, Any]:
        rounds = Rounds(ws, log=ctx.log, cancel=ctx.cancel_requested)
        rounds.heldout.ensure()
        ctx.progress(0, 0, f"Evaluating the base model on {len(rounds.heldout.evalset().query_ids)} held-out queries")
        base = rounds.heldout.measure_baseline()  # what `embedloop evaluate --target` measures too
        report, every, (lo, hi) = base.report, base.intervals, base.ci
        speed = ws.encode_speed()
        ctx.log(f"Baseline NDCG@10 {report.metrics['ndcg@10']:.4f} (95% interval {lo:.4f} to {hi:.4f}) on "
                f"{report.n_queries} queries; encoding {speed:,.0f} passages/s.")
        held = int(ws.store.scalar("SELECT count(*) FROM pairs WHERE split IN ('eval', 'test')"))  # a round grows it
        return {"report": report, "ci": (lo, hi), "intervals": every, "speed": speed, "model": ws.base_version,
                "held_out_pairs": held}

    return run


def generation(ws: Workspace, llm: Any, n: int, domain: str, seed: int = 0):
    """Synthetic pairs written as candidates (the next round scores and routes them)."""
    from loop import indexing
    from loop.generate import run_generation

    def search_ids(queries: list[str]) -> list[list[str]]:
        hits = indexing.search(ws.store, ws.index, ws.embedder(), queries, 10)
        return [[h.passage_id for h in row] for row in hits]

    def run(ctx: JobContext):
        who = f"the LLM {llm.model} at {llm.endpoint}" if llm else "the offline generator"
        ctx.log(f"Generating up to {n} pairs with {who}…")

        def progress(done: int, total: int) -> None:
            ctx.check()
            ctx.progress(done, total, "Generating")

        report = run_generation(ws.store, search_ids, llm=llm, domain=domain, n=n, seed=seed, progress=progress)
        u = report.usage
        ctx.log(f"Generated {report.generated}, kept {report.kept}, wrote {report.written} new candidates; "
                f"tokens: {u.prompt_tokens:,} prompt + {u.completion_tokens:,} completion "
                f"({u.requests} requests, {u.cached} cached).")
        return report

    return run


def run_round(ws: Workspace, config: Any, until: str, force: bool, llm: Any):
    """Advance the open round (or a new one) until `until`; Stop asks training to stop."""
    from loop.rounds import Rounds

    def run(ctx: JobContext) -> dict[str, Any]:
        def log(line: str) -> None:
            ctx.log(line)
            ctx.progress(0, 0, line.strip()[:160])  # the newest line doubles as the status text

        rounds = Rounds(ws, config, log=log, llm=llm, cancel=ctx.cancel_requested)
        r = rounds.open()
        run_dir = rounds.run_dir(r)

        def stop_training() -> None:
            if run_dir.is_dir():
                ws.stop_training(run_dir)  # the trainer keeps its best checkpoint and exits

        ctx.on_cancel.append(stop_training)
        ctx.progress(0, 0, f"Round {r.round}: {r.state}")
        r = rounds.advance(until=until, force=force)
        if ctx.cancel_requested.is_set():  # advance() returns early on a stop: say so
            raise Cancelled(f"Stopped by the user; round {r.round} is at step {r.state}.")
        ctx.log(f"Round {r.round} is at step {r.state}.")
        return {"round": r.round, "state": r.state}

    return run


def distributions(ws: Workspace, versions: dict[str, str], max_queries: int = 300):
    """Cosine of each held-out query with its positive and with its hardest negative (the
    active model's top 10 outside the relevant documents), for each model in `versions`
    (label -> version). The same triplets for every model, so the charts compare."""
    from loop.rounds import Rounds

    def run(ctx: JobContext) -> dict[str, Any]:
        evalset = Rounds(ws).heldout.evalset()
        passages_of: dict[str, list[int]] = {}
        for i, pid in enumerate(evalset.passage_ids):
            for d in (evalset.passage_docs or {}).get(pid, [pid]):
                passages_of.setdefault(d, []).append(i)
        anchors, positives, negatives = [], [], []
        qids = evalset.query_ids[:max_queries]
        ctx.progress(0, len(qids), "Finding hard negatives")
        for n, (qid, query) in enumerate(zip(qids, evalset.queries, strict=False), 1):
            relevant = set(evalset.qrels[qid])
            first = next((passages_of[d][0] for d in sorted(relevant) if d in passages_of), None)
            if first is None:
                continue
            hits = ws.search(query, 10)
            negs = [h.text for h in hits if not relevant & set(h.doc_ids or [h.passage_id])]
            anchors.append(query)
            positives.append(evalset.passages[first])
            negatives.append(negs or None)
            ctx.progress(n, len(qids), "Finding hard negatives")
        out = {}
        for label, version in versions.items():
            ctx.check()
            ctx.progress(0, 0, f"Scoring with {version}")
            out[label] = score_distributions(ws.embedder(version), anchors, positives, negatives)
        ctx.log(f"Scored {len(anchors)} held-out queries with {', '.join(versions.values())}.")
        return out

    return run


def export_model(ws: Workspace, version: str, model_path: str, directory: Path):
    """loop.export.export (model + card, pairs.jsonl, HF dataset), plus a zip of it all for download."""
    from loop.export import export

    def run(ctx: JobContext) -> dict[str, Any]:
        ctx.progress(0, 0, f"Exporting {version} to {directory}")
        info = export(ws.store, version, model_path, directory)
        ctx.progress(0, 0, "Zipping the export for download")
        out = Path(info["directory"])
        info["zip"] = shutil.make_archive(str(out), "zip", out)  # <dir>.zip, beside the folder
        ctx.log(f"Exported model {info['model']} and {info['pairs']:,} pairs to {info['directory']}.")
        return info

    return run
