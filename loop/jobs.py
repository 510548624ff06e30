"""Background jobs in the owning process: start, watch, cancel, recover after a restart.

Long work (generation, a round's steps, training, re-index) never runs in a Streamlit script
thread: `JobRunner.submit` runs it in a thread, records it in the `jobs` table, and keeps its
log and progress where any page can poll them. A rerun never repeats work because a kind of
job runs at most once at a time, and the round steps it calls are idempotent.
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loop.errors import EmbedloopError
from loop.procs import pid_alive
from storage.db import Store


class JobError(EmbedloopError):
    """A job cannot be started (e.g. one of the same kind is running)."""


class Cancelled(EmbedloopError):
    """Raised inside a job that noticed its cancel request."""


@dataclass
class JobContext:
    """Handed to a job function: report progress and log lines, check for cancellation."""

    job_id: str
    kind: str
    lines: list[str] = field(default_factory=list)
    done: int = 0
    total: int = 0
    message: str = ""
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    on_cancel: list[Callable[[], None]] = field(default_factory=list)

    def log(self, line: str) -> None:
        self.lines.append(f"{time.strftime('%H:%M:%S')} {line}")
        del self.lines[:-500]  # keep the tail

    def progress(self, done: int, total: int, message: str = "") -> None:
        self.done, self.total = done, total
        if message:
            self.message = message

    def check(self) -> None:
        if self.cancel_requested.is_set():
            raise Cancelled("Cancelled by the user.")


class JobRunner:
    """One per owning process (the app caches it with the workspace)."""

    def __init__(self, store: Store):
        self.store = store
        self._jobs: dict[str, tuple[threading.Thread, JobContext]] = {}
        self._lock = threading.Lock()
        self.recover()

    def recover(self) -> list[str]:
        """Jobs recorded as running by a process that is gone are marked 'interrupted'.

        Their work resumes when started again: round steps are idempotent, and a training run
        resumes from its last checkpoint.
        """
        rows = self.store.rows("SELECT job_id, pid FROM jobs WHERE status = 'running'")
        stale = [r["job_id"] for r in rows if r["pid"] != os.getpid() and not pid_alive(r["pid"])]
        for job_id in stale:
            self.store.execute(
                "UPDATE jobs SET status = 'interrupted', error = 'the process running it stopped', "
                "updated_at = current_timestamp WHERE job_id = ?",
                [job_id],
            )
        return stale

    def running(self, kind: str | None = None) -> list[JobContext]:
        with self._lock:
            return [ctx for t, ctx in self._jobs.values() if t.is_alive() and (kind is None or ctx.kind == kind)]

    def submit(self, kind: str, fn: Callable[[JobContext], Any], args: dict[str, Any] | None = None) -> str:
        """Run `fn(ctx)` in a thread. Refuses when a job of the same kind is still running."""
        with self._lock:
            if any(t.is_alive() and c.kind == kind for t, c in self._jobs.values()):
                raise JobError(f"A {kind} job is already running; wait for it or cancel it.")
            job_id = f"{kind}-{uuid.uuid4().hex[:8]}"
            ctx = JobContext(job_id, kind)
            self.store.execute(
                "INSERT INTO jobs (job_id, kind, status, pid, args) VALUES (?, ?, 'running', ?, ?)",
                [job_id, kind, os.getpid(), json.dumps(args or {})],
            )
            thread = threading.Thread(target=self._run, args=(fn, ctx), name=job_id, daemon=True)
            self._jobs[job_id] = (thread, ctx)
            thread.start()
        return job_id

    def _run(self, fn: Callable[[JobContext], Any], ctx: JobContext) -> None:
        status, error = "done", None
        try:
            result = fn(ctx)
            if result is not None:
                ctx.log(f"Result: {result}")
        except Cancelled as e:
            status, error = "cancelled", str(e)
        except EmbedloopError as e:
            status, error = "failed", str(e)
        except Exception as e:  # a bug: keep the traceback in the job's log
            status, error = "failed", f"{type(e).__name__}: {e}"
            ctx.log(traceback.format_exc())
        if error:
            ctx.log(error)
        self.store.execute(
            "UPDATE jobs SET status = ?, error = ?, progress = ?, updated_at = current_timestamp WHERE job_id = ?",
            [status, error, json.dumps({"done": ctx.done, "total": ctx.total, "log": ctx.lines[-50:]}), ctx.job_id],
        )

    def status(self, job_id: str) -> dict[str, Any]:
        """Live state of a job of this process, else what the `jobs` table recorded."""
        rows = self.store.rows("SELECT job_id, kind, status, error, progress FROM jobs WHERE job_id = ?", [job_id])
        if not rows:
            raise JobError(f"No job {job_id!r}.")
        row = rows[0]
        entry = self._jobs.get(job_id)
        if entry is not None:
            _thread, ctx = entry
            row.update(done=ctx.done, total=ctx.total, message=ctx.message, log=list(ctx.lines))
        else:
            row.update(json.loads(row.pop("progress") or "{}"))
        row.pop("progress", None)
        return row

    def cancel(self, job_id: str) -> None:
        entry = self._jobs.get(job_id)
        if entry is None:
            raise JobError(f"Job {job_id!r} is not running in this process.")
        ctx = entry[1]
        ctx.cancel_requested.set()
        for hook in ctx.on_cancel:
            hook()

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        entry = self._jobs.get(job_id)
        if entry is not None:
            entry[0].join(timeout)
        return self.status(job_id)
