"""Search: one query, the base model and the active model side by side (top 10 with scores).

Each model searches its own collection with queries it embedded itself; versions are never
mixed (the index refuses a mismatch)."""

from __future__ import annotations

import streamlit as st

from ui import deps
from ui.text import md_escape, text_block

st.title("Search")
ws = deps.workspace()
with st.form("search"):
    query = st.text_input("Query", placeholder="how does the with statement work?")
    k = st.slider("Results", 1, 50, 10)
    submitted = st.form_submit_button("Search", type="primary", icon=":material/search:")


def show(hits: list[tuple[str, float, str, list[str]]]) -> None:
    for i, (pid, score, text, docs) in enumerate(hits, 1):
        with st.container(border=True):
            st.caption(f"**{i}.** score {score:.3f} · {md_escape(', '.join(docs) or pid)}")
            text_block(text, query, max_height=220)


if submitted and query.strip():
    active = deps.run_safely(ws.search, query, k)
    active_hits = [(h.passage_id, h.score, h.text, h.doc_ids) for h in active or []]
    if ws.active_model == ws.base_version:
        st.caption(f"The active model is the base model ({md_escape(ws.base_version)}): one column. Once a fine-tuned "
                   "model is promoted, its results show beside the base model's.")
        show(active_hits)
    else:
        left, right = st.columns(2)
        with left:
            st.subheader("Base model")
            st.caption(md_escape(ws.base_version))
            base = deps.run_safely(ws.search, query, k, ws.base_version)  # says so when its collection is gone
            show([(h.passage_id, h.score, h.text, h.doc_ids) for h in base or []])
        with right:
            st.subheader("Active model")
            st.caption(md_escape(ws.active_model))
            show(active_hits)
elif submitted:
    st.warning("Type a query first.")
