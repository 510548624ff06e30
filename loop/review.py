"""The review queue: claim a card, decide it, undo. The app and `embedloop review apply` share it.

Every decision is one transaction: the pair's new status, the append-only decision log entry
and its side effects (a new pair for edit / pick, a hard negative for reject / pick) commit
together or not at all. Cards are claimed by a reviewer for `claim_seconds`; an abandoned claim
expires and the card returns to the queue, so several reviewers never get the same card.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import duckdb
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from loop.errors import EmbedloopError, InputError, NotFoundError, validation_problems
from loop.evalsets import held_out_keys
from loop.pair_status import ACCEPTED, PENDING, REJECTED, move
from loop.records import Pair, query_key
from storage.db import Store

Action = Literal["accept", "reject", "edit", "pick", "mark"]
CLAIM_SECONDS = 600
REVIEW_SHOWN = 9  # the model's top passages a card shows beside its own (keys 1-9 in the app)


class ReviewConflict(EmbedloopError):
    """The card was decided or claimed by someone else meanwhile."""


class Card(BaseModel):
    model_config = ConfigDict(frozen=True)

    pair_id: str
    anchor: str
    positive_id: str | None
    positive_text: str
    source: str
    reason: str | None
    priority: float | None
    features: dict[str, Any]
    generator: str | None


class DecisionIn(BaseModel):
    """One decision as a reviewer (or a JSONL file) gives it."""

    model_config = ConfigDict(extra="forbid")

    pair_id: str
    action: Action
    reviewer: str
    query: str | None = None
    passage_id: str | None = None
    passage_ids: list[str] | None = None
    shown: list[str] | None = None

    @field_validator("reviewer")
    @classmethod
    def _reviewer(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("reviewer is empty")
        return v.strip()

    @model_validator(mode="after")
    def _needs(self) -> DecisionIn:
        if self.action == "edit" and not (self.query and self.query.strip()):
            raise ValueError("an edit needs the new `query` text")
        if self.action == "pick" and not self.passage_id:
            raise ValueError("a pick needs the chosen `passage_id`")
        if self.action == "mark":
            if self.shown is None or self.passage_ids is None:
                raise ValueError("a mark needs `shown` (the passages the reviewer saw) and `passage_ids` (the ones "
                                 "that answer the query, the card's own passage included; [] if none does)")
        elif self.passage_ids is not None or self.shown is not None:
            raise ValueError("`passage_ids` and `shown` belong to a mark")
        return self


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# Every reviewer is a thread of the one process that owns the workspace. Without this lock they
# all race for the same top card: DuckDB's optimistic transactions let one win and abort the
# rest, and with 20 reviewers a thread can lose 50 times in a row. Serialising the queue's own
# short transactions removes those conflicts; `_retry` still covers other writers (a round).
_QUEUE_LOCK = threading.Lock()


def _retry(fn, attempts: int = 50):
    """Run `fn` again when a concurrent transaction touched the same rows (DuckDB is optimistic)."""
    for i in range(attempts):
        try:
            with _QUEUE_LOCK:
                return fn()
        except duckdb.TransactionException:
            if i == attempts - 1:
                raise
            time.sleep(0.002 * (i + 1))
    raise AssertionError("unreachable")


def _card(row: dict[str, Any]) -> Card:
    meta = json.loads(row["meta"]) if row.get("meta") else {}
    return Card(
        pair_id=row["pair_id"], anchor=row["anchor"], positive_id=row["positive_id"],
        positive_text=row["positive_text"], source=row["source"], reason=row["reason"],
        priority=row["priority"], features=meta.get("features", {}), generator=meta.get("generator"),
    )


_CARD_COLS = "pair_id, anchor, positive_id, positive_text, source, reason, priority, meta"


def claim_next(store: Store, reviewer: str, claim_seconds: int = CLAIM_SECONDS) -> Card | None:
    """The reviewer's current card, or the highest-priority unclaimed pending card, claimed."""

    def attempt() -> Card | None:
        now = _now()
        with store.transaction() as cur:
            rows = cur.execute(
                f"SELECT {_CARD_COLS} FROM pairs WHERE status = 'pending' AND claimed_by = ? AND claim_expires > ? "
                "ORDER BY priority DESC NULLS LAST LIMIT 1",
                [reviewer, now],
            ).fetchall()
            if not rows:
                rows = cur.execute(
                    f"SELECT {_CARD_COLS} FROM pairs WHERE status = 'pending' "
                    "AND (claimed_by IS NULL OR claim_expires <= ?) "
                    "ORDER BY priority DESC NULLS LAST, pair_id LIMIT 1",
                    [now],
                ).fetchall()
            if not rows:
                return None
            row = dict(zip(_CARD_COLS.split(", "), rows[0], strict=True))
            cur.execute(
                "UPDATE pairs SET claimed_by = ?, claim_expires = ? WHERE pair_id = ?",
                [reviewer, now + timedelta(seconds=claim_seconds), row["pair_id"]],
            )
            return _card(row)

    return _retry(attempt)


def release(store: Store, reviewer: str) -> None:
    """Give back the reviewer's claims (e.g. on sign-out)."""
    _retry(lambda: store.execute(
        "UPDATE pairs SET claimed_by = NULL, claim_expires = NULL WHERE claimed_by = ? AND status = 'pending'",
        [reviewer],
    ))


def decide(store: Store, d: DecisionIn, *, require_claim: bool = False) -> int:
    """Apply one decision atomically; returns the decision id.

    Raises:
        NotFoundError: no such pair or passage.
        ReviewConflict: the pair is not pending, or another reviewer holds an unexpired claim.
        InputError: the decision is malformed (e.g. pick of the same passage).
    """

    def attempt() -> int:
        with store.transaction() as cur:
            return _apply(store, cur, d, _now(), require_claim)

    return _retry(attempt)


def _apply(store: Store, cur: duckdb.DuckDBPyConnection, d: DecisionIn, now: datetime, require_claim: bool) -> int:
    """`decide` inside the caller's transaction."""
    rows = cur.execute(
        "SELECT anchor, positive_id, positive_text, status, claimed_by, claim_expires, query_id, split "
        "FROM pairs WHERE pair_id = ?",
        [d.pair_id],
    ).fetchall()
    if not rows:
        raise NotFoundError(f"No pair with id {d.pair_id!r}.")
    anchor, pos_id, pos_text, status, claimed_by, expires, query_id, split = rows[0]
    if status != "pending":
        raise ReviewConflict(f"Pair {d.pair_id} was already decided (status {status}).")
    if claimed_by and claimed_by != d.reviewer and expires and expires > now:
        raise ReviewConflict(f"Pair {d.pair_id} is being reviewed by {claimed_by}.")
    if require_claim and claimed_by != d.reviewer:
        raise ReviewConflict(f"Pair {d.pair_id} is not claimed by {d.reviewer}; fetch the next card again.")
    payload: dict[str, Any] = {"previous_status": status}
    new_status = ACCEPTED if d.action == "accept" else REJECTED
    if d.action == "mark":
        new_status = _apply_mark(cur, d, anchor, pos_id, split, query_id, now, payload)
    new_pair: dict[str, Any] | None = None
    negative: str | None = None
    if d.action == "edit":
        query = " ".join((d.query or "").split())
        if query == " ".join(anchor.split()):
            # The same pair id: its insert would be ignored and the pair end up rejected.
            raise InputError("the edited query is the same as the original; use accept instead")
        if query_key(query) in held_out_keys(cur):
            raise InputError(
                f"the edited query {query!r} is a query held out for evaluation (case, spacing and "
                f"trailing punctuation aside); a training pair on it would leak the evaluation. Write a "
                f"different query, or reject the card."
            )
        new_pair = {"anchor": query, "positive_id": pos_id, "positive_text": pos_text}
        payload["query"] = query
    elif d.action == "pick":
        found = cur.execute("SELECT text FROM passages WHERE passage_id = ?", [d.passage_id]).fetchall()
        if not found:
            raise NotFoundError(f"No passage with id {d.passage_id!r}.")
        if d.passage_id == pos_id:
            raise InputError("a pick must choose a different passage; use accept instead")
        new_pair = {"anchor": anchor, "positive_id": d.passage_id, "positive_text": found[0][0]}
        negative = pos_id
        payload["passage_id"] = d.passage_id
    elif d.action == "reject":
        negative = pos_id
    if new_pair is not None:
        created, resolved = _answer(cur, new_pair, d, split, query_id, now)
        payload["created_pair"] = created
        if resolved:
            payload["resolved_pair"] = resolved
    if negative:
        added = Store.insert_ignore(cur, "negatives", [{"anchor": anchor, "passage_id": negative, "source": "review"}])
        payload["negative"] = negative if added else None
    move(cur, d.pair_id, new_status, "decide", now=now)
    return store.append_decision(d.pair_id, d.reviewer, d.action, payload, cur)


def _answer(cur: duckdb.DuckDBPyConnection, pair: dict[str, Any], d: DecisionIn, split: str, query_id: str | None,
            now: datetime, status: str = ACCEPTED) -> tuple[str | None, dict[str, str] | None]:
    """Record that `pair` (anchor, positive_id, positive_text) is a right answer (or, with status
    'rejected', a wrong one). Returns (the new pair's id, or None) and the open card it answered.

    When the (query, passage) is already a card of its own (e.g. the query's top-2 when its top-1
    was shown), this decision answers it too, so nobody is asked the same question twice; undo
    puts it back. A wrong answer creates no pair, it only closes such a card.
    """
    pair_id = Pair.make_id(pair["anchor"], pair["positive_text"])
    if status == ACCEPTED and Store.insert_ignore(cur, "pairs", [{
        "pair_id": pair_id, **pair, "source": "edited", "status": ACCEPTED, "split": split,
        "query_id": query_id, "origin": f"review:{d.action}",
        "meta": json.dumps({"from_pair": d.pair_id, "reviewer": d.reviewer}),
    }]):
        return pair_id, None
    open_card = cur.execute(
        "SELECT status FROM pairs WHERE pair_id = ? AND status IN ('pending', 'candidate')", [pair_id]
    ).fetchall()
    if not open_card:
        return None, None
    move(cur, pair_id, status, "answer", now=now)
    return None, {"pair_id": pair_id, "previous_status": open_card[0][0]}


def _apply_mark(cur: duckdb.DuckDBPyConnection, d: DecisionIn, anchor: str, pos_id: str | None, split: str,
                query_id: str | None, now: datetime, payload: dict[str, Any]) -> str:
    """A mark: every shown passage the reviewer marked answers the query (a pair each), every
    other shown passage is a verified negative of it. Returns the card's own new status."""
    shown = list(dict.fromkeys([p for p in (pos_id, *(d.shown or [])) if p]))
    marked = set(d.passage_ids or [])
    stray = sorted(marked - set(shown))
    if stray:
        raise InputError(f"marked passages must be the card's own or among those shown: {', '.join(stray)}")
    texts = dict(cur.execute("SELECT passage_id, text FROM passages WHERE passage_id IN (SELECT unnest(?::VARCHAR[]))",
                             [shown]).fetchall())
    missing = [p for p in shown if p not in texts]
    if missing:
        raise NotFoundError(f"No passage with id {missing[0]!r}.")
    created, resolved, negatives = [], [], []
    for pid in shown:
        if pid == pos_id:
            continue
        new_id, card = _answer(cur, {"anchor": anchor, "positive_id": pid, "positive_text": texts[pid]}, d, split,
                               query_id, now, "accepted" if pid in marked else "rejected")
        created += [new_id] if new_id else []
        resolved += [card] if card else []
    for pid in shown:
        if pid not in marked and Store.insert_ignore(
                cur, "negatives", [{"anchor": anchor, "passage_id": pid, "source": "review"}]):
            negatives.append(pid)
    payload.update({"marked": [p for p in shown if p in marked], "shown": len(shown), "created_pairs": created,
                    "resolved_pairs": resolved, "negatives": negatives})
    return "accepted" if pos_id in marked else "rejected"


def undo_last(store: Store, reviewer: str) -> str | None:
    """Revert the reviewer's most recent decision that is not yet undone; returns its pair id.

    The log stays append-only: the undo is itself a decision (action 'undo').
    """

    def attempt() -> str | None:
        with store.transaction() as cur:
            rows = cur.execute(
                "SELECT decision_id, pair_id, action, payload FROM decisions d WHERE reviewer = ? AND action <> 'undo' "
                "AND NOT EXISTS (SELECT 1 FROM decisions u WHERE u.action = 'undo' "
                "AND CAST(json_extract(u.payload, '$.undid') AS BIGINT) = d.decision_id) "
                "ORDER BY decision_id DESC LIMIT 1",
                [reviewer],
            ).fetchall()
            if not rows:
                return None
            decision_id, pair_id, _action, payload = rows[0]
            p = json.loads(payload or "{}")
            for created in [p.get("created_pair"), *p.get("created_pairs", [])]:
                if created:
                    cur.execute("DELETE FROM pairs WHERE pair_id = ?", [created])
            for resolved in [p.get("resolved_pair"), *p.get("resolved_pairs", [])]:
                if resolved:
                    move(cur, resolved["pair_id"], resolved["previous_status"], "undo")
            negatives = [n for n in [p.get("negative"), *p.get("negatives", [])] if n]
            if negatives:
                anchor = cur.execute("SELECT anchor FROM pairs WHERE pair_id = ?", [pair_id]).fetchall()[0][0]
                cur.execute("DELETE FROM negatives WHERE anchor = ? AND passage_id IN (SELECT unnest(?::VARCHAR[]))",
                            [anchor, negatives])
            move(cur, pair_id, PENDING, "undo", claim=(reviewer, _now() + timedelta(seconds=CLAIM_SECONDS)))
            store.append_decision(pair_id, reviewer, "undo", {"undid": decision_id}, cur)
            return pair_id

    return _retry(attempt)


def queue_counts(store: Store) -> dict[str, int]:
    """Cards pending and claimed now, and human decisions that stand (undone ones excluded)."""
    pending, claimed = store.execute(
        "SELECT count(*) FILTER (status = 'pending'), "
        "count(*) FILTER (status = 'pending' AND claimed_by IS NOT NULL AND claim_expires > ?) FROM pairs",
        [_now()],
    ).fetchall()[0]
    decided, undone = store.execute(
        "SELECT count(*) FILTER (action <> 'undo'), count(*) FILTER (action = 'undo') FROM decisions"
    ).fetchall()[0]
    return {"pending": pending, "claimed": claimed, "reviewed": decided - undone}


def pending(store: Store, limit: int | None = None) -> list[Card]:
    sql = f"SELECT {_CARD_COLS} FROM pairs WHERE status = 'pending' ORDER BY priority DESC NULLS LAST, pair_id"
    if limit:
        sql += f" LIMIT {int(limit)}"
    return [_card(dict(zip(_CARD_COLS.split(", "), r, strict=True))) for r in store.execute(sql).fetchall()]


def read_decisions(path: str | Path, max_bytes: int) -> list[tuple[int, DecisionIn]]:
    """(line number, decision) from a JSONL file (pair_id, action, reviewer, query?, passage_id?).

    The whole file is checked: a malformed line, or a card decided twice, is an InputError naming it.
    """
    from loop.readers import iter_jsonl

    out: list[tuple[int, DecisionIn]] = []
    seen: dict[str, int] = {}
    for n, rec in iter_jsonl(Path(path), max_bytes):
        try:
            d = DecisionIn(**rec)
        except ValidationError as e:
            raise InputError(validation_problems(e), path, n) from None
        if d.pair_id in seen:
            raise InputError(f"pair {d.pair_id} is decided twice in this file (lines {seen[d.pair_id]} and {n})",
                             path, n)
        seen[d.pair_id] = n
        out.append((n, d))
    if not out:
        raise InputError("no decisions in this file", path)
    return out


def apply_decisions(store: Store, path: str | Path, max_bytes: int) -> int:
    """Apply a JSONL file of decisions all or nothing (`embedloop review apply`); returns how many.

    The file is read and checked whole first, then its decisions run in one transaction: a line
    that cannot be applied (no such pair or passage, a card already decided or held by another
    reviewer) is an InputError naming the file and line, and nothing of the file is applied.
    """
    decisions = read_decisions(path, max_bytes)

    def attempt() -> int:
        now = _now()
        with store.transaction() as cur:
            for n, d in decisions:
                try:
                    _apply(store, cur, d, now, require_claim=False)
                except (NotFoundError, ReviewConflict, InputError) as e:
                    raise InputError(f"{str(e).rstrip('.')}; nothing in this file was applied.", path, n) from None
        return len(decisions)

    return _retry(attempt)
