"""First start: the embedded default that an empty workspace gets when the app opens.

An empty workspace gets the demo corpus (the bundled model, Python's language reference topics
and a query log), ingested as a job; a workspace whose search index is lost gets it rebuilt from
DuckDB, also as a job, once per process. `app.py` calls `first_start` before each page.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from loop.jobs import JobContext
from loop.workspace import Workspace
from ui.deps import DEMO_JOB, INDEX_JOB, job_panel, jobs


def first_start(ws: Workspace) -> None:
    """The embedded default: an empty workspace gets the demo corpus, ingested as a job.

    A workspace with passages but no usable index (a lost Chroma folder, say) gets its index
    rebuilt from DuckDB, also as a job, once per process.
    """
    j = jobs(ws)
    if INDEX_JOB not in j.latest and DEMO_JOB not in j.latest:
        status = ws.status()
        if status["passages"]:
            j.latest.setdefault(INDEX_JOB, "")  # checked once per process
            idx = status["active_index"] or {}
            if not idx.get("collection") or idx["collection"] not in ws.index.collections():
                def rebuild(ctx: JobContext) -> int:
                    ctx.log("The active index is missing: rebuilding it from the workspace's passages…")
                    return ws.ensure_index(lambda done, total: ctx.progress(done, total, "Re-indexing"))

                j.submit(INDEX_JOB, rebuild)
    if j.latest.get(INDEX_JOB) and (j.running(INDEX_JOB) or (j.status(INDEX_JOB) or {}).get("status") == "failed"):
        st.info("The search index is being rebuilt from the workspace (it was missing).", icon=":material/build:")
        job_panel(INDEX_JOB)
        return
    if DEMO_JOB not in j.latest:
        if ws.status()["documents"]:
            return

        def ingest_demo(ctx: JobContext) -> Any:
            from loop import demo

            ctx.log(f"First start: ingesting the demo corpus ({len(demo.demo_documents())} Python language "
                    f"reference topics) and its query log…")
            ctx.progress(0, 0, "Loading the embedding model…")

            def progress(done: int, total: int) -> None:
                ctx.progress(done, total, "Indexing the demo corpus")

            report, log = demo.ingest_demo(ws, progress)
            ctx.log(f"{report.documents_added} documents, {report.passages_added} passages, {report.indexed} vectors; "
                    f"{log.queries_added} logged queries.")
            return report

        j.submit(DEMO_JOB, ingest_demo)
    failed = (j.status(DEMO_JOB) or {}).get("status") in ("failed", "interrupted")
    if j.running(DEMO_JOB) or failed:
        st.info(
            "First start: the workspace is empty, so embedloop loads its embedded default: the bundled "
            "all-MiniLM-L6-v2 model, a demo corpus (Python's language reference topics) with a log of "
            "questions about it, and the offline pair generator. Import your own data on the Data page at any time.",
            icon=":material/rocket_launch:",
        )
        job_panel(DEMO_JOB)
        if failed:
            st.button("Try again", key="retry-demo", icon=":material/refresh:", on_click=j.latest.pop, args=(DEMO_JOB,))

