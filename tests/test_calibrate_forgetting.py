"""benchmarks/calibrate_forgetting.py on a tiny random Llama: run order, the criterion, the whole calibration."""

from __future__ import annotations

import math

import pytest
from bench_scripts import benchmark_script
from tiny_models import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def calib():
    with benchmark_script("calibrate_forgetting.py") as module:
        yield module


def test_run_order_puts_each_methods_highest_rate_first(calib):
    order = calib.run_order({"full_ft": [3e-5, 1e-4], "cofitune": [3e-4, 1e-3]})
    assert order == [("full_ft", 1e-4), ("cofitune", 1e-3), ("full_ft", 3e-5), ("cofitune", 3e-4)]
    assert calib.run_order({"full_ft": [1e-4], "cofitune": []}) == [("full_ft", 1e-4)]


def test_parse_lrs_overrides_named_methods_only(calib):
    assert calib.parse_lrs(None) == calib.DEFAULT_LRS
    assert calib.parse_lrs([["cofitune", "1e-3"]]) == {"full_ft": [3e-5, 1e-4], "cofitune": [1e-3]}
    assert calib.parse_lrs([["full_ft"]])["full_ft"] == []
    with pytest.raises(SystemExit):
        calib.parse_lrs([["lora", "1e-4"]])


def test_bare_number_replies(calib):
    assert all(map(calib.is_bare_number, ["85", " 1,024.", "-3", "2.5"]))
    assert not any(map(calib.is_bare_number, ["Paris", "The answer is 85", "", "85 km"]))


def test_criterion_is_a_relative_drop_of_generated_accuracy(calib):
    base = {"probe_gen_accuracy": 0.5}
    runs = [{"probe_gen_accuracy": 0.4}, {"probe_gen_accuracy": 0.41}, {"probe_gen_accuracy": 0.6}]
    calib.add_drops(base, runs, 0.2)
    assert [r["forgets"] for r in runs] == [True, False, False]
    assert math.isclose(runs[0]["probe_gen_relative_drop"], 0.2)
    assert math.isclose(runs[2]["probe_gen_relative_drop"], -0.2)
    nothing = [{"probe_gen_accuracy": 0.0}]
    calib.add_drops({"probe_gen_accuracy": 0.0}, nothing, 0.2)
    assert nothing[0]["forgets"] is None and nothing[0]["probe_gen_relative_drop"] is None


@pytest.mark.filterwarnings("ignore:the base model scores 0")
def test_calibration_end_to_end_on_a_tiny_llama(calib):
    tok = tiny_tokenizer()
    settings = calib.Settings(
        steps=2,
        batch=2,
        lrs={"full_ft": [1e-3], "cofitune": [1e-2]},
        n_train=8,
        n_test=3,
        n_probes=3,
        n_general=2,
        arithmetic_new_tokens=3,
        probe_new_tokens=3,
        general_max_length=48,
    )
    updates = []
    summary = calib.run_calibration(
        lambda: tiny_model("llama", num_layers=8), tok, settings, progress=False, on_update=updates.append
    )
    assert summary["complete"] and len(updates) == 4  # base, two runs, done
    base, runs = summary["base"], summary["runs"]
    assert base["kl_to_base"] == pytest.approx(0.0, abs=1e-6) and base["ce_increase"] == pytest.approx(0.0, abs=1e-6)
    assert [(r["method"], r["learning_rate"]) for r in runs] == [("full_ft", 1e-3), ("cofitune", 1e-2)]
    full, cofi = runs
    assert cofi["label"] == "CoFiTune coarse (FFN 2..3, no mask)"  # (N/4, N/2] of 8 layers
    assert cofi["trainable_parameters"] < full["trainable_parameters"]
    for r in runs:
        assert r["kl_to_base"] > 0, f"{r['label']} did not move"
        for key in (
            "arithmetic_accuracy",
            "probe_gen_accuracy",
            "probe_mc_accuracy",
            "probe_gen_bare_number_fraction",
        ):
            assert 0.0 <= r[key] <= 1.0
        assert len(r["probe_samples"]) == 3 and r["forgets"] in (True, False, None)
    table = summary["table"].splitlines()
    assert len(table) == 2 + 1 + 2 and table[2].startswith("| base (no training)")


@pytest.mark.filterwarnings("ignore:the base model scores 0")
def test_budget_skips_the_remaining_runs_and_says_so(calib):
    settings = calib.Settings(
        steps=1,
        batch=2,
        lrs={"full_ft": [1e-3, 1e-4], "cofitune": [1e-2]},
        n_train=4,
        n_test=2,
        n_probes=2,
        n_general=1,
        arithmetic_new_tokens=2,
        probe_new_tokens=2,
        general_max_length=32,
    )
    summary = calib.run_calibration(
        lambda: tiny_model("llama", num_layers=8), tiny_tokenizer(), settings, progress=False, budget_seconds=1e-9
    )
    assert [r["method"] for r in summary["runs"]] == ["full_ft"]  # the first run always goes
    assert summary["skipped"] == [
        {"method": "cofitune", "learning_rate": 1e-2},
        {"method": "full_ft", "learning_rate": 1e-4},
    ]
    assert "budget" in summary["skipped_reason"] and not summary["complete"]
    assert calib.projected_seconds("cofitune", summary["runs"]) > 0  # falls back to the other method's runs
