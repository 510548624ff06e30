"""Generate: the LLM endpoint (any OpenAI-compatible server) with a connection test, a
generation run as a job with progress, token counts, and a sample of generated pairs with
the filter flags that send them to review."""

from __future__ import annotations

import os

import pandas as pd
import streamlit as st

from loop.config import save_settings
from loop.filters import FLAGS
from loop.generate import recent_pairs
from ui import deps, tasks
from ui.text import clip, md_escape

st.title("Generate")
st.caption("Synthetic (query, passage) pairs where labelled data is scarce. They become candidates: the next round "
           "scores them, auto-accepts the confident ones and sends the uncertain ones to review.")
ws = deps.workspace()
jobs = deps.jobs()

st.subheader("LLM endpoint")
endpoint = deps.llm_endpoint()
key, key_source = deps.llm_key()
with st.form("llm-settings"):
    base_url = st.text_input("Base URL", value=endpoint["base_url"], placeholder="http://127.0.0.1:8080/v1",
                             help="Any OpenAI-compatible endpoint: OpenAI, vLLM, Ollama, llama.cpp server, LiteLLM. "
                                  "Empty (and no key): the offline generator.")
    model = st.text_input("Model", value=endpoint["model"])
    c = st.columns(2)
    concurrency = c[0].number_input("Concurrent requests", 1, 256, int(endpoint["concurrency"]), key="llm_concurrency")
    rpm = c[1].number_input("Requests per minute", 0.01, 1e6, float(endpoint["requests_per_minute"]), step=60.0,
                            key="llm_requests_per_minute",
                            help="A client-side cap; an endpoint's 429 still backs off (honouring Retry-After).")
    c = st.columns([1, 1, 3])
    save = c[0].form_submit_button("Save settings", type="primary",
                                   help="Saved to the workspace's embedloop.toml (never the key) and used right away.")
    test = c[1].form_submit_button("Test connection")
st.caption(f"API key: **{f'set, from {key_source}' if key else 'not set'}**. The key is read from the environment "
           "(`OPENAI_API_KEY` or `EMBEDLOOP_LLM_API_KEY`) or Streamlit secrets (`OPENAI_API_KEY`, or `api_key` in "
           "an `[llm]` table) only; it is never shown, stored or logged.")
typed = {"base_url": base_url.strip(), "model": model.strip(), "concurrency": int(concurrency),
         "requests_per_minute": float(rpm)}
if save:
    saved = deps.run_safely(save_settings, ws.settings.workspace, {
        "llm_base_url": typed["base_url"], "llm_model": typed["model"] or "gpt-4o-mini",
        "llm_concurrency": typed["concurrency"], "llm_requests_per_minute": typed["requests_per_minute"]})
    if saved is not None:
        jobs.llm = typed
        st.success(f"Saved to {md_escape(str(saved))}; the app uses these settings now.", icon=":material/check:")
        overridden = [n for n in ("EMBEDLOOP_LLM_BASE_URL", "OPENAI_BASE_URL", "EMBEDLOOP_LLM_MODEL",
                                  "EMBEDLOOP_LLM_CONCURRENCY", "EMBEDLOOP_LLM_REQUESTS_PER_MINUTE") if n in os.environ]
        if overridden:
            st.warning(f"Set in the environment, which overrides the file at the next start: {', '.join(overridden)}.",
                       icon=":material/warning:")
if test:
    client = deps.run_safely(deps.llm_client, typed, timeout_s=10.0, max_retries=0)
    if client is None:
        st.info("No endpoint and no key: nothing to test. The offline generator needs no connection.")
    else:
        with st.spinner(f"Connecting to {client.endpoint}…"):
            found = deps.run_safely(client.test_connection)
        if found:
            st.success(f"Connected: {md_escape(found)}", icon=":material/lan:")

client = deps.run_safely(deps.llm_client)
if client is None:
    st.info("**No LLM endpoint is configured: the offline generator is used** (inverse cloze, title and keyphrase "
            "queries). It is free and deterministic, but weaker than an LLM.", icon=":material/cloud_off:")
else:
    st.caption(f"Generating with {md_escape(client.model)} at {md_escape(client.endpoint)}; answers are cached, "
               "so a rerun never pays twice.")

st.subheader("Run generation")
with st.form("generate"):
    n = st.number_input("Pairs to generate", 1, 20_000, 100, step=50)
    domain = st.text_input("Domain (for the LLM prompt)", placeholder="e.g. support articles for a billing product, "
                           "read by customers", disabled=client is None)
    go = st.form_submit_button("Generate", type="primary", icon=":material/auto_awesome:",
                               disabled=jobs.running("generate") or not ws.status()["passages"])
if go:
    jobs.submit("generate", tasks.generation(ws, client, int(n), domain.strip()), {"n": int(n)})
deps.job_panel("generate", stop_label="Stop generating")

report = jobs.result("generate")
if report is not None:
    r = st.columns(4)
    r[0].metric("Generated", f"{report.generated:,}")
    r[1].metric("Kept", f"{report.kept:,}")
    r[2].metric("New candidates", f"{report.written:,}")
    r[3].metric("Passages used", f"{report.passages:,}")
    st.caption(f"Generator: {md_escape(report.generator)}" + (f" · prompt {report.prompt}" if report.prompt else ""))
    if report.dropped:
        st.caption("Dropped: " + ", ".join(f"{k} {v:,}" for k, v in report.dropped.items()))
    if report.flagged:
        st.caption("Flagged for review: " + ", ".join(f"{k} {v:,}" for k, v in report.flagged.items()))

st.subheader("Token counts")
usage_rows = []
for h in ws.rounds():
    g = h.manifest.steps.get("generate") or {}
    if g.get("usage"):
        usage_rows.append({"run": f"round {h.round}", "generator": g.get("generator"), **g["usage"]})
if report is not None:
    usage_rows.append({"run": "this session's last run", "generator": report.generator, **report.usage.model_dump()})
if usage_rows:
    st.dataframe(pd.DataFrame(usage_rows), hide_index=True, width="stretch")
    st.caption("The offline generator spends no tokens. `cached` counts answers served from the cache (no request).")
else:
    st.caption("No generation has run yet.")

st.subheader("Generated pairs")
chosen = st.multiselect("Only pairs flagged", FLAGS, help="Flags send a pair to review: injection (looks like a prompt "
                        "injection), url_or_email, boilerplate, roundtrip_miss (the model does not retrieve its passage).")
sample = recent_pairs(ws.store, 200, chosen or None)
if sample:
    st.dataframe(
        pd.DataFrame([{"query": p["anchor"], "passage": clip(p["positive_text"]), "generator": p["generator"],
                       "flags": ", ".join(p["flags"]), "status": p["status"], "round": p["round"]} for p in sample]),
        hide_index=True, width="stretch",
    )
    st.caption(f"The newest {len(sample)} synthetic pairs" + (" with those flags." if chosen else "."))
else:
    st.caption("No synthetic pairs" + (" with those flags." if chosen else " yet."))
