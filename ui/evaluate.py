"""Evaluate: the base model against every round (95% bootstrap intervals) from the rounds'
manifests, Matryoshka dimensions, score distributions before/after, the promotion decision
with its reasons, and rollback of the active index."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from loop import indexing
from ui import charts, deps, tasks
from ui.text import md_escape

st.title("Evaluate")
st.caption("Every number comes from the fixed held-out set; intervals are paired bootstrap 95% intervals over its "
           "queries. A candidate goes live only if its interval against the active model lies above zero.")
ws = deps.workspace()
jobs = deps.jobs()
history = ws.rounds()
table = charts.rounds_table(history)
baseline = jobs.result("baseline")

st.subheader("Baseline and rounds (NDCG@10)")
if baseline is not None:
    lo, hi = baseline["ci"]
    st.markdown(f"Off-the-shelf baseline: **{baseline['report'].metrics['ndcg@10']:.4f}** "
                f"(95% interval {lo:.4f} to {hi:.4f}, {baseline['report'].n_queries:,} queries).")
    if baseline.get("intervals"):
        with st.expander("The baseline's every metric, with 95% intervals"):
            st.dataframe(
                pd.DataFrame([{"metric": m, "baseline": mean, "95% CI low": low, "95% CI high": high}
                              for m, (mean, low, high) in baseline["intervals"].items()]),
                hide_index=True, width="stretch",
                column_config={c: st.column_config.NumberColumn(format="%.4f")
                               for c in ("baseline", "95% CI low", "95% CI high")},
            )
if table.empty:
    st.info("No round has been evaluated yet. Measure the baseline on the Overview page and run a round on the "
            "Train page.", icon=":material/hourglass_empty:")
else:
    st.dataframe(
        table, hide_index=True, width="stretch",
        column_config={c: st.column_config.NumberColumn(format="%.4f")
                       for c in ("base", "active then", "candidate NDCG@10", "Δ vs base", "95% CI low", "95% CI high")},
    )
    st.altair_chart(charts.ndcg_chart(table), width="stretch")
    every = charts.metrics_table(history)
    if not every.empty:
        st.markdown("**Every metric, candidate vs base** (paired bootstrap 95% intervals, one resample of the "
                    "queries for all metrics)")
        st.dataframe(every, hide_index=True, width="stretch",
                     column_config={c: st.column_config.NumberColumn(format="%.4f")
                                    for c in ("base", "candidate", "Δ vs base", "95% CI low", "95% CI high")})

    st.subheader("Promotion decision")
    decided = [h for h in history if h.manifest.promotion]
    if decided:
        last = decided[-1]
        promo = last.manifest.promotion
        if promo.promote:
            st.success(f"Round {last.round}: promoted — the candidate is the active model.", icon=":material/verified:")
        else:
            st.warning(f"Round {last.round}: not promoted — the active model stays.", icon=":material/block:")
        for reason in promo.reasons:
            st.markdown(f"- {md_escape(reason)}")
    else:
        st.caption("No round has reached its promotion step yet.")

    mat = charts.matryoshka_frame(history)
    if not mat.empty:
        st.subheader("Matryoshka dimensions")
        st.caption("NDCG@10 of each round's candidate with its embeddings cut to fewer dimensions (smaller index, "
                   "faster search).")
        st.altair_chart(charts.matryoshka_chart(mat), width="stretch")

st.subheader("Score distributions, before and after")
st.caption("Cosine of each held-out query with its positive passage and with its hardest negative (from the active "
           "model's top 10). Training should push the two apart.")
candidates = [h.manifest.model.version for h in history if h.manifest.model]
after = candidates[-1] if candidates else (ws.active_model if ws.active_model != ws.base_version else None)
versions = {f"before: {ws.base_version}": ws.base_version}
if after:
    versions[f"after: {after}"] = after
if st.button("Compute score distributions", icon=":material/bar_chart:", disabled=jobs.running("distributions")):
    jobs.submit("distributions", tasks.distributions(ws, versions))
deps.job_panel("distributions", stop_label="Stop")
scores = jobs.result("distributions")
if scores:
    frame = charts.distributions_frame(scores)
    if frame.empty:
        st.caption("No held-out query with a positive in the corpus.")
    else:
        st.altair_chart(charts.distributions_chart(frame))

st.subheader("Active index and rollback")
status = ws.status()
idx = status["active_index"] or {}
st.markdown(f"Active model **{md_escape(ws.active_model)}**, index **{md_escape(idx.get('collection') or 'none')}**. "
            "Each promotion builds a new collection and keeps the previous one, so a bad switch can be undone.")
with st.popover("Roll back to the previous index", icon=":material/history:"):
    st.write("Re-activates the most recently retired index and its model, after bringing it up to date with "
             "the corpus (passages added since are embedded, removed ones deleted) and verifying it. Nothing "
             "else is deleted.")
    if st.button("Roll back now", type="primary", key="rollback"):
        name = deps.run_safely(indexing.rollback, ws.store, ws.index, ws.embedder)
        if name:
            st.success(f"The active index is now {md_escape(name)} (model {md_escape(ws.active_model)}).")
