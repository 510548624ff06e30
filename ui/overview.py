"""Overview: what the workspace holds, how the off-the-shelf model does, whether fine-tuning is
worth it (`decide.should_finetune`), how the rounds went, and the next thing to do."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from loop.heldout import Baseline
from loop.review import queue_counts
from loop.rounds import Rounds
from ui import charts, deps, tasks
from ui.text import md_code, md_escape

st.title("embedloop")
st.caption("Fine-tune an embedding model on your own domain: generate, review, train, evaluate, re-index.")
ws = deps.workspace()
jobs = deps.jobs()
status = ws.status()
queue = queue_counts(ws.store)
accepted = sum(by.get("accepted", 0) for by in status["pairs"].values())
history = ws.rounds()
open_round = Rounds(ws).current()


def next_step() -> tuple[str, str | None]:
    """The one thing to do now, and the page where it is done."""
    if not status["documents"]:
        if jobs.running(deps.DEMO_JOB):
            return "Wait for the demo corpus to finish indexing (see above).", None
        return "Import your documents.", "ui/data.py"
    if queue["pending"]:
        return f"Review the {queue['pending']:,} pending cards.", "ui/review.py"
    if open_round:
        return f"Continue round {open_round.round}: its next step is **{open_round.state}**.", "ui/train.py"
    if not accepted:
        return ("Import the labelled pairs you have (Data), or generate pairs and run a round to fill the "
                "review queue (Train).", "ui/data.py")
    if jobs.result("baseline") is None:
        return "Measure the off-the-shelf baseline below, then decide whether to fine-tune.", None
    return "Start the next round: generate, select and review pairs, then train.", "ui/train.py"


text, page = next_step()
with st.container(border=True):
    st.markdown(f":material/arrow_forward: **Next:** {text}")
    if page:
        st.page_link(page, label="Go there", icon=":material/open_in_new:")

cols = st.columns(6)
cols[0].metric("Documents", f"{status['documents']:,}")
cols[1].metric("Passages", f"{status['passages']:,}")
cols[2].metric("Logged queries", f"{status['queries']:,}")
cols[3].metric("Accepted pairs", f"{accepted:,}")
cols[4].metric("Pending review", f"{queue['pending']:,}")
cols[5].metric("Decisions", f"{status['decisions']:,}")

left, right = st.columns(2)
with left:
    st.subheader("Pairs by source and status")
    if status["pairs"]:
        table = pd.DataFrame(status["pairs"]).T.fillna(0).astype(int)
        table.index.name = "source"
        st.dataframe(table, width="stretch")
        if status.get("pairs_by_split"):
            st.caption(" · ".join(f"{k}: {v:,}" for k, v in status["pairs_by_split"].items()) + " (all statuses, by split)")
    else:
        st.info("No pairs yet: import labelled pairs on the Data page, or generate some on the Generate page.")
with right:
    st.subheader("Model and index")
    model = status["active_model"]
    idx = status["active_index"] or {}
    st.markdown(
        f"- active model: {md_code(model.get('version') or '?')}"
        + (" (the off-the-shelf base model)" if model.get("version") == ws.base_version else "")
        + f"\n- active index: {md_code(idx.get('collection') or 'none yet')}, "
        + (f"cannot be read: {md_escape(idx['problem'])}" if idx.get("problem") else f"{idx.get('count') or 0:,} vectors")
        + f"\n- workspace: {md_code(status['workspace'])}"
    )

st.subheader("Baseline and recommendation")
held_out = sum(status.get("pairs_by_split", {}).get(s, 0) for s in ("eval", "test"))
baseline = jobs.result("baseline")
stale = baseline is not None and baseline.get("held_out_pairs") != held_out  # a round added queries to it
if held_out and not jobs.running("baseline") and ("baseline" not in jobs.latest or stale):
    # The held-out set exists: measuring is cheap (reports are cached by eval set), so this
    # process measures it on its own, e.g. after a restart or after a round grew the set.
    jobs.submit("baseline", tasks.measure_baseline(ws))
    baseline = None
if baseline is None:
    st.write(
        "The off-the-shelf model is measured first, on a held-out set of human-verified pairs (imported "
        "eval/test pairs, else a seeded share of the verified queries, growing by the same share of each "
        "round's newly verified ones)."
    )
    if st.button("Measure the baseline", icon=":material/speed:", disabled=jobs.running("baseline")):
        jobs.submit("baseline", tasks.measure_baseline(ws))
    deps.job_panel("baseline")
else:
    report, (lo, hi), speed = baseline["report"], baseline["ci"], baseline["speed"]
    ndcg = report.metrics["ndcg@10"]
    b = st.columns([1, 1, 2])
    b[0].metric("Baseline NDCG@10", f"{ndcg:.3f}", help=f"95% interval {lo:.3f} to {hi:.3f}")
    b[0].caption(f"95% interval {lo:.3f}–{hi:.3f} · {report.n_queries:,} held-out queries")
    target = b[1].number_input("Target NDCG@10", 0.0, 1.0, value=float(min(1.0, round(ndcg + 0.1, 2))), step=0.01,
                               help="The NDCG@10 your search needs to be good enough.")
    # The CLI's recommendation (`embedloop evaluate --target`), on the baseline measured above.
    rec = deps.run_safely(lambda: Rounds(ws).heldout.recommend(
        target, Baseline(report=report, intervals=baseline["intervals"]), speed=speed))
    if rec is not None:
        with b[2]:
            if rec.finetune:
                st.success("Fine-tune: the gap is real and you have enough pairs.", icon=":material/thumb_up:")
            elif rec.generate_first:
                st.warning(f"Fine-tuning is worth it, but generate and review about {rec.pairs_needed:,} more pairs "
                           "first.", icon=":material/auto_awesome:")
            else:
                st.info("Keep the off-the-shelf model for now.", icon=":material/pan_tool:")
            for reason in rec.reasons:
                st.markdown(f"- {reason}")
    if st.button("Measure again", icon=":material/refresh:"):
        jobs.submit("baseline", tasks.measure_baseline(ws))

st.subheader("Rounds")
table = charts.rounds_table(history)
if table.empty:
    st.caption("No round has been evaluated yet." + (f" Round {open_round.round} is at step "
                                                   f"{open_round.state}." if open_round else ""))
else:
    st.altair_chart(charts.ndcg_chart(table), width="stretch")
    st.caption("Candidate NDCG@10 per round with its 95% bootstrap interval against the base model (dashed).")
