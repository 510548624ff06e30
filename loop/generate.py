"""Synthetic (query, passage) pairs where labelled data is scarce, and the filters they pass.

Two generators, one output type (`GeneratedPair`):

- offline, no LLM: inverse cloze (a sentence as the query), title-as-query, and keyphrase
  queries; cheap, deterministic, weaker than an LLM but never idle;
- LLM: Promptagator-style few-shot prompting (`prompts/generate_queries.toml`) through
  `loop.llm.LLMClient`, with every answer cached by (passage, prompt version, model).

Every generated pair then passes the same quality filters: dropped (with a reason) when it is
empty, too short or long, a duplicate, or copied from the passage; flagged for review (kept)
when it looks like a prompt injection, contains a URL or e-mail, or is boilerplate. A round-trip
check (Promptagator's consistency filter) flags queries whose passage the current model does not
retrieve in its top k. `run_generation` writes the kept pairs as candidates in one transaction.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loop.errors import EmbedloopError
from loop.llm import CacheKey, LLMClient, LLMError, Usage
from loop.prompts import PromptTemplate, fence, load_prompt
from loop.records import Pair, Passage

if TYPE_CHECKING:
    from storage.db import Store

Progress = Callable[[int, int], None]
SearchFn = Callable[[list[str]], list[list[str]]]

OFFLINE_GENERATORS = ("offline:inverse_cloze", "offline:title", "offline:keyphrase")
GENERATION_PROMPT = "generate_queries"
# Flags route a kept pair to human review; they never drop it.
FLAGS = ("injection", "url_or_email", "boilerplate", "roundtrip_miss")

_GENERATOR = re.compile(r"^(offline:(inverse_cloze|title|keyphrase)|llm:\S.*)$")
_WORD = re.compile(r"\w+(?:['’]\w+)*")
# A compact English stopword list: enough to keep function words out of idf scores and keyphrases.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below
between both but by can could did do does doing down during each either else etc few for from further
had has have having he her here hers herself him himself his how however i if in into is it its itself
just let may me might more most must my myself no nor not now of off on once only or other our ours
ourselves out over own per same shall she should since so some such than that the their theirs them
themselves then there these they this those through thus to too under until up upon us use used using
very via was we were what when where which while who whom whose why will with within without would
yet you your yours yourself yourselves one two also e g i e
""".split())


class GenerationError(EmbedloopError):
    """Generation could not finish; nothing was written."""


# Records -------------------------------------------------------------------------------------
class GeneratedPair(BaseModel):
    """A synthetic query for one passage, before it becomes a `pairs` row.

    `positive_text` is what the model trains on. For inverse-cloze and title queries it is the
    passage minus the query span (see `offline_pairs`); `positive_id` is always the source passage.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    anchor: str = Field(min_length=1)
    positive_id: str
    positive_text: str
    generator: str
    prompt: str | None = None
    flags: list[str] = []

    @field_validator("generator")
    @classmethod
    def _generator(cls, v: str) -> str:
        if not _GENERATOR.match(v):
            raise ValueError("generator must be offline:inverse_cloze|title|keyphrase or llm:<model>")
        return v

    @property
    def pair_id(self) -> str:
        return Pair.make_id(self.anchor, self.positive_text)

    def flagged(self, *flags: str) -> GeneratedPair:
        new = [f for f in flags if f not in self.flags]
        return self.model_copy(update={"flags": [*self.flags, *new]}) if new else self


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


# Text helpers --------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return _WORD.findall(text.lower())


def normalise(query: str) -> str:
    """The form used for de-duplication: lower case, words only, single spaces."""
    return " ".join(words(query))


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if w not in STOPWORDS and not w.isdigit() and len(w) > 1]


# Sentence boundaries: end punctuation before a capital, a blank line, or a line break before an
# indented line, a list item or a heading underline. Hard-wrapped prose lines stay together.
_BOUNDARY = re.compile(
    r"(?<=[.!?])[\"')\]]*[ \t]*\n?[ \t]*(?=[\"'(\[]?[A-Z0-9])(?<=\s)"
    r"|\n[ \t]*\n\s*"
    r"|\n(?=[ \t]|[-*\u2022+][ \t]|\d+[.)][ \t]|[^\w\s]{3,}[ \t]*(?:\n|$))"
)
_RULE_LINE = re.compile(r"^[\W_]+$")  # "*****", "=====", "-----" under a heading


def sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text` (rule lines left out)."""
    spans, start = [], 0
    for m in _BOUNDARY.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    out = []
    for a, b in spans:
        chunk = text[a:b]
        if not chunk.strip() or _RULE_LINE.match(chunk.strip()):
            continue
        lead = len(chunk) - len(chunk.lstrip())
        out.append((a + lead, a + len(chunk.rstrip())))
    return out


def _remove_span(text: str, start: int, end: int) -> str:
    """`text` without text[start:end], tidying the whitespace left behind."""
    before, after = text[:start].rstrip(" \t"), text[end:].lstrip(" \t")
    joiner = " " if before and after and not before.endswith("\n") and not after.startswith("\n") else ""
    return re.sub(r"\n{3,}", "\n\n", (before + joiner + after)).strip()


class CorpusStats:
    """Document frequencies of words over a corpus sample, for idf weights."""

    def __init__(self, texts: Iterable[str]):
        self.df: Counter[str] = Counter()
        self.n = 0
        for t in texts:
            self.n += 1
            self.df.update(set(words(t)))

    def idf(self, word: str) -> float:
        # Smoothed idf (as in scikit-learn): never zero, never negative.
        return math.log((1 + self.n) / (1 + self.df.get(word, 0))) + 1.0

    @classmethod
    def from_store(cls, store: Store, limit: int = 20_000) -> CorpusStats:
        """Stats over at most `limit` passages, a deterministic sample of a large corpus."""
        rows = store.execute("SELECT text FROM passages ORDER BY md5(passage_id) LIMIT ?", [limit]).fetchall()
        return cls(r[0] for r in rows)


# Offline generator ---------------------------------------------------------------------------
def _balanced(text: str) -> bool:
    if text.count('"') % 2:
        return False
    return all(text.count(a) == text.count(b) for a, b in ("()", "[]", "{}"))


def _title_line(text: str) -> tuple[str, int] | None:
    """The passage's first line when it is a distinct title: (title, offset where the body starts).

    A title line is set apart (a blank line or a heading underline follows it), starts with a
    capital or a digit (a passage cut mid-sentence by the chunker does not), has 2-15 words, no
    closing punctuation and balanced quotes/brackets, and is followed by a body of 10+ words.
    """
    lines = text.split("\n")
    if len(lines) < 3:
        return None
    title = lines[0].strip().lstrip("#").strip().strip("*_").strip()
    n = len(words(title))
    if (
        not 2 <= n <= 15 or not title[:1].isupper() and not title[:1].isdigit()
        or title.endswith((".", ",", ";", ":")) or not _balanced(title) or "::=" in title
    ):
        return None
    second = lines[1].strip()
    if second and not _RULE_LINE.match(second):
        return None  # the line runs on into a paragraph: not a title
    rest_start = len(lines[0]) + 1 + (len(lines[1]) + 1 if second else 0)
    if len(words(text[rest_start:])) < 10:
        return None  # a title with no body is not a distinct title line
    return title, rest_start


def inverse_cloze(text: str, stats: CorpusStats, rng: random.Random) -> tuple[str, int, int] | None:
    """Inverse cloze task query (Lee, Chang & Toutanova 2019, "Latent Retrieval for Weakly
    Supervised Open Domain Question Answering", ACL): a sentence of the passage is the pseudo-query
    and the rest of the passage its context.

    Only informative sentences qualify: prose (ends with . ! or ?, not an indented code line), not
    the first (often a heading or a lead-in), 6-30 words, at least 3 content words; among them
    one of the three with the highest mean idf is chosen.

    Returns:
        (sentence, start, end) or None when no sentence qualifies.
    """
    scored = []
    for a, b in sentences(text)[1:]:
        sent = text[a:b]
        line_start = text.rfind("\n", 0, a) + 1
        if not sent.endswith((".", "!", "?")) or text[line_start:a].strip() == "" and a > line_start:
            continue  # not prose, or an indented (code / quoted) line
        n = len(words(sent))
        cw = content_words(sent)
        if not 6 <= n <= 30 or len(cw) < 3:
            continue
        scored.append((sum(stats.idf(w) for w in cw) / len(cw), a, b))
    if not scored:
        return None
    scored.sort(key=lambda s: (-s[0], s[1]))
    _, a, b = rng.choice(scored[:3])
    return " ".join(text[a:b].split()), a, b


def keyphrase_query(text: str, stats: CorpusStats, rng: random.Random) -> str | None:
    """Keyphrase query: the passage's top tf-idf content words (3-6 of them, in reading order).

    Mimics keyword-style searches; the words are scattered across the passage, so the query is
    not a verbatim span of it.
    """
    cw = [w for w in content_words(text) if len(w) > 2]
    if len(set(cw)) < 3:
        return None
    tf = Counter(cw)
    ranked = sorted(tf, key=lambda w: (-(tf[w] * stats.idf(w)), w))
    top = set(ranked[: rng.randint(3, 6)])
    ordered, seen = [], set()
    for w in cw:
        if w in top and w not in seen:
            ordered.append(w)
            seen.add(w)
    return " ".join(ordered)


def offline_pairs(
    passage_id: str, text: str, stats: CorpusStats, seed: int = 0, per_passage: int = 3,
) -> list[GeneratedPair]:
    """Up to `per_passage` pairs for one passage, preferring title, then inverse cloze, then keyphrase.

    Following Lee et al. (2019), a title or sentence used as the query is removed from the
    positive text, so the model must learn the topic rather than match the copied words; the
    pair still points at the source passage through `positive_id`. Deterministic for a given
    (seed, passage): each passage gets its own random stream.
    """
    rng = random.Random(f"{seed}:{passage_id}")
    out: list[GeneratedPair] = []
    title = _title_line(text)
    if title is not None:
        out.append(GeneratedPair(anchor=title[0], positive_id=passage_id, positive_text=text[title[1]:].strip(),
                                 generator="offline:title"))
    ict = inverse_cloze(text, stats, rng)
    if ict is not None:
        sent, a, b = ict
        out.append(GeneratedPair(anchor=sent, positive_id=passage_id, positive_text=_remove_span(text, a, b),
                                 generator="offline:inverse_cloze"))
    kp = keyphrase_query(text, stats, rng)
    if kp is not None:
        out.append(GeneratedPair(anchor=kp, positive_id=passage_id, positive_text=text,
                                 generator="offline:keyphrase"))
    return out[:per_passage]


# LLM generator -------------------------------------------------------------------------------
class QueryList(BaseModel):
    """The JSON the generation prompt asks for."""

    model_config = ConfigDict(extra="ignore")

    queries: list[str]

    @field_validator("queries")
    @classmethod
    def _strip(cls, v: list[str]) -> list[str]:
        return [q.strip() for q in v if q.strip()]


def few_shot_examples(store: Store, k: int = 4, seed: int = 0, excerpt_words: int = 60) -> list[tuple[str, str]]:
    """Up to `k` accepted human pairs (seed or edited, train split) as (query, passage excerpt).

    Only the train split: an eval/test query shown to the LLM would leak into training data.
    """
    rows = store.execute(
        "SELECT anchor, positive_text FROM pairs WHERE status = 'accepted' AND source IN ('seed', 'edited') "
        "AND split = 'train' ORDER BY pair_id"
    ).fetchall()
    picked = random.Random(seed).sample(rows, min(k, len(rows)))
    out = []
    for anchor, text in picked:
        ws = text.split()
        out.append((anchor, " ".join(ws[:excerpt_words]) + (" ..." if len(ws) > excerpt_words else "")))
    return out


def format_examples(examples: Sequence[tuple[str, str]]) -> str:
    if not examples:
        return "(none available yet: rely on the domain description and the passage)"
    return "\n\n".join(
        f"Query: {fence(q, 'passage')}\nPassage: {fence(p, 'passage')}" for q, p in examples
    )


def llm_pairs(
    llm: LLMClient, passages: Sequence[Passage], *, prompt: PromptTemplate | None = None, domain: str = "",
    examples: Sequence[tuple[str, str]] = (), per_passage: int = 3, round: int | None = None,
    progress: Progress | None = None,
) -> tuple[list[list[GeneratedPair] | Exception], Usage]:
    """Ask the LLM for `per_passage` queries for each passage, concurrently, cached.

    Returns:
        One slot per passage (its pairs, or the exception that stopped it), and the usage.
    """
    prompt = prompt or load_prompt(GENERATION_PROMPT)
    generator = f"llm:{llm.model}"
    shots = format_examples(examples)
    dom = domain.strip() or "(not described: infer it from the passage)"
    usages: list[Usage] = []

    def one(p: Passage) -> list[GeneratedPair]:
        messages = prompt.render(domain=dom, examples=shots, passage=fence(p.text, "passage"), n=per_passage)
        answer, usage = llm.complete_json(messages, QueryList, cache_key=CacheKey(p.passage_id, prompt.ref, round))
        usages.append(usage)
        return [
            GeneratedPair(anchor=q, positive_id=p.passage_id, positive_text=p.text, generator=generator,
                          prompt=prompt.ref)
            for q in answer.queries[:per_passage]
        ]

    results = llm.map(passages, one, progress)
    return results, sum(usages, Usage())


# Filters -------------------------------------------------------------------------------------
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
            "positive_text": p.positive_text, "source": "synthetic", "status": "candidate", "split": "train",
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
