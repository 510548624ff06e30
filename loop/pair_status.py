"""The pair-status lifecycle: the statuses a pair moves through, and the one function that moves it.

    (new) --generate / mine--> candidate --select--> pending --review--> accepted | rejected
    (new) --import / a reviewer's new pair--> accepted        pending --undo of a decision--> the status before it
    candidate --select--> accepted (confident synthetic) | dropped (hopeless) | candidate (waits for a later round)
    candidate | pending --a mark or pick that judged its passage--> accepted | rejected
    candidate | pending | accepted --its query is held out for evaluation--> dropped

Every status change of an existing pair goes through `move`, which refuses a change the diagram
does not have (a decided pair reopened by anything but an undo, a dropped pair revived); new pairs
are written with `CANDIDATE` or `ACCEPTED` by the code that creates them.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Final, Literal

from loop.errors import EmbedloopError

PairStatus = Literal["candidate", "pending", "accepted", "rejected", "dropped"]
CANDIDATE: Final = "candidate"
PENDING: Final = "pending"
ACCEPTED: Final = "accepted"
REJECTED: Final = "rejected"
DROPPED: Final = "dropped"
OPEN: Final = (CANDIDATE, PENDING)  # cards not decided yet

# Why a pair moves: the named transitions, each with the statuses it may leave and enter.
TRANSITIONS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "route": ((CANDIDATE,), (PENDING, ACCEPTED, DROPPED, CANDIDATE)),  # the select step
    "decide": ((PENDING,), (ACCEPTED, REJECTED)),  # a reviewer's decision on the card
    "answer": (OPEN, (ACCEPTED, REJECTED)),  # another card's mark or pick judged this passage
    "undo": ((ACCEPTED, REJECTED, PENDING, CANDIDATE), (PENDING, CANDIDATE)),  # back to what it was
    "hold_out": ((CANDIDATE, PENDING, ACCEPTED), (DROPPED,)),  # its query became an evaluation query
}


class LifecycleError(EmbedloopError):
    """A pair status change the lifecycle does not have (a bug, not a user error)."""


def move(cur: Any, pair_ids: str | Iterable[str], to: str, why: str, *, now: datetime | None = None,
         reason: str | None = None, claim: tuple[str, datetime] | None = None) -> int:
    """Move pairs to status `to` for the named transition `why` (see TRANSITIONS); returns how many.

    Clears the card's claim (or sets `claim` = (reviewer, expiry), for an undo that hands the card
    back to its reviewer), stamps updated_at, and sets `reason` when given. `cur` is the store or a
    cursor of the caller's transaction.

    Raises:
        LifecycleError: `why` is unknown, `to` is not one of its targets, or a pair is not in a
            status the transition leaves.
    """
    ids = [pair_ids] if isinstance(pair_ids, str) else list(pair_ids)
    if why not in TRANSITIONS:
        raise LifecycleError(f"unknown pair-status transition {why!r}; known: {', '.join(TRANSITIONS)}")
    sources, targets = TRANSITIONS[why]
    if to not in targets:
        raise LifecycleError(f"{why} moves a pair to {' or '.join(targets)}, not {to}")
    if not ids:
        return 0
    found = cur.execute("SELECT pair_id, status FROM pairs WHERE pair_id IN (SELECT unnest(?::VARCHAR[]))",
                        [ids]).fetchall()
    wrong = [(pid, status) for pid, status in found if status not in sources]
    if wrong:
        raise LifecycleError(f"{why} cannot move pair {wrong[0][0]} from {wrong[0][1]} (only from {', '.join(sources)})")
    who, expires = claim if claim else (None, None)
    sets = "status = ?, claimed_by = ?, claim_expires = ?, updated_at = coalesce(?, current_timestamp)"
    params: list[Any] = [to, who, expires, now]
    if reason is not None:
        sets += ", reason = ?"
        params.append(reason)
    cur.execute(f"UPDATE pairs SET {sets} WHERE pair_id IN (SELECT unnest(?::VARCHAR[]))", [*params, ids])
    return len(found)


def check_routes(statuses: Iterable[str]) -> None:
    """The select step writes its routes in one bulk update: each must be a `route` target."""
    targets = TRANSITIONS["route"][1]
    bad = sorted({s for s in statuses if s not in targets})
    if bad:
        raise LifecycleError(f"route moves a candidate to {' or '.join(targets)}, not {', '.join(bad)}")
