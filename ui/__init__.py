"""Streamlit pages (one module each) and what they share: deps (wiring, jobs, errors, reviewers),
tasks (job bodies), charts, text (safe rendering of user text).

No SQL, torch or prompt text here: pages call `loop` functions.
"""
