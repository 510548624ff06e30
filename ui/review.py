"""Review: one card at a time, every decision committed before the next card shows.

Cards come from `review.claim_next`, which claims the card for this reviewer, so several
reviewers never see the same one. Decisions run in button callbacks, i.e. before the page is
drawn again: the next card is only claimed after `review.decide` committed the last one.
"""

import streamlit as st

from loop.rounds import loop_config
from loop.review import REVIEW_SHOWN, DecisionIn, claim_next, decide, queue_counts, undo_last
from ui import deps, reviewers
from ui.text import md_escape, text_block

TOPK = REVIEW_SHOWN  # the review pool's passages shown with a card: keys 1-9 pick one, ticks mark several

# Keys of this page, handled by one listener in the window's capture phase (it runs before
# Streamlit's own):
# - Enter in the reviewer-name box commits the name (Streamlit does) and then leaves the box, so
#   the next keys (A, R, E, 1-9, U) decide instead of typing into the name.
# - "R" is Streamlit's own rerun key, so st.button(shortcut=...) refuses it. While the Reject
#   button exists and the focus is not in a text field, R clicks Reject instead (and is kept
#   from Streamlit).
_KEYS_JS = """
<script>
(() => {
  const w = window;
  if (w.__embedloopReviewKeys) return;
  w.__embedloopReviewKeys = true;
  w.addEventListener("keydown", (e) => {
    const t = e.target;
    if (e.key === "Enter" && t && t.closest && t.closest(".st-key-reviewer_name_input")) {
      setTimeout(() => t.blur(), 0);  // after Streamlit's handler has committed the name
      return;
    }
    if (e.key !== "r" && e.key !== "R") return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (t && (t.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName))) return;
    const btn = document.querySelector(".st-key-review_reject button");
    if (!btn) return;
    e.stopPropagation();
    e.preventDefault();
    if (!e.repeat && !btn.disabled) btn.click();
  }, true);
})();
</script>
"""

st.title("Review")
ws = deps.workspace()
st.html(_KEYS_JS, unsafe_allow_javascript=True)  # before the name box: Enter there must already leave it
who = reviewers.reviewer()
if who is None:
    st.stop()


def _decide(pair_id: str, action: str, **extra: str) -> None:
    """Button callback: one decision, committed (or refused with a message) before the rerun."""
    d = deps.run_safely(DecisionIn, pair_id=pair_id, action=action, reviewer=who, **extra)
    if d is not None and deps.run_safely(decide, ws.store, d) is not None:
        st.session_state.pop("review.editing", None)
        st.toast(f"Saved: {action}", icon=":material/check:")


def _edit(pair_id: str) -> None:
    _decide(pair_id, "edit", query=st.session_state.get(f"review_edit_query_{pair_id}", ""))


def _mark(pair_id: str, own_id: str | None, shown: list[str]) -> None:
    """Save the ticks: every ticked passage answers the query, every other shown one is a negative."""
    marked = [own_id] if own_id and st.session_state.get(f"review_mark_own_{pair_id}") else []
    marked += [pid for i, pid in enumerate(shown, 1) if st.session_state.get(f"review_mark_{pair_id}_{i}")]
    d = deps.run_safely(DecisionIn, pair_id=pair_id, action="mark", reviewer=who, passage_ids=marked, shown=shown)
    if d is not None and deps.run_safely(decide, ws.store, d) is not None:
        st.toast(f"Saved: {len(marked)} of {len(shown) + bool(own_id)} passages answer the query",
                 icon=":material/check:")


def _undo() -> None:
    pair_id = deps.run_safely(undo_last, ws.store, who)
    st.session_state.pop("review.editing", None)
    st.toast("Undone: the card is back" if pair_id else "Nothing to undo", icon=":material/undo:")


def _toggle_edit(pair_id: str) -> None:
    editing = st.session_state.get("review.editing") == pair_id
    st.session_state["review.editing"] = None if editing else pair_id


head = st.columns([3, 1], vertical_alignment="center")
with head[1]:
    st.caption(f"Reviewing as **{md_escape(who)}**")
    if reviewers.auth_configured():
        st.button("Sign out", on_click=reviewers.sign_out, args=(who,), icon=":material/logout:")

claimed = deps.run_safely(lambda: (claim_next(ws.store, who),))
if claimed is None:
    st.stop()
card = claimed[0]

# Counted after the claim, so this reviewer's own card shows as claimed.
counts = queue_counts(ws.store)
done, pending = counts["reviewed"], counts["pending"]
with head[0]:
    st.progress(
        done / max(1, done + pending),
        text=f"{pending:,} card{'' if pending == 1 else 's'} left to review ({counts['claimed']:,} claimed right now)"
             f" · {done:,} decided by reviewers so far",
    )

if card is None:
    st.success(
        "Nothing to review: the queue is empty (or every pending card is claimed by another reviewer). "
        "Run the next round's generation and selection on the Train page to fill it.",
        icon=":material/done_all:",
    )
    st.button("Undo my last decision", key="review_undo", on_click=_undo, shortcut="U", icon=":material/undo:")
    st.stop()

st.caption(
    "Keyboard: **A** accept · **R** reject · **E** edit the query · **1–9** pick the right passage "
    "from the passages shown · **M** save the ticked passages · **U** undo your last decision"
)

main, side = st.columns([3, 1])
with main:
    st.markdown("**Query**")
    text_block(card.anchor, big=True)
    st.markdown("**Proposed passage**")
    text_block(card.positive_text, card.anchor, max_height=360)
    origin = card.generator or card.source
    st.caption(f"Pair {card.pair_id} · source: {card.source} · from: {md_escape(origin)}")

with side:
    f = card.features
    if f:
        score = f.get("pos_score")
        rank = f.get("rank")
        st.metric("Model score (cosine)", f"{score:.3f}" if isinstance(score, (int, float)) else "–")
        st.metric("Rank of this passage", f"{rank + 1}" if isinstance(rank, int) else "–",
                  help="Where the current model ranks the proposed passage for this query (1 = top).")
        margin = f.get("margin")
        if isinstance(margin, (int, float)):
            st.metric("Margin over the hardest negative", f"{margin:+.3f}")
    st.markdown("**Why this card**")
    st.caption(md_escape(card.reason or "Chosen for review."))
    if f:
        with st.expander("All features"):
            st.json(f)

editing = st.session_state.get("review.editing") == card.pair_id
cols = st.columns(4)
cols[0].button("Accept", key="review_accept", type="primary", shortcut="A", icon=":material/check:",
               on_click=_decide, args=(card.pair_id, "accept"), width="stretch")
cols[1].button("Reject · R", key="review_reject", icon=":material/close:",
               on_click=_decide, args=(card.pair_id, "reject"), width="stretch",
               help="The passage does not answer the query; it becomes a hard negative.")
cols[2].button("Cancel edit" if editing else "Edit the query", key="review_edit", shortcut="E",
               icon=":material/edit:", on_click=_toggle_edit, args=(card.pair_id,), width="stretch")
cols[3].button("Undo", key="review_undo", shortcut="U", icon=":material/undo:", on_click=_undo, width="stretch",
               help="Undo your last decision; its card comes back.")

if editing:
    with st.form("review_edit_form", border=True):
        st.text_input("Edited query", value=card.anchor, key=f"review_edit_query_{card.pair_id}",
                      help="Press Enter to save: the edited query and this passage become an accepted pair.")
        st.form_submit_button("Save the edited query", type="primary", on_click=_edit, args=(card.pair_id,))

pool_kind = deps.run_safely(lambda: loop_config(ws.settings.loop).review_pool) or "model"
shown_what = f"{TOPK} of the model's and BM25's top passages" if pool_kind == "interleaved" else f"the model's top {TOPK}"
st.subheader(f"Or judge {shown_what}: tick every passage that answers the query")
st.caption("One review labels them all: ticked passages become answers of the query, the others (the proposed "
           "one too, unless ticked) verified negatives. Save with **M**, or press **1–9** to pick the single right one.")
cache = st.session_state.setdefault("review.topk", {})
if card.pair_id not in cache:
    hits = (deps.run_safely(ws.review_pool, [card.anchor], TOPK + 1, pool_kind) or [[]])[0]
    cache.clear()  # one card's hits at a time
    cache[card.pair_id] = [h for h in hits if h.passage_id != card.positive_id][:TOPK]
st.checkbox("The proposed passage (above) answers the query", key=f"review_mark_own_{card.pair_id}")
for i, hit in enumerate(cache[card.pair_id], 1):
    row = st.columns([1, 1, 8], vertical_alignment="top")
    row[0].button(f"Pick {i}", key=f"review_pick_{i}", shortcut=str(i), width="stretch",
                  on_click=_decide, args=(card.pair_id, "pick"), kwargs={"passage_id": hit.passage_id})
    row[1].checkbox("Answers", key=f"review_mark_{card.pair_id}_{i}")
    with row[2]:
        found = f"model score {hit.score:.3f}" if hit.found_by == "model" else f"found by BM25 (score {hit.score:.1f})"
        st.caption(f"{found} · {md_escape(', '.join(hit.doc_ids) or hit.passage_id)}")
        text_block(hit.text, card.anchor, max_height=140)
st.button("Save the ticks", key="review_mark", type="primary", shortcut="M", icon=":material/done_all:",
          on_click=_mark, args=(card.pair_id, card.positive_id, [h.passage_id for h in cache[card.pair_id]]))
