"""embedloop's Streamlit app: a router plus dependency wiring (see ui/deps.py). Nothing else."""

import streamlit as st

from ui import deps
from ui.first_start import first_start

st.set_page_config(page_title="embedloop", page_icon=":material/model_training:", layout="wide")

PAGES = [
    st.Page("ui/overview.py", title="Overview", icon=":material/dashboard:", default=True),
    st.Page("ui/data.py", title="Data", icon=":material/database:"),
    st.Page("ui/generate.py", title="Generate", icon=":material/auto_awesome:"),
    st.Page("ui/review.py", title="Review", icon=":material/rate_review:"),
    st.Page("ui/train.py", title="Train", icon=":material/model_training:"),
    st.Page("ui/evaluate.py", title="Evaluate", icon=":material/monitoring:"),
    st.Page("ui/search.py", title="Search", icon=":material/search:"),
    st.Page("ui/export.py", title="Export", icon=":material/download:"),
]
page = st.navigation(PAGES)
first_start(deps.workspace())  # an empty workspace gets the demo corpus, as a job
page.run()
