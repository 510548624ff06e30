"""Quality filters for generated pairs: what is dropped, what is flagged for review.

A generated pair is dropped (with a reason) when it is empty, too short or long, a duplicate,
or copied from the passage; it is kept but flagged for review when it looks like a prompt
injection, contains a URL or e-mail, or is boilerplate. A round-trip check (Promptagator's
consistency filter) flags queries whose passage the current model does not retrieve in its top k.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from loop.generators import GeneratedPair, GenerationError, normalise, words

SearchFn = Callable[[list[str]], list[list[str]]]

# Flags route a kept pair to human review; they never drop it.
FLAGS = ("injection", "url_or_email", "boilerplate", "roundtrip_miss")


class FilterConfig(BaseModel):
    """Thresholds of `filter_pairs`."""

    model_config = ConfigDict(extra="forbid")

    min_words: int = Field(default=2, ge=1)
    max_words: int = Field(default=32, ge=1)
    # A query is a copy when one verbatim run of >= copy_min_run words from the passage makes up
    # >= max_copy_fraction of it: short keyword queries that happen to match stay.
    copy_min_run: int = Field(default=6, ge=2)
    max_copy_fraction: float = Field(default=0.7, gt=0, le=1)


_INJECTION = re.compile(
    r"|".join([
        r"\b(ignore|disregard|forget|override)\b.{0,30}\b(previous|prior|above|earlier|all|any|these|your)\b"
        r".{0,20}\b(instructions?|prompts?|rules|directions|context|messages?)\b",
        r"\b(ignore|disregard)\s+(the\s+)?(above|previous|prior)\b",
        r"\byou\s+are\s+now\b",
        r"^\s*you\s+are\s+(an?|the)\b",
        r"\byou\s+are\s+(an?\s+)?(ai|assistant|chatbot|language\s+model|llm|gpt)\b",
        r"\bas\s+an?\s+(ai|language\s+model|assistant)\b",
        r"\b(system|developer)\s+(prompt|message)\b",
        r"\b(new|hidden|secret|original)\s+instructions?\b",
        r"\b(pretend|roleplay|role-play)\b.{0,20}\b(you|to\s+be)\b",
        r"\bact\s+as\s+(an?\s+)?(ai|assistant|chatbot|dan|jailbroken)\b",
        r"\bjailbreak|\bdan\s+mode\b|\bdeveloper\s+mode\b",
        r"^\s*(please\s+)?(respond|reply|answer|output|print|say|repeat|return)\s+(only|with|exactly|the\s+word)\b",
        r"</?\s*(passage|system|assistant|user|instructions?)\s*>|\[/?inst\]|<\|im_(start|end)\|>",
    ]),
    re.I,
)
_URL_EMAIL = re.compile(
    r"\bhttps?://|\bwww\.\w|\bftp://|\b[\w.+-]+@[\w-]+(\.[\w-]+)+\b"
    r"|\b[\w-]+\.(com|org|net|io|dev|gov|edu|co\.uk|de|fr)(/\S*)?\b",
    re.I,
)
_BOILERPLATE = re.compile(
    r"\bcopyright\b|©|\(c\)\s*\d{4}|\ball rights reserved\b|\bclick here\b|\bcookies?\s+(policy|settings|"
    r"consent|preferences|banner)\b|\b(accept|allow|we use)\s+(all\s+)?cookies\b|\bprivacy policy\b|"
    r"\bterms (of|and) (use|service|conditions)\b|\bsubscribe to (our )?newsletter\b|\bunsubscribe\b|"
    r"\bpowered by\b|\bread more\b|\bskip to (main )?content\b",
    re.I,
)


def review_flags(pair: GeneratedPair) -> list[str]:
    """Flags that send a pair to human review instead of dropping it."""
    flags = []
    if _INJECTION.search(pair.anchor):
        flags.append("injection")
    if _URL_EMAIL.search(pair.anchor):
        flags.append("url_or_email")
    # A query about boilerplate, or any query of a short passage that is mostly boilerplate.
    if _BOILERPLATE.search(pair.anchor) or (
        len(words(pair.positive_text)) < 50 and _BOILERPLATE.search(pair.positive_text)
    ):
        flags.append("boilerplate")
    return flags


def longest_copied_run(query: str, passage: str) -> int:
    """Length, in words, of the longest run of consecutive query words found verbatim in the passage."""
    q, p = words(query), words(passage)
    where: dict[str, list[int]] = defaultdict(list)
    for i, w in enumerate(p):
        where[w].append(i)
    best = 0
    for i in range(len(q)):
        if len(q) - i <= best:
            break
        for j in where.get(q[i], ()):
            n = 0
            while i + n < len(q) and j + n < len(p) and q[i + n] == p[j + n]:
                n += 1
            best = max(best, n)
    return best


def drop_reason(pair: GeneratedPair, config: FilterConfig = FilterConfig()) -> str | None:
    """Why a pair must be dropped (empty, too_short, too_long, copied_from_passage), or None."""
    n = len(words(pair.anchor))
    if n == 0:
        return "empty"
    if n < config.min_words:
        return "too_short"
    if n > config.max_words:
        return "too_long"
    run = longest_copied_run(pair.anchor, pair.positive_text)
    if run >= config.copy_min_run and run / n >= config.max_copy_fraction:
        return "copied_from_passage"
    return None


def filter_pairs(
    pairs: Iterable[GeneratedPair], config: FilterConfig = FilterConfig(), seen: Iterable[str] = (),
) -> tuple[list[GeneratedPair], list[tuple[GeneratedPair, str]]]:
    """Apply the quality filters.

    Args:
        pairs: generated pairs, in priority order (the first of duplicates is kept).
        config: thresholds.
        seen: queries already in the store; a new query equal to one (normalised) is a duplicate.

    Returns:
        (kept pairs with their review flags added, [(dropped pair, reason)]).
    """
    known = {normalise(s) for s in seen}
    kept: list[GeneratedPair] = []
    dropped: list[tuple[GeneratedPair, str]] = []
    for pair in pairs:
        reason = drop_reason(pair, config)
        key = normalise(pair.anchor)
        if reason is None and key in known:
            reason = "duplicate"
        if reason is not None:
            dropped.append((pair, reason))
            continue
        known.add(key)
        kept.append(pair.flagged(*review_flags(pair)))
    return kept, dropped


def roundtrip(pairs: Sequence[GeneratedPair], search_fn: SearchFn, k: int = 10) -> list[GeneratedPair]:
    """Round-trip consistency (Promptagator; Alberti et al. 2019): search each query and flag
    `roundtrip_miss` when its source passage is not among the top `k` results.

    Args:
        search_fn: list of queries -> list of ranked passage-id lists (one per query).
    """
    if not pairs:
        return []
    ranked = search_fn([p.anchor for p in pairs])
    if len(ranked) != len(pairs):
        raise GenerationError(f"search_fn returned {len(ranked)} result lists for {len(pairs)} queries")
    return [
        p if p.positive_id in ids[:k] else p.flagged("roundtrip_miss")
        for p, ids in zip(pairs, ranked, strict=True)
    ]
