"""BM25 beside the model: `loop.lexical` and the workspace's review pool (real DuckDB + Chroma)."""

from __future__ import annotations

import numpy as np
import pytest

from loop.errors import InputError
from loop.lexical import Lexical, interleave
from loop.rounds import LoopConfig, loop_config
from tests.fakes import FakeEmbedder

DOCS = {
    "turbine.txt": "Turbine blades crack under thermal fatigue when the inlet temperature cycles.",
    "wing.txt": "Wing flutter appears when aerodynamic forces couple with the structure's bending modes.",
    "boundary.txt": "The boundary layer separates in an adverse pressure gradient behind the shock.",
    "nozzle.txt": "A convergent divergent nozzle accelerates the flow to supersonic speed at its throat.",
}


class LengthEmbedder(FakeEmbedder):
    """A model blind to words: it ranks passages by length alone, so its top is not BM25's."""

    def encode(self, texts, batch_size=None, show_progress=False):
        out = np.array([[1.0, len(t) / 100.0] for t in texts], dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_lexical_ranks_by_shared_words_and_handles_edges():
    lex = Lexical(list(DOCS), list(DOCS.values()))
    assert lex.search(["why do turbine blades crack"], 2)[0][0] == "turbine.txt"
    assert lex.search(["supersonic nozzle throat"], 1) == [["nozzle.txt"]]
    # k beyond the corpus: every scoring text, no more; a query sharing no word finds nothing.
    assert lex.search(["flutter"], 50) == [["wing.txt"]]
    assert lex.search(["zebra crossing"], 3) == [[]]
    scored = lex.scored(["boundary layer shock"], 2)[0]
    assert scored[0][0] == "boundary.txt" and scored[0][1] > 0
    assert lex.search([], 3) == []
    assert Lexical([], []).search(["anything"], 3) == [[]]
    with pytest.raises(ValueError, match="2 ids for 1 texts"):
        Lexical(["a", "b"], ["only one"])


def test_interleave_alternates_skips_repeats_and_stops_at_k():
    assert interleave([["a", "b", "c"], ["x", "a", "y"]], 10) == ["a", "x", "b", "c", "y"]
    assert interleave([["a", "b", "c"], ["x", "y"]], 3) == ["a", "x", "b"]
    assert interleave([[], ["x", "y"]], 5) == ["x", "y"]
    assert interleave([], 3) == []


def _ingest(ws, tmp_path, docs=DOCS):
    folder = tmp_path / "docs"
    folder.mkdir(exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")
    ws.ingest([folder])


def test_review_pool_shows_what_bm25_finds_and_the_model_misses(workspace, tmp_path):
    workspace._embedders[workspace.active_model] = LengthEmbedder(workspace.active_model)
    _ingest(workspace, tmp_path)
    query = "why does a wing flutter"
    model = workspace.review_pool([query], 2, "model")[0]
    assert [h.passage_id for h in model] == [h.passage_id for h in workspace.search(query, 2)]
    assert all(h.found_by == "model" for h in model)
    wing = next(pid for pid, docs in workspace.store.docs_of_passages(
        [p for p, in workspace.store.execute("SELECT passage_id FROM passages").fetchall()]).items()
        if docs[0].endswith("wing.txt"))
    assert wing not in [h.passage_id for h in model]  # the length model misses the answer...
    pool = workspace.review_pool([query], 2)[0]  # ...the default pool shows it second, found by BM25
    assert [h.passage_id for h in pool] == [model[0].passage_id, wing]
    assert pool[1].found_by == "bm25" and pool[1].doc_ids[0].endswith("wing.txt") and "flutter" in pool[1].text
    assert pool[1].score > 0
    with pytest.raises(InputError, match="review_pool"):
        workspace.review_pool([query], 2, "both")


def test_review_pool_sees_passages_ingested_later(workspace, tmp_path):
    _ingest(workspace, tmp_path)
    assert workspace.lexical().search(["rotor icing"], 3) == [[]]
    _ingest(workspace, tmp_path, {"icing.txt": "Rotor icing changes the blade profile and the lift it gives."})
    hits = workspace.lexical().search(["rotor icing"], 3)[0]
    assert len(hits) == 1 and workspace.store.docs_of_passages(hits)[hits[0]][0].endswith("icing.txt")


def test_mined_cards_take_the_pool_top(workspace, tmp_path):
    """mine_top 2 with the interleaved pool: a logged query's cards are the model's top passage and BM25's."""
    from loop.rounds import Rounds

    workspace._embedders[workspace.active_model] = LengthEmbedder(workspace.active_model)
    _ingest(workspace, tmp_path)
    log = tmp_path / "log.txt"
    log.write_text("why does a wing flutter\n", encoding="utf-8")
    workspace.import_queries(log)
    rounds = Rounds(workspace, LoopConfig(mine_top=2, generate_max=0), log=lambda _: None)
    assert rounds.selection.mine_query_log(1) == 2
    mined = workspace.store.execute("SELECT positive_id FROM pairs WHERE source = 'mined'").fetchall()
    docs = workspace.store.docs_of_passages([p for p, in mined])
    assert any(d[0].endswith("wing.txt") for d in docs.values())


def test_review_pool_setting_is_checked():
    assert LoopConfig().review_pool == "interleaved"
    with pytest.raises(Exception, match="review_pool"):
        loop_config({"review_pool": "bm25-only"})
