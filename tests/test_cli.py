"""The `embedloop` command line, run as a user runs it: a subprocess on a workspace folder.

Commands that embed load the real bundled MiniLM and are marked slow. Failures that happen
before any model is needed (bad input, a locked workspace) run in the default, fast set.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loop.cli import main

_SCRIPT = Path(sys.executable).parent / "embedloop"
EMBEDLOOP = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "loop.cli"]
TOPICS = ["for", "while", "if", "lambda", "numbers", "with"]


def cli(ws: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EMBEDLOOP, "--workspace", str(ws), *args], capture_output=True, text=True, timeout=timeout
    )


def ok(ws: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    r = cli(ws, *args, timeout=timeout)
    assert r.returncode == 0, f"embedloop {' '.join(args)} -> {r.returncode}\n{r.stderr}"
    return r


def status(ws: Path) -> dict:
    return json.loads(ok(ws, "status", "--json").stdout)


def assert_one_line_error(r: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("embedloop: error: ")
    for f in fragments:
        assert f in lines[0]


def counts_of(st: dict) -> tuple:
    idx = st["active_index"] or {}
    return (st["documents"], st["passages"], st["queries"], st["pairs"], st["decisions"], idx.get("count"))


@pytest.fixture
def topics_folder(tmp_path) -> Path:
    """A handful of real texts: Python Language Reference topics shipped with CPython."""
    from pydoc_data.topics import topics

    d = tmp_path / "pydoc"
    d.mkdir()
    for name in TOPICS:
        (d / f"{name}.txt").write_text(topics[name], encoding="utf-8")
    return d


# Fast: no model needed ---------------------------------------------------------------------
def test_status_json_on_an_empty_workspace(tmp_path, capsys):
    assert main(["--workspace", str(tmp_path / "ws"), "status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert counts_of(st) == (0, 0, 0, {}, 0, None)
    assert st["active_model"]["version"].startswith("base-") and st["active_model"]["status"] == "base"
    assert st["active_index"] is None
    assert (tmp_path / "ws" / "embedloop.toml").is_file()


BAD_CLI = [
    pytest.param(["ingest", "{d}/bad.jsonl"], ["bad.jsonl, line 2:", "malformed JSON"], id="ingest-malformed-jsonl"),
    pytest.param(["ingest", "{d}/missing"], ["missing: no such file or folder"], id="ingest-missing-path"),
    pytest.param(["pairs", "import", "{d}/pairs.jsonl"], ["pairs.jsonl, line 1:", "'nope' is neither"],
                 id="pairs-unknown-id"),
    pytest.param(["pairs", "import", "{d}/pairs.jsonl", "--limit", "-1"], ["limit must be at least 1"],
                 id="pairs-negative-limit"),
    pytest.param(["queries", "import", "{d}/queries.jsonl"], ["queries.jsonl, line 1:", "`text`"],
                 id="queries-without-text"),
]


@pytest.mark.parametrize("args, fragments", BAD_CLI)
def test_bad_input_exits_2_with_one_line_and_imports_nothing(tmp_path, capsys, args, fragments):
    d = tmp_path / "in"
    d.mkdir()
    (d / "bad.jsonl").write_text('{"_id": "1", "text": "fine"}\n{"_id": "2", "text": oops}\n', encoding="utf-8")
    (d / "pairs.jsonl").write_text('{"anchor": "a question", "positive_id": "nope"}\n', encoding="utf-8")
    (d / "queries.jsonl").write_text('{"_id": "q1"}\n', encoding="utf-8")
    ws = tmp_path / "ws"
    argv = ["--workspace", str(ws), *(a.format(d=d) for a in args)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("embedloop: error: ") and err.count("\n") == 1
    assert all(f in err for f in fragments), err
    assert main(["--workspace", str(ws), "status", "--json"]) == 0
    assert counts_of(json.loads(capsys.readouterr().out)) == (0, 0, 0, {}, 0, None)


def test_bad_input_in_a_subprocess_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "1", "text": "fine"}\n\n[1, 2]\n', encoding="utf-8")
    r = cli(tmp_path / "ws", "ingest", str(bad))
    assert_one_line_error(r, "bad.jsonl, line 3:", "expected a JSON object, got list")
    assert counts_of(status(tmp_path / "ws")) == (0, 0, 0, {}, 0, None)


_HOLDER = """
import sys, time
from loop.workspace import Workspace
ws = Workspace.open(sys.argv[1])
print("ready", flush=True)
time.sleep(300)
"""


def test_second_process_on_a_workspace_in_use(tmp_path):
    ws = tmp_path / "ws"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(ws)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 120)
        assert ready and holder.stdout.readline().strip() == "ready", holder.stderr.read() if holder.poll() else ""
        for args in (["status", "--json"], ["ingest", str(tmp_path)]):
            r = cli(ws, *args, timeout=120)
            assert_one_line_error(r, f"in use by process {holder.pid}", str(ws))
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # The lock dies with its process: the workspace opens again.
    assert status(ws)["documents"] == 0


def test_rollback_to_a_version_without_a_kept_index(tmp_path):
    r = cli(tmp_path / "ws", "rollback", "--to", "ft-nope", timeout=120)
    assert_one_line_error(r, "no kept index for model 'ft-nope'", "Versions you can roll back to: none")


# Slow: the real bundled model ----------------------------------------------------------------
@pytest.mark.slow
def test_cli_end_to_end_on_real_text(tmp_path, topics_folder):
    ws = tmp_path / "ws"
    t0 = time.monotonic()
    out = ok(ws, "init").stdout
    assert "Workspace ready" in out
    st = status(ws)
    assert st["active_index"]["count"] == 0 and st["active_index"]["status"] == "active"

    out = ok(ws, "ingest", str(topics_folder)).stdout
    assert f"{len(TOPICS)} documents added" in out
    st = status(ws)
    assert st["documents"] == len(TOPICS)
    assert st["passages"] >= len(TOPICS)
    assert st["active_index"]["count"] == st["passages"]
    assert st["active_index"]["model_version"] == st["active_model"]["version"]
    assert st["active_index"]["collection"].startswith("passages.")

    # Labelled pairs (by document id) and a query log show up in status.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"anchor": "how do I loop over a list", "positive": "for.txt", "negative": "if.txt"}) + "\n"
        + json.dumps({"anchor": "anonymous functions", "positive_id": "lambda.txt"}) + "\n", encoding="utf-8",
    )
    ok(ws, "pairs", "import", str(pairs), "--split", "train")
    queries = tmp_path / "log.txt"
    queries.write_text("context managers\n\nwhile loop else clause\ncontext managers\n", encoding="utf-8")
    ok(ws, "queries", "import", str(queries))
    st = status(ws)
    assert st["pairs"] == {"seed": {"accepted": 2}} and st["pairs_by_split"] == {"train": 2}
    assert st["queries"] == 2
    before = counts_of(st)

    # A second ingest (and import) changes no count and embeds nothing.
    out = ok(ws, "ingest", str(topics_folder)).stdout
    assert f"0 documents added, 0 updated, {len(TOPICS)} unchanged; 0 passages added; 0 vectors indexed" in out
    assert "0 pairs added" in ok(ws, "pairs", "import", str(pairs)).stdout
    assert counts_of(status(ws)) == before

    r = json.loads(ok(ws, "search", "the with statement and context managers", "--k", "3", "--json").stdout)
    assert r["model_version"] == st["active_model"]["version"]
    assert 1 <= len(r["hits"]) <= 3
    assert r["hits"][0]["doc_ids"] == ["pydoc/with.txt"]  # <folder>/<file>
    scores = [h["score"] for h in r["hits"]]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores) and scores[0] > 0.3
    assert all(h["passage_id"] and h["text"] for h in r["hits"])
    plain = ok(ws, "search", "anonymous lambda functions", "--k", "2").stdout
    assert plain.lstrip().startswith("1.") and "pydoc/lambda.txt" in plain.splitlines()[0]

    # Bad input on a populated workspace: exit 2, one line, nothing changes.
    bad = tmp_path / "more.jsonl"
    bad.write_text('{"_id": "x", "text": "good"}\n{"_id": "y", "text": "unterminated}\n', encoding="utf-8")
    assert_one_line_error(cli(ws, "ingest", str(topics_folder), str(bad)), "more.jsonl, line 2:")
    assert counts_of(status(ws)) == before
    print(f"\nCLI end to end: {time.monotonic() - t0:.1f}s")


@pytest.mark.slow
def test_ingest_demo(tmp_path):
    from loop.demo import demo_documents, demo_queries

    ws = tmp_path / "ws"
    t0 = time.monotonic()
    ok(ws, "ingest", "--demo")
    st = status(ws)
    assert st["documents"] == len(demo_documents()) > 50
    assert st["queries"] == len(demo_queries()) >= 120
    assert st["active_index"]["count"] == st["passages"] > st["documents"]
    out = ok(ws, "ingest", "--demo").stdout
    assert "0 documents added" in out and "0 vectors indexed" in out and "0 queries added" in out
    assert status(ws) == st
    r = json.loads(ok(ws, "search", "for loop over an iterable", "--json").stdout)
    assert any(d.startswith("pydoc/") for h in r["hits"] for d in h["doc_ids"])
    print(f"\ningest --demo: {time.monotonic() - t0:.1f}s")


@pytest.mark.slow
def test_cli_ingest_cranfield(tmp_path, cranfield):
    """The CLI on a real collection (1,400 documents; about 50 s with the default int8 encoder here)."""
    ws = tmp_path / "ws"
    ok(ws, "ingest", str(cranfield))
    ok(ws, "pairs", "import", str(cranfield), "--split", "train")
    st = status(ws)
    assert st["documents"] == 1400 and st["active_index"]["count"] == st["passages"]


@pytest.mark.slow
def test_cli_rollback_to_an_earlier_version_syncs_it_first(tmp_path, topics_folder):
    """`rollback --to VERSION` brings the kept index up to date with the corpus before switching."""
    from loop import indexing
    from loop.workspace import Workspace

    ws = tmp_path / "ws"
    ok(ws, "ingest", str(topics_folder))
    with Workspace.open(ws) as w:  # a promoted fine-tune, as a round leaves it (same weights, new version)
        base = w.base_version
        w.store.execute("INSERT INTO model_versions (version, path, parent, sha256, status) "
                        "SELECT 'ft-r1', path, version, sha256, 'candidate' FROM model_versions WHERE version = ?",
                        [base])
        indexing.activate(w.store, indexing.build(w.store, w.index, w.embedder("ft-r1")))
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "harbor.txt").write_text("Ships dock at the harbor pier before the storm season.\n", encoding="utf-8")
    ok(ws, "ingest", str(extra))  # only ft-r1's index follows

    out = ok(ws, "rollback", "--to", base).stdout
    assert f"(model {base})" in out
    st = status(ws)
    assert st["active_model"]["version"] == base
    assert st["active_index"]["count"] == st["passages"] > len(TOPICS)
    with Workspace.open(ws) as w:
        assert w.index.ids(w.store.pointer(indexing.ACTIVE_INDEX)) == set(w.store.passage_ids())
        assert w.store.scalar("SELECT status FROM model_versions WHERE version = 'ft-r1'") == "retired"


@pytest.mark.slow
def test_evaluate_gives_every_metric_an_interval(tmp_path, capsys):
    """`embedloop evaluate` on a small BEIR folder with the bundled model: every metric (not only
    NDCG@10) has its 95% bootstrap interval, in the JSON and in the text."""
    from pydoc_data.topics import topics

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": t, "title": t, "text": topics[t][:600]}) + "\n" for t in TOPICS), encoding="utf-8")
    queries = {"q1": "loop over the items of a list", "q2": "anonymous function expression",
               "q3": "conditional branches", "q4": "context manager enter and exit"}
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()),
                                        encoding="utf-8")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tfor\t1\nq2\tlambda\t1\nq3\tif\t1\n"
                                             "q4\twith\t1\n", encoding="utf-8")
    ws = ["--workspace", str(tmp_path / "ws")]
    assert main([*ws, "evaluate", "--beir", str(beir), "--json"]) == 0
    [(version, model)] = json.loads(capsys.readouterr().out)["models"].items()
    assert set(model["intervals"]) == set(model["metrics"]) >= {"ndcg@10", "recall@10", "mrr@10", "map"}
    for name, (mean, lo, hi) in model["intervals"].items():
        assert mean == pytest.approx(model["metrics"][name]) and lo <= mean <= hi
    assert main([*ws, "evaluate", "--beir", str(beir)]) == 0
    text = capsys.readouterr().out
    for name in ("ndcg@10", "recall@1", "recall@100", "mrr@10", "map"):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(name + " "))
        assert "[" in line and "]" in line, line
