"""The review page in a real browser (Debian's Chromium driven by Playwright), against a real
`streamlit run` on a small workspace with the bundled model: five cards decided with the
keyboard (A, R, E + Enter, A, R) and one by picking from the passages shown (a number key). Then,
with the server stopped (DuckDB has one writer per file), the decision log must hold exactly
those six decisions."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from loop.records import Document
from storage.db import Store

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update"]
REVIEWER = "browser-bot"

DOCS = {
    "open": "The built-in open function returns a file object; pass a mode such as 'r' to read or 'w' to write.",
    "with": "The with statement runs a block inside a context manager, which closes files and releases locks.",
    "for": "A for loop iterates over the items of any iterable, such as a list, a string or a dictionary.",
    "try": "The try statement catches exceptions raised in its block; except clauses name the exception types.",
    "class": "A class statement defines a new type; its methods receive the instance as their first argument.",
    "import": "The import statement finds a module, loads it and binds its name in the current namespace.",
    "lambda": "A lambda expression builds a small anonymous function from one expression.",
    "yield": "A function that contains yield is a generator: it produces values lazily, one at a time.",
    "dict": "A dictionary maps keys to values; keys must be hashable, and lookups by key are fast.",
    "slice": "Slicing a sequence with start:stop:step returns a new sequence of the selected items.",
}
# (query, document of the proposed positive), by descending priority: the order of the cards.
CARDS = [
    ("how do I read a text file", "open"),
    ("close a file automatically", "for"),      # wrong positive: rejected
    ("loop over a list", "for"),                # edited
    ("handle an exception", "try"),
    ("make an anonymous function", "dict"),     # wrong positive: rejected
    ("produce values lazily", "slice"),         # wrong positive: picked from the top-k
    ("define a new type", "class"),             # left pending
]
EXPECTED = ["accept", "reject", "edit", "accept", "reject", "pick"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefill(ws_dir: Path) -> dict[str, str]:
    """Documents (indexed with the bundled model) and pending review cards; returns doc -> passage."""
    from loop.workspace import Workspace

    with Workspace.open(ws_dir) as ws:
        ws.add_documents([Document(doc_id=k, title=k, text=v) for k, v in DOCS.items()], "browser-test")
        pid = ws.store.first_passage_of_docs(list(DOCS))
        text = ws.store.passages(list(pid.values()))
        rows = [
            {"pair_id": f"card-{i}", "anchor": q, "positive_id": pid[doc], "positive_text": text[pid[doc]],
             "source": "synthetic", "status": "pending", "priority": 1.0 - i / 10, "round": 1,
             "reason": "uncertain: low margin over the hardest negative",
             "meta": json.dumps({"features": {"pos_score": 0.4, "rank": 1, "margin": -0.02}, "generator": "offline:title"})}
            for i, (q, doc) in enumerate(CARDS)
        ]
        with ws.store.transaction() as cur:
            Store.insert_ignore(cur, "pairs", rows)
    return pid


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"streamlit exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"streamlit did not answer on port {port} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_review_with_the_keyboard_in_a_real_browser(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (scripts/test.sh installs it with apt-get)")
    from playwright.sync_api import expect, sync_playwright

    ws_dir = tmp_path / "ws"
    pid = _prefill(ws_dir)
    port = _free_port()
    log = (tmp_path / "streamlit.log").open("wb")
    env = {**os.environ, "EMBEDLOOP_WORKSPACE": str(ws_dir)}
    proc = subprocess.Popen(
        [str(ROOT / ".venv/bin/streamlit"), "run", "app.py", "--server.port", str(port), "--server.address",
         "127.0.0.1", "--server.headless", "true", "--server.fileWatcherType", "none",
         "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    shot = tmp_path / "review.png"
    try:
        _wait_healthy(port, proc)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(60_000)
                page.goto(f"http://127.0.0.1:{port}/review")
                name = page.get_by_label("Reviewer name", exact=True).and_(page.locator("input"))
                name.fill(REVIEWER)
                name.press("Enter")
                query = page.locator(".embedloop-text").first

                def idle() -> None:
                    expect(page.locator("[data-testid='stApp']")).to_have_attribute(
                        "data-test-script-state", "notRunning", timeout=60_000)

                def card_after(action) -> None:
                    before = query.inner_text()
                    action()
                    expect(query).not_to_have_text(before, timeout=60_000)
                    idle()

                expect(query).to_have_text(CARDS[0][0], timeout=120_000)  # the first load also loads the model
                idle()
                # No click and no blur: right after Enter in the name box, the keys decide (they used
                # to type into the name box, which kept the focus).
                card_after(lambda: page.keyboard.press("a"))
                expect(name).to_have_value(REVIEWER)
                card_after(lambda: page.keyboard.press("r"))
                expect(query).to_have_text(CARDS[2][0])
                page.keyboard.press("e")
                edit = page.get_by_label("Edited query", exact=True).and_(page.locator("input"))
                expect(edit).to_be_visible()
                idle()
                card_after(lambda: (edit.fill("iterate over a list with for"), edit.press("Enter")))
                page.evaluate("document.activeElement && document.activeElement.blur()")
                card_after(lambda: page.keyboard.press("a"))
                card_after(lambda: page.keyboard.press("r"))
                expect(query).to_have_text(CARDS[5][0])
                # The pick: the yield passage must be among the 9 shown (the review pool); press its number.
                picks = page.locator(".embedloop-text").all_inner_texts()[2:]  # query, proposed, then the pool
                number = next(i for i, t in enumerate(picks, 1) if t.startswith("yield"))
                card_after(lambda: page.keyboard.press(str(number)))
                expect(query).to_have_text(CARDS[6][0])
                expect(page.get_by_text("1 card left to review", exact=False)).to_be_visible()
                page.screenshot(path=str(shot), full_page=True)
            finally:
                if not shot.exists():
                    try:
                        page.screenshot(path=str(shot), full_page=True)
                    except Exception:
                        pass
                browser.close()
    finally:
        _stop(proc)
        log.close()
    print(f"screenshot: {shot}")

    with Store.open(ws_dir / "embedloop.duckdb") as store:
        rows = store.rows("SELECT pair_id, reviewer, action, payload FROM decisions ORDER BY decision_id")
    assert [(r["pair_id"], r["action"], r["reviewer"]) for r in rows] == [
        (f"card-{i}", action, REVIEWER) for i, action in enumerate(EXPECTED)]
    assert json.loads(rows[2]["payload"])["query"] == "iterate over a list with for"
    assert json.loads(rows[5]["payload"])["passage_id"] == pid["yield"]
