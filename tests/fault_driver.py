"""A stand-in for the owning process (app or CLI), run as a subprocess by tests/test_faults.py.

    python -m tests.fault_driver SCENARIO WORKSPACE '{"json": "options"}'

It opens the workspace like the app does (one owner, FakeEmbedder models so that no model
loads), does one kind of work through the engine's own functions, and prints a marker line for
every durable step (flushed at once), so the test knows when to `kill -9` it:

    READY <pid>                          the workspace is open (the lock is held)
    CACHED <passage id>                  generate: an LLM answer was committed to the cache
    DECIDED <decision id> <pair id> <action> <reviewer>   review: a decision was committed
    CLAIMED <pair id> <reviewer>         review: a card was claimed (the reviewer now "reads" it)
    PARTIAL <collection> <n>             reindex: n vectors of the new collection were written
    SEARCH <model version> <doc id>      reindex: the active index answered during the build
    SWITCHED <collection>                reindex: the switch to the new collection was committed
    WRITTEN <n>                          generate: the round's n candidates were committed
    DONE <state>                         the work finished (a test that wanted a kill failed)

Scenarios: generate, review, train, reindex (see the functions below for their options).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loop.records import Document  # noqa: E402
from loop.workspace import Workspace  # noqa: E402
from tests.fakes import FakeEmbedder  # noqa: E402

_print_lock = threading.Lock()

_WORDS = ("anchor bearing cable damper engine flange gasket hinge impeller journal keel lever manifold nozzle "
          "orifice piston quill rotor spindle throttle valve washer yoke zinc bracket clutch dowel ferrule "
          "gimbal hopper idler jack knuckle linkage mandrel nacelle").split()


def docs(n: int, start: int = 0) -> list[Document]:
    """n documents of distinct words (> 12 tokens each), so passages and their vectors differ."""
    out = []
    for i in range(start, start + n):
        words = [f"{_WORDS[(i + k) % len(_WORDS)]}{i}" for k in range(8)]
        text = (f"Part {i} of the maintenance manual. The {words[0]} and the {words[1]} hold the "
                f"{words[2]}; inspect {words[3]}, {words[4]} and {words[5]} before fitting {words[6]} "
                f"to {words[7]}.")
        out.append(Document(doc_id=f"doc{i:03d}", title=f"Part {i}", text=text))
    return out


def say(*parts: object) -> None:
    with _print_lock:
        print(*parts, flush=True)


def open_workspace(path: str, fake: dict[str, int] | None = None) -> Workspace:
    """The workspace with FakeEmbedders: the base model, plus `fake` {version: dim}."""
    ws = Workspace.open(path)
    ws._embedders[ws.base_version] = FakeEmbedder(ws.base_version)
    for version, dim in (fake or {}).items():
        ws._embedders[version] = FakeEmbedder(version, dim=dim)
    return ws


# Scenarios -----------------------------------------------------------------------------------
def generate(ws: Workspace, opts: dict[str, Any]) -> str:
    """A round's generate step with the configured LLM (EMBEDLOOP_LLM_BASE_URL, OPENAI_API_KEY).

    Options: generate_max (pairs wanted), concurrency, after_write (stop once the candidates are
    committed, before the step is recorded).
    """
    import loop.rounds
    from loop.llm import LLMClient, LLMSettings
    from storage.llm_cache import LLMCache
    from loop.rounds import LoopConfig, Rounds

    if opts.get("after_write"):
        run_generation = loop.rounds.run_generation

        def write_then_wait(*args: Any, **kw: Any) -> Any:
            report = run_generation(*args, **kw)
            say("WRITTEN", report.written)
            time.sleep(600)  # the test kills us here

        loop.rounds.run_generation = write_then_wait

    class MarkingCache(LLMCache):
        def put(self, passage_hash: str, *args: Any, **kw: Any) -> None:
            super().put(passage_hash, *args, **kw)
            say("CACHED", passage_hash)  # printed only once the answer is committed

    settings = LLMSettings.from_settings(ws.settings, concurrency=opts.get("concurrency", 2), max_retries=0)
    llm = LLMClient(settings, MarkingCache(ws.store), backoff_base_s=0.01)
    cfg = LoopConfig(generate_max=opts["generate_max"], generate_threshold=10_000)
    r = Rounds(ws, cfg, llm=llm, log=lambda m: say("LOG", m)).advance(until="review")
    return r.state


def review(ws: Workspace, opts: dict[str, Any]) -> str:
    """Reviewers deciding cards through the app's functions, one thread each.

    Options: reviewers (names), stalled (names of reviewers who claim one card each and never
    decide it), claim_seconds, think_s (between claim and decision), pick_passage (a passage id
    for `pick`). Actions cycle accept, reject, edit, pick.
    """
    from loop.review import DecisionIn, claim_next, decide

    actions = ["accept", "reject", "edit", "pick"]
    errors: list[BaseException] = []

    def reviewer(name: str, offset: int) -> None:
        try:
            j = offset
            while True:
                card = claim_next(ws.store, name, claim_seconds=opts.get("claim_seconds", 600))
                if card is None:
                    return
                say("CLAIMED", card.pair_id, name)
                time.sleep(opts.get("think_s", 0.0))
                action = actions[j % len(actions)]
                extra: dict[str, Any] = {}
                if action == "edit":
                    extra["query"] = f"{card.anchor} (edited by {name})"
                elif action == "pick":
                    extra["passage_id"] = opts["pick_passage"]
                    if card.positive_id == opts["pick_passage"]:
                        action, extra = "accept", {}
                d = DecisionIn(pair_id=card.pair_id, action=action, reviewer=name, **extra)
                decision_id = decide(ws.store, d, require_claim=True)
                say("DECIDED", decision_id, card.pair_id, action, name)
                j += 1
        except BaseException as e:  # noqa: BLE001 - reported, and the test fails on it
            errors.append(e)
            say("ERROR", name, type(e).__name__, str(e).replace("\n", " "))

    def stalled(name: str) -> None:
        """A reviewer who opens a card and walks away: the claim is abandoned."""
        card = claim_next(ws.store, name, claim_seconds=opts.get("claim_seconds", 600))
        if card is not None:
            say("CLAIMED", card.pair_id, name)

    for name in opts.get("stalled", []):
        stalled(name)
    threads = [threading.Thread(target=reviewer, args=(name, i)) for i, name in enumerate(opts["reviewers"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return "errors" if errors else "queue-empty"


def train(ws: Workspace, opts: dict[str, Any]) -> str:
    """A round up to its train step, with the given TrainConfig overrides and trainer environment."""
    from loop.rounds import LoopConfig, Rounds

    cfg = LoopConfig(**{"generate_threshold": 0, "train": opts["train"], **opts.get("loop", {})})
    r = Rounds(ws, cfg, log=lambda m: say("LOG", m), train_env=opts.get("train_env", {})).advance(
        until="evaluate", force=True)
    return r.state


def reindex(ws: Workspace, opts: dict[str, Any]) -> str:
    """The open round's reindex step; the first write to the new collection stops half-way, or
    (`after_switch`) the step stops once the switch is committed, before the step is recorded.

    Options: pause_after (vectors written before the pause), query (searched during the pause),
    after_switch.
    """
    from loop import indexing
    from loop.rounds import Rounds
    from storage.index import VectorIndex

    if opts.get("after_switch"):
        activate = indexing.activate

        def activate_then_wait(store, name: str) -> None:
            activate(store, name)
            say("SWITCHED", name)
            time.sleep(600)  # the test kills us here

        indexing.activate = activate_then_wait
        return Rounds(ws, log=lambda m: say("LOG", m)).advance(until="done").state

    original = VectorIndex.upsert
    paused = threading.Event()

    def upsert(self: VectorIndex, name: str, ids, embeddings, documents) -> None:
        if paused.is_set() or name == ws.store.pointer(indexing.ACTIVE_INDEX):
            return original(self, name, ids, embeddings, documents)
        k = opts.get("pause_after", 3)
        original(self, name, ids[:k], embeddings[:k], documents[:k])
        paused.set()
        say("PARTIAL", name, self.count(name))
        # What a search from another page sees while the new collection is being built.
        hit = ws.search(opts.get("query", "the"), k=1)[0]
        say("SEARCH", ws.active_model, ",".join(hit.doc_ids))
        time.sleep(600)  # the test kills us here

    VectorIndex.upsert = upsert  # type: ignore[method-assign]
    r = Rounds(ws, log=lambda m: say("LOG", m)).advance(until="done")
    return r.state


SCENARIOS = {"generate": generate, "review": review, "train": train, "reindex": reindex}


def main(argv: list[str]) -> int:
    scenario, path = argv[0], argv[1]
    opts = json.loads(argv[2]) if len(argv) > 2 else {}
    ws = open_workspace(path, opts.get("fake"))
    say("READY", os.getpid())
    try:
        state = SCENARIOS[scenario](ws, opts)
    finally:
        ws.close()
    say("DONE", state)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
