"""Who is reviewing: the signed-in OIDC user when `[auth]` is configured in Streamlit secrets,
else a name typed in single-user mode (kept across pages under `REVIEWER_KEY`)."""

from __future__ import annotations

import streamlit as st

from ui.deps import run_safely, workspace

REVIEWER_KEY = "embedloop.reviewer"  # the single-user mode's reviewer name (kept across pages)


def auth_configured() -> bool:
    """Whether `[auth]` (OIDC sign-in) is configured in Streamlit secrets."""
    try:
        return "auth" in st.secrets
    except Exception:  # no secrets file at all
        return False


def auth_providers() -> list[str]:
    """Named providers (`[auth.NAME]` sections); empty when `[auth]` holds a single provider."""
    try:
        auth = st.secrets["auth"]
    except Exception:
        return []
    return [k for k, v in auth.items() if hasattr(v, "keys")]


def reviewer_identity() -> str | None:
    """Who decides: the signed-in user (email, else name) with auth, else the typed name."""
    if auth_configured():
        if not st.user.get("is_logged_in"):
            return None
        who = st.user.get("email") or st.user.get("name") or st.user.get("sub")
        return str(who) if who else None
    name = (st.session_state.get(REVIEWER_KEY) or "").strip()
    return name or None


def reviewer() -> str | None:
    """The reviewer, asking them to sign in (auth) or to give a name (single-user mode)."""
    if auth_configured():
        who = reviewer_identity()
        if who is None:
            st.info("Reviewers sign in, so that every decision records who made it.", icon=":material/login:")
            providers = auth_providers()
            for p in providers or [None]:
                label = f"Sign in with {p}" if p else "Sign in"
                st.button(label, key=f"login-{p or 'default'}", on_click=st.login, args=(p,) if p else (),
                          type="primary", icon=":material/login:")
            return None
        return who

    def keep() -> None:
        st.session_state[REVIEWER_KEY] = st.session_state["reviewer_name_input"].strip()

    st.session_state.setdefault("reviewer_name_input", st.session_state.get(REVIEWER_KEY, ""))
    st.text_input("Reviewer name", key="reviewer_name_input", on_change=keep, placeholder="e.g. Ann",
                  help="Recorded with every decision.")
    st.caption(
        "Single-user mode: no sign-in is configured. Add an `[auth]` section to `.streamlit/secrets.toml` "
        "(OIDC) to let several reviewers sign in."
    )
    who = reviewer_identity()
    if who is None:
        st.info("Type your name and press Enter to start reviewing.", icon=":material/badge:")
    return who


def sign_out(who: str) -> None:
    """Give back the reviewer's claimed cards, then sign out (auth mode)."""
    from loop.review import release

    run_safely(release, workspace().store, who)
    st.logout()
