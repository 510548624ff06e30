"""A `bench.quality` JSON as the markdown tables bench/README.md shows (printed, never edited by hand).

    python -m bench.table FILE.json
    python -m bench.table --calibration A.json B.json ...   # the gate calibration pooled over runs
    python -m bench.table --wise-probe A.json B.json ...    # WiSE-FT weight rules over --probe-wise runs
    python -m bench.table --arms A.json B.json [A2.json B2.json ...] [--mixed-machines]  # two loop settings, paired

Rows: the base, BM25, the stock fine-tune, the random control's and the loop's rounds (the
candidate and the ACTIVE model, the one the user has after the round), each with its seed-mean
NDCG@10, R@100, MRR@10 and the interval against the base (pooled over seeds and queries when the
run had several seeds); then the loop against each control, promotions per seed, the reviews and
passages judged, and the gate calibration. `--calibration` pools the gate calibration over every
round of several runs (e.g. two collections): a rule is only as well supported as its rounds.
`--wise-probe` pools `bench.quality --probe-wise` runs (dev splits): the WiSE-FT weight the
development fold chose against each fixed weight, over every probed round. `--arms` sets two runs
of one protocol that differ in `--loop-config` side by side (same seeds, same judged queries): each
round's candidate and the active model after the last round, B minus A, paired over seeds and queries;
more A/B pairs add seeds run apart (dev splits, each seed on its own queries: resampled per seed).
A pair that ran on different CPUs is refused (`--mixed-machines` shows it with a caution): the same
code, data and seed train another model on another CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _ci(row: dict[str, Any]) -> str:
    if "delta_vs_base" not in row:
        return "-"
    if "ci95_vs_base" not in row:  # combined from runs that did not keep this round's per-query figures
        return f"{row['delta_vs_base']:+.4f} (seed mean)"
    lo, hi = row["ci95_vs_base"]
    return f"{row['delta_vs_base']:+.4f} [{lo:+.3f}, {hi:+.3f}]"


def _row(name: str, row: dict[str, Any], reviews: Any = "-", active: Any = "-") -> str:
    return (f"| {name} | {reviews} | {row['ndcg@10']:.4f} | {active} | {row['recall@100']:.4f} | "
            f"{row['mrr@10']:.4f} | {_ci(row)} |")


def tables(d: dict[str, Any]) -> str:
    seeds = d.get("seeds", [0])
    out = [f"{d['dataset']}: budget {d['budget']}, {d['n_rounds']} rounds, seeds {seeds}, "
           f"{d['n_test_queries']} test queries, commit {d['machine']['commit']}, {d['machine']['date']}", "",
           "| system | reviews | NDCG@10 | ACTIVE NDCG@10 | R@100 | MRR@10 | vs base, 95% CI |",
           "|---|---|---|---|---|---|---|",
           _row("(a) off-the-shelf", d["base"], 0)]
    if "bm25" in d:
        out.append(_row("(d) BM25", d["bm25"], 0))
    if "stock_finetune" in d:
        out.append(_row(f"(c) stock fine-tune, {d['stock_finetune'].get('train_pairs')} gold pairs",
                        d["stock_finetune"], d["budget"]))
    for r in d.get("random_control", {}).get("rounds", []):
        out.append(_row(f"(b) random control, round {r['round']}", r, r["reviews"], f"{r['active_ndcg@10']:.4f}"))
    for r in d.get("rounds", []):
        out.append(_row(f"loop, round {r['round']}", r, r["reviews"], f"**{r['active_ndcg@10']:.4f}**"))
    if "loop_vs" in d:
        out += ["", "Loop's active model after the last round minus each control (pooled paired 95% CI): " + "; ".join(
            f"{name} {v['delta']:+.4f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" for name, v in d["loop_vs"].items())
                + "."]
    if "candidate_vs" in d:
        out += ["Last candidate minus each control: " + "; ".join(
            f"{name} {v['delta']:+.4f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
            for name, v in d["candidate_vs"].items()) + "."]
    if "promotions_per_seed" in d:
        out.append(f"Promotions per seed (loop): {d['promotions_per_seed']}.")
    last = (d.get("rounds") or [{}])[-1].get("decisions") or {}
    if last:
        out.append(f"Reviews after the last round (seed mean): accept {last.get('accept')}, pick {last.get('pick')}, "
                   f"reject {last.get('reject')}; passages judged {last.get('passages_judged')}, marked relevant "
                   f"{last.get('positives')}.")
    cal = d.get("gate_calibration")
    if cal:
        out += ["", *calibration_table(cal)]
    if d.get("wise_probe"):
        out += ["", *probe_table(d["wise_probe"])]
    if "combined_from" in d:
        out += ["", "Combined from " + "; ".join(
            f"{c['file']} (seeds {c['seeds']}, commit {(c.get('machine') or {}).get('commit')}, wall time "
            f"{json.dumps(c.get('wall_s'))})" for c in d["combined_from"]) + "."]
    else:
        out += ["", f"Wall time: {json.dumps(d.get('wall_s'))}"]
    return "\n".join(out)


def _rule(name: str) -> str:
    return (name.replace("p>=", "bootstrap share of wins >= ").replace("sign-flip p<=", "sign-flip test p <= ")
            .replace(" & ", " and "))


def calibration_table(cal: dict[str, Any], what: str = "loop and random control, every seed") -> list[str]:
    """`bench.quality.gate_calibration`'s counts as a markdown table, one row per rule."""
    return [f"Gate calibration over {cal['rounds']} rounds ({what}; {cal['better_on_test']} candidates better than "
            f"the active model on the test split, {cal['significantly_better_on_test']} significantly):", "",
            "| rule: promote when (and the candidate's held-out mean is ahead) | promoted | false promotions | "
            "false refusals (test CI > 0) | refused a better one |", "|---|---|---|---|---|",
            *(f"| {_rule(k)} | {v['promoted']} | {v['false_promotions']} | {v['false_refusals']} | "
              f"{v['refused_better']} |" for k, v in cal.items() if isinstance(v, dict))]


def probe_table(probe: dict[str, Any]) -> list[str]:
    """`bench.quality.wise_probe_summary` as a markdown table."""
    return [f"WiSE-FT weight, each way of picking it, over {probe['rounds']} loop rounds (the rounds' own weights: "
            f"{probe['chosen']}):", "",
            "| weight | NDCG@10 | minus the round's own weight, 95% CI |", "|---|---|---|",
            f"| the round's own (the loop's rule) | {probe['development_fold_choice']:.4f} | - |",
            *(f"| {name} | {v['ndcg@10']:.4f} | {v['vs_fold_choice']:+.4f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] |"
              for name, v in probe.items() if name.startswith("fixed "))]


def pooled_probe(paths: list[str]) -> str:
    """The WiSE-FT probe over every probed loop round of these `bench.quality --probe-wise` results."""
    from bench.quality import read_result, wise_probe_summary

    rows = [row for p in paths for r in read_result(p, "--wise-probe")["per_seed"] for row in r.get("rounds", [])]
    probe = wise_probe_summary(rows)
    if probe is None:
        raise SystemExit("--wise-probe: none of these results has a probed round (run bench.quality --probe-wise)")
    return "\n".join(probe_table(probe))


def pooled_calibration(paths: list[str]) -> str:
    """The gate calibration over every round of these `bench.quality` results, as one table."""
    from bench.quality import calibration_rows, gate_calibration, read_result

    docs = [read_result(p, "--calibration") for p in paths]
    rows = [row for d in docs for row in calibration_rows(d)]
    what = "; ".join(f"{Path(p).name}: {d['dataset']}, seeds {d.get('seeds', [d.get('seed', 0)])}"
                     for p, d in zip(paths, docs, strict=True))
    return "\n".join(calibration_table(gate_calibration(rows), what))


def arms_table(paths: list[str], mixed_machines: bool = False) -> str:
    """Two loop settings (`bench.quality` runs that differ only in `loop_config`), paired: per round,
    each arm's seed-mean candidate NDCG@10 and B minus A with the interval pooled over seeds and
    queries; the same for the active model after the last round.

    `paths` are A.json B.json, optionally followed by more A/B pairs of other seeds (dev-split runs,
    one seed per process, each on its own split): their seeds are pooled, the interval then
    resampling queries within each seed (`bench.common.paired_vs`).

    Each A/B pair must have run on one kind of CPU (`machine.cpu`): another CPU trains and encodes with
    other kernels (bf16 autocast where the CPU has it in hardware, int8 dot products), so the same code,
    data and seed give another model; `mixed_machines` pairs them anyway, and the table says so."""
    from bench.common import paired_vs
    from bench.quality import PROTOCOL_KEYS, read_result, reports_from_json

    if len(paths) < 2 or len(paths) % 2:
        raise SystemExit("--arms takes A.json B.json, optionally more A/B pairs of other seeds.")
    results = [read_result(path, "--arms", per_query=True) for path in paths]
    a, b = results[0], results[1]
    for path, run in zip(paths, results, strict=True):
        for key in PROTOCOL_KEYS:
            if json.dumps(a.get(key), sort_keys=True) != json.dumps(run.get(key), sort_keys=True):
                raise SystemExit(f"--arms: the runs differ in {key!r} ({path}); only runs of one protocol compare.")
    for n, run in enumerate(results):
        same = results[n % 2]
        if json.dumps(same.get("loop_config") or {}, sort_keys=True) != json.dumps(run.get("loop_config") or {}, sort_keys=True):
            raise SystemExit(f"--arms: {paths[n]} has another loop_config than {paths[n % 2]}; give A/B pairs in one order.")
    cpus = [(run.get("machine") or {}).get("cpu") for run in results]
    mixed = sorted({f"{cpus[n]} vs {cpus[n + 1]}" for n in range(0, len(cpus), 2) if cpus[n] != cpus[n + 1]})
    if mixed and not mixed_machines:
        raise SystemExit(f"--arms: an A/B pair ran on different CPUs ({'; '.join(mixed)}): another CPU gives another "
                         "model from the same code, data and seed, so the pair does not isolate the setting. Run both "
                         "arms on one machine (or pass --mixed-machines to compare them anyway).")
    seeds_a: dict[int, dict[str, Any]] = {}
    seeds_b: dict[int, dict[str, Any]] = {}
    for n in range(0, len(results), 2):
        pa, pb = ({r["seed"]: r for r in d["per_seed"]} for d in results[n:n + 2])
        if set(pa) != set(pb):
            raise SystemExit(f"--arms: the runs have different seeds ({sorted(pa)} vs {sorted(pb)}); "
                             f"pairing needs the same ones.")
        if set(pa) & set(seeds_a):
            raise SystemExit(f"--arms: seed repeated across pairs: {sorted(set(pa) & set(seeds_a))}.")
        if any(set(pa[s]["per_query_ndcg@10"]["query_ids"]) != set(pb[s]["per_query_ndcg@10"]["query_ids"]) for s in pa):
            raise SystemExit("--arms: the runs were judged on different queries (another dev split?).")
        seeds_a.update(pa)
        seeds_b.update(pb)
    seeds = sorted(seeds_a)
    strata = len({frozenset(seeds_a[s]["per_query_ndcg@10"]["query_ids"]) for s in seeds}) > 1
    rep_a, rep_b = ([reports_from_json(runs[s]) for s in seeds] for runs in (seeds_a, seeds_b))

    def line(name: str, pick) -> str:
        ra, rb = [pick(r) for r in rep_a], [pick(r) for r in rep_b]
        if None in ra or None in rb:  # a JSON written before every round's per-query figures were kept
            return f"| {name} | - | - | no per-query figures |"
        vs = paired_vs(ra, rb)
        mean_a, mean_b = (sum(r.metrics["ndcg@10"] for r in reports) / len(reports) for reports in (ra, rb))
        return f"| {name} | {mean_a:.4f} | {mean_b:.4f} | {vs['delta']:+.4f} [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}] |"

    def promotions(runs: dict[int, dict[str, Any]]) -> list[int]:
        return [sum(bool(row["promoted"]) for row in runs[s]["rounds"]) for s in seeds]

    n_rounds = len(rep_a[0]["rounds"])
    return "\n".join([
        f"{a['dataset']}, seeds {seeds}, {a['n_test_queries']} judged queries"
        f"{' per seed (each seed its own dev split; queries resampled within each seed)' if strata else ''}. "
        f"A: {json.dumps(a.get('loop_config') or {})}; B: {json.dumps(b.get('loop_config') or {})}."
        f"{f' CAUTION: pairs ran on different CPUs ({chr(59).join(mixed)}).' if mixed else ''}", "",
        "| loop | A | B | B minus A, 95% CI |", "|---|---|---|---|",
        *(line(f"candidate, round {i + 1}", lambda r, i=i: r["rounds"][i]) for i in range(n_rounds)),
        line(f"active after round {n_rounds}", lambda r: r["active"]["loop"]),
        f"| promotions per seed | {promotions(seeds_a)} | {promotions(seeds_b)} | |",
    ])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--calibration"] and len(args) > 1:
        print(pooled_calibration(args[1:]))
        return 0
    if args[:1] == ["--arms"] and len(args) > 1:
        rest = [a for a in args[1:] if a != "--mixed-machines"]
        print(arms_table(rest, mixed_machines=len(rest) < len(args) - 1))
        return 0
    if args[:1] == ["--wise-probe"] and len(args) > 1:
        print(pooled_probe(args[1:]))
        return 0
    if len(args) != 1 or args[0].startswith("--"):
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    print(tables(json.loads(Path(args[0]).read_text(encoding="utf-8"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
