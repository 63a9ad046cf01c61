"""`cofitune demo`: the reduced comparison end to end on a tiny model (speciality made continuous so it always moves)."""

from __future__ import annotations

import argparse
import json
import re

import pytest
from test_compare import GENERAL, TEST, TRAIN, VAL, NegLoss
from tiny_models import tiny_model, tiny_tokenizer

from cofitune_peft import CoFiTuneError
from cofitune_peft.kit import demo
from cofitune_peft.kit.compare import EvalSplit
from cofitune_peft.kit.evaluation import VersatilityEval


def _fake_task(task, tokenizer, **kwargs):
    val = EvalSplit(NegLoss(VAL, "val"), VersatilityEval(GENERAL[:3], tokenizer=tokenizer, progress=False))
    test = EvalSplit(NegLoss(TEST, "test"), VersatilityEval(GENERAL[3:], tokenizer=tokenizer, progress=False))
    return TRAIN, {"validation": val, "test": test}, GENERAL


def _tiny_loader(name, base_model_id=None):
    from cofitune_peft.hub import set_base_model_id

    def load():
        model = tiny_model(num_layers=4)
        if base_model_id is not None:
            set_base_model_id(model, base_model_id)
        return model

    return load, tiny_tokenizer()


def test_demo_runs_the_reduced_comparison_and_saves_the_selected_adapter(tmp_path, monkeypatch, capsys):
    from cofitune_peft.kit.compare import tasks

    monkeypatch.setattr(tasks, "task_splits", _fake_task)
    monkeypatch.setattr(tasks, "model_loader", _tiny_loader)
    parser = argparse.ArgumentParser()
    demo.add_demo_arguments(parser)
    argv = [
        "--quick",
        "--output-dir",
        str(tmp_path),
        "--steps",
        "2",
        "--no-progress",
        "--base-model-id",
        "tiny-org/base",
    ]
    args = parser.parse_args(argv)
    assert demo.demo_command(args) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "demo.json").read_text())
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert list(comparison["selected"]) == list(demo.METHODS)
    assert all(len(demo.QUICK.grids[m]) == 1 for m in demo.METHODS[1:])
    assert all(len(demo.DEFAULT.grids[m]) == 3 for m in demo.METHODS[1:])
    # every trained point of the mask method saved its adapter; the demo names the selected one
    assert summary["adapter"].endswith(comparison["selected"][demo.DEMO_MASK]["key"])
    assert (tmp_path / "adapters").is_dir() and len(list((tmp_path / "adapters").iterdir())) == 1
    # ready to publish: the base model's Hub id (--base-model-id), the task type and the training settings
    config = json.loads(
        (tmp_path / "adapters" / comparison["selected"][demo.DEMO_MASK]["key"] / "adapter_config.json").read_text()
    )
    assert config["base_model_name_or_path"] == "tiny-org/base" and config["task_type"] == "CAUSAL_LM"
    assert config["training_info"]["steps"] == 2 and config["training_info"]["trainer"] == "cofitune-peft train_sft"
    assert len(summary["verdict"]) == 4 and "Verdict" in out and "LoRA" in out
    assert (tmp_path / "comparison.png").stat().st_size > 0


def test_demo_refuses_methods_it_does_not_compare(tmp_path):
    parser = argparse.ArgumentParser()
    demo.add_demo_arguments(parser)
    with pytest.raises(CoFiTuneError, match="osf"):
        demo.demo_command(parser.parse_args(["--output-dir", str(tmp_path), "--lr", "osf=1e-4,2e-4,3e-4"]))
    with pytest.raises(CoFiTuneError, match="--steps"):
        demo.demo_command(parser.parse_args(["--output-dir", str(tmp_path), "--steps", "0"]))


def test_demo_says_what_to_do_when_runs_are_too_short_to_learn(tmp_path, monkeypatch):
    def too_short(*args, **kwargs):
        raise CoFiTuneError(
            "Spec. is undefined: full fine-tuning did not change the speciality score (base 0, full 0)"
        )

    monkeypatch.setattr(demo, "run_demo", too_short)
    parser = argparse.ArgumentParser()
    demo.add_demo_arguments(parser)
    with pytest.raises(CoFiTuneError, match=r"too short.*raise `--steps`"):
        demo.demo_command(parser.parse_args(["--quick", "--output-dir", str(tmp_path)]))


def test_verdict_says_within_noise_below_one_item_and_names_the_interval_above():
    from test_compare_precision import _record

    from cofitune_peft.kit.compare import ComparisonResult
    from cofitune_peft.kit.compare.methods import resolve_methods

    def verdict_for(cofitune_split):
        records = [
            _record("base", None, spec=0, gen=1, mc=1, ce=2.0, kl=0.0),
            _record("full", 1e-4, spec=1, gen=0, mc=1, ce=3.0, kl=0.4),
            _record("lora", 1e-3, spec=1, gen=1, mc=0, ce=2.4, kl=0.2),
            _record("cofitune", 3e-4, **cofitune_split),
        ]
        result = ComparisonResult(records, resolve_methods(["lora", "cofitune"]), seed=0, weight=0.5)
        return demo.verdict(result, baselines=("lora",), cofitune=("cofitune",))

    # Vers. 0.007 above LoRA's: less than one probe's worth (0.25 here) is noise, not a win
    (line,) = verdict_for({"spec": 1, "gen": 1, "mc": 0, "ce": 2.37, "kl": 0.2})
    assert re.search(r"Vers\. [\d.]+ vs [\d.]+ \(within noise: less than one item", line), line
    # two probes more: beyond the item noise, and the demo says it ran one seed
    (line,) = verdict_for({"spec": 1, "gen": 1, "mc": 1, "ce": 2.0, "kl": 0.0})
    assert re.search(r"Vers\. [\d.]+ vs [\d.]+ \(\+[\d.]+, beyond the item noise .*; one seed\)", line), line
