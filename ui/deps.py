"""Dependency wiring for the app, and the one place engine errors become messages.

- `workspace()`: the process's only Workspace (it owns the DuckDB file and the Chroma index),
  opened once with `st.cache_resource`. Tests inject their own under `WORKSPACE_KEY` in
  session state (a workspace built like tests/conftest.py's, with a FakeEmbedder).
- `jobs()`: the workspace's `JobRunner` plus what pages need to find their jobs again. Long
  work runs there, never in the script thread; `job_panel` polls it from a fragment.
- `run_safely` / `show_error`: project errors (and a pydantic validation error of a value the
  user typed) become one red message; anything else is a bug and keeps its traceback.
- `llm_key()` / `llm_endpoint()` / `llm_client()`: the LLM endpoint this process uses.

The reviewer's identity and sign-in are in ui/reviewers.py; the first-start demo corpus is in
ui/first_start.py.
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
DEMO_JOB = "ingest-demo"
INDEX_JOB = "reindex"  # DEMO_JOB and INDEX_JOB: the first start's jobs (ui/first_start.py)


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
