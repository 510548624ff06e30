"""RELIABILITY.md, written from the results of the reliability tests (issue #6).

    .venv/bin/python -m tests.reliability_report            # every case, slow ones included
    .venv/bin/python -m tests.reliability_report --fast     # the fast tier only (slow cases: "not run")
    .venv/bin/python -m tests.reliability_report -- -x      # anything after -- goes to pytest

It runs pytest on the reliability tests (tests/test_faults.py, tests/test_reliability_table.py,
tests/test_security.py) and on the tests of other modules that cover a case already (listed in
`EXISTING`, or marked `@case` in one of the modules it runs), collects each one's outcome and the
`observed` text the test recorded with `record_property`, and writes the table: section, case,
expected, observed, result, node id, time. The exit status is pytest's, so a failing case fails
the command too (RELIABILITY.md is still written, with the failure in it).

Tests declare their case with `@case(section, title, expected)`; rows of a parametrized table
carry theirs in a `Row` parameter (`kind`, `title`, `expected`).
"""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "RELIABILITY.md"
COMMAND = ".venv/bin/python -m tests.reliability_report"

SECTIONS = [
    "Faults: kill -9 and restart",
    "Faults: lost or damaged index",
    "Concurrency",
    "Bad input",
    "Security",
    "Stuck or wrong state",
    "What a user hits",
]
OWN_FILES = ["tests/test_faults.py", "tests/test_reliability_table.py", "tests/test_security.py"]


def case(section: str, title: str, expected: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a test as the proof of one reliability case (read by the report; no pytest marker)."""
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}; use one of {SECTIONS}")

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.reliability = {"section": section, "title": title, "expected": expected}  # type: ignore[attr-defined]
        return fn

    return mark


# Tests in other modules that already prove a case: node id (or id prefix for a parametrized
# test, ending in "[") -> (section, title, expected). The bad-input rows of test_ingest take
# their expected error from the row itself.
EXISTING: dict[str, tuple[str, str, str]] = {
    "tests/test_rounds.py::test_a_query_imported_in_two_forms_is_held_out_in_both": (
        "Stuck or wrong state", "labelled pairs imported twice, as written and upper-cased with extra spaces",
        "the held-out set takes every form of a held-out query (one normalisation: case, spacing, trailing "
        "punctuation); no training pair uses a held-out query, so training is not refused"),
    "tests/test_rounds.py::test_a_stuck_workspace_drops_training_pairs_of_held_out_queries": (
        "Stuck or wrong state", "training pairs that repeat a held-out query in another case, spacing or "
        "trailing punctuation (eval pairs imported, then training pairs typed differently)",
        "the train step drops them from training with the reason 'its query is held out for evaluation' and "
        "says so; training goes ahead instead of failing with LeakageError on every run"),
    "tests/test_review.py::test_edit_onto_a_held_out_query_is_refused": (
        "Stuck or wrong state", "a reviewer edits a card's query into a held-out evaluation query (in another "
        "case, spacing or trailing punctuation)",
        "InputError saying the query is held out and what to do instead; the card stays pending, nothing written"),
    "tests/test_rounds.py::test_training_rows_prefer_reviewer_negatives_and_never_use_own_document": (
        "Stuck or wrong state", "a reviewer rejects one passage of a query and accepts another",
        "the rejected passage is that query's hard negative in the training rows (preferred over a mined one)"),
    "tests/test_config.py::test_bad_loop_train_settings_fail_when_the_round_settings_load[": (
        "What a user hits", "a bad [loop.train] setting in embedloop.toml",
        "ConfigError naming the key (e.g. loop.train.epochz) when the round settings load, before any "
        "generation or review work, not at the train step"),
    "tests/test_review.py::test_twenty_reviewers_decide_a_thousand_cards_exactly_once": (
        "Concurrency", "20 reviewers x 50 decisions at once (claim_next + decide, require_claim)",
        "exactly 1,000 decisions, each card once, no error for any reviewer"),
    "tests/test_review.py::test_an_abandoned_claim_goes_to_the_next_reviewer_after_expiry": (
        "Concurrency", "an abandoned claim", "the card returns to the queue after its expiry, not before"),
    "tests/test_review.py::test_a_card_claimed_by_another_reviewer_is_a_conflict": (
        "Concurrency", "deciding a card another reviewer holds", "ReviewConflict naming the holder"),
    "tests/test_db.py::test_second_process_is_refused_with_owner_pid": (
        "Concurrency", "a second process opens the same DuckDB file",
        "WorkspaceLockedError naming the owner's pid; the owner keeps reading and writing"),
    "tests/test_cli.py::test_second_process_on_a_workspace_in_use": (
        "Concurrency", "a second `embedloop` command on a workspace in use",
        "one-line error 'in use by process <pid>'; the workspace opens again once the owner is gone"),
    "tests/test_db.py::test_concurrent_append_decision_from_threads": (
        "Concurrency", "8 threads appending decisions", "distinct ids, none lost"),
    "tests/test_train.py::test_kill_9_then_restart_resumes_from_checkpoint": (
        "Faults: kill -9 and restart", "kill -9 the trainer itself, then restart it",
        "the restart resumes from the last complete checkpoint"),
    "tests/test_train.py::test_last_complete_checkpoint_skips_and_removes_torn_ones": (
        "Faults: kill -9 and restart", "a checkpoint torn by a kill during its save",
        "skipped and removed; the run resumes from the previous complete one"),
    "tests/test_train.py::test_read_progress_tolerates_a_torn_last_line": (
        "Faults: kill -9 and restart", "progress.jsonl torn by a kill mid-write", "the torn line is skipped"),
    "tests/test_indexing.py::test_lost_chroma_folder_is_rebuilt_from_duckdb": (
        "Faults: lost or damaged index", "Chroma folder deleted",
        "ensure_index() (`embedloop init`) rebuilds the active collection from DuckDB; it stays 'active'"),
    "tests/test_indexing.py::test_rebuilt_active_index_can_still_be_retired_and_rolled_back": (
        "Faults: lost or damaged index", "active collection dropped, rebuilt, then replaced",
        "the rebuilt one can still be retired and rolled back to"),
    "tests/test_indexing.py::test_failed_build_is_recorded_and_not_activatable": (
        "Faults: lost or damaged index", "a re-index that fails verification",
        "recorded 'failed'; it cannot become active; the old index keeps answering"),
    "tests/test_indexing.py::test_rollback_syncs_a_stale_collection_before_switching": (
        "Stuck or wrong state", "rollback after an ingest that only the active index followed",
        "the kept index is synced first (new passages embedded, removed ones deleted) and verified; "
        "search finds the new documents"),
    "tests/test_indexing.py::test_rollback_refuses_a_kept_index_that_fails_its_canaries": (
        "Stuck or wrong state", "rollback to a kept index whose vectors sit on the wrong passages",
        "VectorIndexError (canary); nothing switches; the active model stays 'active'"),
    "tests/test_indexing.py::test_rollback_to_any_earlier_version_keeps_model_status_true": (
        "Stuck or wrong state", "rollback to any earlier version (base, previous, older), back and forth",
        "that version's index and model become active; model_versions.status: switched to 'active', left "
        "'retired' (base stays 'base'); an active, unknown or never-indexed version is refused"),
    "tests/test_indexing.py::test_activate_refuses_a_collection_whose_count_differs_from_passages": (
        "Stuck or wrong state", "activating an index built before the corpus grew",
        "VectorIndexError naming both counts; the active index and model are unchanged"),
    "tests/test_indexing.py::test_collections_named_before_workspace_ids_keep_their_names": (
        "Stuck or wrong state", "a workspace from before workspace ids, opened after the migration",
        "gets an id; its collections keep their names (nothing re-embedded; search and rollback work); "
        "collections built from then on carry the id"),
    "tests/test_indexing.py::test_status_reports_the_count_the_index_really_holds": (
        "What a user hits", "status after vectors vanished from the active collection, or it was dropped",
        "the count Chroma really holds (None and the problem when it cannot be read), not DuckDB's record"),
    "tests/test_index.py::test_two_workspaces_on_one_chroma_server_keep_their_own_vectors": (
        "What a user hits", "two workspaces (same base model) on one `chroma run` server",
        "each writes its own collection (named with its workspace id); A's 5 hits and its count are the "
        "same after B ingests"),
    "tests/test_cli.py::test_rollback_to_a_version_without_a_kept_index": (
        "What a user hits", "`embedloop rollback --to` a version with no kept index",
        "one-line error listing the versions one can roll back to"),
    "tests/test_cli.py::test_cli_rollback_to_an_earlier_version_syncs_it_first": (
        "What a user hits", "`embedloop rollback --to VERSION` after an ingest",
        "VERSION is active, its index synced (count = passages); the model left is 'retired'"),
    "tests/test_ingest.py::test_bad_input_is_an_input_error_and_imports_nothing[": (
        "Bad input", "", ""),
    "tests/test_ingest.py::test_good_and_bad_file_together_import_nothing": (
        "Bad input", "file: a good and a bad file in one ingest", "error naming the bad file; neither is imported"),
    "tests/test_llm.py::test_key_never_leaks": (
        "Security", "API key in LLM errors, logs, repr and the cache (incl. a server echoing it)",
        "never present; shown as ***"),
    "tests/test_config.py::test_openai_api_key_is_a_secret_never_dumped": (
        "Security", "API key in settings dumps", "excluded from model_dump / repr"),
    "tests/test_config.py::test_config_errors_do_not_echo_the_key": (
        "Security", "API key in configuration errors", "not echoed"),
    "tests/test_index.py::test_collections_have_no_embedding_function": (
        "Security", "Chroma default embedding function (would download a model)",
        "never used: every collection is created with embedding_function=None"),
    "tests/test_export.py::test_export_refuses_a_bad_target[": (
        "Security", "export into a non-empty folder, a file, or the model folder", "InputError; nothing written"),
    "tests/test_app.py::test_with_auth_reviewers_sign_in_and_decisions_record_the_user": (
        "Security", "app: sign-in with [auth]", "no card before sign-in; decisions record the signed-in user"),
    "tests/test_app.py::test_markup_in_a_passage_is_shown_as_text": (
        "Security", "app: HTML/JS/Markdown in a passage", "shown as inert text"),
    "tests/test_app.py::test_llm_key_is_never_shown": (
        "Security", "app: the Generate page with a key set", "the key is never rendered ('API key: set')"),
    "tests/test_app.py::test_a_zip_with_an_unsafe_path_is_refused": (
        "Security", "app: BEIR zip upload with ../ in a member name", "refused as 'unsafe path'; nothing written outside"),
    # Issue 13, items 8-12.
    "tests/test_app.py::test_generate_page_saves_the_endpoint_to_embedloop_toml": (
        "What a user hits", "app: save the LLM endpoint on the Generate page (with a key in the environment)",
        "base URL, model, concurrency and requests per minute land in embedloop.toml; other keys, comments and "
        "[loop] tables kept; the key never written"),
    "tests/test_config.py::test_save_settings_keeps_the_rest_of_the_file_and_never_writes_a_key": (
        "Bad input", "saving a key, an unknown setting, a bad value or a table to embedloop.toml",
        "ConfigError; the file is unchanged"),
    "tests/test_evaluate.py::test_every_metric_gets_an_interval_from_one_resample_of_the_queries": (
        "What a user hits", "intervals of Recall/MRR/MAP (the README promises one for every metric)",
        "compare_all: a paired 95% interval for every metric from one resample of the queries; NDCG@10's unchanged"),
    "tests/test_cli.py::test_evaluate_gives_every_metric_an_interval": (
        "What a user hits", "`embedloop evaluate`: every metric's interval", "in --json and in the text, each metric"),
    "tests/test_app.py::test_evaluate_page_shows_an_interval_for_every_metric": (
        "What a user hits", "app: Evaluate page, every metric's interval",
        "the baseline's and each round's candidate-vs-base intervals for every metric"),
    "tests/test_ingest.py::test_same_relative_path_in_two_folders_is_two_documents": (
        "Stuck or wrong state", "x/a.txt and y/a.txt ingested (and a second folder named x)",
        "three documents (x/a.txt, y/a.txt, x~2/a.txt), none reported 'updated'; re-ingesting any of them "
        "changes nothing"),
    "tests/test_ingest.py::test_reingesting_a_folder_ingested_with_old_ids_adopts_them": (
        "Stuck or wrong state", "re-ingesting a folder whose documents have the old ids (a.txt)",
        "the rows are renamed in place (docs/a.txt): no duplicate documents; a changed file counts as updated"),
    "tests/test_ingest.py::test_pairs_may_name_a_folder_document_by_its_path_inside_the_folder": (
        "What a user hits", "a pair file naming a folder document the old way (a.txt)",
        "resolves while one folder has that path; with two, an InputError asking for the full id"),
    "tests/test_browser.py::test_review_with_the_keyboard_in_a_real_browser": (
        "What a user hits", "review in a real browser: type the reviewer name, press Enter, then A",
        "Enter leaves the name box, so A accepts the first card (it used to type 'a' into the name); "
        "six decisions by keyboard, each recorded once"),
    "tests/test_config.py::test_a_misspelt_environment_variable_is_warned_about_with_the_closest_setting": (
        "What a user hits", "a misspelt EMBEDLOOP_* environment variable (EMBEDLOOP_CHUNK_TOKEN)",
        "a warning naming it and the closest setting (EMBEDLOOP_CHUNK_TOKENS); no longer silently ignored"),
    "tests/test_config.py::test_the_cli_shows_the_misspelt_variable_on_stderr": (
        "What a user hits", "CLI with a misspelt EMBEDLOOP_* variable", "the warning is on stderr; the command works"),
    "tests/test_config.py::test_an_api_key_in_the_config_file_is_refused_with_where_keys_go[": (
        "Security", "an LLM API key written in embedloop.toml",
        "ConfigError naming the file and where keys go (OPENAI_API_KEY / EMBEDLOOP_LLM_API_KEY, Streamlit "
        "secrets); the key is not echoed"),
    "tests/test_config.py::test_the_key_is_read_from_the_two_documented_variables_only": (
        "Security", "LLM key in undocumented variables (LLM_API_KEY)",
        "not read: only OPENAI_API_KEY and EMBEDLOOP_LLM_API_KEY, as the README says"),
    "tests/test_rounds.py::test_training_rows_never_use_a_known_positive_as_a_negative": (
        "Stuck or wrong state", "training labels: a query with several accepted positives (mine_top 3), a variant "
        "in case or punctuation, a multi-chunk positive, a reviewer's reject later accepted",
        "no known positive of the query is its hard negative; each row lists them in `exclude` for the trainer"),
    "tests/test_rounds.py::test_select_does_not_score_a_known_positive_as_the_hard_negative": (
        "Stuck or wrong state", "routing a card whose query already has an accepted positive ranked above it",
        "the margin is measured against the best passage that is not a known positive"),
    "tests/test_ingest.py::test_demo_ingest_imports_its_query_log_and_rerunning_changes_nothing": (
        "What a user hits", "the demo (`ingest --demo`, the app's first start) on an empty workspace, twice",
        "the corpus and its query log of questions (no labels) are imported; the second run adds nothing"),
    "tests/test_bench.py::test_seeds_combine_into_means_promotions_and_pooled_intervals_of_the_active_model": (
        "What a user hits", "a benchmark over several seeds where the gate promotes in one seed and not another",
        "seed means in the same keys, promotions per seed, and intervals pooled over seeds and queries that "
        "compare the model the user has (the base when nothing was promoted)"),
    "tests/test_bench.py::test_pooled_bootstrap_resamples_seeds_and_queries": (
        "What a user hits", "a benchmark gain that one seed shows and another reverses",
        "the pooled interval spans both (-1..+1), where a query bootstrap alone would say 0 +- 0"),
}


NOTES = [
    "The kill tests run the owner as a real subprocess (`tests/fault_driver.py`) and SIGKILL it a random "
    "0.05-0.3 s after a marker it prints once a step is committed, so runs cover different interleavings.",
    "A damaged Chroma folder is detected the first time a process opens the index, moved aside (never "
    "deleted) and rebuilt for the active model; collections kept for rollback are not rebuilt. A deleted "
    "folder is reported at the first search with its fix, and `embedloop init` rebuilds it.",
    "Training: killing the owner leaves the trainer running (own session) and the next advance follows it; "
    "a restart after both died resumes from the last complete checkpoint; a trainer killed while its owner "
    "waits leaves the round at `train` with the reason, and running it again resumes the same run.",
    "Bad input: the {own}-row table of `tests/test_reliability_table.py` (uploads, review, LLM, training, "
    "configuration, paths) and the {ingest}-row import table of `tests/test_ingest.py` (files, pairs, queries) "
    "are one table here. Each row also checks that the workspace's data is unchanged.",
]


@dataclass
class Result:
    nodeid: str
    section: str
    title: str
    expected: str
    outcome: str = "not run"
    observed: str = ""
    seconds: float = 0.0
    slow: bool = False
    own: bool = True


@dataclass
class ReliabilityPlugin:
    """Keeps the reliability items (and their metadata) and records their outcomes."""

    output: Path = OUTPUT
    results: dict[str, Result] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    # Collection --------------------------------------------------------------------------
    def pytest_collection_modifyitems(self, session, config, items) -> None:
        keep = [item for item in items if self._record(item)]
        deselected = [i for i in items if i not in keep]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
        items[:] = keep

    def _record(self, item) -> bool:
        if item.nodeid not in self.results:
            meta = self._meta(item)
            if meta is None:
                return False
            self.results[item.nodeid] = meta
        return True

    def _meta(self, item) -> Result | None:
        slow = item.get_closest_marker("slow") is not None
        fn = getattr(item, "function", None)
        own = any(item.nodeid.startswith(f) for f in OWN_FILES)
        if own:
            row = getattr(item, "callspec", None) and item.callspec.params.get("row")
            if row is not None and hasattr(row, "title"):
                return Result(item.nodeid, "Bad input", f"{row.kind}: {row.title}", row.expected, slow=slow)
        meta = getattr(fn, "reliability", None)  # @case, in any module the report runs
        if meta is not None:
            title = meta["title"]
            if getattr(item, "callspec", None):
                title += f" ({item.callspec.id})"
            return Result(item.nodeid, meta["section"], title, meta["expected"], slow=slow, own=own)
        for key, (section, title, expected) in EXISTING.items():
            if item.nodeid == key or (key.endswith("[") and item.nodeid.startswith(key)):
                if "test_bad_input_is_an_input_error" in key:
                    params = item.callspec.params
                    kind = params["action"].split(":", 1)[0].replace("ingest", "file")
                    title = f"{kind}: {item.callspec.id}"
                    expected = f"InputError '{params['expected_error']}' naming {params['culprit']}" + (
                        f", line {params['line']}" if params["line"] else "") + "; nothing imported"
                elif key.endswith("["):
                    title = f"{title} ({item.callspec.id})"
                return Result(item.nodeid, section, title, expected, slow=slow, own=False)
        return None

    # Results -----------------------------------------------------------------------------
    def pytest_runtest_logreport(self, report) -> None:
        res = self.results.get(report.nodeid)
        if res is None:
            return
        res.seconds += report.duration
        for name, value in report.user_properties:
            if name == "observed":
                res.observed = str(value)
        if report.when == "call" or report.outcome != "passed":
            if report.skipped:
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                res.outcome, res.observed = "skipped", reason.removeprefix("Skipped: ")
            elif report.failed:
                res.outcome = "FAILED" if report.when == "call" else f"ERROR ({report.when})"
                msg = getattr(report.longrepr, "reprcrash", None)
                res.observed = (msg.message if msg else str(report.longrepr)).strip().splitlines()[0][:300]
            elif report.when == "call":
                res.outcome = "pass"
                res.observed = res.observed or "as expected (every assertion held)"

    def pytest_deselected(self, items) -> None:
        for item in items:  # e.g. slow tests under --fast: listed as not run
            if self._record(item) and self.results[item.nodeid].outcome == "not run":
                res = self.results[item.nodeid]
                res.observed = "deselected (slow: run without --fast)" if res.slow else "deselected"

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        for key in EXISTING:
            if not any(r.startswith(key) if key.endswith("[") else r == key for r in self.results):
                self.missing.append(key)
        self.output.write_text(render(self.results.values(), self.missing, time.time() - self.started),
                               encoding="utf-8")
        print(f"\nwrote {self.output}", file=sys.stderr)


# Rendering ---------------------------------------------------------------------------------
_TMP = re.compile(r"/\S*?pytest-of-[^/\s]+/pytest-\d+/[^/\s]+")


def _cell(text: str) -> str:
    text = _TMP.sub("<tmp>", str(text))  # the run's temp folders would change the file every run
    return " ".join(text.split()).replace("|", "\\|") or "-"


def render(results, missing: list[str], seconds: float) -> str:
    results = list(results)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    lines = [
        "# Reliability",
        "",
        "Reviewers' decisions are the most expensive data embedloop holds; this file lists the cases that",
        "show none is lost (issue #6): processes killed mid-work, a damaged index, many reviewers at once,",
        "bad input of every kind, and the secrets and paths that must not leak or escape.",
        "",
        f"**Generated by the tests; do not edit.** Regenerate with `{COMMAND}` (add `--fast` to skip",
        "the slow tier). Each row is one test: *expected* is what the test asserts, *observed* is what it",
        "recorded (or the failure), *result* is its outcome in the run below.",
        "",
        f"- run: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {seconds:.0f} s, Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "- results: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
        "- tests written for this file live in " + ", ".join(f"`{f}`" for f in OWN_FILES)
        + " (driver: `tests/fault_driver.py`); the others are existing tests of the module concerned.",
        "",
    ]
    table_rows = {
        "own": sum(1 for r in results if r.nodeid.startswith("tests/test_reliability_table.py::test_bad_input")),
        "ingest": sum(1 for r in results if r.nodeid.startswith("tests/test_ingest.py::test_bad_input")),
    }
    lines += ["## Notes", ""] + [f"- {n.format(**table_rows)}" for n in NOTES] + [""]
    for section in SECTIONS:
        rows = sorted((r for r in results if r.section == section), key=lambda r: not r.own)
        if not rows:
            continue
        lines += [f"## {section}", "", "| case | expected | observed | result | test | s |", "|---|---|---|---|---|---|"]
        for r in rows:
            where = r.nodeid.split("::", 1)
            test = f"`{where[0]}` `{_cell(where[1]) if len(where) > 1 else ''}`"
            slow = " (slow)" if r.slow else ""
            lines.append(f"| {_cell(r.title)} | {_cell(r.expected)} | {_cell(r.observed)} | "
                         f"**{r.outcome}**{slow} | {test} | {r.seconds:.1f} |")
        lines.append("")
    if missing:
        lines += ["## Referenced tests not found", "",
                  "These cases are covered by the app tests (or the module's own tests) once they exist:", ""]
        lines += [f"- `{m.rstrip('[')}`" for m in missing]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import pytest

    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    fast = "--fast" in argv
    files = sorted({*OWN_FILES, *(k.split("::", 1)[0] for k in EXISTING)})
    files = [f for f in files if (ROOT / f).exists()]
    args = ["-p", "no:cacheprovider", "-q", "-m", "not slow" if fast else "", *extra, *files]
    os.chdir(ROOT)
    return int(pytest.main(args, plugins=[ReliabilityPlugin()]))


if __name__ == "__main__":
    sys.exit(main())
