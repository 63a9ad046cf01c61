"""How long the committed comparison (`cofitune compare --preset full`) takes, piece by piece, from per-run costs.

A comparison's cost is a sum over runs: each trained grid point is `steps x seconds per step` of training plus one
evaluation of both splits; each post-hoc point (WiSE-FT, CoFiTune's strength) one evaluation; each seed repeat a
training run plus an evaluation of the test split alone; each task once the base model's references and scores,
the importance and the replay pool. This script reads the plan from `cofitune_peft.kit.compare.command`
(`FULL_METHODS`, `FULL_GRIDS`, `FULL_DEFAULTS`, `FULL_TASK_DEFAULTS`, `FULL_TASK_GRIDS`, `FULL_RATE_FROM`) and the costs from measured runs:

    python benchmarks/comparison_budget.py --costs DIR [DIR ...] [--methods a,b,...] [--json PATH]

where each DIR is a comparison folder (`<task>/runs/*.json` or `runs/*.json`): the median seconds per step of `full`,
`lora` and `cofitune` runs and the median evaluation seconds per run are taken from its records, per task (a task
without runs borrows the costs of the first one measured); or the JSON of `bench_run_cost.py`. Other methods' steps are those ratios to full fine-tuning's
step that the committed comparison measured (`STEP_VS_FULL`, docs/results.md). Prints a table of the pieces (per task:
the sweep of the named methods, the post-hoc points, the seed repeats) with their run counts and minutes at one
thread, and the total in process-hours.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: Step time of each method relative to full fine-tuning's on SmolLM2 (medians of the committed comparison's runs,
#: docs/results.md: LoRA 0.85-1.0x, a window 0.6x, the whole-model soft mask 1.0x, L1/L2 to base 1.1-1.2x, OSF 1.9x).
#: The three measured classes (full, lora, window) are replaced by the measured costs.
STEP_VS_FULL = {"full": 1.0, "lora": 0.9, "window": 0.6, "whole": 1.02, "penalty": 1.15, "osf": 1.9}
#: Test-only evaluation (a seed repeat) as a fraction of both splits': 120 of 200 items, and the texts of one split.
TEST_SHARE = 0.6


def cost_class(method: str) -> str:
    """The step-cost class of a registry method."""
    if method in ("full", "full_replay10", "full_replay25"):
        return "full"
    if method in ("lora", "lora_replay10", "lora_replay25", "corda_kpm"):
        return "lora"
    if method in ("vsoftmask", "cofitune_restrained"):
        return "whole"
    if method in ("l1", "l2", "cofitune_l2out"):
        return "penalty"
    if method == "osf":
        return "osf"
    return "window"  # every windowed CoFiTune variant: coarse, masks, pull, replay


def measured_costs(directory: str) -> dict[str, dict[str, float]]:
    """`{task: {"full", "lora", "window": seconds per step, "eval": seconds per run}}` from a comparison folder, or
    from the JSON `bench_run_cost.py` writes."""
    if os.path.isfile(directory):
        with open(directory) as fh:
            bench = json.load(fh)
        keys = ("full", "lora", "window", "eval")
        return {task: {k: r[k] for k in keys if k in r} for task, r in bench.get("tasks", {}).items()}
    out: dict[str, dict[str, list[float]]] = {}
    paths = glob.glob(os.path.join(directory, "*", "runs", "*.json")) + glob.glob(
        os.path.join(directory, "runs", "*.json")
    )
    for path in paths:
        task = os.path.basename(os.path.dirname(os.path.dirname(path)))
        with open(path) as fh:
            record = json.load(fh)
        costs = out.setdefault(task, {})
        train = record.get("train")
        if train and record.get("alpha") is None and record["method"] in ("full", "lora", "cofitune"):
            key = "window" if record["method"] == "cofitune" else record["method"]
            costs.setdefault(key, []).append(train["seconds"] / train["steps"])
        if record.get("eval_seconds") and "validation" in record and "test" in record:
            costs.setdefault("eval", []).append(record["eval_seconds"])
    return {task: {k: statistics.median(v) for k, v in c.items()} for task, c in out.items() if c}


def step_seconds(costs: dict[str, float], method: str) -> float:
    kind = cost_class(method)
    if kind in costs:
        return costs[kind]
    return STEP_VS_FULL[kind] * costs["full"]


def plan(task: str, methods: list[str] | None = None) -> dict:
    """The runs of one task of `--preset full`: grid points per method, post-hoc points, seed repeats."""
    from cofitune_peft.kit.compare.command import (
        FULL_DEFAULTS,
        FULL_GRIDS,
        FULL_METHODS,
        FULL_RATE_FROM,
        FULL_TASK_DEFAULTS,
        FULL_TASK_GRIDS,
    )
    from cofitune_peft.kit.compare.methods import METHODS, resolve_methods

    defaults = {**FULL_DEFAULTS, **FULL_TASK_DEFAULTS.get(task, {})}
    names = list(methods or FULL_METHODS)
    grids = {**FULL_GRIDS, **FULL_TASK_GRIDS.get(task, {})}
    resolved = resolve_methods(names, {k: v for k, v in grids.items() if k in resolve_methods(names)})
    seeds = [s for s in str(defaults["seeds"]).split(",") if s.strip()]
    seed_methods = str(defaults["seed_methods"])
    if seed_methods.startswith("auto"):  # the most `--seed-methods auto` may take
        from cofitune_peft.kit.compare.command import AUTO_SEEDS_ALWAYS, AUTO_SEEDS_MAX

        extra = [m for m in resolved if m not in AUTO_SEEDS_ALWAYS and METHODS[m].trains and m not in ("base",)]
        seed_methods = [*(m for m in AUTO_SEEDS_ALWAYS if m in resolved), *extra][:AUTO_SEEDS_MAX]
    else:
        seed_methods = [m for m in seed_methods.split(",") if m.strip() in resolved]
    trained, derived = {}, {}
    for name, method in resolved.items():
        if method.trains:
            # a method at its parent's selected rate is one point
            trained[name] = 1 if name in FULL_RATE_FROM and name not in grids else len(method.learning_rates)
        elif method.derived_from is not None:
            derived[name] = len(method.learning_rates) * len(resolved[method.derived_from].learning_rates)
    repeats = {}
    for name in seed_methods:
        parent = METHODS[name].derived_from
        repeats[name] = len(seeds) if METHODS[name].trains or parent not in seed_methods else 0
    return {"steps": defaults["steps"], "trained": trained, "derived": derived, "repeats": repeats}


def minutes(task: str, costs: dict[str, float], runs: dict, prep_evals: float = 5.0) -> dict[str, float]:
    """Minutes of each part of `plan(task)`: base preparation (`prep_evals` evaluations' worth: references, base scores,
    importance, replay), the sweep, the post-hoc points, the seed repeats."""
    evaluation = costs["eval"]
    sweep = sum(n * (runs["steps"] * step_seconds(costs, m) + evaluation) for m, n in runs["trained"].items())
    derived = sum(runs["derived"].values()) * evaluation
    seeds = 0.0
    for name, n in runs["repeats"].items():
        from cofitune_peft.kit.compare.methods import METHODS

        train = runs["steps"] * step_seconds(costs, name) if METHODS[name].trains else 0.0
        seeds += n * (train + TEST_SHARE * evaluation)
    return {"prep": prep_evals * evaluation / 60, "sweep": sweep / 60, "post_hoc": derived / 60, "seeds": seeds / 60}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--costs", nargs="+", required=True, help="comparison folders with measured runs")
    parser.add_argument("--tasks", default="arithmetic,words,knowledge")
    parser.add_argument("--methods", help="comma-separated methods (default: FULL_METHODS)")
    parser.add_argument("--json", help="write the table here too")
    args = parser.parse_args(argv)
    measured: dict[str, dict[str, float]] = {}
    for directory in args.costs:
        for task, costs in measured_costs(directory).items():
            measured.setdefault(task, {}).update(costs)
    if not measured:
        raise SystemExit(f"no run records under {args.costs}")
    fallback = next(iter(measured.values()))
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    table, total = [], 0.0
    print("| task | steps | trained runs | post-hoc points | seed repeats | prep min | sweep min | post-hoc min | "
          "seeds min | total min |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks.split(","):
        costs = {**fallback, **measured.get(task, {})}
        runs = plan(task, methods)
        parts = minutes(task, costs, runs)
        task_total = sum(parts.values())
        total += task_total
        row = {"task": task, "costs": costs, **runs, **parts, "total": task_total}
        table.append(row)
        print(f"| {task} | {runs['steps']} | {sum(runs['trained'].values())} | {sum(runs['derived'].values())} | "
              f"{sum(runs['repeats'].values())} | {parts['prep']:.0f} | {parts['sweep']:.0f} | {parts['post_hoc']:.0f} | "
              f"{parts['seeds']:.0f} | {task_total:.0f} |")  # fmt: skip
    print(f"\ntotal: {total / 60:.1f} process-hours at one thread")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"tasks": table, "process_hours": total / 60}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
