"""`passage_vectors`: a proposed passage's vector comes from the model's own index, not a second
encode (real DuckDB + Chroma, a fake model that records what it encodes)."""

from __future__ import annotations

import numpy as np

from loop import indexing
from loop.training_data import passage_vectors
from tests.fakes import FakeEmbedder

DOCS = {
    "turbine.txt": "Turbine blades crack under thermal fatigue when the inlet temperature cycles.",
    "wing.txt": "Wing flutter appears when aerodynamic forces couple with the structure's bending modes.",
}


class RecordingEmbedder(FakeEmbedder):
    def __init__(self, version: str):
        super().__init__(version)
        self.seen: list[str] = []

    def encode(self, texts, batch_size=None, show_progress=False):
        self.seen.extend(texts)
        return super().encode(texts)


def test_stored_passages_are_read_from_the_index_and_the_rest_encoded(workspace, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    workspace.ingest([folder])
    emb = RecordingEmbedder(workspace.active_model)
    workspace._embedders[workspace.active_model] = emb
    active = workspace.store.pointer(indexing.ACTIVE_INDEX)
    ids = [r["passage_id"] for r in workspace.store.rows("SELECT passage_id FROM passages ORDER BY passage_id")]
    texts = workspace.store.passages(ids)
    edited = texts[ids[1]] + " Edited by a reviewer."
    got = passage_vectors(workspace, emb, active, [ids[0], ids[1], None, ids[0]],
                          [texts[ids[0]], edited, "free text", texts[ids[0]]])

    # Only the edited positive and the text without a passage are encoded; the stored one (asked
    # for twice, as two candidates of one passage are) is read from the index.
    assert emb.seen == [edited, "free text"]
    np.testing.assert_allclose(got[[0, 3]], workspace.index.embeddings(active, [ids[0]])[[0, 0]], atol=1e-6)
    np.testing.assert_allclose(got[1:3], FakeEmbedder(workspace.active_model).encode([edited, "free text"]), atol=1e-6)

    # A collection that lacks the vectors (here: none at all) means encoding every text.
    emb.seen.clear()
    again = passage_vectors(workspace, emb, "no-such-collection", [ids[0]], [texts[ids[0]]])
    assert emb.seen == [texts[ids[0]]]
    np.testing.assert_allclose(again[0], got[0], atol=1e-6)
    assert passage_vectors(workspace, emb, active, [], []).shape[0] == 0
