"""benchmarks/bench_estimator_fidelity.py: the rank correlation, the configurations, and a whole run at tiny size."""

from __future__ import annotations

import json

import pytest
import torch
from bench_scripts import benchmark_script

from cofitune_peft.estimation import RECIPES


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("bench_estimator_fidelity.py") as module:
        yield module


def test_spearman_matches_its_definition_with_ties(bench):
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert bench.spearman(a, a * 10 + 3) == pytest.approx(1.0)
    assert bench.spearman(a, -a) == pytest.approx(-1.0)
    x, y = torch.tensor([1.0, 2.0, 2.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])
    # ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): Pearson of the ranks
    rx, ry = torch.tensor([1, 2.5, 2.5, 4]), torch.tensor([1.0, 3, 2, 4])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    assert bench.spearman(x, y) == pytest.approx(float((rx * ry).sum() / (rx.norm() * ry.norm())))


def test_each_configuration_differs_from_its_recipe_by_its_deviation_only(bench):
    configs = bench.configurations(128)
    default, authors = configs["default"], configs["authors"]
    assert default == {**RECIPES["default"], "max_length": 128} and authors == {
        **RECIPES["authors"],
        "max_length": 128,
    }
    for name, (_, switch, eager) in bench.DEVIATIONS.items():
        plus = configs[f"default+{name}"]
        changed = {k for k in plus if plus[k] != default[k]}
        assert changed == set(switch) | ({"attn_implementation"} if eager else set())
        assert all(plus[k] == authors[k] for k in changed), "default + it takes the authors' choices"
        if name == "eager":
            assert "authors-eager" not in configs  # the probabilities need eager attention
            continue
        minus = configs[f"authors-{name}"]
        assert {k for k in minus if minus[k] != authors[k]} == set(switch)
        assert all(minus[k] == default[k] for k in switch)


def test_a_whole_run_at_tiny_size(bench, tmp_path):
    out = tmp_path / "fidelity.json"
    argv = ["--batches", "2", "--batch-size", "2", "--max-length", "48", "--no-progress", "--out", str(out)]
    result = bench.main([*argv, "--cache-dir", str(tmp_path / "cache")])
    saved = json.loads(out.read_text())
    assert saved["padding_fraction"] == pytest.approx(result["padding_fraction"]) and 0 < saved["padding_fraction"] < 1
    assert len(saved["deviations"]) == len(bench.DEVIATIONS) and len(saved["seconds"]) == 17
    for row in saved["reference_rows"] + [d["default_plus"] for d in saved["deviations"]]:
        assert all(-1 <= row[p] <= 1 for p in bench.PARTS)
    assert (tmp_path / "fidelity.png").stat().st_size > 0
    # The cache makes a second run estimate nothing and give the same figures.
    again = bench.main([*argv, "--cache-dir", str(tmp_path / "cache")])
    assert again["deviations"] == result["deviations"] and again["reference_rows"] == result["reference_rows"]


def test_one_side_only(bench, tmp_path):
    assert len(bench.configurations(64, "authors_minus")) == 2 + len(bench.DEVIATIONS) - 1
    assert len(bench.configurations(64, "default_plus")) == 2 + len(bench.DEVIATIONS)
    argv = ["--batches", "1", "--batch-size", "2", "--max-length", "32", "--no-progress", "--sides", "authors_minus"]
    result = bench.main([*argv, "--out", str(tmp_path / "one.json")])
    assert len(result["seconds"]) == 10
    assert all(d["default_plus"] is None for d in result["deviations"])
    assert "authors - " in bench.table(result) and "default + " not in bench.table(result)
