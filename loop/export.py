"""Export: the active model as a plain sentence-transformers folder with a model card, and the
accepted pairs as JSONL and as a Hugging Face dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from loop.errors import InputError, NotFoundError
from loop.records import RoundRecord
from storage.db import Store


def _target(directory: str | Path, model_path: str | Path) -> Path:
    """The export folder: new or empty, never a file, never inside the model folder it copies."""
    out = Path(directory).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError("the export folder must be new or empty", out)
    if out.is_relative_to(Path(model_path).expanduser().resolve()):
        # copytree would copy the export into itself until the path is too deep
        raise InputError("the export folder must not be inside the model folder it exports", out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def model_card(store: Store, version: str) -> str:
    rows = store.rows("SELECT version, path, parent, sha256, round FROM model_versions WHERE version = ?", [version])
    if not rows:
        raise NotFoundError(f"No model version {version!r}.")
    model = rows[0]
    rounds = [RoundRecord.from_row(r) for r in store.rounds()]
    counts = store.counts()
    lines = [
        "---", "library_name: sentence-transformers", "tags: [sentence-transformers, embedloop]", "---", "",
        f"# {version}", "",
        f"Fine-tuned with embedloop from base model `{model['parent'] or model['version']}`; "
        f"this model's sha256 is `{model['sha256'][:16]}…`.", "",
        "## Data", "",
        f"- corpus: {counts['documents']:,} documents, {counts['passages']:,} passages",
        f"- pairs by source and status: `{json.dumps(counts['pairs'])}`",
        f"- reviewer decisions: {counts['decisions']:,}", "",
        "## Rounds", "",
        "| round | state | NDCG@10 base | NDCG@10 candidate | delta vs base (95% CI) | promoted |",
        "|---|---|---|---|---|---|",
    ]
    for r in rounds:
        m = r.manifest
        metrics = m.metrics or {}
        vs = m.vs_base or {}
        base = metrics.get("base", {}).get("ndcg@10")
        cand = metrics.get("candidate", {}).get("ndcg@10")
        ci = f"{vs['delta']:+.4f} ({vs['ci_low']:+.4f} to {vs['ci_high']:+.4f})" if vs else "-"
        lines.append(
            f"| {r.round} | {r.state} | {base if base is None else f'{base:.4f}'} | "
            f"{cand if cand is None else f'{cand:.4f}'} | {ci} | {m.promotion.promote if m.promotion else '-'} |"
        )
    lines += ["", "## Usage", "", "```python", "from sentence_transformers import SentenceTransformer",
              "model = SentenceTransformer('PATH_TO_THIS_FOLDER')", "```", ""]
    return "\n".join(lines)


def accepted_pairs(store: Store) -> list[dict[str, Any]]:
    rows = store.rows(
        "SELECT p.anchor, p.positive_text AS positive, coalesce(p.negative_text, "
        "(SELECT any_value(x.text) FROM negatives n JOIN passages x USING (passage_id) WHERE n.anchor = p.anchor)) "
        "AS negative, p.source, p.split FROM pairs p WHERE p.status = 'accepted' ORDER BY p.split, p.pair_id"
    )
    return rows


def export(store: Store, version: str, model_path: str | Path, directory: str | Path) -> dict[str, Any]:
    """Write model/, pairs.jsonl and dataset/ under `directory` (which must be new or empty)."""
    card = model_card(store, version)  # fails (unknown version) before anything is written
    out = _target(directory, model_path)
    model_out = out / "model"
    shutil.copytree(model_path, model_out, ignore=shutil.ignore_patterns("checkpoint-*", "optimizer.pt", "training_args.bin"))
    (model_out / "README.md").write_text(card, encoding="utf-8")
    pairs = accepted_pairs(store)
    with (out / "pairs.jsonl").open("w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({k: v for k, v in p.items() if v is not None}, ensure_ascii=False) + "\n")
    from datasets import Dataset, Features, Value, disable_progress_bars

    disable_progress_bars()

    # Explicit features and one shard: with no accepted pairs, `from_list` can't infer a schema and
    # `save_to_disk` would write zero shards, which `load_from_disk` can't read back.
    cols = ["anchor", "positive", "negative", "source", "split"]
    ds = Dataset.from_dict(
        {c: [(p[c] or "") if c == "negative" else p[c] for p in pairs] for c in cols},
        features=Features({c: Value("string") for c in cols}),
    )
    ds.save_to_disk(str(out / "dataset"), num_shards=1 if not pairs else None)
    return {"directory": str(out), "model": version, "pairs": len(pairs)}
