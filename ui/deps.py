"""Dependency wiring for the app, and the one place engine errors become messages.

- `workspace()`: the process's only Workspace (it owns the DuckDB file and the Chroma index),
  opened once with `st.cache_resource`. Tests inject their own under `WORKSPACE_KEY` in
  session state (a workspace built like tests/conftest.py's, with a FakeEmbedder).
- `jobs()`: the workspace's `JobRunner` plus what pages need to find their jobs again. Long
  work runs there, never in the script thread; `job_panel` polls it from a fragment.
- `run_safely` / `show_error`: project errors (and a pydantic validation error of a value the
  user typed) become one red message; anything else is a bug and keeps its traceback.
- `reviewer()`: who is reviewing: the signed-in OIDC user when `[auth]` is configured in
  Streamlit secrets, else a name typed in single-user mode.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import streamlit as st
from pydantic import ValidationError

from loop.errors import EmbedloopError
from loop.jobs import JobContext, JobRunner
from loop.workspace import Workspace
from ui.text import md_escape

WORKSPACE_KEY = "embedloop.workspace"
REVIEWER_KEY = "embedloop.reviewer"  # the single-user mode's reviewer name (kept across pages)
DEMO_JOB = "ingest-demo"
INDEX_JOB = "reindex"


# Errors ----------------------------------------------------------------------------------------
def error_message(e: BaseException) -> str:
    if isinstance(e, ValidationError):  # a value typed into a form, checked by an engine model
        return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors())
    return str(e)


def show_error(message: str) -> None:
    """One red message. Escaped: engine messages may quote file names and values from users."""
    st.error(md_escape(message), icon=":material/error:")


def run_safely(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call an engine function; a project error becomes one red message and None is returned."""
    try:
        return fn(*args, **kwargs)
    except (EmbedloopError, ValidationError) as e:
        show_error(error_message(e))
        return None


# The workspace ---------------------------------------------------------------------------------
@st.cache_resource(show_spinner="Opening the workspace…")
def _open_workspace(path: str) -> Workspace:
    return Workspace.open(path or None)


def workspace() -> Workspace:
    """The injected workspace (tests), else the process's cached one. Stops the page on error."""
    injected = st.session_state.get(WORKSPACE_KEY)
    if injected is not None:
        return injected
    ws = run_safely(_open_workspace, os.environ.get("EMBEDLOOP_WORKSPACE", ""))
    if ws is None:
        st.stop()
    return ws


# Jobs ------------------------------------------------------------------------------------------
@dataclass
class Jobs:
    """A workspace's JobRunner, the latest job of each kind and the values jobs returned."""

    runner: JobRunner
    latest: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    llm: dict[str, Any] | None = None  # endpoint settings saved on the Generate page (this process uses them now)

    def submit(self, kind: str, fn: Callable[[JobContext], Any], args: dict[str, Any] | None = None) -> str | None:
        """Start `fn(ctx)` as a job; its return value is kept in `results`. None if refused."""

        def run(ctx: JobContext) -> None:
            self.results[ctx.job_id] = fn(ctx)

        job_id = run_safely(self.runner.submit, kind, run, args)
        if job_id:
            self.latest[kind] = job_id
        return job_id

    def status(self, kind: str) -> dict[str, Any] | None:
        job_id = self.latest.get(kind)
        return self.runner.status(job_id) if job_id else None

    def result(self, kind: str) -> Any:
        """The value of the latest job of `kind`, once it finished well."""
        job_id = self.latest.get(kind)
        return self.results.get(job_id) if job_id else None

    def running(self, kind: str) -> bool:
        return any(ctx.job_id == self.latest.get(kind) for ctx in self.runner.running(kind))

    def cancel(self, kind: str) -> None:
        job_id = self.latest.get(kind)
        if job_id and self.running(kind):
            run_safely(self.runner.cancel, job_id)

    def stop_requested(self, kind: str) -> bool:
        return any(ctx.cancel_requested.is_set() for ctx in self.runner.running(kind)
                   if ctx.job_id == self.latest.get(kind))


_jobs: weakref.WeakKeyDictionary[Workspace, Jobs] = weakref.WeakKeyDictionary()
_jobs_lock = threading.Lock()


def jobs(ws: Workspace | None = None) -> Jobs:
    ws = ws or workspace()
    with _jobs_lock:
        if ws not in _jobs:
            _jobs[ws] = Jobs(JobRunner(ws.store))
        return _jobs[ws]


def job_panel(kind: str, *, poll_s: float = 1.0, on_running: Callable[[], None] | None = None,
              stop_label: str | None = None) -> dict[str, Any] | None:
    """Show the latest job of `kind`: progress, log tail and outcome; poll while it runs.

    A fragment re-runs every `poll_s` seconds while the job runs (and runs `on_running` for
    live extras such as a loss curve; with `stop_label`, a button cancels the job); when it
    ends, the whole page reruns once to show the new data. Returns the job's status as the
    page run saw it.
    """
    j = jobs()
    job_id = j.latest.get(kind)
    if not job_id:
        return None
    running = j.running(kind)
    seen = f"_job_seen_running.{job_id}"

    @st.fragment(run_every=poll_s if running else None, key=f"job-panel-{kind}")
    def panel() -> None:
        state = j.runner.status(job_id)
        if state["status"] == "running":
            st.session_state[seen] = True
            total = state.get("total") or 0
            done = state.get("done") or 0
            text = state.get("message") or f"{kind}: running…"
            if total:
                st.progress(min(1.0, done / total), text=f"{text} ({done:,}/{total:,})")
            else:
                st.progress(0.0, text=text)
            if stop_label:
                stopping = j.stop_requested(kind)
                st.button("Stopping…" if stopping else stop_label, key=f"stop-{kind}", icon=":material/stop_circle:",
                          on_click=j.cancel, args=(kind,), disabled=stopping)
            if on_running:
                on_running()
        elif state["status"] == "done":
            last = (state.get("log") or [""])[-1].partition(" ")[2]  # the job's own summary, sans time
            st.success(f"The {kind} job finished." + (f" {md_escape(last)}" if last else ""),
                       icon=":material/check_circle:")
        elif state["status"] == "cancelled":
            why = state.get("error") or ""
            st.warning(f"The {kind} job was stopped." + (f" {md_escape(why)}" if why else ""), icon=":material/cancel:")
        else:
            show_error(f"The {kind} job {state['status']}: {state.get('error') or 'see its log'}")
        lines = state.get("log") or []
        if lines:
            with st.expander("Log", expanded=state["status"] == "running"):
                st.code("\n".join(lines[-40:]), language=None)
        if state["status"] != "running" and st.session_state.pop(seen, False):
            st.rerun()  # the job changed the data: refresh the whole page once

    panel()
    return j.runner.status(job_id)


# The LLM ---------------------------------------------------------------------------------------
def llm_key() -> tuple[str | None, str]:
    """The API key and where it came from: the environment (via settings: OPENAI_API_KEY or
    EMBEDLOOP_LLM_API_KEY) or Streamlit secrets (OPENAI_API_KEY, or api_key in an [llm] table).
    The value is only handed to the client; pages show the source, never the key."""
    key = workspace().settings.llm_api_key
    if key is not None and key.get_secret_value():
        return key.get_secret_value(), "the environment (OPENAI_API_KEY or EMBEDLOOP_LLM_API_KEY)"
    try:
        value = st.secrets.get("OPENAI_API_KEY") or (st.secrets.get("llm") or {}).get("api_key")
    except Exception:  # no secrets file
        value = None
    if value:
        return str(value), "Streamlit secrets"
    return None, "not set"


def llm_endpoint() -> dict[str, Any]:
    """Base URL, model, concurrency and requests per minute: as saved on the Generate page (this
    process), else from the settings."""
    s = workspace().settings
    return jobs().llm or {"base_url": s.llm_base_url, "model": s.llm_model, "concurrency": s.llm_concurrency,
                          "requests_per_minute": s.llm_requests_per_minute}


def llm_client(endpoint: dict[str, Any] | None = None, **overrides: Any):
    """The LLM client for `endpoint` (default: the chosen one), or None: then the offline
    generator is used. Built by `Workspace.llm`; `overrides` go to LLMSettings (e.g. a short
    timeout for a test)."""
    key, _ = llm_key()
    return workspace().llm(endpoint or llm_endpoint(), api_key=key, **overrides)


# First start -----------------------------------------------------------------------------------
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


# Reviewers -------------------------------------------------------------------------------------
def auth_configured() -> bool:
    """Whether `[auth]` (OIDC sign-in) is configured in Streamlit secrets."""
    try:
        return "auth" in st.secrets
    except Exception:  # no secrets file at all
        return False


def auth_providers() -> list[str]:
    """Named providers (`[auth.NAME]` sections); empty when `[auth]` holds a single provider."""
    try:
        auth = st.secrets["auth"]
    except Exception:
        return []
    return [k for k, v in auth.items() if hasattr(v, "keys")]


def reviewer_identity() -> str | None:
    """Who decides: the signed-in user (email, else name) with auth, else the typed name."""
    if auth_configured():
        if not st.user.get("is_logged_in"):
            return None
        who = st.user.get("email") or st.user.get("name") or st.user.get("sub")
        return str(who) if who else None
    name = (st.session_state.get(REVIEWER_KEY) or "").strip()
    return name or None


def reviewer() -> str | None:
    """The reviewer, asking them to sign in (auth) or to give a name (single-user mode)."""
    if auth_configured():
        who = reviewer_identity()
        if who is None:
            st.info("Reviewers sign in, so that every decision records who made it.", icon=":material/login:")
            providers = auth_providers()
            for p in providers or [None]:
                label = f"Sign in with {p}" if p else "Sign in"
                st.button(label, key=f"login-{p or 'default'}", on_click=st.login, args=(p,) if p else (),
                          type="primary", icon=":material/login:")
            return None
        return who

    def keep() -> None:
        st.session_state[REVIEWER_KEY] = st.session_state["reviewer_name_input"].strip()

    st.session_state.setdefault("reviewer_name_input", st.session_state.get(REVIEWER_KEY, ""))
    st.text_input("Reviewer name", key="reviewer_name_input", on_change=keep, placeholder="e.g. Ann",
                  help="Recorded with every decision.")
    st.caption(
        "Single-user mode: no sign-in is configured. Add an `[auth]` section to `.streamlit/secrets.toml` "
        "(OIDC) to let several reviewers sign in."
    )
    who = reviewer_identity()
    if who is None:
        st.info("Type your name and press Enter to start reviewing.", icon=":material/badge:")
    return who


def sign_out(who: str) -> None:
    """Give back the reviewer's claimed cards, then sign out (auth mode)."""
    from loop.review import release

    run_safely(release, workspace().store, who)
    st.logout()
