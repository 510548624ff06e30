"""Bad input of every kind (issue #6): one table, each row with the error it must produce.

Every row runs against one shared workspace (12 documents, 12 verified pairs with their held-out
split fixed, review cards pending, decided and claimed) and must leave its data exactly as it was:
documents, passages, pairs, decisions, negatives, queries, the active pointers and the index. A
row that must change something (a success with a safety property) gets a fresh workspace.

The file, pair and query imports are the 44-row table of tests/test_ingest.py; this table adds
the app's upload path, review decisions, LLM replies, training faults, configuration, and paths.
RELIABILITY.md lists both (`python -m tests.reliability_report`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from loop import indexing, train
from loop.errors import ConfigError, InputError, NotFoundError, VectorIndexError
from loop.evalsets import evalset_from_beir
from loop.export import export
from loop.jobs import JobRunner
from loop.llm import LLMClient, LLMError, LLMSettings
from loop.prompts import PromptError, load_prompt
from loop.review import DecisionIn, ReviewConflict, claim_next, decide, read_decisions
from loop.rounds import LeakageError, LoopConfig, Rounds
from loop.workspace import Workspace
from storage.db import Store
from storage.index import VectorIndex
from storage.llm_cache import LLMCache
from tests.fakes import FakeEmbedder
from tests.fault_driver import docs
from tests.openai_server import MODEL, FakeOpenAI, Reply

KEY = "sk-table-SECRET-9b8a7c6d"
TINY_TRAIN = {"epochs": 1, "batch_size": 8, "max_seq_length": 32}
TRAIN_LOOP = {"generate_threshold": 0, "train": TINY_TRAIN, "mining": {"num_negatives": 0}}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# The shared workspace ---------------------------------------------------------------------------
class Env:
    """The shared workspace, its fake LLM server, and what rows need to find in it."""

    def __init__(self, root: Path):
        self.root = root
        self.server = FakeOpenAI().start()
        self.ws = open_ws(root / "ws")
        # 20 documents: 12 with verified pairs (5 become the held-out set), 4 with review cards, and
        # 4 without pairs, which generation picks.
        self.ws.add_documents(docs(20), "tests")
        self.pids = self.ws.store.first_passage_of_docs([f"doc{i:03d}" for i in range(20)])
        self._pairs("accepted", range(12), "seed")
        self.cards = self._pairs("pending", range(12, 16), "card")
        heldout = Rounds(self.ws).heldout
        heldout.ensure()  # fixed, and the rest trained on, as the first train step would
        heldout.record_trained([f"seed question {n}" for n in range(12)], 1)
        decide(self.ws.store, DecisionIn(pair_id=self.cards[0], action="reject", reviewer="ann"))
        self.decided = self.cards[0]
        assert claim_next(self.ws.store, "zoe", claim_seconds=3600).pair_id == self.cards[1]
        self.claimed = self.cards[1]
        self.config_text = (root / "ws" / "embedloop.toml").read_text()

    def _pairs(self, status: str, doc_numbers: range, prefix: str) -> list[str]:
        texts = self.ws.store.passages(list(self.pids.values()))
        rows = []
        for n, i in enumerate(doc_numbers):
            pid = self.pids[f"doc{i:03d}"]
            rows.append({"pair_id": f"{prefix}{n}", "anchor": f"{prefix} question {n}", "positive_id": pid,
                         "positive_text": texts[pid], "source": "seed" if status == "accepted" else "synthetic",
                         "status": status, "split": "train", "priority": float(10 - n)})
        with self.ws.store.transaction() as cur:
            Store.insert_ignore(cur, "pairs", rows)
        return [r["pair_id"] for r in rows]

    def fingerprint(self) -> dict[str, str]:
        """A digest per table of everything a reviewer or an import could lose or corrupt."""
        out = {}
        for name, sql in {
            "documents": "SELECT doc_id, source, title, content_hash FROM documents",
            "passages": "SELECT passage_id, text FROM passages",
            "doc_passages": "SELECT * FROM doc_passages",
            "pairs": "SELECT * EXCLUDE (created_at, updated_at) FROM pairs",
            "decisions": "SELECT * FROM decisions",
            "negatives": "SELECT anchor, passage_id, source FROM negatives",
            "queries": "SELECT query_id, text FROM queries",
            "pointers": "SELECT name, value FROM pointers",
        }.items():
            rows = sorted(map(repr, self.ws.store.execute(sql).fetchall()))
            out[name] = f"{len(rows)} rows " + hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]
        active = self.ws.store.pointer(indexing.ACTIVE_INDEX)
        out["index"] = f"{active}: {self.ws.index.count(active)} vectors"
        return out

    def close_open_rounds(self) -> None:
        """Rows are independent: a round left open by an earlier row does not carry over."""
        self.ws.store.execute("UPDATE rounds SET state = 'failed', error = 'closed between table rows' "
                              "WHERE state NOT IN ('done', 'failed')")

    def close(self) -> None:
        self.ws.close()
        self.server.stop()


def open_ws(path: Path, **overrides: Any) -> Workspace:
    ws = Workspace.open(path, **overrides)
    ws._embedders[ws.base_version] = FakeEmbedder(ws.base_version)
    return ws


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # conftest's isolation, for a module-scoped fixture
        for name in [n for n in os.environ if n.startswith("EMBEDLOOP_")] + ["OPENAI_API_KEY", "OPENAI_BASE_URL"]:
            mp.delenv(name, raising=False)
        e = Env(tmp_path_factory.mktemp("table"))
        yield e
        e.close()


# The rows ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    kind: str
    title: str
    expected: str  # a substring of the error message (or of the observed outcome)
    run: Callable[..., str]  # (env, tmp, mp) -> the observed message
    changes_data: bool = False  # the row works on a fresh workspace of its own

    def __str__(self) -> str:
        return f"{self.kind}: {self.title}"


def raises(exc: type[BaseException] | tuple[type[BaseException], ...], fn: Callable[[], Any]) -> str:
    try:
        fn()
    except exc as e:
        return str(e)
    raise AssertionError(f"expected {exc} but nothing was raised")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files_under(root: Path, skip: tuple[Path, ...] = ()) -> set[Path]:
    return {p for p in root.rglob("*") if not any(p.is_relative_to(s) for s in skip)}


# Uploads through the app's job (ui.tasks.import_uploads under the JobRunner) --------------------
def upload(kind: str, name: str, data: bytes) -> Callable[..., str]:
    def run(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
        from ui.tasks import import_uploads

        jobs = JobRunner(env.ws.store)
        state = jobs.wait(jobs.submit("import", import_uploads(env.ws, kind, [(name, data)], {})), 60)
        assert state["status"] == "failed", state
        stored = env.ws.store.scalar("SELECT error FROM jobs WHERE job_id = ?", [state["job_id"]])
        assert stored == state["error"] and "Traceback" not in stored  # what the Data page shows
        return stored

    return run


# Review decisions (the functions the Review page calls) -----------------------------------------
def decision(exc, **fields: Any) -> Callable[..., str]:
    def run(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
        values = {"pair_id": env.cards[2], "action": "accept", "reviewer": "ann", **fields}
        values = {k: (v(env) if callable(v) else v) for k, v in values.items()}
        return raises(exc, lambda: decide(env.ws.store, DecisionIn(**values), require_claim=False))

    return run


def decisions_file(text: str) -> Callable[..., str]:
    def run(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
        path = tmp / "decisions.jsonl"
        path.write_text(text, encoding="utf-8")
        return raises(InputError, lambda: read_decisions(path, env.ws.max_bytes))

    return run


# LLM replies (a round's generate step against the fake OpenAI server) ---------------------------
def llm(kind: str, *replies: Reply, retries: int = 1, timeout_s: float = 5.0, refused: bool = False):
    def run(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
        model = f"{MODEL}-{kind}"  # its own cache key: no row sees another row's answers
        url = f"http://127.0.0.1:{closed_port()}/v1" if refused else env.server.base_url
        env.server.queue.clear()
        env.server.enqueue(*replies)
        client = LLMClient(
            LLMSettings(base_url=url, model=model, api_key=SecretStr(KEY), max_retries=retries, timeout_s=timeout_s,
                        concurrency=1, requests_per_minute=60_000),
            LLMCache(env.ws.store), backoff_base_s=0.001, max_backoff_s=0.01)
        rounds = Rounds(env.ws, LoopConfig(generate_max=3, generate_threshold=10_000), llm=client)
        with pytest.raises(LLMError) as info:
            rounds.advance(until="select")
        assert info.value.kind == kind, info.value
        assert "nothing was written" in str(info.value) and KEY not in str(info.value)
        assert rounds.current().state == "generate"  # the step can simply be run again
        assert env.ws.store.scalar("SELECT count(*) FROM llm_cache WHERE llm_model = ?", [model]) == 0
        return str(info.value)

    return run


def llm_injection(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    ws = open_ws(tmp / "fresh")
    try:
        ws.add_documents(docs(6), "tests")
        env.server.queue.clear()
        env.server.enqueue(Reply.injection())
        client = LLMClient(LLMSettings(base_url=env.server.base_url, model=f"{MODEL}-injection", max_retries=0),
                           LLMCache(ws.store), backoff_base_s=0.001)
        r = Rounds(ws, LoopConfig(generate_max=3, generate_threshold=10_000), llm=client).advance(until="review")
        rows = ws.store.rows("SELECT anchor, status, reason, meta FROM pairs WHERE source = 'synthetic'")
        flagged = [p for p in rows if "injection" in json.loads(p["meta"])["flags"]]
        assert len(flagged) == 2 and all(p["status"] == "pending" for p in flagged), rows
        assert not any(p["status"] == "accepted" for p in rows)
        return (f"round at {r.state}: {len(flagged)} instruction-like queries kept as candidates, flagged "
                f"'injection' and sent to review ({flagged[0]['reason']}), none auto-accepted")
    finally:
        ws.close()


# Training (a round's train step; the trainer subprocess with EMBEDLOOP_TRAIN_FAULT) --------------
def training(fault: str) -> Callable[..., str]:
    def run(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
        before_models = env.ws.store.scalar("SELECT count(*) FROM model_versions")
        rounds = Rounds(env.ws, LoopConfig(**TRAIN_LOOP), train_env={**ONE_THREAD, train.FAULT_ENV: fault})
        r = rounds.advance(until="evaluate", force=True)
        assert r.state == "failed", r
        result = train.read_result(rounds.run_dir(r))
        assert result["status"] == "failed" and result["model_dir"] is None
        assert not (rounds.run_dir(r) / train.MODEL_DIR).exists()  # no half-published model
        assert env.ws.store.scalar("SELECT count(*) FROM model_versions") == before_models
        assert env.ws.search("damper3 engine3 flange3", k=1)[0].doc_ids == ["doc003"]  # still answers
        return r.error

    return run


def training_leak(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    """The last guard: training rows read before the train step's clean-up (`HeldOut.ensure`,
    which drops such pairs, tests/test_rounds.py) refuse a held-out query."""
    eval_anchor = env.ws.store.scalar("SELECT anchor FROM pairs WHERE split = 'eval' LIMIT 1")
    with env.ws.store.transaction() as cur:  # a held-out query slipped into the training data
        Store.insert_ignore(cur, "pairs", [{"pair_id": "leak", "anchor": eval_anchor.upper(), "positive_text": "x",
                                            "source": "seed", "status": "accepted", "split": "train"}])
    try:
        return raises(LeakageError, Rounds(env.ws, LoopConfig(**TRAIN_LOOP)).data.rows)
    finally:
        env.ws.store.execute("DELETE FROM pairs WHERE pair_id = 'leak'")


# Configuration --------------------------------------------------------------------------------
def config_file(text: str) -> Callable[..., str]:
    def run(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
        cfg = env.root / "ws" / "embedloop.toml"
        cfg.write_text(env.config_text + text, encoding="utf-8")
        try:
            return raises(ConfigError, lambda: Workspace.open(env.root / "ws"))
        finally:
            cfg.write_text(env.config_text, encoding="utf-8")

    return run


def config_env(name: str, value: str) -> Callable[..., str]:
    def run(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
        mp.setenv(name, value)
        return raises(ConfigError, lambda: Workspace.open(env.root / "ws"))

    return run


def config_loop_table(text: str) -> Callable[..., str]:
    """Round settings are read when a round starts (`Rounds(ws)`), from the [loop] table."""

    def run(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
        from loop.config import load_settings
        from loop.rounds import loop_config

        folder = tmp / "ws"
        folder.mkdir()
        (folder / "embedloop.toml").write_text(text, encoding="utf-8")
        return raises(ConfigError, lambda: loop_config(load_settings(folder).loop))

    return run


def config_base_model(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    msg = raises(ConfigError, lambda: Workspace.open(tmp / "other", base_model=str(tmp / "no-such-model")))
    Workspace.open(tmp / "other").close()  # the failed open released its lock
    return msg


def config_llm_unreachable(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    client = LLMClient(LLMSettings(base_url=f"http://127.0.0.1:{closed_port()}/v1", model=MODEL, timeout_s=5))
    return raises(LLMError, client.test_connection)


def config_chroma_unreachable(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    return raises(VectorIndexError, lambda: VectorIndex(url=f"http://127.0.0.1:{closed_port()}"))


# Paths: ids and names that look like paths must not escape anything ----------------------------
TRAVERSAL_IDS = ["../../etc/passwd", "/etc/passwd", "..\\..\\windows\\win.ini", "a/../../b"]


def traversal_ids(fmt: str) -> Callable[..., str]:
    def run(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
        src = tmp / "input"
        src.mkdir()
        texts = [d.text for d in docs(len(TRAVERSAL_IDS))]
        if fmt == "beir":
            (src / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n"
                                                      for i, t in zip(TRAVERSAL_IDS, texts, strict=True)))
            (src / "queries.jsonl").write_text("".join(json.dumps({"_id": f"../q{n}", "text": f"question {n}"}) + "\n"
                                                       for n in range(len(TRAVERSAL_IDS))))
            (src / "qrels").mkdir()
            (src / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
                f"../q{n}\t{i}\t1\n" for n, i in enumerate(TRAVERSAL_IDS)))
            path = src
        else:
            import csv

            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["_id", "text"])
            w.writerows(zip(TRAVERSAL_IDS, texts, strict=True))
            path = src / "docs.csv"
            path.write_text(buf.getvalue())
        before = files_under(tmp)
        ws = open_ws(tmp / "fresh")
        try:
            ws.ingest([path])
            if fmt == "beir":
                assert ws.import_pairs(path).pairs_added == len(TRAVERSAL_IDS)
            out = export(ws.store, ws.base_version, _tiny_model(tmp), tmp / "export")
            stored = sorted(r[0] for r in ws.store.execute("SELECT doc_id FROM documents").fetchall())
        finally:
            ws.close()
        assert stored == sorted(TRAVERSAL_IDS)
        new = files_under(tmp) - before
        assert all(p.is_relative_to(tmp / "fresh") or p.is_relative_to(tmp / "export") or p.is_relative_to(
            tmp / "tiny-model") for p in new), sorted(map(str, new))
        assert not (tmp / "etc").exists() and not (tmp.parent / "etc").exists()
        return (f"ids {TRAVERSAL_IDS} stored as opaque strings; export wrote {out['pairs']} pairs only under the "
                f"export folder; no file created outside the workspace and export folders")

    return run


def _tiny_model(tmp: Path) -> Path:
    d = tmp / "tiny-model"
    d.mkdir(exist_ok=True)
    (d / "modules.json").write_text("[]")
    (d / "config.json").write_text("{}")
    return d


def split_traversal(what: str) -> Callable[..., str]:
    def run(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
        beir = tmp / "beir"
        (beir / "qrels").mkdir(parents=True)
        (beir / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "text": "some text"}) + "\n")
        (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "some query"}) + "\n")
        (tmp / "secret.tsv").write_text("q1\td1\t1\n")  # what ../secret would read
        if what == "queries":
            return raises(InputError, lambda: env.ws.import_queries(beir, split="../../secret"))
        return raises(InputError, lambda: evalset_from_beir(beir, "../../secret"))

    return run


def zip_member(name: str, link: bool = False) -> Callable[..., str]:
    def run(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
        from loop.readers import extract_beir_zip

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("mini/queries.jsonl", '{"_id": "q1", "text": "q"}\n')
            info = zipfile.ZipInfo(name)
            if link:
                info.external_attr = (0o120777 << 16)
            z.writestr(info, "/etc/passwd" if link else '{"_id": "x", "text": "y"}\n')
        path = tmp / "uploads" / "beir.zip"
        path.parent.mkdir()
        path.write_bytes(buf.getvalue())
        outside = [tmp / "evil", tmp.parent / "evil", Path("/tmp/evil/corpus.jsonl")]
        existed = [p.exists() for p in outside]
        before = files_under(tmp)
        msg = raises(InputError, lambda: extract_beir_zip(path, env.ws.settings.max_file_mb))
        assert files_under(tmp) == before  # nothing extracted, inside or next to the upload
        assert [p.exists() for p in outside] == existed
        return msg

    return run


def upload_name(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    from ui.tasks import save_uploads

    [path] = save_uploads(env.ws, [("../../../evil.jsonl", b'{"anchor": "q"}\n')])
    uploads = (env.root / "ws" / "uploads").resolve()
    assert path.resolve().is_relative_to(uploads) and path.name == "evil.jsonl"
    assert not (env.root / "evil.jsonl").exists() and not (env.root.parent / "evil.jsonl").exists()
    return f"saved as {path.relative_to(env.root)} (inside the workspace's uploads folder)"


def upload_too_big(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    from ui.tasks import save_uploads

    mp.setattr(env.ws.settings, "max_file_mb", 0.001)
    return raises(InputError, lambda: save_uploads(env.ws, [("big.txt", b"x" * 2048)]))


def export_to(target: str) -> Callable[..., str]:
    def run(env: Env, tmp: Path, mp: pytest.MonkeyPatch) -> str:
        model = _tiny_model(tmp)
        (tmp / "full").mkdir()
        (tmp / "full" / "keep.txt").write_text("mine")
        (tmp / "afile").write_text("mine")
        dest = {"non-empty": tmp / "full", "file": tmp / "afile", "model": model / "sub",
                "dotdot": tmp / "a" / ".." / "out"}[target]
        before = files_under(tmp)
        if target != "dotdot":
            msg = raises(InputError, lambda: export(env.ws.store, env.ws.base_version, model, dest))
            assert files_under(tmp) == before and (tmp / "full" / "keep.txt").read_text() == "mine"
            return msg
        info = export(env.ws.store, env.ws.base_version, model, dest)
        new = files_under(tmp) - before
        assert info["directory"] == str((tmp / "out").resolve())
        assert new and all(p.is_relative_to(tmp / "out") for p in new), sorted(map(str, new))
        return f"exported to the resolved folder {info['directory']} only ({len(new)} new paths, all inside it)"

    return run


ROWS = [
    # Uploads, through the app's import job (the same readers as tests/test_ingest.py's table).
    Row("upload", "0-byte documents file", "the file is empty (0 bytes)", upload("documents", "empty.txt", b"")),
    Row("upload", "binary file named .txt", "looks like a binary file", upload("documents", "x.txt", b"\x89PNG\x00\x01")),
    Row("upload", "Latin-1 text (wrong encoding)", "not valid UTF-8",
        upload("documents", "latin.txt", "caf\xe9 cr\xe8me".encode("latin-1"))),
    Row("upload", "pairs JSONL with a malformed line", "pairs.jsonl, line 2: malformed JSON",
        upload("pairs", "pairs.jsonl", b'{"anchor": "q", "positive": "p q"}\n{"anchor": \n')),
    Row("upload", "pairs CSV without the anchor column", "missing column(s) anchor",
        upload("pairs", "pairs.csv", b"question,positive\nq,p\n")),
    Row("upload", "documents CSV with a duplicate id", "duplicate id 'a'",
        upload("documents", "docs.csv", b"_id,text\na,first text\na,second text\n")),
    Row("upload", "file over max_file_mb", "larger than max_file_mb", upload_too_big),
    # Review decisions.
    Row("review", "edit with an empty query", "an edit needs the new `query` text",
        decision(ValidationError, action="edit", query="   ")),
    Row("review", "edit to the same query", "the same as the original",
        decision(InputError, action="edit", query="card  question 2")),
    Row("review", "pick of an unknown passage id", "No passage with id 'p-missing'",
        decision(NotFoundError, action="pick", passage_id="p-missing")),
    Row("review", "pick of the positive itself (negative equal to positive)", "must choose a different passage",
        decision(InputError, action="pick", passage_id=lambda env: env.pids["doc014"])),
    Row("review", "decision on an unknown pair", "No pair with id 'nope'", decision(NotFoundError, pair_id="nope")),
    Row("review", "the same card decided twice", "was already decided",
        decision(ReviewConflict, pair_id=lambda env: env.decided)),
    Row("review", "a card another reviewer holds", "is being reviewed by zoe",
        decision(ReviewConflict, pair_id=lambda env: env.claimed)),
    Row("review", "unknown action", "Input should be 'accept', 'reject', 'edit', 'pick' or 'mark'",
        decision(ValidationError, action="approve")),
    Row("review", "empty reviewer name", "reviewer is empty", decision(ValidationError, reviewer=" ")),
    Row("review", "decisions file with a malformed line", "line 2: malformed JSON",
        decisions_file('{"pair_id": "card2", "action": "accept", "reviewer": "ann"}\n{oops\n')),
    Row("review", "decisions file with an unknown field", "extra_field: Extra inputs are not permitted",
        decisions_file('{"pair_id": "card2", "action": "accept", "reviewer": "ann", "extra_field": 1}\n')),
    # LLM replies.
    Row("llm", "reply is not JSON", "the answer is not JSON", llm("invalid_json", Reply.invalid_json(),
                                                                   Reply.invalid_json())),
    Row("llm", "JSON of the wrong schema", "does not match QueryList", llm("off_schema", Reply.wrong_schema(),
                                                                         Reply.wrong_schema())),
    Row("llm", "empty list of queries", "the answer is empty", llm("empty", Reply.empty(), Reply.empty())),
    Row("llm", "refusal", "the model refused", llm("refusal", Reply.refusal(), Reply.refusal())),
    Row("llm", "a run of 429s", "rate limited", llm("rate_limited", *[Reply.rate_limit()] * 4, retries=3)),
    Row("llm", "HTTP 500", "server error", llm("server_error", Reply.error(500), Reply.error(500))),
    Row("llm", "timeout", "no answer within 0.3 s", llm("timeout", Reply.slow(1.0), Reply.slow(1.0), timeout_s=0.3)),
    Row("llm", "connection refused", "cannot connect", llm("connection", refused=True)),
    Row("llm", "cut off by length", "cut off (finish_reason=length)", llm("truncated", Reply.length(), Reply.length())),
    Row("llm", "bad key, and the server echoes it", "Check the API key",
        llm("http_error", Reply.echo_auth(401), retries=3)),
    Row("llm", "queries that try to give instructions", "flagged 'injection' and sent to review", llm_injection,
        changes_data=True),
    # Training.
    Row("training", "NaN loss", "loss became NaN at step 1", training("nan_at_step=1")),
    Row("training", "out of memory (simulated)", "Out of GPU memory at step 1", training("oom_at_step=1")),
    Row("training", "disk full in the run directory (simulated)", "Disk full while saving at step 1",
        training("disk_full_at_step=1")),
    Row("training", "a malformed fault/diagnostic setting", "EMBEDLOOP_TRAIN_FAULT: bad item 'explode=1'",
        training("explode=1")),
    # Training settings are checked with the round settings, before any generation or review work.
    Row("training", "unknown training setting ([loop.train] epochz)",
        "loop.train.epochz: Extra inputs are not permitted", config_loop_table("[loop.train]\nepochz = 3\n")),
    Row("training", "training setting of the wrong type ([loop.train] batch_size)",
        "loop.train.batch_size: Input should be a valid integer",
        config_loop_table('[loop.train]\nbatch_size = "big"\n')),
    Row("training", "training rows read with a held-out query in the training data",
        "refusing to train on evaluation data",
        training_leak),
    # Configuration.
    Row("config", "unknown key in embedloop.toml", "colour: Extra inputs are not permitted",
        config_file('colour = "blue"\n')),
    Row("config", "wrong type in embedloop.toml", "max_file_mb: Input should be a valid number",
        config_file('max_file_mb = "big"\n')),
    Row("config", "invalid value in embedloop.toml", "device must be one of", config_file('device = "tpu"\n')),
    Row("config", "embedloop.toml that is not TOML", "not valid TOML", config_file("chunk_tokens = = 3\n")),
    Row("config", "wrong type in the environment", "chunk_overlap: Input should be a valid integer",
        config_env("EMBEDLOOP_CHUNK_OVERLAP", "lots")),
    Row("config", "base_model that is not a folder", "is not a folder", config_base_model),
    Row("config", "unknown key in the [loop] table", "loop.reviw_budget: Extra inputs are not permitted",
        config_loop_table("[loop]\nreviw_budget = 5\n")),
    Row("config", "unreachable LLM endpoint", "cannot connect", config_llm_unreachable),
    Row("config", "unreachable Chroma server", "Cannot open the Chroma index", config_chroma_unreachable),
    # Paths.
    Row("path", "BEIR corpus/query ids like ../../etc/passwd", "stored as opaque strings", traversal_ids("beir"),
        changes_data=True),
    Row("path", "CSV document ids like ../../etc/passwd", "stored as opaque strings", traversal_ids("csv"),
        changes_data=True),
    Row("path", "pair positive_id ../../etc/passwd", "is neither a passage id nor a document id",
        lambda env, tmp, mp: raises(InputError, lambda: env.ws.import_pairs(_write(
            tmp / "pairs.jsonl", '{"anchor": "q", "positive_id": "../../etc/passwd"}\n')))),
    Row("path", "query-log BEIR split ../../secret", "is not a plain name", split_traversal("queries")),
    Row("path", "evaluation BEIR split ../../secret", "is not a plain name", split_traversal("evaluate")),
    Row("path", "zip member ../evil/corpus.jsonl", "unsafe path '../evil/corpus.jsonl'",
        zip_member("../evil/corpus.jsonl")),
    Row("path", "zip member with an absolute path", "unsafe path '/tmp/evil/corpus.jsonl'",
        zip_member("/tmp/evil/corpus.jsonl")),
    Row("path", "zip member that is a symlink", "links are not accepted", zip_member("mini/corpus.jsonl", link=True)),
    Row("path", "uploaded file named ../../../evil.jsonl", "inside the workspace's uploads folder", upload_name),
    Row("path", "decision on pair id ../../etc/passwd", "No pair with id '../../etc/passwd'",
        decision(NotFoundError, pair_id="../../etc/passwd")),
    Row("path", "prompt id ../../etc/passwd", "is not valid",
        lambda env, tmp, mp: raises(PromptError, lambda: load_prompt("../../etc/passwd"))),
    Row("path", "export into a non-empty folder", "must be new or empty", export_to("non-empty")),
    Row("path", "export onto a file", "must be new or empty", export_to("file")),
    Row("path", "export inside the model folder", "must not be inside the model folder", export_to("model")),
    Row("path", "export to a path with ..", "exported to the resolved folder", export_to("dotdot")),
]

SLOW = {"NaN loss", "out of memory (simulated)", "disk full in the run directory (simulated)"}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _param(row: Row):
    marks = [pytest.mark.slow] if row.title in SLOW else []
    slug = "".join(c if c.isalnum() else "-" for c in row.title.lower()).strip("-")
    return pytest.param(row, id=f"{row.kind}-{slug}"[:80], marks=marks)


@pytest.mark.parametrize("row", [_param(r) for r in ROWS])
def test_bad_input_gives_a_clear_error_and_loses_nothing(env, tmp_path, monkeypatch, row, record_property):
    env.close_open_rounds()
    before = env.fingerprint()
    observed = row.run(env, tmp_path, monkeypatch)
    record_property("observed", observed)
    assert row.expected in observed, observed
    assert "Traceback" not in observed
    if isinstance(observed, str) and row.kind != "path":
        assert KEY not in observed
    assert env.fingerprint() == before, "the shared workspace changed"
    # ...and it still works: the next reviewer action and a search go through.
    assert env.ws.search("damper3 engine3 flange3", k=1)[0].doc_ids == ["doc003"]


def test_the_table_has_every_kind_the_issue_asks_for():
    kinds = {r.kind for r in ROWS}
    assert {"upload", "review", "llm", "training", "config", "path"} <= kinds
    assert len(ROWS) >= 40
    assert len({str(r) for r in ROWS}) == len(ROWS)
