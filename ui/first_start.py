"""First start: the embedded default that an empty workspace gets when the app opens.

An empty workspace gets the demo corpus (the bundled model, Python's language reference topics
and a query log), ingested as a job; a workspace whose search index is lost gets it rebuilt from
DuckDB, also as a job, once per process. `app.py` calls `first_start` before each page.
"""

from __future__ import annotations

import streamlit as st

from loop import demo
from loop.workspace import Workspace
from ui.deps import DEMO_JOB, INDEX_JOB, job_panel, jobs


def first_start(ws: Workspace) -> None:
    """The embedded default (`demo.first_start_need` decides): an empty workspace gets the demo
    corpus, a workspace whose index is lost gets it rebuilt from DuckDB; each as a job, checked
    once per process."""
    j = jobs(ws)
    if INDEX_JOB not in j.latest and DEMO_JOB not in j.latest:
        need = demo.first_start_need(ws)
        j.latest.setdefault(INDEX_JOB, "")  # checked once per process
        if need == "index":
            j.submit(INDEX_JOB, demo.rebuild_index_job(ws))
        elif need == "demo":
            j.submit(DEMO_JOB, demo.ingest_demo_job(ws))
    if j.latest.get(INDEX_JOB) and (j.running(INDEX_JOB) or (j.status(INDEX_JOB) or {}).get("status") == "failed"):
        st.info("The search index is being rebuilt from the workspace (it was missing).", icon=":material/build:")
        job_panel(INDEX_JOB)
        return
    if DEMO_JOB not in j.latest:
        return
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
            st.button("Try again", key="retry-demo", icon=":material/refresh:", on_click=_retry_demo, args=(ws,))


def _retry_demo(ws: Workspace) -> None:
    jobs(ws).submit(DEMO_JOB, demo.ingest_demo_job(ws))
