"""The `embedloop` command line, run as a user runs it: a subprocess on a workspace folder.

Commands that embed load the real bundled MiniLM and are marked slow. Failures that happen
before any model is needed (bad input, a locked workspace) run in the default, fast set.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loop.cli import main
from tests.conftest import ROOT, SHARED
from tests.reliability_report import case

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


# Slow: the loop commands on a small real corpus ----------------------------------------------
# Cranfield train queries 1-69 (the first 24 with qrels) and their three most relevant documents
# each, filled up to 80 documents. The bundled model ranks the documents of EVAL_QUERIES poorly in
# this corpus (NDCG@10 0 to 0.85), and the training pairs restate those queries ("question: ..."; a
# restatement that differed only in case or punctuation would be held out too), so one tiny epoch
# lifts the candidate beyond noise and promote, reindex and rollback run for real instead of
# stopping at "not promoted". Twelve of them: 35% are the development fold, and the 8 left give
# the default gate's sign-flip test enough queries to confirm a win (4 could not: p >= 1/16).
EVAL_QUERIES = ["7", "17", "19", "21", "22", "27", "28", "30", "48", "60", "64", "69"]
N_DEV = round(len(EVAL_QUERIES) * 0.35)  # LoopConfig.dev_share
N_QUERIES, N_DOCS, N_LOGGED, REVIEW_BUDGET = 24, 80, 6, 4
LOOP_TOML = f"""\
encode_backend = "torch"   # no ONNX export of each new model version: seconds, not minutes
[loop]
review_budget = {REVIEW_BUDGET}
generate_max = 6
[loop.train]
epochs = 1
batch_size = 16
max_seq_length = 64
learning_rate = 2e-4       # one epoch of 5 steps moves the model (3e-5 leaves it within noise)
"""
BAD_DECISIONS = {
    # label: (lines, the line the error names, a fragment of the error)
    "unknown-pair": (['{first}', '{{"pair_id": "nope", "action": "accept", "reviewer": "ann"}}'], 2,
                     "No pair with id 'nope'; nothing in this file was applied."),
    "same-card-twice": (['{first}', '{second}', '{{"pair_id": "{id0}", "action": "reject", "reviewer": "bo"}}'],
                        3, "pair {id0} is decided twice in this file (lines 1 and 3)"),
    "unknown-action": (['{first}', '{{"pair_id": "{id1}", "action": "maybe", "reviewer": "ann"}}'], 2, "action"),
}


def _cranfield_subset(out: Path) -> dict[str, Path]:
    """A slice of Cranfield: corpus, train and eval pairs (JSONL with document ids), a query log."""
    src = SHARED / "cranfield"

    def jsonl(name: str) -> list[dict]:
        return [json.loads(line) for line in (src / name).read_text(encoding="utf-8").splitlines()]

    qrels: dict[str, list[tuple[str, int]]] = {}
    for line in (src / "qrels" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        q, d, score = line.split("\t")
        qrels.setdefault(q, []).append((d, int(score)))
    qids = sorted(qrels, key=int)[:N_QUERIES]
    relevant = {q: [d for d, _ in sorted(qrels[q], key=lambda x: -x[1])[:3]] for q in qids}
    corpus = {o["_id"]: o for o in jsonl("corpus.jsonl")}
    keep = list(dict.fromkeys(d for q in qids for d in relevant[q]))
    keep += [d for d in corpus if d not in keep][: N_DOCS - len(keep)]
    queries = {o["_id"]: o["text"] for o in jsonl("queries.jsonl")}
    out.mkdir(parents=True)
    files = {"corpus": out / "corpus.jsonl", "train": out / "train.jsonl", "eval": out / "eval.jsonl",
             "log": out / "log.txt"}
    files["corpus"].write_text("".join(json.dumps(corpus[d]) + "\n" for d in keep), encoding="utf-8")
    train, held_out = [], []
    for q in qids:
        for d in relevant[q]:
            if q in EVAL_QUERIES:
                held_out.append({"anchor": queries[q], "positive_id": d})
                train.append({"anchor": "question: " + queries[q].removesuffix(" ."), "positive_id": d})
            else:
                train.append({"anchor": queries[q], "positive_id": d})
    files["train"].write_text("".join(json.dumps(p) + "\n" for p in train), encoding="utf-8")
    files["eval"].write_text("".join(json.dumps(p) + "\n" for p in held_out), encoding="utf-8")
    logged = [queries[q] for q in queries if q not in qrels][:N_LOGGED]
    files["log"].write_text("\n".join(logged) + "\n", encoding="utf-8")
    return files


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class LoopRun:
    """Every command of the loop, run once as a subprocess; what each returned, and the state after."""

    def __init__(self, root: Path):
        self.root = root
        self.ws = root / "ws"
        self.out: dict[str, subprocess.CompletedProcess[str]] = {}
        self.status: dict[str, dict] = {}
        self.queue: dict[str, list[dict]] = {}
        self.seconds: dict[str, tuple[float, float]] = {}  # label -> (wall, CPU) seconds

    def run(self, label: str, *args: str) -> subprocess.CompletedProcess[str]:
        t0, cpu0 = time.monotonic(), _children_cpu()
        self.out[label] = r = cli(self.ws, *args, timeout=300)
        self.seconds[label] = (time.monotonic() - t0, _children_cpu() - cpu0)
        return r

    def _in_process(self, *args: str):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--workspace", str(self.ws), *args])
        assert code == 0, err.getvalue()
        return json.loads(out.getvalue())

    def snapshot(self, label: str) -> None:
        """`status --json` and `review list --json` (in this process: no model is loaded for them)."""
        self.status[label] = self._in_process("status", "--json")
        self.queue[label] = self._in_process("review", "list", "--json")

    def state(self, label: str) -> tuple[int, str] | None:
        rounds = self.status[label]["rounds"]
        return (rounds[-1]["round"], rounds[-1]["state"]) if rounds else None

    def decisions_file(self, name: str, lines: list[str]) -> Path:
        path = self.root / name
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path


def _run_the_loop(run: LoopRun) -> None:
    files = _cranfield_subset(run.root / "cranfield")
    run.ws.mkdir()
    (run.ws / "embedloop.toml").write_text(LOOP_TOML, encoding="utf-8")
    for label, args in [("ingest", ["ingest", str(files["corpus"])]),
                        ("pairs-train", ["pairs", "import", str(files["train"])]),
                        ("pairs-eval", ["pairs", "import", str(files["eval"]), "--split", "eval"]),
                        ("queries", ["queries", "import", str(files["log"])])]:
        assert run.run(label, *args).returncode == 0, run.out[label].stderr
    run.snapshot("start")

    # Round 1: `round --until review`, the review queue, the steps one at a time, then `round --until done`.
    run.run("round --until review", "round", "--until", "review")
    run.run("review list", "review", "list")
    run.run("review list --json", "review", "list", "--json")
    run.run("train (pending)", "train")
    run.snapshot("train (pending)")
    cards = run.queue["train (pending)"]
    if len(cards) < 2:
        return  # the tests report what is missing
    values = {"first": json.dumps({"pair_id": cards[0]["pair_id"], "action": "accept", "reviewer": "ann"}),
              "second": json.dumps({"pair_id": cards[1]["pair_id"], "action": "accept", "reviewer": "ann"}),
              "id0": cards[0]["pair_id"], "id1": cards[1]["pair_id"]}
    for label, (lines, _, _) in BAD_DECISIONS.items():
        path = run.decisions_file(f"{label}.jsonl", [ln.format(**values) for ln in lines])
        run.run(f"apply {label}", "review", "apply", str(path))
        run.snapshot(f"apply {label}")
    # The good file: one of each action. The pick takes a passage proposed for another query (a
    # pick of one of this query's own cards would answer that card too, and this file decides it).
    other = next((c["positive_id"] for c in cards[1:] if c["anchor"] != cards[0]["anchor"]), None)
    good = [{"pair_id": cards[0]["pair_id"], "action": "pick", "passage_id": other, "reviewer": "ann"},
            {"pair_id": cards[1]["pair_id"], "action": "edit", "query": cards[1]["anchor"] + " in detail",
             "reviewer": "bo"}]
    good += [{"pair_id": c["pair_id"], "action": a, "reviewer": "ann"}
             for c, a in zip(cards[2:], ["reject", "accept"] * REVIEW_BUDGET)]
    path = run.decisions_file("good.jsonl", [json.dumps(d) for d in good])
    run.run("apply good", "review", "apply", str(path))
    run.snapshot("apply good")
    for step in ("train", "promote"):
        run.run(step, step)
        run.snapshot(step)
    run.run("round --until done", "round", "--until", "done", "--json")
    run.snapshot("round --until done")
    run.run("evaluate", "evaluate")
    run.run("evaluate --json", "evaluate", "--json")
    run.run("export", "export", str(run.root / "export"))
    run.run("rollback", "rollback")
    run.snapshot("rollback")

    # Round 2: generate and select; a step past review waits for the reviewers.
    for label, args in [("generate", ["generate"]), ("select", ["select"]), ("reindex (pending)", ["reindex"]),
                        ("round --until done (pending)", ["round", "--until", "done"])]:
        run.run(label, *args)
        run.snapshot(label)


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory) -> LoopRun:
    """The whole loop on 80 Cranfield documents with the bundled model, once for this module."""
    if not (SHARED / "cranfield" / "corpus.jsonl").exists():
        pytest.skip("../shared/datasets/cranfield is not present")
    run = LoopRun(tmp_path_factory.mktemp("loop"))
    with pytest.MonkeyPatch.context() as mp:  # the function-scoped isolation of conftest is not active yet
        for name in list(os.environ):
            if name.startswith("EMBEDLOOP_") or name in {"OPENAI_API_KEY", "OPENAI_BASE_URL"}:
                mp.delenv(name)
        mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        t0 = time.monotonic()
        _run_the_loop(run)
    cpu = sum(c for _, c in run.seconds.values())
    steps = ", ".join(f"{k} {w:.0f}s/{c:.0f}s" for k, (w, c) in sorted(run.seconds.items(), key=lambda kv: -kv[1][0]))
    print(f"\nthe loop through the CLI: {time.monotonic() - t0:.0f}s, {cpu:.0f}s CPU (wall/CPU: {steps})")
    return run


def _said(r: subprocess.CompletedProcess[str]) -> str:
    return f"exit {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-3000:]}"


@pytest.mark.slow
def test_loop_steps_exit_0_when_their_step_is_reached(loop_run):
    """round --until review|done, generate, select, train, promote: 0, and the round at that step.

    (`embedloop reindex` reaching its step is the same code: `round --until done` runs the reindex here.)
    """
    run = loop_run
    expected = {
        "round --until review": (1, "review"), "train": (1, "evaluate"), "promote": (1, "reindex"),
        "round --until done": (1, "done"), "generate": (2, "select"), "select": (2, "review"),
    }
    for label, (n, state) in expected.items():
        r = run.out[label]
        assert r.returncode == 0, f"{label}: {_said(r)}"
        assert r.stdout.startswith(f"round {n}: state {state}\n"), f"{label}: {_said(r)}"
        assert "Traceback" not in r.stderr
    for label, (n, state) in expected.items():
        if label in run.status:
            assert run.state(label) == (n, state), label
    for label in ("train (pending)", "select"):  # the queue each round filled
        assert sum(p.get("pending", 0) for p in run.status[label]["pairs"].values()) == REVIEW_BUDGET
    done = json.loads(run.out["round --until done"].stdout.split("\n", 1)[1])
    assert done["round"] == 1 and done["state"] == "done" and done["manifest"]["steps"]["reindex"]["collection"]


@pytest.mark.slow
def test_loop_steps_exit_1_when_their_step_is_not_reached(loop_run):
    """A step past review while cards wait for review: exit 1, the reason, the round stays at review."""
    run = loop_run
    for label, n in [("train (pending)", 1), ("reindex (pending)", 2), ("round --until done (pending)", 2)]:
        r = run.out[label]
        assert r.returncode == 1, f"{label}: {_said(r)}"
        assert "Traceback" not in r.stderr
        assert r.stdout.startswith(f"round {n}: state review ({REVIEW_BUDGET} cards are waiting for review."), \
            f"{label}: {_said(r)}"
        assert "--force" in r.stdout
        assert run.state(label) == (n, "review")
    # Nothing was trained meanwhile: no run folder, no model in the round.
    assert "model" not in run.status["train (pending)"]["rounds"][0]
    assert not (run.ws / "runs" / "round-002").exists() and "model" not in run.status["reindex (pending)"]["rounds"][1]


@pytest.mark.slow
def test_review_list_shows_the_queue(loop_run):
    run = loop_run
    r, rj = run.out["review list"], run.out["review list --json"]
    assert r.returncode == 0 and rj.returncode == 0, _said(r) + _said(rj)
    cards = json.loads(rj.stdout)
    assert len(cards) == REVIEW_BUDGET and r.stderr.strip() == f"{REVIEW_BUDGET} pending"
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == [c["pair_id"] for c in cards]
    assert [c["priority"] for c in cards] == sorted((c["priority"] for c in cards), reverse=True)
    for c in cards:
        assert c["source"] == "mined" and c["anchor"] and c["positive_id"] and c["positive_text"] and c["reason"]
        assert {"pos_score", "rank", "margin"} <= set(c["features"])


@pytest.mark.slow
@pytest.mark.parametrize("label", list(BAD_DECISIONS))
@case("Bad input", "`embedloop review apply FILE` with a bad decisions file after a good line",
      "exit 2, one line naming the file and the bad line; nothing of the file is applied (the good lines "
      "before it included)")
def test_review_apply_a_bad_file_applies_nothing(loop_run, label, record_property):
    run = loop_run
    _, line, fragment = BAD_DECISIONS[label]
    cards = run.queue["train (pending)"]
    fragment = fragment.format(id0=cards[0]["pair_id"])
    r = run.out[f"apply {label}"]
    assert_one_line_error(r, f"{label}.jsonl, line {line}:", fragment)
    after = run.status[f"apply {label}"]
    assert after["decisions"] == 0 and after["pairs"] == run.status["train (pending)"]["pairs"]
    assert run.queue[f"apply {label}"] == cards
    record_property("observed", r.stderr.strip())


@pytest.mark.slow
def test_review_apply_a_good_file(loop_run):
    run = loop_run
    r = run.out["apply good"]
    assert r.returncode == 0, _said(r)
    assert r.stdout.strip() == f"{REVIEW_BUDGET} decisions applied"
    st = run.status["apply good"]
    assert st["decisions"] == REVIEW_BUDGET and run.queue["apply good"] == []
    # pick, edit and reject leave the card rejected; the edit and the pick made new accepted pairs
    # (a pick of a passage that is a card of its own already accepts that card instead).
    assert st["pairs"]["mined"].get("rejected", 0) == 3
    assert 1 <= st["pairs"]["edited"]["accepted"] <= 2


@pytest.mark.slow
def test_promote_and_reindex_switch_the_active_model(loop_run):
    run = loop_run
    before, after = run.status["apply good"], run.status["round --until done"]
    base = before["active_model"]["version"]
    promoted = after["active_model"]["version"]
    assert before["active_index"]["model_version"] == base and promoted.startswith("r1-")
    r1 = after["rounds"][0]
    assert r1["promoted"] is True and r1["model"] == promoted
    assert after["active_index"]["model_version"] == promoted
    assert after["active_index"]["count"] == after["passages"] and after["active_index"]["status"] == "active"
    assert "Promote" in run.out["promote"].stderr and "verified and active" in run.out["round --until done"].stderr


@pytest.mark.slow
def test_evaluate_reports_base_and_active(loop_run):
    run = loop_run
    r, rj = run.out["evaluate"], run.out["evaluate --json"]
    assert r.returncode == 0 and rj.returncode == 0, _said(r) + _said(rj)
    out = json.loads(rj.stdout)
    base = run.status["start"]["active_model"]["version"]
    promoted = run.status["round --until done"]["active_model"]["version"]
    # The promotion set: the held-out queries less the development fold.
    assert out["n_dev_queries"] == N_DEV and out["n_queries"] == len(EVAL_QUERIES) - N_DEV
    assert list(out["models"]) == [base, promoted]
    assert "vs_base" not in out["models"][base]
    vs = out["models"][promoted]["vs_base"]
    assert vs["ci_low"] > 0 and vs["ci_low"] <= vs["delta"] <= vs["ci_high"]
    assert out["models"][promoted]["metrics"]["ndcg@10"] == pytest.approx(
        out["models"][base]["metrics"]["ndcg@10"] + vs["delta"])
    lines = r.stdout.splitlines()
    assert lines[0] == (f"{out['evalset']}: {len(EVAL_QUERIES) - N_DEV} queries (the promotion set; {N_DEV} more held-out "
                        f"queries are the development fold)")
    at_base, at_promoted = lines.index(f"{base}  (base)"), lines.index(promoted)
    assert at_base < at_promoted and not any("vs base" in ln for ln in lines[at_base:at_promoted])
    ndcg = next(ln for ln in lines[at_promoted:] if ln.strip().startswith("ndcg@10 "))
    assert f"vs base {vs['delta']:+.4f}" in ndcg


@pytest.mark.slow
def test_export_writes_the_active_model_and_the_pairs(loop_run):
    run = loop_run
    r = run.out["export"]
    assert r.returncode == 0, _said(r)
    promoted = run.status["round --until done"]["active_model"]["version"]
    d = run.root / "export"
    n_pairs = len((d / "pairs.jsonl").read_text(encoding="utf-8").splitlines())
    assert r.stdout.strip() == f"exported model {promoted} and {n_pairs} pairs to {d}"
    accepted = sum(by_status.get("accepted", 0) for by_status in run.status["round --until done"]["pairs"].values())
    assert n_pairs == accepted
    assert (d / "model" / "modules.json").is_file() and promoted in (d / "model" / "README.md").read_text()


@pytest.mark.slow
def test_rollback_returns_to_the_previous_index(loop_run):
    run = loop_run
    r = run.out["rollback"]
    assert r.returncode == 0, _said(r)
    before, after = run.status["round --until done"], run.status["rollback"]
    base = run.status["start"]["active_index"]
    assert after["active_model"]["version"] == base["model_version"] == run.status["start"]["active_model"]["version"]
    assert after["active_index"]["collection"] == base["collection"] != before["active_index"]["collection"]
    assert after["active_index"]["count"] == after["passages"]
    assert r.stdout.strip() == f"active index is now {base['collection']} (model {base['model_version']})"
