"""The Streamlit app, page by page, with AppTest: a real workspace (DuckDB + Chroma in a temp
dir) whose model is the FakeEmbedder, injected through session state (ui.deps.WORKSPACE_KEY)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from loop.records import Document
from loop.rounds import Rounds
from storage.db import Store
from tests.fakes import FakeEmbedder
from tests.openai_server import MODEL, openai_server  # noqa: F401 - fixture
from ui import deps
from ui.deps import WORKSPACE_KEY
from ui.reviewers import REVIEWER_KEY

APP = Path(__file__).resolve().parent.parent / "app.py"
EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)> **not bold** [link](javascript:alert(1))'

TOPICS = {
    "files": "To open a file use the open function with a mode such as read or write and close the file after use.",
    "loops": "A for loop iterates over the items of a sequence; a while loop repeats while its condition holds.",
    "classes": "A class statement defines a new type with methods and attributes; instances are created by calling it.",
    "exceptions": "The try statement catches exceptions raised in its body; finally clauses always run at the end.",
    "imports": "The import statement loads a module and binds its name; packages are folders of modules.",
    "strings": "Strings are immutable sequences of characters; methods such as split and join transform them.",
    "dicts": "A dictionary maps hashable keys to values; lookups by key are fast and keys are unique.",
    "lambdas": "A lambda expression creates a small anonymous function from a single expression.",
    "context": "The with statement wraps a block with the enter and exit methods of a context manager.",
    "generators": "A generator function uses yield to produce a sequence of values lazily, one at a time.",
    "evil": "Untrusted markup follows: " + EVIL,
}


def pair_id(anchor: str) -> str:
    return "pair-" + anchor.replace(" ", "-")


def _pair(anchor: str, pid: str, text: str, priority: float, **extra) -> dict:
    return {"pair_id": pair_id(anchor), "anchor": anchor, "positive_id": pid,
            "positive_text": text, "source": "synthetic", "status": "pending", "priority": priority,
            "reason": "uncertain: the positive ranks 3rd", "round": 1,
            "meta": json.dumps({"features": {"pos_score": 0.41, "rank": 2, "margin": -0.03}, "generator": "offline:title"}),
            **extra}


@pytest.fixture
def ws(tmp_path):
    """A workspace with 11 one-passage documents and 4 pending review cards (one with markup)."""
    from loop.workspace import Workspace

    w = Workspace.open(tmp_path / "ws")
    w._embedders[w.active_model] = FakeEmbedder(w.active_model)
    w.add_documents([Document(doc_id=k, title=k, text=v) for k, v in TOPICS.items()], "tests")
    pid = {doc: w.store.first_passage_of_docs([doc])[doc] for doc in TOPICS}
    text = w.store.passages(list(pid.values()))
    pairs = [
        _pair("how do I open a file", pid["files"], text[pid["files"]], 0.9),
        _pair("iterate over a sequence", pid["loops"], text[pid["loops"]], 0.8),
        _pair("catch an error", pid["dicts"], text[pid["dicts"]], 0.7),  # wrong positive: pick fixes it
        _pair("untrusted markup", pid["evil"], text[pid["evil"]], 0.6),
    ]
    with w.store.transaction() as cur:
        Store.insert_ignore(cur, "pairs", pairs)
    w.pids = pid  # for the tests
    yield w
    deps._jobs.pop(w, None)
    w.close()


def app(ws, page: str = "ui/overview.py", reviewer: str | None = "ann") -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.session_state[WORKSPACE_KEY] = ws
    if reviewer:
        at.session_state[REVIEWER_KEY] = reviewer
    at.switch_page(page)
    return at.run()


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def wait_job(ws, kind: str, timeout: float = 60) -> dict:
    j = deps.jobs(ws)
    state = j.runner.wait(j.latest[kind], timeout)
    assert state["status"] != "running", f"{kind} job still running after {timeout}s"
    return state


def decisions(ws) -> list[dict]:
    return ws.store.rows("SELECT pair_id, reviewer, action, payload FROM decisions ORDER BY decision_id")


def html_bodies(at: AppTest) -> str:
    return "\n".join(h.proto.body for h in at.html)


# Every page ------------------------------------------------------------------------------------
@pytest.mark.parametrize("page, title", [
    ("ui/overview.py", "embedloop"), ("ui/data.py", "Data"), ("ui/generate.py", "Generate"),
    ("ui/review.py", "Review"), ("ui/train.py", "Train"), ("ui/evaluate.py", "Evaluate"),
    ("ui/search.py", "Search"), ("ui/export.py", "Export"),
])
def test_every_page_renders(ws, page, title):
    at = ok(app(ws, page))
    assert at.title[0].value == title
    assert not at.error, [e.value for e in at.error]


# Review ----------------------------------------------------------------------------------------
def test_accept_commits_the_decision_and_shows_the_next_card(ws):
    at = ok(app(ws, "ui/review.py"))
    assert "how do I open a file" in html_bodies(at)
    at.button(key="review_accept").click().run()
    ok(at)
    assert [(d["pair_id"], d["reviewer"], d["action"]) for d in decisions(ws)] == [
        ("pair-how-do-I-open-a-file", "ann", "accept")]
    assert ws.store.scalar("SELECT status FROM pairs WHERE pair_id = 'pair-how-do-I-open-a-file'") == "accepted"
    body = html_bodies(at)
    assert "iterate over a sequence" in body and "how do I open a file" not in body
    assert "3 cards left to review" in at.get("progress")[0].proto.text


def test_reject_edit_pick_and_undo(ws):
    at = ok(app(ws, "ui/review.py"))
    at.button(key="review_reject").click().run()  # card 1: files
    at.button(key="review_edit").click().run()    # card 2: loops, open the edit form
    ok(at)
    at.text_input(key=f"review_edit_query_{pair_id('iterate over a sequence')}").set_value("loop over a list")
    at.button[[b.label for b in at.button].index("Save the edited query")].click().run()
    ok(at)
    assert "catch an error" in html_bodies(at)  # card 3: its positive is the dicts passage
    picks = [b for b in at.button if b.key and b.key.startswith("review_pick_")]
    assert 1 <= len(picks) <= 9
    # The exceptions passage is among the model's top 9 for "catch an error"? Pick it by its text.
    target = ws.pids["exceptions"]
    options = at.session_state["review.topk"]["pair-catch-an-error"]
    i = [h.passage_id for h in options].index(target) + 1
    at.button(key=f"review_pick_{i}").click().run()
    ok(at)
    log = decisions(ws)
    assert [d["action"] for d in log] == ["reject", "edit", "pick"]
    assert json.loads(log[1]["payload"])["query"] == "loop over a list"
    assert json.loads(log[2]["payload"])["passage_id"] == target
    # the rejected / replaced passages became hard negatives
    negs = set(ws.store.execute("SELECT anchor, passage_id FROM negatives").fetchall())
    assert negs == {("how do I open a file", ws.pids["files"]), ("catch an error", ws.pids["dicts"])}
    assert ws.store.scalar("SELECT count(*) FROM pairs WHERE anchor = 'catch an error' AND positive_id = ? "
                           "AND status = 'accepted'", [target]) == 1
    at.button(key="review_undo").click().run()  # undo the pick: its card comes back
    ok(at)
    assert "catch an error" in html_bodies(at)
    assert ws.store.scalar("SELECT status FROM pairs WHERE pair_id = 'pair-catch-an-error'") == "pending"
    assert decisions(ws)[-1]["action"] == "undo"


def test_ticking_several_passages_labels_them_all_in_one_review(ws):
    at = ok(app(ws, "ui/review.py"))
    card = at.session_state["review.topk"]
    (pid, hits), = card.items()
    anchor = ws.store.scalar("SELECT anchor FROM pairs WHERE pair_id = ?", [pid])
    at.checkbox(key=f"review_mark_own_{pid}").check()
    at.checkbox(key=f"review_mark_{pid}_2").check()
    at.button(key="review_mark").click().run()
    ok(at)
    log = decisions(ws)
    assert [d["action"] for d in log] == ["mark"]
    payload = json.loads(log[0]["payload"])
    own = ws.store.scalar("SELECT positive_id FROM pairs WHERE pair_id = ?", [pid])
    assert payload["marked"] == [own, hits[1].passage_id] and payload["shown"] == len(hits) + 1
    assert ws.store.scalar("SELECT status FROM pairs WHERE pair_id = ?", [pid]) == "accepted"
    assert ws.store.scalar("SELECT count(*) FROM pairs WHERE anchor = ? AND positive_id = ? AND status = 'accepted'",
                           [anchor, hits[1].passage_id]) == 1
    negs = {p for (p,) in ws.store.execute("SELECT passage_id FROM negatives WHERE anchor = ?", [anchor]).fetchall()}
    assert negs == {h.passage_id for i, h in enumerate(hits) if i != 1}
    assert pid not in at.session_state["review.topk"]  # the next card shows


def test_markup_in_a_passage_is_shown_as_text(ws):
    at = app(ws, "ui/review.py")
    for _ in range(3):
        at.button(key="review_accept").click().run()
    ok(at)
    body = html_bodies(at)
    assert "<mark>Untrusted</mark> <mark>markup</mark> follows" in body  # the query's words are highlighted ...
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in body  # ... and the user's markup is escaped
    assert "<script>alert" not in body and "<img src=x" not in body
    assert all(not md.proto.allow_html for md in at.markdown)


def test_two_reviewers_get_different_cards(ws):
    ann = ok(app(ws, "ui/review.py", reviewer="ann"))
    bob = ok(app(ws, "ui/review.py", reviewer="bob"))
    assert "how do I open a file" in html_bodies(ann)
    assert "how do I open a file" not in html_bodies(bob) and "iterate over a sequence" in html_bodies(bob)


def test_single_user_mode_asks_for_a_name(ws):
    at = ok(app(ws, "ui/review.py", reviewer=None))
    assert any("Single-user mode" in c.value for c in at.caption)
    assert "review_accept" not in [b.key for b in at.button]
    at.text_input(key="reviewer_name_input").input("Cy").run()
    ok(at)
    at.button(key="review_accept").click().run()
    assert decisions(ws)[-1]["reviewer"] == "Cy"


AUTH = {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "s3cret", "client_id": "id",
        "client_secret": "secret", "server_metadata_url": "https://id.example.com/.well-known/openid-configuration"}


def test_with_auth_reviewers_sign_in_and_decisions_record_the_user(ws):
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.session_state[WORKSPACE_KEY] = ws
    at.secrets["auth"] = AUTH
    at.user = {"is_logged_in": False}
    at.switch_page("ui/review.py").run()
    ok(at)
    assert [b.label for b in at.button] == ["Sign in"]
    assert 'class="embedloop-text"' not in html_bodies(at)  # no card before sign-in
    at.user = {"is_logged_in": True, "email": "ann@example.com", "name": "Ann"}
    at.run()
    ok(at)
    at.button(key="review_accept").click().run()
    assert decisions(ws)[-1]["reviewer"] == "ann@example.com"
    assert not any("Single-user" in c.value for c in at.caption)


# Data ------------------------------------------------------------------------------------------
def test_uploaded_pairs_are_imported_by_a_job(ws):
    at = ok(app(ws, "ui/data.py"))
    rows = [{"anchor": f"question {i} about dictionaries", "positive_id": ws.pids["dicts"]} for i in range(3)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    at.file_uploader(key="upload-pairs").upload("pairs.jsonl", data, "application/json")
    at.button(key="import-pairs").click().run()
    wait_job(ws, "import")
    at.run()
    ok(at)
    assert ws.store.scalar("SELECT count(*) FROM pairs WHERE source = 'seed' AND status = 'accepted'") == 3
    assert any("finished" in s.value for s in at.success)


def test_a_bad_upload_gives_a_clear_error_and_imports_nothing(ws):
    at = app(ws, "ui/data.py")
    at.file_uploader(key="upload-pairs").upload("pairs.jsonl", b'{"anchor": "q", "positive_id": "nope"}\n{oops\n')
    at.button(key="import-pairs").click().run()
    assert wait_job(ws, "import")["status"] == "failed"
    at.run()
    errors = " ".join(e.value for e in at.error).replace("\\", "")  # messages are Markdown-escaped
    assert "pairs.jsonl, line 2: malformed JSON" in errors
    assert ws.store.scalar("SELECT count(*) FROM pairs WHERE source = 'seed'") == 0


def test_a_zip_with_an_unsafe_path_is_refused(ws):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../evil/corpus.jsonl", '{"_id": "x", "text": "y"}\n')
    at = app(ws, "ui/data.py")
    at.file_uploader(key="upload-beir").upload("beir.zip", buf.getvalue(), "application/zip")
    at.button(key="import-beir").click().run()
    assert wait_job(ws, "import")["status"] == "failed"
    at.run()
    assert any("unsafe path" in e.value.replace("\\", "") for e in at.error)
    assert not (ws.settings.workspace.parent / "evil").exists()


def test_a_beir_zip_is_ingested_with_its_qrels(ws):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("mini/corpus.jsonl", '{"_id": "b1", "title": "Bees", "text": "Bees make honey in hives."}\n'
                                        '{"_id": "b2", "title": "Ants", "text": "Ants build colonies underground."}\n')
        z.writestr("mini/queries.jsonl", '{"_id": "q1", "text": "who makes honey"}\n')
        z.writestr("mini/qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\tb1\t1\n")
    at = app(ws, "ui/data.py")
    at.file_uploader(key="upload-beir").upload("mini.zip", buf.getvalue(), "application/zip")
    at.button(key="import-beir").click().run()
    assert wait_job(ws, "import")["status"] == "done"
    assert ws.store.scalar("SELECT count(*) FROM documents WHERE doc_id IN ('b1', 'b2')") == 2
    assert ws.store.scalar("SELECT split FROM pairs WHERE anchor = 'who makes honey'") == "test"


def test_passage_browser_and_search(ws):
    at = ok(app(ws, "ui/data.py"))
    assert len(at.html) >= 10  # the first page of passages, as escaped text
    at.text_input(key="browse-query").input("context manager enter exit").run()
    ok(at)
    assert "<mark>context</mark> <mark>manager</mark>" in at.html[0].proto.body


# Generate --------------------------------------------------------------------------------------
def pairs_to_generate(at: AppTest):
    return next(n for n in at.number_input if n.label == "Pairs to generate")


def test_offline_generation_runs_as_a_job_and_shows_its_pairs(ws):
    at = ok(app(ws, "ui/generate.py"))
    assert any("offline generator is used" in i.value for i in at.info)
    pairs_to_generate(at).set_value(12)
    at.button[[b.label for b in at.button].index("Generate")].click().run()
    assert wait_job(ws, "generate")["status"] == "done"
    at.run()
    ok(at)
    assert ws.store.scalar("SELECT count(*) FROM pairs WHERE source = 'synthetic' AND status = 'candidate'") > 0
    assert [m.label for m in at.metric][:3] == ["Generated", "Kept", "New candidates"]
    assert "offline:" in at.dataframe[-1].value["generator"].iloc[0]


def test_llm_key_is_never_shown(ws, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret-key")
    at = AppTest.from_file(str(APP), default_timeout=30)
    at.session_state[WORKSPACE_KEY] = ws
    ws.settings.llm_api_key = __import__("pydantic").SecretStr("sk-very-secret-key")
    at.switch_page("ui/generate.py").run()
    ok(at)
    shown = " ".join(str(e.value) for kind in (at.caption, at.markdown, at.text_input, at.code, at.info) for e in kind)
    assert "sk-very-secret-key" not in shown and "API key: **set, from the environment" in shown


# Overview, Train, Evaluate ------------------------------------------------------------------------
def _seed_verified_pairs(ws, n: int = 12, split: str = "train") -> None:
    rows = []
    for i, doc in enumerate(list(TOPICS)[: n] * 2):
        pid = ws.pids[doc]
        text = ws.store.passages([pid])[pid]
        anchor = f"{doc} question {i}"
        rows.append({"pair_id": f"seed-{i}", "anchor": anchor, "positive_id": pid, "positive_text": text,
                     "source": "seed", "status": "accepted", "split": split})
    with ws.store.transaction() as cur:
        Store.insert_ignore(cur, "pairs", rows[:n])


def test_overview_measures_the_baseline_and_recommends(ws):
    _seed_verified_pairs(ws)
    at = ok(app(ws))
    assert "Review the 4 pending cards" in " ".join(m.value for m in at.markdown)
    at.button[[b.label for b in at.button].index("Measure the baseline")].click().run()
    assert wait_job(ws, "baseline")["status"] == "done"
    at.run()
    ok(at)
    assert any(m.label == "Baseline NDCG@10" for m in at.metric)
    reasons = " ".join(m.value for m in at.markdown)
    assert "your target is" in reasons and "Re-indexing" in reasons


def test_a_fixed_held_out_set_is_measured_without_asking(ws):
    _seed_verified_pairs(ws, split="eval")
    ok(app(ws))
    assert wait_job(ws, "baseline")["status"] == "done"
    at = ok(app(ws, "ui/evaluate.py"))
    assert any("Off-the-shelf baseline" in m.value for m in at.markdown)


def test_the_baseline_is_measured_again_when_a_round_grew_the_held_out_set(ws):
    _seed_verified_pairs(ws, split="eval")
    ok(app(ws))
    assert wait_job(ws, "baseline")["status"] == "done"
    first = deps.jobs(ws).result("baseline")
    assert first["held_out_pairs"] == 12
    pid = ws.pids[list(TOPICS)[0]]
    with ws.store.transaction() as cur:  # what a round's growth step does: six more held-out queries
        Store.insert_ignore(cur, "pairs", [
            {"pair_id": f"grown-{i}", "anchor": f"verified question {i}", "positive_id": pid,
             "positive_text": ws.store.passages([pid])[pid], "source": "seed", "status": "accepted", "split": "eval"}
            for i in range(6)])
    ok(app(ws))
    assert wait_job(ws, "baseline")["status"] == "done"
    again = deps.jobs(ws).result("baseline")
    assert again["held_out_pairs"] == 18 and again["report"].n_queries > first["report"].n_queries
    assert again["report"].evalset_fingerprint != first["report"].evalset_fingerprint
    ok(app(ws))  # measured for this set: not again
    assert deps.jobs(ws).result("baseline") is again


def test_train_page_shows_live_training_progress(ws):
    r = Rounds(ws).open()
    run = Rounds(ws).run_dir(r)
    run.mkdir(parents=True)
    events = [{"event": "log", "step": s, "max_steps": 20, "loss": 2.0 / s, "eta_seconds": 20 - s,
               "learning_rate": 3e-5} for s in range(1, 11)]
    (run / "progress.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    at = ok(app(ws, "ui/train.py"))
    assert any("Round **1**" in m.value for m in at.markdown)
    bar = at.get("progress")[0].proto
    assert bar.value == 50 and "step 10/20" in bar.text
    assert at.get("arrow_vega_lite_chart") or at.get("vega_lite_chart")


def test_train_page_fills_the_review_queue_with_a_job(ws):
    ws.store.execute("UPDATE pairs SET status = 'accepted'")  # an empty queue
    at = ok(app(ws, "ui/train.py"))
    at.button[[b.label for b in at.button].index("Generate and fill the review queue")].click().run()
    assert wait_job(ws, "round", timeout=90)["status"] == "done", deps.jobs(ws).status("round")
    at.run()
    ok(at)
    assert Rounds(ws).current().state == "review"


def _fake_round(ws) -> None:
    manifest = {
        "round": 1, "model": {"version": "r1-abc"},
        "metrics": {"base": {"ndcg@10": 0.50}, "active": {"ndcg@10": 0.50}, "candidate": {"ndcg@10": 0.58},
                    "matryoshka": {"64": 0.52, "128": 0.56, "384": 0.58}, "n_queries": 40},
        "vs_base": {"delta": 0.08, "ci_low": 0.03, "ci_high": 0.12},
        "promotion": {"promote": True, "reasons": ["Candidate r1-abc scores NDCG@10 0.5800 against 0.5000.",
                                                   "The whole interval is above zero: the gain is beyond noise."]},
    }
    ws.store.execute("INSERT INTO rounds (round, state, manifest) VALUES (1, 'done', ?)", [json.dumps(manifest)])


def test_evaluate_page_shows_rounds_promotion_and_rollback(ws):
    _fake_round(ws)
    at = ok(app(ws, "ui/evaluate.py"))
    table = at.dataframe[0].value
    assert list(table["round"]) == [1] and table["Δ vs base"].iloc[0] == pytest.approx(0.08)
    assert table["95% CI low"].iloc[0] == pytest.approx(0.03)
    assert any("promoted" in s.value for s in at.success)
    assert any("beyond noise" in m.value for m in at.markdown)
    at.button(key="rollback").click().run()
    assert any("Nothing to roll back" in e.value.replace("\\", "") for e in at.error)


def test_evaluate_page_shows_an_interval_for_every_metric(ws):
    from loop.evaluate import EvalReport, intervals

    _fake_round(ws)
    every = {m: {"base": 0.5, "other": 0.5 + d, "delta": d, "ci_low": d - 0.04, "ci_high": d + 0.04}
             for m, d in (("ndcg@10", 0.08), ("recall@10", 0.06), ("mrr@10", 0.05), ("map", 0.07))}
    manifest = json.loads(ws.store.scalar("SELECT manifest FROM rounds WHERE round = 1"))
    ws.store.execute("UPDATE rounds SET manifest = ? WHERE round = 1",
                     [json.dumps({**manifest, "vs_base_by_metric": every})])
    per_query = {"ndcg@10": [0.2, 0.6, 0.9, 0.4], "recall@10": [0.0, 1.0, 1.0, 0.5], "mrr@10": [0.1, 1.0, 0.5, 0.2],
                 "map": [0.1, 0.7, 0.8, 0.3]}
    report = EvalReport(model_version=ws.base_version, n_queries=4, n_docs=11, dim=64, k=100,
                        metrics={m: sum(v) / 4 for m, v in per_query.items()}, per_query=per_query,
                        query_ids=["q1", "q2", "q3", "q4"])
    jobs = deps.jobs(ws)
    jobs.latest["baseline"] = "job-b"
    jobs.results["job-b"] = {"report": report, "ci": (0.1, 0.9), "intervals": intervals(report), "speed": 100.0,
                             "model": ws.base_version}
    at = ok(app(ws, "ui/evaluate.py"))
    frames = [d.value for d in at.dataframe]
    base = next(f for f in frames if "metric" in f and "baseline" in f)
    assert list(base["metric"]) == ["ndcg@10", "recall@10", "mrr@10", "map"]
    assert (base["95% CI low"] <= base["baseline"]).all() and (base["baseline"] <= base["95% CI high"]).all()
    rounds = next(f for f in frames if "metric" in f and "Δ vs base" in f)
    assert list(rounds["metric"]) == ["ndcg@10", "recall@10", "mrr@10", "map"]
    assert rounds.set_index("metric").loc["mrr@10", "95% CI low"] == pytest.approx(0.01)


def test_overview_charts_rounds(ws):
    _fake_round(ws)
    at = ok(app(ws))
    assert any("95% bootstrap interval" in c.value for c in at.caption)


# Search, Export, first start ------------------------------------------------------------------------
def test_search_shows_one_column_when_the_active_model_is_the_base(ws):
    at = app(ws, "ui/search.py")
    at.text_input[0].input("open a file")
    at.button[0].click().run()
    ok(at)
    assert any("The active model is the base model" in c.value for c in at.caption)
    assert "<mark>open</mark> a <mark>file</mark>" in at.html[0].proto.body


def test_export_page_offers_downloads(ws):
    at = ok(app(ws, "ui/export.py"))
    assert [d.label for d in at.get("download_button")] == ["Accepted pairs (JSONL)", "Model card (README.md)"]


def test_first_start_ingests_the_demo_corpus_as_a_job(tmp_path):
    from loop.workspace import Workspace

    w = Workspace.open(tmp_path / "empty")
    w._embedders[w.active_model] = FakeEmbedder(w.active_model)
    try:
        at = ok(app(w))
        assert any("First start" in i.value for i in at.info)
        state = wait_job(w, deps.DEMO_JOB, timeout=120)
        assert state["status"] == "done", state
        assert w.status()["documents"] > 50
        from loop.demo import demo_queries

        assert w.status()["queries"] == len(demo_queries())  # the demo's query log came with it
        at.run()  # a rerun does not ingest again
        assert deps.jobs(w).latest[deps.DEMO_JOB] == state["job_id"]
        assert not deps.jobs(w).running(deps.DEMO_JOB)
    finally:
        deps._jobs.pop(w, None)
        w.close()


def test_search_shows_base_and_active_side_by_side(ws):
    from loop import indexing

    fine = FakeEmbedder("r1-fake", dim=32)  # another "model": its own collection, its own vectors
    ws.store.execute("INSERT INTO model_versions (version, path, sha256, status) VALUES ('r1-fake', '/nowhere', 'x', "
                     "'candidate')")
    ws._embedders["r1-fake"] = fine
    indexing.activate(ws.store, indexing.build(ws.store, ws.index, fine))
    at = app(ws, "ui/search.py")
    at.text_input[0].input("open a file")
    at.button[0].click().run()
    ok(at)
    assert [h.value for h in at.subheader] == ["Base model", "Active model"]
    assert len(at.html) == 20  # ten hits in each column
    # The engine searches by version (Workspace.search(version=...)); a collection no longer kept says so.
    base = ws.search("open a file", 10, version=ws.base_version)
    assert [h.passage_id for h in base] == [h.passage_id for h in indexing.search(
        ws.store, ws.index, ws.embedder(ws.base_version), ["open a file"], 10,
        collection=indexing.collection_for(ws.store, ws.base_version))[0]]
    ws.index.drop(indexing.collection_for(ws.store, ws.base_version))
    at.button[0].click().run()
    assert any("is not kept in this index" in e.value for e in at.error) and len(at.html) == 10


def test_a_lost_index_is_rebuilt_as_a_job_on_start(ws):
    ws.index.drop(ws.store.pointer("active_index"))
    at = ok(app(ws, "ui/search.py"))
    assert any("being rebuilt" in i.value for i in at.info)
    assert wait_job(ws, deps.INDEX_JOB)["status"] == "done"
    assert ws.store.pointer("active_index") in ws.index.collections()
    at.run()
    assert not any("being rebuilt" in i.value for i in at.info)


def test_a_running_job_can_be_stopped_from_its_panel(ws):
    def long_job(ctx):
        while True:
            ctx.check()  # raises Cancelled once Stop was pressed
            ctx.progress(1, 2, "Working")
            __import__("time").sleep(0.01)

    j = deps.jobs(ws)
    j.submit("round", long_job)
    at = ok(app(ws, "ui/train.py"))
    assert at.get("progress")[0].proto.text.startswith("Working")
    at.button(key="stop-round").click().run()
    assert wait_job(ws, "round", timeout=10)["status"] == "cancelled"


def test_an_empty_queue_says_so(ws):
    ws.store.execute("UPDATE pairs SET status = 'accepted'")
    at = ok(app(ws, "ui/review.py"))
    assert any("Nothing to review" in s.value for s in at.success)
    assert 'class="embedloop-text"' not in html_bodies(at)  # no card is drawn


def test_llm_endpoint_test_connection_and_generation(ws, openai_server):
    at = ok(app(ws, "ui/generate.py"))
    at.text_input[0].input(openai_server.base_url)
    at.text_input[1].input(MODEL)
    at.button[[b.label for b in at.button].index("Test connection")].click().run()
    ok(at)
    assert any("Connected" in s.value and MODEL in s.value.replace("\\", "") for s in at.success)
    assert deps.jobs(ws).llm is None  # testing does not switch the app to that endpoint
    at.button[[b.label for b in at.button].index("Save settings")].click().run()
    assert deps.jobs(ws).llm == {"base_url": openai_server.base_url, "model": MODEL, "concurrency": 16,
                                 "requests_per_minute": 6000.0}
    pairs_to_generate(at).set_value(6)
    at.button[[b.label for b in at.button].index("Generate")].click().run()
    assert wait_job(ws, "generate")["status"] == "done", deps.jobs(ws).status("generate")
    at.run()
    ok(at)
    assert openai_server.count >= 1
    assert not any("offline generator is used" in i.value for i in at.info)
    assert f"llm:{MODEL}" in set(at.dataframe[-1].value["generator"])


def test_generate_page_saves_the_endpoint_to_embedloop_toml(ws, monkeypatch):
    import tomllib

    from loop.config import CONFIG_FILE, load_settings

    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-written")
    cfg = ws.settings.workspace / CONFIG_FILE
    cfg.write_text("# my settings\nchunk_overlap = 16\nllm_model = \"old-model\"  # was\n\n[loop]\nreview_budget = 7\n"
                   "[loop.train]\nepochs = 2\n", encoding="utf-8")
    at = ok(app(ws, "ui/generate.py"))
    at.text_input[0].input("http://127.0.0.1:9/v1")
    at.text_input[1].input("my-llm")
    at.number_input(key="llm_concurrency").set_value(4)
    at.number_input(key="llm_requests_per_minute").set_value(120.0)
    at.button[[b.label for b in at.button].index("Save settings")].click().run()
    ok(at)
    text = cfg.read_text(encoding="utf-8")
    assert "sk-never-written" not in text and "api_key" not in text
    assert text.startswith("# my settings\nchunk_overlap = 16\n")  # the rest of the file is kept
    assert tomllib.loads(text) == {
        "chunk_overlap": 16, "llm_model": "my-llm", "llm_base_url": "http://127.0.0.1:9/v1", "llm_concurrency": 4,
        "llm_requests_per_minute": 120.0, "loop": {"review_budget": 7, "train": {"epochs": 2}}}
    s = load_settings(ws.settings.workspace)
    assert (s.llm_base_url, s.llm_model, s.llm_concurrency, s.llm_requests_per_minute) == (
        "http://127.0.0.1:9/v1", "my-llm", 4, 120.0)
    assert deps.jobs(ws).llm == {"base_url": "http://127.0.0.1:9/v1", "model": "my-llm", "concurrency": 4,
                                 "requests_per_minute": 120.0}
    assert any("Saved" in s.value for s in at.success)
