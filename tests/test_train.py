"""loop.train and loop.trainer: config and snapshot (fast); real training runs with the bundled MiniLM (slow).

Slow runs are as small as a real run can be (8-16 pairs, batch 8, max_seq_length 32) so that
each takes seconds of compute; most run `main` in-process to pay the import cost once, and the
ones about process life (start, kill -9 + resume, torchrun) run real subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loop import train, train_batching, train_loss, train_monitor, trainer
from loop.errors import ConfigError, EmbedloopError, InputError
from loop.records import Pair

SMALL = {"batch_size": 8, "max_seq_length": 32, "learning_rate": 5e-5}
# One CPU thread: on a shared, oversubscribed box OpenMP threads spin-wait each other and a
# 0.75 s step takes 2-15 s with two threads. Correctness does not depend on it.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _one_cpu_thread(request):
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_pairs(n: int) -> list[dict]:
    """Real text: anchor = a Python doc topic + the first sentence of a paragraph, positive = the next paragraph."""
    from pydoc_data.topics import topics

    pairs = []
    for name, text in sorted(topics.items()):
        paras = [" ".join(p.split()) for p in text.split("\n\n")]
        paras = [p for p in paras if len(p) > 80]
        for i in range(1, min(3, len(paras))):
            pairs.append({"anchor": f"{name}: {paras[i - 1].split('. ')[0][:200]}", "positive": paras[i][:400]})
    assert len(pairs) >= n
    return pairs[:n]


def snapshot(run_dir: Path, base_model, n_train: int, n_eval: int = 8, **cfg) -> str:
    pairs = make_pairs(n_train + n_eval)
    return train.write_snapshot(
        run_dir, pairs[:n_train], pairs[n_train:], {"base_model": str(base_model), **SMALL, **cfg}
    )


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def run_log(run_dir: Path) -> str:
    p = run_dir / train.LOG_FILE
    return p.read_text(errors="replace")[-4000:] if p.exists() else ""


# --- fast -----------------------------------------------------------------------------------


def test_config_defaults_and_dims(minilm_path):
    cfg = train.TrainConfig(base_model=str(minilm_path), matryoshka_dims=[64, 256, 64])
    assert (cfg.loss, cfg.epochs, cfg.batch_size, cfg.save_total_limit, cfg.dataloader_num_workers) == (
        "mnrl", 3, 32, 3, 0)
    assert cfg.matryoshka_dims == [256, 64]
    assert train.TrainConfig.from_dict(cfg.model_dump()) == cfg


@pytest.mark.parametrize(
    "overrides, expected_error",
    [
        ({"lr": 1e-5}, "lr: unknown setting (known: base_model"),
        ({"loss": "triplet"}, "loss: Input should be 'mnrl', 'cached_mnrl' or 'gist'"),
        ({"batch_size": 1}, "batch_size"),
        ({"matryoshka_dims": [128, 0]}, "matryoshka_dims"),
        ({"precision": "fp8"}, "precision"),
        ({"base_model": ""}, "base_model"),
        ({"directions": ["doc_to_query"]}, "directions must include query_to_doc"),
        ({"directions": ["query_to_doc", "sideways"]}, "directions.1: Input should be 'query_to_doc'"),
        ({"directions": ["query_to_doc", "doc_to_doc"], "partition_mode": "per_direction"}, "use joint"),
        ({"hardness_mode": "hard_negatives"}, "needs a hardness_strength above 0"),
        ({"hardness_strength": -1}, "hardness_strength"),
        ({"loss": "gist", "directions": ["query_to_doc", "doc_to_query"]}, "directions apply to the mnrl"),
    ],
)
def test_config_errors_say_what_is_wrong(overrides, expected_error):
    with pytest.raises(ConfigError) as e:
        train.TrainConfig.from_dict({"base_model": "/m", **overrides})
    assert expected_error in str(e.value)
    assert str(e.value).startswith("Invalid training config:")


def test_precision_auto_takes_bf16_on_a_cpu_only_where_the_cpu_has_it(monkeypatch):
    import torch

    from loop import trainer

    for has, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda has=has: has, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert trainer.cpu_has_native_bf16() is has
        assert trainer._resolve_precision("auto", cuda=False) == expected
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)  # AMX alone is enough
    assert trainer._resolve_precision("auto", cuda=False) == "bf16"
    # asked for, bf16 runs on any CPU (autocast, emulated where the hardware lacks it); fp16 needs CUDA
    assert trainer._resolve_precision("bf16", cuda=False) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        trainer._resolve_precision("fp16", cuda=False)


def test_config_file_missing_or_bad(tmp_path):
    with pytest.raises(ConfigError, match="write_snapshot"):
        train.TrainConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        train.TrainConfig.from_file(tmp_path / "config.json")


def test_snapshot_hash_is_stable_and_tracks_data(tmp_path, minilm_path):
    h1 = snapshot(tmp_path / "a", minilm_path, 16)
    h2 = snapshot(tmp_path / "b", minilm_path, 16, learning_rate=1e-5)  # hyper-parameters are not data
    h3 = snapshot(tmp_path / "c", minilm_path, 15)
    assert h1 == h2 != h3 and len(h1) == 64
    run = tmp_path / "a"
    assert (run / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    assert len((run / "train.jsonl").read_text().splitlines()) == 16
    assert json.loads((run / "snapshot.json").read_text())["data_hash"] == h1
    assert train.TrainConfig.from_file(run / "config.json").batch_size == 8


def test_snapshot_splits_eval_and_fills_negatives(tmp_path, minilm_path):
    pairs = make_pairs(20)
    pairs[0]["negative"] = pairs[5]["positive"]
    cfg = {"base_model": str(minilm_path), "eval_fraction": 0.2}
    h = train.write_snapshot(tmp_path / "r", pairs, None, cfg)
    assert h == train.write_snapshot(tmp_path / "s", pairs, [], cfg)  # same seeded split
    tr = [json.loads(x) for x in (tmp_path / "r" / "train.jsonl").read_text().splitlines()]
    ev = [json.loads(x) for x in (tmp_path / "r" / "eval.jsonl").read_text().splitlines()]
    assert (len(tr), len(ev)) == (16, 4)
    assert all(set(r) == {"anchor", "positive", "negative"} for r in tr + ev)
    assert all(r["negative"] != r["positive"] for r in tr + ev)
    assert json.loads((tmp_path / "r" / "snapshot.json").read_text())["filled_negatives"] == 19


def test_snapshot_gives_every_row_as_many_negatives_as_the_richest_row(tmp_path, minilm_path):
    """Rows with several hard negatives (`negative` and a `negatives` list) become columns negative,
    negative_2, ... in the order given; shorter rows are filled with other rows' positives, never
    one of their own negatives twice nor a positive of their query."""
    pairs = make_pairs(12)
    pairs[0]["negatives"] = [pairs[7]["positive"], pairs[8]["positive"], pairs[9]["positive"]]
    pairs[1]["negative"] = pairs[7]["positive"]
    pairs[1]["negatives"] = [pairs[7]["positive"], " ", pairs[1]["positive"]]  # a repeat, a blank, its own positive
    pairs[2]["exclude"] = [pairs[3]["positive"]]
    pairs[3]["anchor"] = pairs[2]["anchor"]
    train.write_snapshot(tmp_path, pairs[:10], pairs[10:], {"base_model": str(minilm_path)})
    rows = [json.loads(x) for f in (train.TRAIN_FILE, train.EVAL_FILE) for x in (tmp_path / f).read_text().splitlines()]
    columns = ["negative", "negative_2", "negative_3"]
    assert train.text_columns(rows[0]) == ["anchor", "positive", *columns]
    assert [rows[0][c] for c in columns] == [pairs[7]["positive"], pairs[8]["positive"], pairs[9]["positive"]]
    assert rows[1]["negative"] == pairs[7]["positive"]
    for r in rows:
        negatives = [r[c] for c in columns]
        assert len(set(negatives)) == 3 and r["positive"] not in negatives, r
    assert pairs[3]["positive"] not in [rows[2][c] for c in columns]
    snap = json.loads((tmp_path / "snapshot.json").read_text())
    assert snap["negatives_per_row"] == 3 and snap["filled_negatives"] == 3 * 12 - 3 - 1
    with pytest.raises(InputError, match="train row 1: negatives must be a list"):
        train.write_snapshot(tmp_path / "bad", [{**pairs[0], "negatives": "one text"}, *pairs[1:4]], None,
                             {"base_model": str(minilm_path)})


def test_snapshot_accepts_pair_records(tmp_path, minilm_path):
    recs = [
        Pair(pair_id=str(i), anchor=p["anchor"], positive_text=p["positive"], source="seed", status="accepted")
        for i, p in enumerate(make_pairs(6))
    ]
    train.write_snapshot(tmp_path, recs[:4], recs[4:], {"base_model": str(minilm_path)})
    first = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
    assert first == {"anchor": recs[0].anchor, "positive": recs[0].positive_text}


@pytest.mark.parametrize(
    "train_rows, base, expected_error",
    [
        ([{"anchor": " ", "positive": "p"}] * 4, None, (InputError, "train row 1: anchor is empty")),
        ([{"anchor": "a", "positive": ""}] * 4, None, (InputError, "positive is empty")),
        ([{"anchor": "a", "positive": "p"}], None, (InputError, "Too few pairs")),
        ([{"anchor": "a", "positive": "p"}] * 4, "/no/such/model", (ConfigError, "not a local folder")),
    ],
)
def test_snapshot_rejects_bad_input(tmp_path, minilm_path, train_rows, base, expected_error):
    exc, text = expected_error
    with pytest.raises(exc, match=text):
        train.write_snapshot(tmp_path, train_rows, None, {"base_model": base or str(minilm_path)})


def test_read_progress_tolerates_a_torn_last_line(tmp_path):
    assert train.read_progress(tmp_path) == []
    good = json.dumps({"event": "step", "step": 1}) + "\n"
    (tmp_path / "progress.jsonl").write_text(good + '{"event": "step", "st')
    assert train.read_progress(tmp_path) == [{"event": "step", "step": 1}]
    # A resumed writer ends the torn line first, so its own events parse.
    train_monitor.Progress(tmp_path / "progress.jsonl", enabled=True).emit("start", step=5, loss=float("nan"))
    events = train.read_progress(tmp_path)
    assert [e["event"] for e in events] == ["step", "start"]
    assert events[1]["loss"] is None and events[1]["step"] == 5  # NaN is not JSON: written as null


def test_result_stop_and_command(tmp_path):
    assert train.read_result(tmp_path) is None
    (tmp_path / "result.json").write_text('{"status": "ok"')  # never happens (atomic write), still tolerated
    assert train.read_result(tmp_path) is None
    train.request_stop(tmp_path)
    assert (tmp_path / "STOP").exists()
    assert train.command(tmp_path, 1)[1:3] == ["-m", "loop.trainer"]
    multi = train.command(tmp_path, 2)
    assert multi[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in multi
    assert multi[-3:] == ["-m", "loop.trainer", str(tmp_path.resolve())]
    with pytest.raises(ConfigError, match="write_snapshot"):
        train.start(tmp_path / "empty")


def test_faults_parse():
    f = train_monitor.Faults.parse("nan_at_step=3, sleep_per_step=0.5")
    assert (f.nan_at_step, f.sleep_per_step, f.oom_at_step) == (3, 0.5, None)
    with pytest.raises(ConfigError, match="nan_at_step"):
        train_monitor.Faults.parse("explode=1")


def test_is_running_checks_liveness_and_identity(tmp_path):
    assert not train.is_running(0) and not train.is_running(2**22 + 12345)
    # Only a training process counts: a reused pid of another program does not.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "loop.train"])
    try:
        # Right after fork the child may not have exec'd yet (its cmdline is still ours): wait.
        wait_for(lambda: train.is_running(ours.pid), 10, what="the training process to be seen")
        assert not train.is_running(other.pid)
        ours.send_signal(signal.SIGKILL)
        wait_for(lambda: not train.is_running(ours.pid), 5, what="zombie counted as dead")
    finally:
        for p in (other, ours):
            p.kill()
            p.wait()


def test_start_refuses_a_second_trainer_on_a_live_run(tmp_path, minilm_path):
    run = (tmp_path / "run").resolve()
    snapshot(run, minilm_path, 8)
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "loop.train", str(run)])
    try:
        train_monitor.Progress(run / "progress.jsonl", enabled=True).emit("start", pid=fake.pid)
        wait_for(lambda: train.running_pid(run) == fake.pid, 10, what="the fake trainer to be seen")
        assert train.running_pid(tmp_path) is None
        with pytest.raises(EmbedloopError, match=f"pid {fake.pid}\\) is already running"):
            train.start(run)
    finally:
        fake.kill()
        fake.wait()
    assert train.running_pid(run) is None


def test_snapshot_refuses_to_replace_a_started_run(tmp_path, minilm_path):
    h = snapshot(tmp_path, minilm_path, 8)
    (tmp_path / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    assert snapshot(tmp_path, minilm_path, 8) == h  # the same inputs again: idempotent
    with pytest.raises(ConfigError, match="new run directory"):
        snapshot(tmp_path, minilm_path, 9)
    with pytest.raises(ConfigError, match="new run directory"):
        snapshot(tmp_path, minilm_path, 8, epochs=5)


def test_main_without_a_run_dir_exits_2(tmp_path):
    assert trainer.main(tmp_path / "missing") == 2


def test_main_without_a_snapshot_leaves_a_failed_result(tmp_path):
    assert trainer.main(tmp_path) == 1
    res = train.read_result(tmp_path)
    assert res["status"] == "failed" and "call write_snapshot" in res["reason"]
    assert [e["event"] for e in train.read_progress(tmp_path)] == ["start", "end"]


def test_last_complete_checkpoint_skips_and_removes_torn_ones(tmp_path):
    for step, state in ((2, "{}"), (4, "{}"), (6, None), (8, '{"global_st')):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if state is not None:
            (d / "trainer_state.json").write_text(state)
    assert trainer._last_complete_checkpoint(tmp_path, cleanup=False).name == "checkpoint-4"
    assert (tmp_path / "checkpoint-6").exists()
    assert trainer._last_complete_checkpoint(tmp_path, cleanup=True).name == "checkpoint-4"
    assert not (tmp_path / "checkpoint-6").exists() and not (tmp_path / "checkpoint-8").exists()
    assert trainer._last_complete_checkpoint(tmp_path / "none", cleanup=True) is None


def test_length_grouped_batches_group_lengths_and_never_repeat_a_text():
    # 30 queries with 3 positives each (mine_top 3): a query's rows must never share a batch.
    values = [(f"q{i // 3}", f"p{i}") for i in range(90)]
    lengths = [(i * 37) % 120 + 5 for i in range(90)]
    blocks = [[f"p{j}" for j in range(3 * (i // 3), 3 * (i // 3) + 3) if j != i] for i in range(90)]
    batches = train_batching.length_grouped_batches(values, lengths, 8, seed=1, blocks=blocks)
    assert len(batches) <= 12 and sum(map(len, batches)) >= 84  # ceil(90 / 8); at most a few rows wait
    for b in batches:
        texts = [t for i in b for t in values[i]]
        assert len(texts) == len(set(texts)), b  # no text twice
        assert not {t for i in b for t in blocks[i]} & set(texts), b  # no known positive beside its query
    # Grouping cuts padding: the summed longest-per-batch is well below a random order's.
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    import random

    order = list(range(90))
    random.Random(1).shuffle(order)
    plain = sum(max(lengths[i] for i in order[s:s + 8]) * len(order[s:s + 8]) for s in range(0, 90, 8))
    assert padded < 0.8 * plain
    assert batches == train_batching.length_grouped_batches(values, lengths, 8, seed=1, blocks=blocks)  # seeded
    assert batches != train_batching.length_grouped_batches(values, lengths, 8, seed=2, blocks=blocks)


def test_a_filled_negative_is_never_a_positive_of_the_same_query(tmp_path, minilm_path):
    rows = [{"anchor": "q", "positive": f"answer {i}", "exclude": ["also answers q"]} for i in range(3)]
    rows += [{"anchor": "other", "positive": "also answers q"}, {"anchor": "x", "positive": "unrelated", "negative": "n"}]
    train.write_snapshot(tmp_path, rows, rows[3:], {"base_model": str(minilm_path), "seed": 3})
    written = [json.loads(line) for line in (tmp_path / train.TRAIN_FILE).read_text().splitlines()]
    for r in written:
        if r["anchor"] == "q":
            assert r["negative"] not in {"answer 0", "answer 1", "answer 2", "also answers q"}, r
            assert r["exclude"] == ["also answers q"]
    only_q = [{"anchor": "q", "positive": f"a{i}"} for i in range(2)] + [{"anchor": "q", "positive": "b", "negative": "n"}]
    with pytest.raises(InputError, match="every positive answers the same query"):
        train.write_snapshot(tmp_path / "b", only_q, only_q[:2], {"base_model": str(minilm_path)})


def test_a_batch_that_does_not_fit_the_memory_budget_is_micro_batched():
    from types import SimpleNamespace

    minilm = SimpleNamespace(hidden_size=384, num_attention_heads=12, num_hidden_layers=6)
    per_text = train_loss.activation_mb_per_text(minilm, 128)
    assert 25 < per_text < 40  # measured: 32 triplets at 128 tokens held ~3.2 GB
    assert train_loss.micro_batch(32, 3, per_text, 4096) is None  # fits: plain MNRL
    assert train_loss.micro_batch(32, 3, per_text, 2048) == 32  # one column at a time fits
    assert train_loss.micro_batch(32, 3, per_text, 500) == int(500 // per_text) < 32
    assert train_loss.micro_batch(32, 3, per_text, 1) == 1
    # The CPU default: 32 (query, passage) pairs at 128 tokens peaked over 3 GB as plain MNRL (2026-12-07).
    assert train_loss.micro_batch(32, 2, per_text, train_loss.CPU_BUDGET_MB) == 32


@pytest.mark.parametrize("loss, micro", [("mnrl", None), ("mnrl", 4), ("cached_mnrl", None)])
def test_the_loss_scores_in_fp32_under_bf16_autocast(minilm_path, loss, micro):
    """Autocast runs a matmul in bf16; the loss's similarity logits must not be rounded to it."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import cos_sim

    model = SentenceTransformer(str(minilm_path), device="cpu", local_files_only=True)
    cfg = train.TrainConfig.from_dict({"base_model": str(minilm_path), "loss": loss})
    built = train_loss.build_loss(cfg, model, "cpu", 1, micro)
    a, b = torch.randn(5, 384), torch.randn(7, 384)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cos_sim(a, b).dtype == torch.bfloat16  # what the library's default would give
        sims = built.similarity_fct(a, b)
    assert sims.dtype == torch.float32
    assert torch.allclose(sims, cos_sim(a, b), atol=1e-6)


@pytest.mark.parametrize("loss, micro", [("mnrl", None), ("mnrl", 4), ("cached_mnrl", None)])
def test_the_mnrl_options_reach_the_librarys_loss(minilm_path, loss, micro):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path), device="cpu", local_files_only=True)
    cfg = train.TrainConfig.from_dict({
        "base_model": str(minilm_path), "loss": loss, "directions": ["query_to_doc", "doc_to_query", "query_to_doc"],
        "partition_mode": "per_direction", "hardness_mode": "in_batch_negatives", "hardness_strength": 9})
    built = train_loss.build_loss(cfg, model, "cpu", 1, micro)
    assert built.directions == ("query_to_doc", "doc_to_query")
    assert (built.partition_mode, built.hardness_mode, built.hardness_strength) == ("per_direction", "in_batch_negatives", 9)
    plain = train_loss.build_loss(train.TrainConfig.from_dict({"base_model": str(minilm_path), "loss": loss}),
                                  model, "cpu", 1, micro)
    assert (plain.directions, plain.partition_mode, plain.hardness_mode) == (("query_to_doc",), "joint", None)


@pytest.mark.parametrize("device, env", [("auto", {}), ("cpu", {"CUDA_VISIBLE_DEVICES": ""}),
                                         ("cuda:1", {"CUDA_VISIBLE_DEVICES": "1"}), ("cuda", {})])
def test_training_runs_on_the_configured_device_only(device, env, tmp_path, minilm_path):
    assert train._device_env(device) == env
    cfg = train.TrainConfig.from_dict({"base_model": str(minilm_path), "device": device})
    assert cfg.train_devices == 1  # several GPUs only when asked, never one process per visible GPU
    with pytest.raises(ConfigError, match="train_devices"):
        train.TrainConfig.from_dict({"base_model": str(minilm_path), "device": "cpu", "train_devices": 2})
    with pytest.raises(ConfigError, match="device"):
        train.TrainConfig.from_dict({"base_model": str(minilm_path), "device": "gpu"})


# --- slow: real training ----------------------------------------------------------------------


@pytest.mark.slow
def test_run_in_subprocess_finishes_ok(tmp_path, minilm_path):
    run = tmp_path / "run"
    snapshot(run, minilm_path, 8, epochs=4, early_stopping_patience=None)  # 1 step per epoch: 4 checkpoints, 3 kept
    proc = train.start(run, env=ONE_THREAD)
    assert proc.wait(timeout=300) == 0, run_log(run)
    res = train.read_result(run)
    assert res["status"] == "ok", res
    assert res["steps"] == 4 and res["train_seconds"] > 0 and res["pairs_per_second"] > 0
    assert res["stopped_early"] is False and res["epochs_run"] == 4
    assert res["model_dir"] == str(run / "model")
    assert Path(res["best_checkpoint"]).is_dir() and res["best_eval_loss"] > 0
    assert len(checkpoints(run)) == 3, checkpoints(run)
    assert 0 < res["peak_rss_mb"] < 3000 and res["device"] == "cpu"
    assert (res["batch_size"], res["effective_batch_size"], res["max_seq_length"]) == (8, 8, 32)

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(res["model_dir"], device="cpu", local_files_only=True)
    assert model.encode(["hello", "world"]).shape == (2, 384)

    events = train.read_progress(run)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert {"train_begin", "step", "log", "eval", "epoch", "checkpoint"} <= set(kinds)
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(e["max_steps"] == 4 and e["loss"] > 0 and e["learning_rate"] >= 0 for e in steps)
    assert steps[0]["learning_rate"] == 0 < steps[1]["learning_rate"]  # warmup, then the peak rate
    assert steps[0]["eta_seconds"] > 0 and steps[-1]["eta_seconds"] == 0
    assert sum(1 for k in kinds if k == "eval") == 4
    assert not train.is_running(proc.pid)


@pytest.mark.slow
def test_pretokenized_batches_match_the_models_own_preprocessing(minilm_path):
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path), device="cpu", local_files_only=True)
    texts = [p[k] for p in make_pairs(12) for k in ("anchor", "positive")]
    collator = train_batching.PretokenizedCollator(model.preprocess, texts, max_length=48, chunk=5)  # several chunks
    rows = [{"anchor": texts[i], "positive": texts[i + 1]} for i in (0, 4, 8)]
    batch = collator(rows)
    for column in ("anchor", "positive"):
        want = model.preprocess([r[column] for r in rows], max_length=48)
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert torch.equal(batch[f"{column}_{key}"], want[key]), (column, key)
    assert collator.length(texts[1]) == int(model.preprocess([texts[1]], max_length=48)["attention_mask"].sum())
    assert max(collator.lengths) == 48


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [
        {"loss": "cached_mnrl", "mini_batch_size": 4},
        {"loss": "gist"},
        {"loss": "mnrl", "matryoshka_dims": [256, 64]},
        {"loss": "mnrl", "directions": ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]},
    ],
    ids=["cached_mnrl", "gist", "matryoshka", "all directions"],
)
def test_loss_variants_train(tmp_path, minilm_path, variant):
    snapshot(tmp_path, minilm_path, 16, epochs=1, max_steps=2, **variant)
    assert trainer.main(tmp_path) == 0
    res = train.read_result(tmp_path)
    assert res["status"] == "ok" and res["steps"] == 2, res
    losses = [e["loss"] for e in train.read_progress(tmp_path) if e["event"] == "step"]
    assert len(losses) == 2 and all(x > 0 for x in losses)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["mnrl", "cached_mnrl"])
def test_rows_with_several_hard_negatives_train(tmp_path, minilm_path, loss):
    """Three negative columns reach the loss (anchor, positive, negative, negative_2, negative_3)."""
    pairs = make_pairs(30)
    rows = [{**p, "negatives": [pairs[(i + k) % 30]["positive"] for k in (7, 11, 13)]} for i, p in enumerate(pairs)]
    train.write_snapshot(tmp_path, rows[:22], rows[22:], {"base_model": str(minilm_path), **SMALL, "epochs": 1,
                                                          "max_steps": 2, "loss": loss, "mini_batch_size": 4})
    assert json.loads((tmp_path / "snapshot.json").read_text())["negatives_per_row"] == 3
    assert trainer.main(tmp_path) == 0
    res = train.read_result(tmp_path)
    assert res["status"] == "ok" and res["steps"] == 2, res
    losses = [e["loss"] for e in train.read_progress(tmp_path) if e["event"] == "step"]
    assert len(losses) == 2 and all(x > 0 for x in losses)


@pytest.mark.slow
def test_one_wise_weight_is_applied_without_a_development_fold(tmp_path, minilm_path):
    """wise_grid [0.5]: the saved model lies halfway between the base and the best checkpoint."""
    import torch
    from safetensors.torch import load_file

    snapshot(tmp_path, minilm_path, 16, epochs=1, max_steps=2, wise_grid=[0.5])
    assert not (tmp_path / "dev.json").exists()
    assert trainer.main(tmp_path) == 0
    res = train.read_result(tmp_path)
    assert res["status"] == "ok" and res["wise"]["alpha"] == 0.5 and res["wise"]["fixed"], res
    saved = load_file(str(Path(res["model_dir"]) / "model.safetensors"))
    tuned = load_file(str(Path(res["best_checkpoint"]) / "model.safetensors"))
    base = load_file(str(Path(minilm_path) / "model.safetensors"))
    key = next(k for k, v in saved.items() if v.ndim == 2 and not torch.equal(tuned[k], base[k]))
    assert torch.allclose(saved[key], 0.5 * base[key] + 0.5 * tuned[key], atol=1e-6)


@pytest.mark.slow
def test_a_soup_averages_this_runs_fine_tune_with_an_earlier_runs_tuned_weights(tmp_path, minilm_path):
    """soup_with: the earlier run's tuned weights are recovered from its WiSE-FT mix (saved at 0.5) and
    averaged with this run's best checkpoint; this run's own WiSE-FT then mixes the soup with the base."""
    import torch
    from safetensors.torch import load_file

    first, second = tmp_path / "first", tmp_path / "second"
    snapshot(first, minilm_path, 16, epochs=1, max_steps=2, wise_grid=[0.5])
    assert trainer.main(first) == 0
    one = train.read_result(first)
    snapshot(second, minilm_path, 16, epochs=1, max_steps=2, seed=7, wise_grid=[0.5],
             soup_with={"path": one["model_dir"], "alpha": 0.5, "version": "r1-x"})
    assert trainer.main(second) == 0
    two = train.read_result(second)
    assert two["status"] == "ok" and two["soup"] == {"path": one["model_dir"], "alpha": 0.5, "version": "r1-x"}, two
    base = load_file(str(Path(minilm_path) / "model.safetensors"))
    tuned1 = load_file(str(Path(one["best_checkpoint"]) / "model.safetensors"))
    tuned2 = load_file(str(Path(two["best_checkpoint"]) / "model.safetensors"))
    saved = load_file(str(Path(two["model_dir"]) / "model.safetensors"))
    key = next(k for k, v in saved.items() if v.ndim == 2 and not torch.equal(tuned1[k], tuned2[k]))
    soup = 0.5 * tuned1[key] + 0.5 * tuned2[key]
    assert torch.allclose(saved[key], 0.5 * base[key] + 0.5 * soup, atol=1e-5)


def test_a_soup_refuses_weights_of_another_model(minilm_path):
    from sentence_transformers import SentenceTransformer

    from loop import wise

    model = SentenceTransformer(str(minilm_path), device="cpu")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    other = {k: v for k, v in base.items() if "pooler" not in k and "layer.5." not in k}
    with pytest.raises(ValueError, match="same base model"):
        wise.soup(model, base, other, 1.0)
    assert all(v.equal(base[k]) for k, v in model.state_dict().items())  # left as it was


@pytest.mark.slow
def test_a_small_memory_budget_trains_with_cached_micro_batches(tmp_path, minilm_path):
    snapshot(tmp_path, minilm_path, 16, epochs=1, max_steps=2, memory_budget_mb=16)
    assert trainer.main(tmp_path) == 0
    res = train.read_result(tmp_path)
    assert res["status"] == "ok" and res["steps"] == 2 and res["micro_batch_size"] is not None, res
    assert res["micro_batch_size"] < res["batch_size"]


@pytest.mark.slow
def test_stops_early_when_the_eval_loss_stops_improving(tmp_path, minilm_path):
    # A rate far below fp32's resolution of the weights: no weight moves, so every epoch's eval
    # loss equals the first one's and the second epoch is not an improvement.
    snapshot(tmp_path, minilm_path, 8, epochs=4, learning_rate=1e-12, weight_decay=0.0)  # 1 step per epoch
    assert trainer.main(tmp_path) == 0
    res = train.read_result(tmp_path)
    assert res["status"] == "ok" and res["steps"] == 2, res  # patience 1 (the default): epochs 3 and 4 skipped
    assert res["stopped_early"] is True and res["epochs_run"] == 2
    assert res["best_checkpoint"] == str(tmp_path / "checkpoints" / "checkpoint-1")
    assert [e["step"] for e in train.read_progress(tmp_path) if e["event"] == "eval"] == [1, 2]


@pytest.mark.slow
def test_evaluates_and_checkpoints_every_half_epoch_by_default(tmp_path, minilm_path):
    # 4 steps per epoch, 2 epochs: an evaluation and a checkpoint every 2 steps.
    snapshot(tmp_path, minilm_path, 32, epochs=2, early_stopping_patience=None)
    assert trainer.main(tmp_path) == 0, train.read_result(tmp_path)
    res = train.read_result(tmp_path)
    assert res["status"] == "ok" and res["steps"] == 8, res
    assert [e["step"] for e in train.read_progress(tmp_path) if e["event"] == "eval"] == [2, 4, 6, 8]
    assert Path(res["best_checkpoint"]).name in {"checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"}


@pytest.mark.slow
def test_an_odd_epoch_is_evaluated_at_its_halves_and_at_the_last_step(tmp_path, minilm_path):
    # 3 steps per epoch, 1 epoch, evals every ceil(3/2) = 2 steps: at step 2, and at 3 (the last).
    snapshot(tmp_path, minilm_path, 24, epochs=1, early_stopping_patience=None)
    assert trainer.main(tmp_path) == 0, train.read_result(tmp_path)
    assert [e["step"] for e in train.read_progress(tmp_path) if e["event"] == "eval"] == [2, 3]


@pytest.mark.slow
def test_a_nan_on_an_evaluation_step_is_neither_evaluated_nor_saved(tmp_path, minilm_path, monkeypatch):
    snapshot(tmp_path, minilm_path, 16, epochs=2, early_stopping_patience=None)  # 2 steps per epoch: eval every step
    monkeypatch.setenv(train.FAULT_ENV, "nan_at_step=2")
    assert trainer.main(tmp_path) == 1
    res = train.read_result(tmp_path)
    assert res["status"] == "failed" and res["reason"].startswith("loss became NaN at step 2"), res
    assert [e["step"] for e in train.read_progress(tmp_path) if e["event"] == "eval"] == [1]
    assert res["best_checkpoint"] == str(tmp_path / "checkpoints" / "checkpoint-1")
    assert checkpoints(tmp_path) == ["checkpoint-1"]


@pytest.mark.slow
def test_nan_loss_fails_and_keeps_best_checkpoint(tmp_path, minilm_path, monkeypatch):
    snapshot(tmp_path, minilm_path, 16, epochs=2, evals_per_epoch=1)  # 2 steps per epoch, one eval each
    monkeypatch.setenv(train.FAULT_ENV, "nan_at_step=3")
    assert trainer.main(tmp_path) == 1
    res = train.read_result(tmp_path)
    assert res["status"] == "failed"
    assert res["reason"].startswith("loss became NaN at step 3")
    assert res["steps"] == 3 and res["model_dir"] is None
    assert res["best_checkpoint"] == str(tmp_path / "checkpoints" / "checkpoint-2")
    assert checkpoints(tmp_path) == ["checkpoint-2"]  # the NaN weights were never saved
    last_step = [e for e in train.read_progress(tmp_path) if e["event"] == "step"][-1]
    assert last_step["step"] == 3 and last_step["loss"] is None


@pytest.mark.slow
def test_run_to_end_returns_the_result_or_raises_with_the_reason_and_the_log(tmp_path, minilm_path):
    ok, bad = tmp_path / "ok", tmp_path / "bad"
    snapshot(ok, minilm_path, 8, epochs=1)
    snapshot(bad, minilm_path, 8, epochs=1)
    res = train.run_to_end(ok, env=ONE_THREAD)
    assert res["status"] == "ok" and res["model_dir"] == str(ok / "model")
    with pytest.raises(EmbedloopError, match="loss became NaN at step 1") as err:
        train.run_to_end(bad, env={**ONE_THREAD, train.FAULT_ENV: "nan_at_step=1"})
    assert "train.log (tail)" in str(err.value) and train.read_result(bad)["status"] == "failed"


@pytest.mark.slow
def test_stop_file_stops_and_keeps_best(tmp_path, minilm_path, monkeypatch):
    snapshot(tmp_path, minilm_path, 16, epochs=3, evals_per_epoch=1)  # 6 steps, the first checkpoint at step 2
    monkeypatch.setenv(train.FAULT_ENV, "sleep_per_step=1")

    def stop_after_first_checkpoint():
        wait_for(lambda: any(e["event"] == "checkpoint" for e in train.read_progress(tmp_path)), 120,
                 what="first checkpoint")
        train.request_stop(tmp_path)

    t = threading.Thread(target=stop_after_first_checkpoint, daemon=True)
    t.start()
    assert trainer.main(tmp_path) == 0
    t.join(timeout=1)
    res = train.read_result(tmp_path)
    assert res["status"] == "stopped", res
    assert 2 < res["steps"] < 6
    assert Path(res["best_checkpoint"]).is_dir()
    assert (tmp_path / "model" / "model.safetensors").exists() and res["model_dir"] == str(tmp_path / "model")


@pytest.mark.slow
def test_oom_and_disk_full_fail_with_a_fix(tmp_path, minilm_path, monkeypatch):
    snapshot(tmp_path / "oom", minilm_path, 16, epochs=1)
    monkeypatch.setenv(train.FAULT_ENV, "oom_at_step=1")
    assert trainer.main(tmp_path / "oom") == 1
    reason = train.read_result(tmp_path / "oom")["reason"]
    assert reason.startswith("Out of GPU memory at step 1 (batch_size=8): lower batch_size"), reason

    snapshot(tmp_path / "disk", minilm_path, 8, epochs=1)
    monkeypatch.setenv(train.FAULT_ENV, "disk_full_at_step=1")
    assert trainer.main(tmp_path / "disk") == 1
    res = train.read_result(tmp_path / "disk")
    assert res["status"] == "failed" and res["reason"].startswith("Disk full while saving at step 1"), res
    assert "restart the run" in res["reason"]
    assert train.read_progress(tmp_path / "disk")[-1]["event"] == "end"


@pytest.mark.slow
def test_kill_9_then_restart_resumes_from_checkpoint(tmp_path, minilm_path):
    run = tmp_path / "run"
    snapshot(run, minilm_path, 8, epochs=3, early_stopping_patience=None)  # 1 step per epoch
    proc = train.start(run, env={train.FAULT_ENV: "sleep_per_step=2", **ONE_THREAD})
    # The checkpoint event is written after the save (state file included) is complete.
    wait_for(lambda: any(e["event"] == "checkpoint" for e in train.read_progress(run)), 240, proc,
             "the first checkpoint")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert train.read_result(run) is None  # died without a result: the owner sees a crash

    proc = train.start(run, env=ONE_THREAD)
    assert proc.wait(timeout=300) == 0, run_log(run)
    res = train.read_result(run)
    assert res["status"] == "ok" and res["steps"] == 3, res
    assert res["resumed_from"] == str(run / "checkpoints" / "checkpoint-1")
    begins = [e for e in train.read_progress(run) if e["event"] == "train_begin"]
    assert [e["resumed_from_step"] for e in begins] == [0, 1]
    second_run_steps = [e["step"] for e in train.read_progress(run) if e["event"] == "step"][-2:]
    assert second_run_steps == [2, 3]


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path, minilm_path):
    run = tmp_path / "run"
    snapshot(run, minilm_path, 16, epochs=1)  # 2 ranks x batch 8: one step
    proc = train.start(run, nproc=2)
    assert proc.wait(timeout=300) == 0, run_log(run)
    res = train.read_result(run)
    assert res["status"] == "ok" and res["world_size"] == 2 and res["steps"] == 1, res
    assert (run / "model" / "model.safetensors").exists()
    # Only rank 0 writes progress: a single start event.
    assert sum(1 for e in train.read_progress(run) if e["event"] == "start") == 1
