"""Showing user text safely: every character is escaped; only our own <mark> tags are markup.

Passages and queries come from users' files and from LLMs, so they may hold HTML, scripts or
Markdown. They are never passed to `unsafe_allow_html`; `highlight` escapes the text piece by
piece and wraps whole-word matches of the query's content words in <mark>, and `text_block`
renders that with `st.html` (which also sanitises), whitespace kept as it is.
"""

from __future__ import annotations

import html
import re

import streamlit as st

from loop.generators import content_words

_STYLE = (
    "white-space: pre-wrap; overflow-wrap: anywhere; font-size: 0.95rem; line-height: 1.5; "
    "padding: 0.6rem 0.8rem; border-radius: 0.5rem; background: rgba(128, 128, 128, 0.08);"
)


def highlight(text: str, query: str | None = None) -> str:
    """HTML for `text`: escaped, with the query's content words (3+ letters) in <mark>."""
    terms = sorted({w for w in content_words(query or "") if len(w) >= 3}, key=len, reverse=True)
    if not terms:
        return html.escape(text)
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(t) for t in terms) + r")\b", re.IGNORECASE)
    out: list[str] = []
    pos = 0
    for m in pattern.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        out.append(f"<mark>{html.escape(m.group(0))}</mark>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def text_block(text: str, query: str | None = None, *, max_height: int | None = None, big: bool = False) -> None:
    """Render user text (escaped, query terms highlighted) in a quiet box."""
    style = _STYLE
    if max_height:
        style += f" max-height: {int(max_height)}px; overflow-y: auto;"
    if big:
        style += " font-size: 1.2rem; font-weight: 600;"
    st.html(f'<div class="embedloop-text" style="{style}">{highlight(text, query)}</div>')


def clip(text: str, n: int = 240) -> str:
    """One line of at most `n` characters, for tables (shown as plain text there)."""
    one = " ".join(text.split())
    return one if len(one) <= n else one[: n - 1] + "…"


_MD_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character


def md_escape(text: str) -> str:
    """`text` for a Markdown element (st.caption, st.markdown): all punctuation backslash-escaped,
    so links, images, HTML, emphasis and LaTeX in user text stay literal characters."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def md_code(text: str) -> str:
    """`text` as an inline code span (literal in Markdown): a fence longer than any run of
    backticks inside it, whitespace folded to single spaces."""
    one = " ".join(str(text).split())
    longest = max((len(run) for run in re.findall(r"`+", one)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if one.startswith("`") or one.endswith("`") else ""
    return f"{fence}{pad}{one}{pad}{fence}"
