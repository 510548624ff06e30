import threading

import pytest

from loop.errors import InputError
from loop.jobs import JobError, JobRunner


def test_job_runs_in_a_thread_and_records_its_result(store):
    runner = JobRunner(store)
    release = threading.Event()

    def work(ctx):
        ctx.progress(1, 2, "half way")
        ctx.log("started")
        release.wait(5)
        ctx.progress(2, 2)
        return "fine"

    job = runner.submit("generate", work)
    live = runner.status(job)
    assert live["status"] == "running" and live["kind"] == "generate"
    with pytest.raises(JobError, match="already running"):
        runner.submit("generate", work)
    release.set()
    done = runner.wait(job, timeout=5)
    assert done["status"] == "done" and done["done"] == 2 and any("started" in line for line in done["log"])
    assert store.scalar("SELECT status FROM jobs WHERE job_id = ?", [job]) == "done"


def test_project_errors_fail_the_job_with_their_message(store):
    runner = JobRunner(store)

    def work(ctx):
        raise InputError("the file is empty", "x.jsonl")

    job = runner.submit("ingest", work)
    st = runner.wait(job, timeout=5)
    assert st["status"] == "failed" and "x.jsonl: the file is empty" in st["error"]


def test_cancel_reaches_the_job_and_its_hooks(store):
    runner = JobRunner(store)
    hooked = threading.Event()

    def work(ctx):
        ctx.on_cancel.append(hooked.set)
        while True:
            ctx.check()
            ctx.cancel_requested.wait(0.01)

    job = runner.submit("train", work)
    runner.cancel(job)
    st = runner.wait(job, timeout=5)
    assert st["status"] == "cancelled" and hooked.is_set()


def test_jobs_of_a_dead_process_are_marked_interrupted(store):
    store.execute("INSERT INTO jobs (job_id, kind, status, pid) VALUES ('old', 'train', 'running', 999999)")
    runner = JobRunner(store)  # recovers on start
    assert store.scalar("SELECT status FROM jobs WHERE job_id = 'old'") == "interrupted"
    assert runner.status("old")["status"] == "interrupted"
