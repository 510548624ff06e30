"""Would the benchmark's arms run faster side by side? One process on every core against several
one-thread processes at once, for the two things a benchmark seed spends its time on.

    python -m bench.threads --data DIR [--steps 5] [--passages 400] --out FILE.json

Each configuration runs in fresh processes: a training step (MNRL on 32 (query, passage,
negative) rows of DIR at 128 tokens, the loop's row shape and training length; AdamW; the
seconds of `--steps` steps after one warm-up step) and an encode of `--passages` passages with
the workspace's default encoder (`Embedder`, int8 ONNX on a CPU). Configurations: every core in
one process; one thread in one process; one thread in each of `cores` processes at once. The
ratio that decides is the processes' summed throughput over the one process's on every core:
above 1, arms (or seeds) run side by side on one thread each finish sooner than one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def inputs(data: Path) -> tuple[list[str], list[str]]:
    """DIR's document texts and queries; SystemExit with the reason when there are none or it cannot be read."""
    from bench.common import Beir
    from loop.errors import InputError

    try:
        beir = Beir.read(data)
    except InputError as e:
        raise SystemExit(f"--data: {e}") from None
    texts, queries = list(beir.corpus.values()), list(beir.queries.values())
    if not texts or not queries:
        raise SystemExit(f"--data: {data} needs documents and queries")
    return texts, queries


def measure(data: Path, threads: int, steps: int, passages: int, wait: Callable[[str], None]) -> dict[str, float]:
    """One process's figures at `threads` threads (call in a fresh process: torch's pool is fixed once used).
    `wait(phase)` returns when every process measured beside this one is ready for the phase."""
    import torch

    torch.set_num_threads(threads)
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from loop.config import bundled_model_path
    from loop.embed import Embedder

    texts, queries = inputs(data)
    texts = texts * (max(64, passages) // len(texts) + 1)  # a small folder's texts repeat
    model = SentenceTransformer(str(bundled_model_path()), device="cpu", local_files_only=True)
    model.max_seq_length = 128
    loss = MultipleNegativesRankingLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = [model.preprocess(part) for part in ((queries * 32)[:32], texts[:32], texts[32:64])]
    emb = Embedder(bundled_model_path(), "base", "cpu")
    emb.encode(texts[:8])  # the export and the session, outside the timing

    def step() -> None:
        opt.zero_grad()
        loss(batch, None).backward()
        opt.step()

    step()
    wait("train")
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    train = (time.perf_counter() - t0) / steps
    wait("encode")
    t0 = time.perf_counter()
    emb.encode(texts[:passages])
    return {"train_s_per_step": round(train, 3), "encode_passages_per_s": round(passages / (time.perf_counter() - t0), 2)}


def _child_wait(phase: str) -> None:
    print(f"ready {phase}", flush=True)
    sys.stdin.readline()


def _children(args: argparse.Namespace, threads: int, n: int) -> list[dict[str, float]]:
    """`n` fresh processes, `threads` threads each, each phase started in all of them at once; their figures."""
    cmd = [sys.executable, "-m", "bench.threads", "--child", str(threads), "--data", str(args.data),
           "--steps", str(args.steps), "--passages", str(args.passages), "--out", os.devnull]
    root = str(Path(__file__).resolve().parent.parent)  # where `bench` imports from, wherever this runs
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    try:
        for phase in ("train", "encode"):
            for proc in procs:  # every process loaded and warm (or done with the last phase) ...
                line = proc.stdout.readline()
                if line.strip() != f"ready {phase}":
                    raise SystemExit(f"a measuring process stopped before the {phase} phase (said {line!r})")
            for proc in procs:  # ... then all start the phase together
                proc.stdin.write("go\n")
                proc.stdin.flush()
        outs = [json.loads(proc.stdout.readline()) for proc in procs]
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    for proc in procs:
        proc.wait()
    return outs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="a BEIR folder (its texts are the inputs)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--passages", type=int, default=400)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.passages < 1:
        p.error("--steps and --passages must be at least 1")
    if args.child is not None:
        print(json.dumps(measure(args.data, args.child, args.steps, args.passages, _child_wait)), flush=True)
        return 0
    from bench.common import machine, write_json

    inputs(args.data)  # a folder that cannot be read stops here, not in every measuring process
    cores = len(os.sched_getaffinity(0))
    (whole,) = _children(args, cores, 1)
    (one,) = _children(args, 1, 1)
    side = _children(args, 1, cores)

    def ratio(key: str, per_second: bool) -> float:
        rate = (lambda r: r[key]) if per_second else (lambda r: 1 / r[key])
        return round(sum(rate(r) for r in side) / rate(whole), 3)

    result: dict[str, Any] = {
        "machine": machine(), "cores": cores, "steps": args.steps, "passages": args.passages,
        f"one_process_{cores}_threads": whole, "one_process_1_thread": one, f"{cores}_processes_1_thread_each": side,
        "side_by_side_vs_one_process": {"train": ratio("train_s_per_step", False),
                                        "encode": ratio("encode_passages_per_s", True)},
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
