"""Train: run the next round's steps as a job; live progress and loss curve from the trainer's
progress events; Stop (the trainer keeps its best checkpoint); the job's log tail."""

from __future__ import annotations

import streamlit as st

from loop.verdicts import human_duration
from loop.review import queue_counts
from loop.rounds import STATES, LoopConfig, Rounds
from ui import charts, deps, tasks
from ui.text import md_escape

st.title("Train")
st.caption("A round: generate → select (score candidates, fill the review queue) → review → train → evaluate → "
           "promote → re-index. Each step records its result, so a stopped or crashed round resumes where it was.")
ws = deps.workspace()
jobs = deps.jobs()
rounds = Rounds(ws)
current = rounds.current()
history = ws.rounds()
latest = current or (history[-1] if history else None)
running = jobs.running("round")

if latest:
    state = latest.state
    steps = [f"**:blue[{s}]**" if s == state else (f"~~{s}~~" if state in STATES and STATES.index(s) < STATES.index(state)
                                                      else s) for s in STATES]
    st.markdown(f"Round **{latest.round}**: " + " → ".join(steps if state != "failed" else STATES))
    if state == "failed":
        deps.show_error(f"Round {latest.round} failed: {latest.error or latest.manifest.failure}. "
                        "Start again to open a new round.")
else:
    st.markdown("No round yet: the first one opens when you start it.")

pending = queue_counts(ws.store)["pending"]
if pending:
    st.warning(f"{pending:,} cards wait for review. Training waits for them unless you train without them (they stay "
               "for a later round).", icon=":material/rate_review:")

with st.expander("Round settings", expanded=not latest):
    c = st.columns(4)
    budget = c[0].number_input("Review budget (cards)", 0, 10_000, 200, step=10)
    gen_max = c[1].number_input("Generate at most (pairs)", 0, 20_000, 300, step=50)
    epochs = c[2].number_input("Epochs", 1, 100, 3)
    batch = c[3].number_input("Batch size", 2, 1024, 32, help="In-batch negatives per anchor = batch size − 1.")
    domain = st.text_input("Domain (for the LLM prompt)", placeholder="what the corpus is and who searches it")
    force = st.checkbox("Train without the pending cards", value=False)

config = deps.run_safely(LoopConfig, review_budget=int(budget), generate_max=int(gen_max), domain=domain.strip(),
                         train={"epochs": int(epochs), "batch_size": int(batch)})
b = st.columns(2)
fill = b[0].button("Generate and fill the review queue", icon=":material/playlist_add:", disabled=running or not config,
                   help="Runs generate and select; stops at review.", width="stretch")
go = b[1].button("Train, evaluate and promote", type="primary", icon=":material/model_training:",
                 disabled=running or not config, help="Runs the round to its end (re-indexing if the candidate wins).",
                 width="stretch")
if (fill or go) and config:
    llm = deps.run_safely(deps.llm_client)
    jobs.submit("round", tasks.run_round(ws, config, "review" if fill else "done", force, llm),
                {"until": "review" if fill else "done"})
    running = True
    latest = rounds.current() or latest

run_dir = rounds.run_dir(latest) if latest else None


def training_progress() -> None:
    """Progress bar, ETA and loss curve of the round's training run (from its progress.jsonl)."""
    events = ws.training_progress(run_dir) if run_dir else []
    steps = [e for e in events if e.get("event") in ("step", "log") and e.get("max_steps")]
    if not steps:
        return
    last = steps[-1]
    step, total = int(last.get("step") or 0), int(last["max_steps"])
    eta = last.get("eta_seconds")
    lr = last.get("learning_rate")
    text = f"Training: step {step:,}/{total:,}" + (f" · ETA {human_duration(eta)}" if eta else "") + (
        f" · learning rate {lr:.2e}" if lr else "")
    st.progress(min(1.0, step / max(1, total)), text=text)
    frame = charts.progress_frame(events)
    if not frame.empty:
        st.altair_chart(charts.loss_chart(frame), width="stretch")


status = deps.job_panel("round", poll_s=2.0, on_running=training_progress,
                        stop_label="Stop (training keeps its best checkpoint)")
if not (status and status["status"] == "running"):
    result = ws.training_result(run_dir) if run_dir else None
    if run_dir and ws.training_progress(run_dir):
        st.subheader(f"Training of round {latest.round}")
        training_progress()
        if result:
            reason = f" — {md_escape(result['reason'])}" if result.get("reason") else ""
            st.caption(f"Result: {result.get('status')}" + reason
                       + (f" · best validation loss {result['best_eval_loss']:.4f}" if result.get("best_eval_loss")
                          is not None else ""))
