"""Export: model folder with a model card, accepted pairs as JSONL and as a HF dataset."""

import json

import pytest

from loop.errors import InputError
from loop.export import accepted_pairs, export, model_card
from storage.db import Store

VERSION = "r2-abcdef"


def _fill(store: Store, model_path, pairs=True) -> None:
    """A base model, one fine-tuned version, two rounds and (optionally) a few pairs."""
    manifest = {
        "metrics": {"base": {"ndcg@10": 0.41234}, "candidate": {"ndcg@10": 0.45678}},
        "vs_base": {"delta": 0.04444, "ci_low": 0.01, "ci_high": 0.08},
        "promotion": {"promote": True},
    }
    with store.transaction() as cur:
        Store.insert_ignore(cur, "model_versions", [
            {"version": "base-123", "path": str(model_path), "parent": None, "sha256": "0" * 64, "round": None},
            {"version": VERSION, "path": str(model_path), "parent": "base-123", "sha256": "f" * 64, "round": 2},
        ])
        Store.insert_ignore(cur, "rounds", [
            {"round": 1, "state": "failed", "manifest": None},
            {"round": 2, "state": "done", "manifest": json.dumps(manifest)},
        ])
        if not pairs:
            return
        Store.insert_ignore(cur, "passages", [
            {"passage_id": f"p{i}", "text": f"passage {i}", "n_tokens": 2} for i in range(4)
        ])
        Store.insert_ignore(cur, "pairs", [
            {"pair_id": "a", "anchor": "query a", "positive_id": "p0", "positive_text": "passage 0",
             "source": "seed", "status": "accepted", "split": "train"},
            {"pair_id": "b", "anchor": "query b", "positive_id": "p1", "positive_text": "passage 1",
             "source": "synthetic", "status": "accepted", "split": "train"},
            {"pair_id": "c", "anchor": "query c", "positive_id": "p2", "positive_text": "passage 2",
             "source": "synthetic", "status": "rejected", "split": "train"},
            {"pair_id": "d", "anchor": "query d", "positive_id": "p3", "positive_text": "passage 3",
             "source": "seed", "status": "accepted", "split": "eval"},
        ])
        Store.insert_ignore(cur, "negatives", [{"anchor": "query a", "passage_id": "p2", "source": "review"}])


@pytest.fixture
def tiny_model(tmp_path):
    """A model-shaped folder, for tests that don't need real weights copied."""
    d = tmp_path / "tiny-model"
    d.mkdir()
    (d / "modules.json").write_text("[]")
    (d / "config.json").write_text("{}")
    (d / "checkpoint-10").mkdir()
    (d / "checkpoint-10" / "optimizer.pt").write_text("x")
    return d


def test_export_writes_model_card_pairs_and_dataset(store, minilm_path, tmp_path):
    from datasets import load_from_disk

    _fill(store, minilm_path)
    info = export(store, VERSION, minilm_path, tmp_path / "out")
    out = tmp_path / "out"
    assert info == {"directory": str(out.resolve()), "model": VERSION, "pairs": 3}

    assert (out / "model" / "modules.json").read_text() == (minilm_path / "modules.json").read_text()
    assert (out / "model" / "model.safetensors").stat().st_size == (minilm_path / "model.safetensors").stat().st_size
    card = (out / "model" / "README.md").read_text()
    assert f"# {VERSION}" in card
    assert "base model `base-123`" in card and "ffffffffffffffff" in card
    assert "| round | state | NDCG@10 base | NDCG@10 candidate | delta vs base (95% CI) | promoted |" in card
    assert "| 1 | failed | None | None | - | - |" in card
    assert "| 2 | done | 0.4123 | 0.4568 | +0.0444 (+0.0100 to +0.0800) | True |" in card
    assert "4 passages" in card

    lines = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert [(x["anchor"], x["positive"], x.get("negative")) for x in lines] == [
        ("query d", "passage 3", None), ("query a", "passage 0", "passage 2"), ("query b", "passage 1", None),
    ]
    assert all("negative" not in x for x in lines if x["anchor"] != "query a")  # no null negatives
    assert {x["split"] for x in lines} == {"train", "eval"}

    ds = load_from_disk(str(out / "dataset"))
    assert ds.num_rows == 3
    assert {"anchor", "positive", "negative"} <= set(ds.column_names)
    assert ds[1]["negative"] == "passage 2" and ds[0]["negative"] == ""


def test_export_skips_checkpoints(store, tiny_model, tmp_path):
    _fill(store, tiny_model)
    export(store, VERSION, tiny_model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "model").iterdir()) == ["README.md", "config.json", "modules.json"]


def test_export_with_no_accepted_pairs(store, tiny_model, tmp_path):
    from datasets import load_from_disk

    _fill(store, tiny_model, pairs=False)
    assert accepted_pairs(store) == []
    info = export(store, VERSION, tiny_model, tmp_path / "out")
    assert info["pairs"] == 0
    assert (tmp_path / "out" / "pairs.jsonl").read_text() == ""
    ds = load_from_disk(str(tmp_path / "out" / "dataset"))
    assert ds.num_rows == 0
    assert {"anchor", "positive", "negative"} <= set(ds.column_names)


def test_export_into_an_empty_existing_folder(store, tiny_model, tmp_path):
    _fill(store, tiny_model, pairs=False)
    (tmp_path / "out").mkdir()
    assert export(store, VERSION, tiny_model, tmp_path / "out")["pairs"] == 0


@pytest.mark.parametrize("kind", ["non-empty folder", "file", "inside the model"])
def test_export_refuses_a_bad_target(store, tiny_model, tmp_path, kind):
    _fill(store, tiny_model, pairs=False)
    if kind == "non-empty folder":
        target = tmp_path / "out"
        target.mkdir()
        (target / "keep.txt").write_text("mine")
    elif kind == "file":
        target = tmp_path / "out"
        target.write_text("mine")
    else:
        target = tiny_model / "export"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(InputError, match="export folder"):
        export(store, VERSION, tiny_model, target)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_model_card_of_a_base_model(store, tiny_model):
    _fill(store, tiny_model, pairs=False)
    card = model_card(store, "base-123")
    assert "# base-123" in card and "base model `base-123`" in card
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
