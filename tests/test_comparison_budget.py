"""benchmarks/comparison_budget.py: the plan's run counts and the minutes from measured run records."""

from __future__ import annotations

import json

import pytest
from bench_scripts import benchmark_script


@pytest.fixture(scope="module")
def budget():
    with benchmark_script("comparison_budget.py") as module:
        yield module


def _record(path, method, lr, seconds, steps, eval_seconds, alpha=None):
    path.mkdir(parents=True, exist_ok=True)
    record = {"key": f"{method}_{lr}_{alpha}", "method": method, "learning_rate": lr, "alpha": alpha, "seed": 0,
              "train": None if alpha is not None else {"seconds": seconds, "steps": steps},
              "validation": {}, "test": {}, "eval_seconds": eval_seconds}  # fmt: skip
    (path / f"{record['key']}.json").write_text(json.dumps(record))


def test_costs_plan_and_minutes(budget, tmp_path):
    runs = tmp_path / "arithmetic" / "runs"
    _record(runs, "full", 1e-4, 200, 40, 180)
    _record(runs, "lora", 1e-3, 160, 40, 170)
    _record(runs, "cofitune", 3e-4, 120, 40, 190)
    _record(runs, "cofitune_alpha", 3e-4, 0, 0, 500, alpha=0.5)  # post-hoc: no training, its eval still counts
    costs = budget.measured_costs(str(tmp_path))["arithmetic"]
    assert costs == {"full": 5.0, "lora": 4.0, "window": 3.0, "eval": 185.0}
    assert budget.step_seconds(costs, "osf") == pytest.approx(1.9 * 5.0)
    assert budget.step_seconds(costs, "cofitune_pull") == 3.0 and budget.cost_class("full_replay25") == "full"
    plan = budget.plan("arithmetic", ["base", "full", "lora", "wiseft"])
    assert plan["trained"]["full"] == plan["trained"]["lora"] == len(budget_grid("full"))
    assert plan["derived"]["wiseft"] == len(budget_grid("wiseft")) * len(budget_grid("full"))
    parts = budget.minutes("arithmetic", costs, {"steps": 40, "trained": {"full": 2}, "derived": {"wiseft": 2},
                                                 "repeats": {"full": 2}})  # fmt: skip
    assert parts["sweep"] == pytest.approx(2 * (40 * 5 + 185) / 60)
    assert parts["post_hoc"] == pytest.approx(2 * 185 / 60)
    assert parts["seeds"] == pytest.approx(2 * (40 * 5 + 0.6 * 185) / 60)
    assert budget.main(["--costs", str(tmp_path), "--tasks", "arithmetic", "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["process_hours"] > 0


def budget_grid(name):
    from cofitune_peft.kit.compare.command import FULL_GRIDS

    return FULL_GRIDS[name]


def test_run_cost_bench_on_a_tiny_model_feeds_the_budget(budget, tmp_path):
    from tiny_models import tiny_model, tiny_tokenizer

    with benchmark_script("bench_run_cost.py") as bench:
        sizes = {"n_eval": 2, "n_test": 3, "n_general": 1, "batch_size": 2, "max_length": 32}
        result = bench.measure_task("arithmetic", lambda: tiny_model(num_layers=4), tiny_tokenizer(), steps=1,
                                    sizes=sizes)  # fmt: skip
    assert {"full", "lora", "window", "eval", "eval_test"} <= set(result)
    assert all(result[k] > 0 for k in ("full", "lora", "window", "eval")) and result["eval_test"] < result["eval"]
    path = tmp_path / "run_cost.json"
    path.write_text(json.dumps({"tasks": {"arithmetic": result}}))
    assert budget.measured_costs(str(path))["arithmetic"]["eval"] == result["eval"]
