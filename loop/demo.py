"""The demo corpus: the Python Language Reference topics that ship with every CPython.

`pydoc_data.topics` is the text `help('TOPIC')` shows (assignment, for, with, classes, ...),
written by the Python documentation team and installed with the interpreter, so the app's
embedded default has a real corpus on any machine, offline.

It comes with a query log (`loop/data/demo_queries.txt`): questions a Python user would ask,
written for this project, each answerable by one of the topics. It holds queries only, no
relevance labels: the loop mines it (each query proposes its top passages for review) and holds
out reviewed queries for evaluation, as it would a real log.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING

from loop.indexing import Progress
from loop.jobs import JobContext
from loop.records import Document, IngestReport

if TYPE_CHECKING:
    from loop.workspace import Workspace

DEMO_SOURCE = "python-docs:pydoc_data.topics"
DEMO_QUERY_LOG = "demo_queries.txt"


def demo_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [
        Document(doc_id=f"pydoc/{name}", title=name.replace("-", " "), text=text.strip(), source=DEMO_SOURCE)
        for name, text in sorted(topics.items())
        if text.strip()
    ]


def demo_queries() -> list[str]:
    """The demo's query log, one question a line."""
    text = (resources.files("loop") / "data" / DEMO_QUERY_LOG).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def ingest_demo(ws: Workspace, progress: Progress | None = None) -> tuple[IngestReport, IngestReport]:
    """Ingest the demo corpus and import its query log; running it again adds nothing.

    Returns:
        (the corpus's report, the query log's report).
    """
    docs = ws.add_documents(demo_documents(), DEMO_SOURCE, progress)
    with resources.as_file(resources.files("loop") / "data" / DEMO_QUERY_LOG) as path:
        queries = ws.import_queries(path)
    return docs, queries


# First start: what an app opening this workspace must do before anything else -------------------
def first_start_need(ws: Workspace) -> str | None:
    """'index' when the workspace has passages but its active index is missing (a lost Chroma
    folder: rebuild it from DuckDB), 'demo' when it is empty (ingest the demo corpus), else None."""
    status = ws.status()
    if status["passages"]:
        idx = status["active_index"] or {}
        return "index" if not idx.get("collection") or idx["collection"] not in ws.index.collections() else None
    return None if status["documents"] else "demo"


def rebuild_index_job(ws: Workspace) -> Callable[[JobContext], int]:
    """A job body that rebuilds the active index from the workspace's passages."""

    def run(ctx: JobContext) -> int:
        ctx.log("The active index is missing: rebuilding it from the workspace's passages…")
        return ws.ensure_index(lambda done, total: ctx.progress(done, total, "Re-indexing"))

    return run


def ingest_demo_job(ws: Workspace) -> Callable[[JobContext], IngestReport]:
    """A job body that ingests the demo corpus and its query log (`ingest_demo`)."""

    def run(ctx: JobContext) -> IngestReport:
        ctx.log(f"First start: ingesting the demo corpus ({len(demo_documents())} Python language "
                f"reference topics) and its query log…")
        ctx.progress(0, 0, "Loading the embedding model…")
        report, log = ingest_demo(ws, lambda done, total: ctx.progress(done, total, "Indexing the demo corpus"))
        ctx.log(f"{report.documents_added} documents, {report.passages_added} passages, {report.indexed} vectors; "
                f"{log.queries_added} logged queries.")
        return report

    return run
