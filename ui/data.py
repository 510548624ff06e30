"""Data: upload documents, labelled pairs, query logs and BEIR folders (as zip); corpus stats;
a passage browser with semantic search. Every import runs as a job."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ui import deps, tasks
from loop.ingest import corpus_stats
from ui.text import clip, md_escape, text_block

st.title("Data")
ws = deps.workspace()
jobs = deps.jobs()
# The tighter of the workspace's file limit and the server's upload limit (.streamlit/config.toml).
max_mb = min(ws.settings.max_file_mb, float(st.get_option("server.maxUploadSize")))
busy = jobs.running("import")

st.caption(
    f"Files up to {max_mb:g} MB each. Each file is imported in one transaction: a bad file is "
    "named with its line and nothing of it lands. Re-importing the same data changes nothing."
)


def uploader(kind: str, label: str, help: str, multiple: bool = True):
    return st.file_uploader(label, type=tasks.UPLOAD_TYPES[kind], accept_multiple_files=multiple, key=f"upload-{kind}",
                            help=help, max_upload_size=max(1, int(max_mb)), disabled=busy)


def start_import(kind: str, files, **options) -> None:
    files = files if isinstance(files, list) else [files] if files else []
    if not files:
        deps.show_error("Choose a file first.")
        return
    payload = [(f.name, f.getvalue()) for f in files]
    jobs.submit("import", tasks.import_uploads(ws, kind, payload, options), {"kind": kind, "files": [n for n, _ in payload]})


st.subheader("Corpus")
status = ws.status()
stats = corpus_stats(ws.store)
c = st.columns(4)
c[0].metric("Documents", f"{status['documents']:,}")
c[1].metric("Passages", f"{status['passages']:,}")
tok = stats["tokens"]
c[2].metric("Tokens per passage (median)", f"{tok['median']:.0f}" if tok["passages"] else "–",
            help=f"min {tok['min']}, mean {tok['mean']:.0f}, max {tok['max']}" if tok["passages"] else None)
c[3].metric("Logged queries", f"{status['queries']:,}")
if stats["sources"]:
    st.dataframe(pd.DataFrame([{**s, "source": clip(s["source"], 120)} for s in stats["sources"]]),
                 hide_index=True, width="stretch")

st.subheader("Import and browse")
docs_tab, pairs_tab, queries_tab, beir_tab, browse_tab = st.tabs(
    ["Documents", "Labelled pairs", "Query log", "BEIR folder (zip)", "Browse passages"]
)
with docs_tab:
    files = uploader("documents", "Documents", ".txt, .md, .html, .pdf (one document each), or .jsonl / .csv "
                     "with one document per record (fields `_id`/`id`, `title`, `text`).")
    if st.button("Import documents", type="primary", disabled=busy, key="import-documents"):
        start_import("documents", files)
with pairs_tab:
    files = uploader("pairs", "Labelled pairs", "JSONL or CSV with `anchor` (the query), `positive` (a text, passage "
                     "id or document id) or `positive_id`, optional `negative` and `score` (0..1).")
    split = st.radio("Use them for", ["train", "eval", "test"], horizontal=True, key="pairs-split",
                     captions=["training", "the held-out evaluation set", "a held-out test set"])
    if st.button("Import pairs", type="primary", disabled=busy, key="import-pairs"):
        start_import("pairs", files, split=split)
with queries_tab:
    files = uploader("queries", "Query log", "Real queries without labels: .txt (one a line), .jsonl (`text` or "
                     "`query`) or .csv (column `query` or `text`). Rounds mine pairs from them.")
    if st.button("Import queries", type="primary", disabled=busy, key="import-queries"):
        start_import("queries", files)
with beir_tab:
    file = uploader("beir", "BEIR folder as a .zip", "A zip of a BEIR folder: corpus.jsonl, queries.jsonl and "
                    "qrels/<split>.tsv.", multiple=False)
    qrels = st.selectbox("Import its judgements (qrels) as", ["test", "eval", "train", "(do not import)"],
                         help="test/eval pairs are held out for evaluation; train pairs may be trained on.")
    with_queries = st.checkbox("Also import its queries as a query log", value=False)
    if st.button("Import BEIR folder", type="primary", disabled=busy, key="import-beir"):
        start_import("beir", file, qrels_split=None if qrels.startswith("(") else qrels, queries=with_queries)

deps.job_panel("import")

with browse_tab:
    query = st.text_input("Search the corpus (active model)", key="browse-query", placeholder="a question or keywords")
    if query.strip():
        hits = deps.run_safely(ws.search, query, 20) or []
        for i, h in enumerate(hits, 1):
            st.caption(f"{i}. score {h.score:.3f} · {md_escape(', '.join(h.doc_ids) or h.passage_id)}")
            text_block(h.text, query, max_height=200)
    else:
        ids = ws.store.passage_ids()
        per_page = 20
        pages = max(1, -(-len(ids) // per_page))
        page = st.number_input(f"Page (of {pages:,})", 1, pages, 1, key="browse-page")
        chunk = ids[(page - 1) * per_page : page * per_page]
        texts = ws.store.passages(chunk)
        docs = ws.store.docs_of_passages(chunk)
        for pid in chunk:
            st.caption(f"{md_escape(', '.join(docs.get(pid, [])) or '(no document)')} · passage {pid}")
            text_block(texts.get(pid, ""), max_height=160)
