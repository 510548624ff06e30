"""Tables and charts built from round manifests, training progress events and score arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from loop.records import RoundRecord

METRIC = "ndcg@10"


def rounds_table(history: Sequence[RoundRecord]) -> pd.DataFrame:
    """One row per round that was evaluated: NDCG@10 of base, active and candidate, the
    candidate-minus-base difference with its 95% bootstrap interval, and the promotion verdict."""
    rows = []
    for r in history:
        m = r.manifest
        metrics = m.metrics or {}
        if not metrics:
            continue
        vs = m.vs_base or {}
        rows.append({
            "round": r.round,
            "state": r.state,
            "candidate": m.model.version if m.model else None,
            "base": (metrics.get("base") or {}).get(METRIC),
            "active then": (metrics.get("active") or {}).get(METRIC),
            "candidate NDCG@10": (metrics.get("candidate") or {}).get(METRIC),
            "Δ vs base": vs.get("delta"),
            "95% CI low": vs.get("ci_low"),
            "95% CI high": vs.get("ci_high"),
            "queries": metrics.get("n_queries"),
            "promoted": m.promotion.promote if m.promotion else None,
        })
    return pd.DataFrame(rows)


def metrics_table(history: Sequence[RoundRecord]) -> pd.DataFrame:
    """One row per (round, metric): base, candidate, the difference and its 95% paired bootstrap
    interval, for rounds whose manifest has every metric's interval (`vs_base_by_metric`)."""
    rows = []
    for r in history:
        for metric, c in (r.manifest.vs_base_by_metric or {}).items():
            rows.append({"round": r.round, "metric": metric, "base": c.get("base"), "candidate": c.get("other"),
                         "Δ vs base": c.get("delta"), "95% CI low": c.get("ci_low"), "95% CI high": c.get("ci_high")})
    return pd.DataFrame(rows)


def ndcg_chart(table: pd.DataFrame) -> alt.Chart:
    """Candidate NDCG@10 per round with its 95% interval against the base model (dashed rule)."""
    df = table.copy()
    df["low"] = (df["base"] + df["95% CI low"]).clip(0, 1)
    df["high"] = (df["base"] + df["95% CI high"]).clip(0, 1)
    df["promoted"] = df["promoted"].map({True: "promoted", False: "not promoted"}).fillna("pending")
    x = alt.X("round:O", title="round", axis=alt.Axis(labelAngle=0))
    y = alt.Y("low:Q", title="NDCG@10", scale=alt.Scale(zero=False, domainMax=1))
    interval = alt.Chart(df).mark_rule(strokeWidth=3, opacity=0.5).encode(x=x, y=y, y2="high:Q")
    points = alt.Chart(df).mark_point(filled=True, size=110).encode(
        x=x, y="candidate NDCG@10:Q", color=alt.Color("promoted:N", title=None),
        tooltip=["round", "candidate", "candidate NDCG@10", "Δ vs base", "95% CI low", "95% CI high"])
    base = alt.Chart(df).mark_rule(strokeDash=[6, 4], color="gray").encode(y="base:Q", tooltip=["round", "base"])
    return (base + interval + points).properties(height=280)


def matryoshka_frame(history: Sequence[RoundRecord]) -> pd.DataFrame:
    rows = []
    for r in history:
        for dim, score in ((r.manifest.metrics or {}).get("matryoshka") or {}).items():
            rows.append({"round": f"round {r.round}", "dimensions": int(dim), METRIC: score})
    return pd.DataFrame(rows)


def matryoshka_chart(df: pd.DataFrame) -> alt.Chart:
    return alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("dimensions:Q", title="embedding dimensions kept"),
        y=alt.Y(f"{METRIC}:Q", title="NDCG@10", scale=alt.Scale(zero=False)),
        color=alt.Color("round:N", title=None), tooltip=["round", "dimensions", METRIC],
    ).properties(height=260)


def progress_frame(events: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Training loss (and eval loss) by step from `train.read_progress` events."""
    rows = []
    for ev in events:
        if ev.get("event") == "log" and ev.get("loss") is not None:
            rows.append({"step": ev.get("step"), "series": "training loss", "loss": ev["loss"]})
        elif ev.get("event") == "eval" and ev.get("eval_loss") is not None:
            rows.append({"step": ev.get("step"), "series": "validation loss", "loss": ev["eval_loss"]})
    return pd.DataFrame(rows, columns=["step", "series", "loss"])


def loss_chart(df: pd.DataFrame) -> alt.Chart:
    return alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("step:Q"), y=alt.Y("loss:Q", scale=alt.Scale(zero=False)), color=alt.Color("series:N", title=None),
        tooltip=["step", "series", "loss"],
    ).properties(height=260)


def distributions_frame(scores: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """model label -> (positive scores, hardest-negative scores) as a long table (NaN dropped)."""
    rows = []
    for model, (pos, neg) in scores.items():
        rows += [{"model": model, "pair": "positive", "cosine": float(s)} for s in pos if np.isfinite(s)]
        rows += [{"model": model, "pair": "hardest negative", "cosine": float(s)} for s in neg if np.isfinite(s)]
    return pd.DataFrame(rows, columns=["model", "pair", "cosine"])


def distributions_chart(df: pd.DataFrame) -> alt.Chart:
    return alt.Chart(df).mark_bar(opacity=0.55, binSpacing=0).encode(
        x=alt.X("cosine:Q", bin=alt.Bin(maxbins=30), title="cosine similarity to the query"),
        y=alt.Y("count():Q", stack=None, title="pairs"),
        color=alt.Color("pair:N", title=None, scale=alt.Scale(domain=["positive", "hardest negative"],
                                                              range=["#2e7d32", "#c62828"])),
        column=alt.Column("model:N", title=None, sort=list(dict.fromkeys(df["model"]))),
    ).properties(height=220, width=320)
