"""The two ways to make synthetic (query, passage) pairs, and the text utilities they share.

One output type, `GeneratedPair`:

- offline, no LLM: inverse cloze (a sentence as the query), title-as-query, and keyphrase
  queries; cheap, deterministic, weaker than an LLM but never idle;
- LLM: Promptagator-style few-shot prompting (`prompts/generate_queries.toml`) through
  `loop.llm.LLMClient`, with every answer cached by (passage, prompt version, model).

The pairs then pass loop/filters.py; loop/generate.py runs the whole generation step.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loop.errors import EmbedloopError
from loop.llm import CacheKey, LLMClient, Usage
from loop.prompts import PromptTemplate, fence, load_prompt
from loop.records import Pair, Passage

if TYPE_CHECKING:
    from storage.db import Store

Progress = Callable[[int, int], None]

GENERATION_PROMPT = "generate_queries"

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
