"""Export: the active model as a plain sentence-transformers folder with its model card, and the
accepted pairs as JSONL and as a Hugging Face dataset; downloads where they make sense."""

from __future__ import annotations

import json
import time
from pathlib import Path

import streamlit as st

from loop.export import accepted_pairs, model_card
from ui import deps, tasks
from ui.text import md_escape

st.title("Export")
ws = deps.workspace()
jobs = deps.jobs()
model = ws.status()["active_model"]
version = model.get("version") or ws.active_model
st.markdown(f"Active model **{md_escape(version)}**"
            + (" — the off-the-shelf base model (no round has been promoted yet)." if version == ws.base_version else "."))


def pairs_jsonl() -> bytes:
    rows = accepted_pairs(ws.store)
    return "".join(json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False) + "\n"
                   for r in rows).encode("utf-8")


st.subheader("Downloads")
d = st.columns(2)
d[0].download_button("Accepted pairs (JSONL)", pairs_jsonl, file_name="pairs.jsonl", mime="application/jsonl",
                     icon=":material/data_object:", on_click="ignore",
                     help="anchor, positive, negative (a reviewer's or given hard negative), source, split.")
d[1].download_button("Model card (README.md)", lambda: model_card(ws.store, version), file_name="README.md",
                     mime="text/markdown", icon=":material/description:", on_click="ignore")

st.subheader("Export folder")
st.caption("Writes model/ (the active model with its model card), pairs.jsonl and dataset/ (a Hugging Face dataset, "
           "`datasets.load_from_disk`) into a new or empty folder, and a zip of it to download.")
default = ws.settings.workspace.resolve() / "exports" / f"{version}-{time.strftime('%Y%m%d-%H%M%S')}"
st.session_state.setdefault("export_dir", str(default))
target = st.text_input("Folder", key="export_dir")
if st.button("Export", type="primary", icon=":material/output:", disabled=jobs.running("export")):
    path = model.get("path")
    if not path:
        deps.show_error(f"No model folder is recorded for {version}.")
    else:
        jobs.submit("export", tasks.export_model(ws, version, path, Path(target).expanduser()), {"dir": target})
deps.job_panel("export")
info = jobs.result("export")
if info:
    st.markdown(f"Exported **{md_escape(info['model'])}** and {info['pairs']:,} pairs to "
                f"**{md_escape(info['directory'])}**.")
    zip_path = Path(info["zip"])
    st.download_button(f"Download the export ({zip_path.stat().st_size / 2**20:,.0f} MiB zip)",
                       lambda: zip_path.read_bytes(), file_name=zip_path.name, mime="application/zip",
                       icon=":material/download:", on_click="ignore", type="primary")
