"""benchmarks/comparison_summary.py on hand-made comparisons: the mask choice, the spread rule, the tables."""

from __future__ import annotations

import json
import math

import pytest
from bench_scripts import benchmark_script


@pytest.fixture(scope="module")
def summary_module():
    with benchmark_script("comparison_summary.py") as module:
        yield module


def _scores(spec, vers, gen=0.5):
    return {"spec": spec, "vers": vers, "gen": gen, "uni": (spec + vers) / 2}


def _row(method, lr, val_uni, test, seeds=None):
    row = {"method": method, "learning_rate": lr, "alpha": None, "validation": {"uni": val_uni}, "test": test}
    if seeds:
        row["seeds"] = seeds
    return row


def _comparison(val_unis: dict[str, float], seeds: dict[str, dict] | None = None) -> dict:
    seeds = seeds or {}
    selected = {"base": _row("base", None, 0.5, _scores(0.0, 1.0, 1.0))}
    for name, val_uni in val_unis.items():
        selected[name] = _row(name, 1e-3, val_uni, _scores(0.8, 0.7), seeds.get(name))
    frontier = [dict(row) for row in selected.values()]
    return {
        "selected": selected,
        "methods": {name: {"label": name.upper()} for name in selected},
        "reference": {},
        "frontier": frontier,
        "at_equal_speciality": {
            name: {"0.5": {"vers": 0.7, "gen": 0.5, "spec": 0.8, "learning_rate": 1e-3, "alpha": None}, "1": None}
            for name in selected
        },
    }


def test_best_mask_needs_every_task_and_ignores_the_coarse_level(summary_module):
    comparisons = {
        "a": _comparison({"cofitune": 0.95, "cofitune_mask": 0.7, "cofitune_fisher": 0.8, "cofitune_hard": 0.99}),
        "b": _comparison({"cofitune": 0.95, "cofitune_mask": 0.8, "cofitune_fisher": 0.6}),
    }
    best, scores = summary_module.best_mask(comparisons)
    # cofitune_hard ran on one task only; the coarse level is not a mask variant; fisher 0.70 < mask 0.75
    assert best == "cofitune_mask"
    assert "cofitune_hard" not in scores
    assert math.isclose(scores["cofitune"], 0.95) and math.isclose(scores["cofitune_fisher"], 0.7)


def test_a_difference_counts_only_beyond_the_sum_of_the_spreads(summary_module):
    def seeded(mean, sd):
        return {"seeds": [0, 1, 2], "uni": [mean, sd], "spec": [mean, sd], "vers": [mean, sd]}

    a = _row("a", 1e-3, 0.8, _scores(0.8, 0.8), seeded(0.80, 0.02))
    b = _row("b", 1e-3, 0.8, _scores(0.8, 0.8), seeded(0.77, 0.02))
    c = _row("c", 1e-3, 0.8, _scores(0.8, 0.8), seeded(0.70, 0.02))
    single = _row("d", 1e-3, 0.8, _scores(0.1, 0.1))
    assert summary_module.compare_pair(a, b, "uni", [0.01, 0.05])["call"] == "noise"  # within the spread
    far = summary_module.compare_pair(a, c, "uni", [0.05, 0.15])
    assert far["call"] == "real" and math.isclose(far["diff"], 0.1) and math.isclose(far["spread"], 0.04)
    assert summary_module.compare_pair(a, c, "uni", [-0.01, 0.2])["call"] == "noise"  # the interval holds 0
    assert summary_module.compare_pair(a, c, "uni")["call"] == "unmeasured (no item interval)"
    assert summary_module.compare_pair(a, single, "uni", [0.5, 0.9])["call"] == "unmeasured (one seed)"
    assert summary_module.compare_pair(a, single, "uni", [-0.5, 0.9])["call"] == "noise"
    differences = [{"a": "c", "b": "a", "uni": {"interval": [-0.15, -0.05]}}]
    assert summary_module._interval(differences, "a", "c", "uni") == [0.05, 0.15]


def test_markdown_has_every_task_the_pairs_and_the_equal_speciality_table(summary_module):
    comparisons = {
        "arithmetic": _comparison({"full": 0.9, "lora": 0.8, "cofitune": 0.7, "cofitune_mask": 0.75}),
        "words": _comparison({"full": 0.9, "lora": 0.8, "cofitune": 0.7, "cofitune_mask": 0.72}),
    }
    summary = summary_module.summarise(comparisons)
    assert summary["best_mask"] == "cofitune_mask"
    text = summary_module.to_markdown(summary)
    assert "### arithmetic" in text and "### words" in text
    assert "| COFITUNE_MASK vs LORA |" in text
    assert "| Spec. >= 0.5 | Spec. >= 1 |" in text
    assert "| words | FULL | 0.700 (0.50) | - |" in text
    assert "Best mask variant on validation (mean selected validation Uni. over the tasks): cofitune_mask" in text
    comparisons["words"]["equal_speciality_answer"] = {
        "1": {"ours": {"method": "cofitune", "vers": 0.8}, "theirs": {"method": "full", "vers": 0.7}, "diff": 0.1,
              "interval": [0.02, 0.18], "call": "beyond the item noise"}}  # fmt: skip
    text = summary_module.to_markdown(summary_module.summarise(comparisons))
    assert "| words | 1 | COFITUNE 0.800 | FULL 0.700 | +0.100 [+0.020, +0.180] | beyond the item noise |" in text
    json.dumps(summary, default=float)  # what main() writes


def test_plot_draws_every_task(summary_module, tmp_path):
    comparisons = {
        "arithmetic": _comparison({"full": 0.9, "lora": 0.8, "cofitune": 0.7, "cofitune_mask": 0.75,
                                   "cofitune_pull": 0.74, "full_replay10": 0.85}),
        "knowledge": _comparison({"full": 0.9, "lora": 0.8, "cofitune": 0.7, "cofitune_mask": 0.72,
                                  "cofitune_pull": 0.7, "full_replay10": 0.8}),
    }  # fmt: skip
    path = summary_module.plot(comparisons, summary_module.summarise(comparisons), str(tmp_path / "summary.png"))
    assert (tmp_path / "summary.png").stat().st_size > 0 and path.endswith("summary.png")
