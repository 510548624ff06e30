"""Security (issue #6): the LLM key is written nowhere; models never run code shipped with them.

Export paths and ids that look like paths are rows of tests/test_reliability_table.py; the app's
sign-in and inert HTML are tests/test_app.py's. RELIABILITY.md lists them all.
"""

from __future__ import annotations

import ast
import json
import logging
import shutil
from pathlib import Path

import pytest

from loop import train
from loop.config import bundled_model_path
from loop.embed import Embedder
from loop.export import export
from loop.generate import run_generation
from loop.jobs import JobRunner
from loop.llm import LLMClient, LLMSettings
from loop.review import DecisionIn, decide, pending
from loop.rounds import LoopConfig, Rounds
from loop.workspace import Workspace
from storage.db import Store
from storage.llm_cache import LLMCache
from tests.fakes import FakeEmbedder
from tests.fault_driver import docs
from tests.openai_server import MODEL, Reply, openai_server  # noqa: F401 - fixture
from tests.reliability_report import case

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-security-SECRET-4e5f6a7b8c9d"


def files_containing(needle: str, roots: list[Path]) -> list[str]:
    data = needle.encode()
    return sorted(str(p) for root in roots for p in root.rglob("*") if p.is_file() and data in p.read_bytes())


def tables_containing(needle: str, store: Store) -> list[str]:
    names = [r[0] for r in store.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()]
    assert "decisions" in names and "llm_cache" in names
    return [n for n in names if needle in repr(store.execute(f'SELECT * FROM "{n}"').fetchall())]


def test_the_scanners_find_a_planted_key(tmp_path):
    """The scan below can fail: a key planted in a file or a table is found."""
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "blob.bin").write_bytes(b"\x00\x01" + KEY.encode() + b"\xff")
    assert files_containing(KEY, [tmp_path]) == [str(tmp_path / "deep" / "er" / "blob.bin")]
    with Store.memory() as s:
        s.append_decision("p", "ann", "accept", {"note": KEY})
        assert tables_containing(KEY, s) == ["decisions"]


@case("Security", "the API key through LLM generation (and an error that echoes it), a job, a round's manifest "
                  "and training snapshot, DEBUG logs of every library, and an export with its model card",
      "the key reaches the LLM server, and appears in no file under the workspace or the export folder, "
      "in no DuckDB table, and in no log line")
def test_api_key_is_never_written_anywhere(tmp_path, openai_server, monkeypatch, record_property):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("EMBEDLOOP_LLM_BASE_URL", openai_server.base_url)
    monkeypatch.setenv("EMBEDLOOP_LLM_MODEL", MODEL)
    ws_path, out = tmp_path / "ws", tmp_path / "export"
    ws = Workspace.open(ws_path)
    ws._embedders[ws.base_version] = FakeEmbedder(ws.base_version)
    handler = logging.FileHandler(ws_path / "debug.log", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        ws.add_documents(docs(20), "tests")
        pids = ws.store.first_passage_of_docs([f"doc{i:03d}" for i in range(12)])
        texts = ws.store.passages(list(pids.values()))
        with ws.store.transaction() as cur:
            Store.insert_ignore(cur, "pairs", [
                {"pair_id": f"seed{i}", "anchor": f"seed question {i}", "positive_id": pid,
                 "positive_text": texts[pid], "source": "seed", "status": "accepted", "split": "train"}
                for i, pid in enumerate(pids.values())])
        cfg = LoopConfig(generate_max=12, generate_threshold=10_000, review_budget=100, mining={"num_negatives": 0})
        rounds = Rounds(ws, cfg, llm=ws.llm(), log=logging.getLogger("embedloop.rounds").info)
        r = rounds.advance(until="review")
        assert r.manifest.steps["generate"]["usage"]["requests"] == 4
        assert openai_server.requests[-1]["headers"]["authorization"] == f"Bearer {KEY}"  # it was used

        # An endpoint that echoes the key in its error, run as a job (the app stores job errors).
        openai_server.enqueue(Reply.echo_auth(401))
        bad = LLMClient(LLMSettings.from_settings(ws.settings, model="other-model", max_retries=0), LLMCache(ws.store))
        jobs = JobRunner(ws.store)
        state = jobs.wait(jobs.submit("generate", lambda ctx: run_generation(ws.store, None, llm=bad, n=3, seed=7)), 60)
        assert state["status"] == "failed" and "Bearer ***" in state["error"], state

        for card in pending(ws.store):
            decide(ws.store, DecisionIn(pair_id=card.pair_id, action="accept", reviewer="ann"))
        r = rounds.advance(until="train", force=True)
        assert r.state == "train"
        rounds.heldout.ensure()  # what the train step writes before starting the trainer:
        train.write_snapshot(rounds.run_dir(r), rounds.data.rows(), None,
                             {"base_model": str(ws.settings.base_model_path), "epochs": 1})
        model = tmp_path / "model"
        model.mkdir()
        (model / "modules.json").write_text("[]")
        export(ws.store, ws.base_version, model, out)
        assert (out / "model" / "README.md").exists() and (out / "pairs.jsonl").exists()
        in_tables = tables_containing(KEY, ws.store)
        shown = json.dumps(ws.status(), default=str) + repr(ws.settings) + ws.settings.model_dump_json()
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
        ws.close()
    assert (ws_path / "debug.log").stat().st_size > 0 and (ws_path / "runs" / "round-001" / "config.json").exists()
    assert in_tables == [], f"the key is stored in DuckDB tables {in_tables}"
    assert KEY not in shown
    in_files = files_containing(KEY, [ws_path, out])
    assert in_files == [], f"the key is written in {in_files}"
    n_files = sum(1 for p in [*ws_path.rglob("*"), *out.rglob("*")] if p.is_file())
    record_property("observed", f"key sent in {openai_server.count} requests; found in 0 of {n_files} files "
                                f"(DuckDB, Chroma, DEBUG log, run snapshot, export) and 0 DuckDB tables; the "
                                f"echoed key shows as 'Bearer ***' in the job error")


# Models never run code shipped with them ----------------------------------------------------------
def _model_loading_calls() -> list[tuple[str, int, dict[str, object]]]:
    """Every SentenceTransformer(...) / *.from_pretrained(...) call in loop/, with its keywords."""
    calls = []
    for path in sorted((ROOT / "loop").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in {"SentenceTransformer", "from_pretrained", "CrossEncoder"}:
                kw = {k.arg: (k.value.value if isinstance(k.value, ast.Constant) else "?") for k in node.keywords}
                calls.append((path.name, node.lineno, kw))
    return calls


@case("Security", "every place the engine loads a model (embedder, trainer, GIST guide)",
      "trust_remote_code=False and local_files_only=True, spelled out at every call")
def test_every_model_load_turns_remote_code_off(record_property):
    calls = _model_loading_calls()
    assert len(calls) >= 3, calls  # embed.py, and the trainer's model and guide
    bad = [(f, line) for f, line, kw in calls if kw.get("trust_remote_code") is not False
           or kw.get("local_files_only") is not True]
    assert bad == [], f"model loads without trust_remote_code=False / local_files_only=True: {bad}"
    record_property("observed", "; ".join(f"{f}:{line}" for f, line, _ in calls) + ": all pass both flags")


def _model_asking_for_remote_code(tmp_path: Path, model_type: str, marker: Path) -> Path:
    """The bundled MiniLM, with a config that maps its classes to code shipped in the folder."""
    src = bundled_model_path()
    d = tmp_path / f"remote-{model_type}"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("model.safetensors", "*.bin"))
    (d / "model.safetensors").symlink_to(src / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((d / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    (d / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('the model folder ran its own code')\n"
        "from transformers import BertConfig, BertModel, BertTokenizerFast\n"
        f"class EvilConfig(BertConfig):\n    model_type = {model_type!r}\n"
        "class EvilModel(BertModel):\n    config_class = EvilConfig\n"
        "class EvilTokenizer(BertTokenizerFast):\n    pass\n")
    return d


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["bert", "evil_bert"])
@case("Security", "a model folder whose config asks to run its own code (auto_map + evil.py)",
      "its code never runs: a known architecture loads as the plain one; an unknown one is refused")
def test_a_model_folder_cannot_run_its_own_code(tmp_path, model_type, record_property):
    marker = tmp_path / "RAN"
    path = _model_asking_for_remote_code(tmp_path, model_type, marker)
    emb = Embedder(path, "remote", device="cpu")
    if model_type == "bert":
        vec = emb.encode(["hello"])
        assert vec.shape == (1, 384)
        assert type(emb.model[0].auto_model).__name__ == "BertModel"
        observed = "loaded as the plain BertModel; evil.py never imported"
    else:
        with pytest.raises(Exception, match="trust_remote_code") as info:
            emb.encode(["hello"])
        observed = f"refused: {str(info.value).splitlines()[0][:200]}"
    assert not marker.exists(), "the model folder's own code ran"
    record_property("observed", observed)
