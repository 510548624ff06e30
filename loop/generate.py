"""The generation step: pick passages, generate pairs, filter them, write the kept ones.

Synthetic (query, passage) pairs are made where labelled data is scarce (`needs_generation`),
by the offline or the LLM generator (loop/generators.py), filtered (loop/filters.py), and
`run_generation` writes the kept pairs as candidates in one transaction.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from loop.filters import FilterConfig, SearchFn, filter_pairs, roundtrip
from loop.generators import (
    GENERATION_PROMPT, CorpusStats, GeneratedPair, GenerationError, Progress, few_shot_examples, llm_pairs,
    offline_pairs,
)
from loop.llm import LLMClient, LLMError, Usage
from loop.pair_status import CANDIDATE
from loop.prompts import PromptTemplate, load_prompt
from loop.records import Passage

if TYPE_CHECKING:
    from storage.db import Store


class GenerationReport(BaseModel):
    """What one generation run did. `written` counts new rows (a re-run writes 0)."""

    model_config = ConfigDict(frozen=True)

    generator: str  # "offline" or "llm:<model>"
    prompt: str | None = None
    requested: int
    passages: int = 0
    generated: int = 0
    kept: int = 0
    written: int = 0
    dropped: dict[str, int] = {}
    flagged: dict[str, int] = {}
    usage: Usage
    round: int | None = None


# Scarcity and selection ----------------------------------------------------------------------
def needs_generation(n_accepted_train_pairs: int, threshold: int = 1000) -> int:
    """How many synthetic pairs to generate: the shortfall below `threshold` accepted train pairs."""
    return max(0, threshold - max(0, n_accepted_train_pairs))


def pick_passages(store: Store, n: int, seed: int = 0, min_tokens: int = 12) -> list[Passage]:
    """Up to `n` passages without a candidate, pending or accepted pair, spread across documents.

    Documents take turns (round-robin, in a seeded random order), and each gives its passages
    in a seeded random order, so a few long documents cannot take the whole budget. Passages
    under `min_tokens` (page numbers, stray headings) are skipped. Deterministic for a given
    seed and store content.
    """
    if n <= 0:
        return []
    rows = store.execute(
        "SELECT p.passage_id, coalesce(min(m.doc_id), '') AS doc_id FROM passages p "
        "LEFT JOIN doc_passages m ON m.passage_id = p.passage_id "
        "WHERE p.n_tokens >= ? AND NOT EXISTS (SELECT 1 FROM pairs q WHERE q.positive_id = p.passage_id "
        "AND q.status IN ('candidate', 'pending', 'accepted')) "
        "GROUP BY p.passage_id ORDER BY doc_id, p.passage_id",
        [min_tokens],
    ).fetchall()
    rng = random.Random(seed)
    by_doc: dict[str, list[str]] = defaultdict(list)
    for pid, doc in rows:
        by_doc[doc].append(pid)
    docs = sorted(by_doc)
    rng.shuffle(docs)
    queues = []
    for d in docs:
        ids = by_doc[d]
        rng.shuffle(ids)
        queues.append(ids)
    chosen: list[str] = []
    depth = 0
    while len(chosen) < n and queues:
        queues = [q for q in queues if len(q) > depth]
        for q in queues:
            if len(chosen) == n:
                break
            chosen.append(q[depth])
        depth += 1
    texts = store.passages(chosen)
    ntok = dict(store.execute(
        "SELECT passage_id, n_tokens FROM passages WHERE passage_id IN (SELECT unnest(?::VARCHAR[]))", [chosen]
    ).fetchall()) if chosen else {}
    return [Passage(passage_id=pid, text=texts[pid], n_tokens=ntok[pid]) for pid in chosen]


# The run -------------------------------------------------------------------------------------
def run_generation(
    store: Store, search_fn: SearchFn | None, *, llm: LLMClient | None = None, domain: str = "",
    round: int | None = None, n: int = 100, per_passage: int = 3, seed: int = 0, k: int = 10,
    prompt: PromptTemplate | None = None, filters: FilterConfig = FilterConfig(),
    n_examples: int = 4, progress: Progress | None = None,
) -> GenerationReport:
    """Generate up to `n` synthetic pairs, filter them, and write the kept ones as candidates.

    Nothing is written until every passage has been processed, and then all pairs go in one
    transaction: an error leaves no half-written run (paid LLM answers stay in the cache, so a
    retry costs only what failed). Re-running adds nothing new for passages already covered.

    Args:
        search_fn: queries -> ranked passage ids, for the round-trip check; None skips it.
        llm: the LLM client; None = the offline generator.
        domain: a sentence on the domain and its users, for the LLM prompt.
        n: pairs wanted; `ceil(n / per_passage)` passages are picked.

    Raises:
        LLMError / GenerationError: generation failed for some passages; nothing was written.
    """
    per_passage = max(1, per_passage)
    passages = pick_passages(store, math.ceil(max(0, n) / per_passage), seed)
    usage = Usage()
    generated: list[GeneratedPair] = []
    prompt_ref: str | None = None
    if llm is None:
        label = "offline"
        stats = CorpusStats.from_store(store)
        for i, p in enumerate(passages, 1):
            generated.extend(offline_pairs(p.passage_id, p.text, stats, seed, per_passage))
            if progress:
                progress(i, len(passages))
    else:
        label = f"llm:{llm.model}"
        prompt = prompt or load_prompt(GENERATION_PROMPT)
        prompt_ref = prompt.ref
        examples = few_shot_examples(store, n_examples, seed)
        results, usage = llm_pairs(llm, passages, prompt=prompt, domain=domain, examples=examples,
                                   per_passage=per_passage, round=round, progress=progress)
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            first = failed[0]
            msg = (f"Generation failed for {len(failed)} of {len(passages)} passages; nothing was written "
                   f"(answers already received are cached, so running again only pays for the rest). "
                   f"First error: {first}")
            if isinstance(first, LLMError):
                raise LLMError(msg, kind=first.kind, endpoint=first.endpoint, status=first.status,
                               attempts=first.attempts, fatal=first.fatal) from None
            raise GenerationError(msg) from first
        for r in results:
            generated.extend(r)  # type: ignore[arg-type]
    generated = generated[: max(0, n)]

    existing = [r[0] for r in store.execute("SELECT anchor FROM pairs").fetchall()]
    kept, dropped = filter_pairs(generated, filters, seen=existing)
    if search_fn is not None:
        kept = roundtrip(kept, search_fn, k)

    rows = [
        {
            "pair_id": p.pair_id, "anchor": p.anchor, "positive_id": p.positive_id,
            "positive_text": p.positive_text, "source": "synthetic", "status": CANDIDATE, "split": "train",
            "round": round, "origin": p.generator,
            "meta": json.dumps({"generator": p.generator, "prompt": p.prompt, "flags": p.flags, "seed": seed}),
        }
        for p in kept
    ]
    with store.transaction() as cur:
        written = store.insert_ignore(cur, "pairs", rows)

    flagged: Counter[str] = Counter(f for p in kept for f in p.flags)
    return GenerationReport(
        generator=label, prompt=prompt_ref, requested=n, passages=len(passages), generated=len(generated),
        kept=len(kept), written=written, dropped=dict(Counter(r for _, r in dropped)), flagged=dict(flagged),
        usage=usage, round=round,
    )


def recent_pairs(store: Store, limit: int = 200, flags: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The newest synthetic pairs with their generator and filter flags; with `flags`, only
    those carrying one of them."""
    rows = store.rows(
        "SELECT anchor, positive_text, status, round, origin, meta FROM pairs WHERE source = 'synthetic' "
        "ORDER BY created_at DESC, pair_id"
    )
    out = []
    for r in rows:
        meta = json.loads(r.pop("meta") or "{}")
        r["generator"] = meta.get("generator") or r["origin"]
        r["flags"] = list(meta.get("flags") or [])
        if flags and not set(flags) & set(r["flags"]):
            continue
        out.append(r)
        if len(out) >= limit:
            break
    return out
