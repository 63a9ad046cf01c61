"""Precision and the new methods of the comparison: paired bootstrap intervals, the real/noise rule, split sizes,
the fine levels that are not a learning rate (importance pull, restraint outside the window) and replay."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_model, tiny_tokenizer

from cofitune_peft import CoFiTuneConfig, CoFiTuneError, Importance
from cofitune_peft.kit.compare import ComparisonResult, EvalSplit, MethodSettings, compare_methods
from cofitune_peft.kit.compare.command import FULL_TASK_DEFAULTS, _task_defaults
from cofitune_peft.kit.compare.fine_levels import (
    ImportancePull,
    ReplayMix,
    build_cofitune_l2out,
    restrained_importance,
)
from cofitune_peft.kit.compare.intervals import call_difference, interval, resample
from cofitune_peft.kit.compare.methods import resolve_methods
from cofitune_peft.kit.compare.tasks import plain_format, task_replay, task_splits
from cofitune_peft.kit.evaluation import SpecialityEval, VersatilityEval

WEIGHTS = {"probes_gen": 1.0, "probes_mc": 1.0, "ce": 1.0, "kl": 1.0}


def _split(spec, gen, mc, ce, kl, tokens=4, base_ce=0.5, base_gen=1.0, base_mc=1.0):
    components = {"probes_gen": gen / base_gen, "probes_mc": mc / base_mc, "ce": math.exp(-(ce / tokens - base_ce)),
                  "kl": math.exp(-kl / tokens)}  # fmt: skip
    score = sum(components.values()) / 4
    return {
        "speciality": spec,
        "versatility": {"score": score, "components": components, "weights": WEIGHTS},
        "items": {
            "speciality": [spec],
            "probes_gen": [gen],
            "probes_mc": [mc],
            "ce_sum": [ce],
            "kl_sum": [kl],
            "tokens": [tokens],
        },
    }


def _record(method, lr, seed=0, **split):
    return {"key": f"{method}_{lr}_s{seed}", "method": method, "learning_rate": lr, "alpha": None, "seed": seed,
            "train": None, "validation": _split(**split), "test": _split(**split)}  # fmt: skip


def _result(extra=()):
    records = [
        _record("base", None, spec=0, gen=1, mc=1, ce=2.0, kl=0.0),
        _record("full", 1e-4, spec=1, gen=0, mc=1, ce=3.0, kl=0.4),
        _record("lora", 1e-3, spec=1, gen=1, mc=0, ce=2.4, kl=0.2),
        *extra,
    ]
    return ComparisonResult(records, resolve_methods(["lora"]), seed=0, weight=0.5)


def test_bootstrap_draws_of_single_item_splits_are_the_point_scores():
    result = _result()
    draws = result.draws("test")
    for row in result.frontier:
        for metric in ("spec", "vers", "uni"):
            assert draws[row["key"]][metric] == pytest.approx(row["test"][metric], abs=1e-12)
    lora, full = result.selected["lora"]["key"], result.selected["full"]["key"]
    diff = result.selected["lora"]["test"]["uni"] - result.selected["full"]["test"]["uni"]
    assert result.interval(lora, full, "uni") == pytest.approx((diff, diff))


def test_bootstrap_interval_of_a_difference_covers_it_and_shrinks_with_items():
    rng = torch.Generator().manual_seed(0)

    def records(n):
        def items(p):
            return (torch.rand(n, generator=rng) < p).int().tolist()

        out = []
        for method, lr, p in (("base", None, 0.0), ("full", 1e-4, 0.8), ("lora", 1e-3, 0.6)):
            split = {"speciality": 0.0, "versatility": {"score": 1.0, "components": {"probes_gen": 1.0},
                     "weights": WEIGHTS}, "items": {"speciality": items(p), "probes_gen": [1] * n}}  # fmt: skip
            out.append({"key": method, "method": method, "learning_rate": lr, "seed": 0, "test": split})
        return {r["key"]: r for r in out}

    widths = []
    for n in (20, 500):
        draws = resample(records(n), "base", "full", "test", n=500)
        low, high = interval(draws["lora"]["spec"], draws["full"]["spec"])
        widths.append(high - low)
        assert low < 0 < high or high < 0  # lora learned less
    assert widths[1] < widths[0] / 2


@pytest.mark.parametrize(
    "diff, spread, bounds, call",
    [
        (0.10, 0.05, (0.02, 0.18), "real"),
        (0.10, 0.15, (0.02, 0.18), "noise"),  # within the seed spread
        (0.10, 0.05, (-0.01, 0.2), "noise"),  # the interval holds 0
        (0.10, None, (0.02, 0.18), "unmeasured"),  # one seed
        (0.10, None, (-0.02, 0.18), "noise"),
        (0.10, 0.05, None, "unmeasured"),  # no per-item values
        (math.nan, 0.05, (0.02, 0.18), "unmeasured"),
    ],
)
def test_call_difference(diff, spread, bounds, call):
    assert call_difference(diff, spread, bounds) == call


def test_difference_uses_seed_spread_and_interval_and_item_worth():
    extra = [_record("lora", 1e-3, seed=1, spec=1, gen=1, mc=1, ce=2.0, kl=0.0),
             _record("full", 1e-4, seed=1, spec=1, gen=0, mc=1, ce=3.0, kl=0.4)]  # fmt: skip
    for r in extra:
        del r["validation"]  # a seed's repeat is scored on test only
    result = _result(extra)
    d = result.difference("lora", "full", "vers")
    assert d["spread"] is not None and d["interval"] is not None and d["call"] in ("real", "noise")
    assert d["diff"] == pytest.approx(
        result.selected["lora"]["seeds"]["vers"][0] - result.selected["full"]["seeds"]["vers"][0]
    )
    assert result.item_worth("spec") == pytest.approx(1.0) and result.item_worth("vers") == pytest.approx(0.25)
    pairs = result.to_dict()["differences"]
    assert {(p["a"], p["b"]) for p in pairs} == {("full", "lora")}


def _tiny_splits(tok):
    def items(lo):
        return [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(lo, lo + 3)]

    probes = [{"prompt": "Sky?", "answer": "blue", "subject": "sky"}, {"prompt": "Sky?", "options": ["blue", "red"],
              "answer": "blue", "subject": "sky"}]  # fmt: skip
    general = ["The river runs past the mill.", "A library keeps old maps.", "Snow lies on the peaks."]
    splits = {}
    for name, lo, texts in (("validation", 10, general[:1]), ("test", 20, general[1:])):
        spec = SpecialityEval.exact_match(items(lo), tokenizer=tok, max_new_tokens=2, progress=False)
        vers = VersatilityEval(texts, [{**p, "prompt": f"{name} {p['prompt']}"} for p in probes], tokenizer=tok,
                               max_new_tokens=2, progress=False)  # fmt: skip
        splits[name] = EvalSplit(spec, vers)
    return splits


@pytest.mark.filterwarnings("ignore:the base model scores 0")
def test_settings_record_split_sizes_and_runs_keep_per_item_values(tmp_path):
    tok = tiny_tokenizer()
    splits = _tiny_splits(tok)
    train = [{"prompt": f"{a}+1=", "completion": str(a + 1)} for a in range(30, 40)]
    with pytest.raises(CoFiTuneError, match=r"Spec\. is undefined"):  # a random tiny model learns nothing: no report
        compare_methods(lambda: tiny_model(num_layers=4), train, tokenizer=tok, validation=splits["validation"],
                        test=splits["test"], steps=1, batch_size=2, max_length=16, output_dir=str(tmp_path),
                        methods=["full"], learning_rates={"full": [1e-3]}, progress=False)  # fmt: skip
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["split_sizes"] == {
        "validation": {"questions": 3, "probes_gen": 1, "probes_mc": 1, "general_texts": 1},
        "test": {"questions": 3, "probes_gen": 1, "probes_mc": 1, "general_texts": 2},
    }
    record = json.loads((tmp_path / "runs" / "full_lr0.001_s0.json").read_text())
    items = record["test"]["items"]
    assert len(items["speciality"]) == 3 and len(items["ce_sum"]) == len(items["tokens"]) == 2
    assert len(items["probes_gen"]) == len(items["probes_mc"]) == 1
    ce = sum(items["ce_sum"]) / sum(items["tokens"])
    assert math.exp(-(ce - (ce - record["test"]["versatility"]["ce_increase"]))) == pytest.approx(
        record["test"]["versatility"]["components"]["ce"]
    )


def _importance(num_layers=4, value=None):
    model = tiny_model(num_layers=num_layers)
    dims = model.config
    torch.manual_seed(0)

    def part(n):
        return torch.rand(num_layers, n) if value is None else torch.full((num_layers, n), value)

    return Importance(heads=part(dims.num_attention_heads), intermediate=part(dims.intermediate_size),
                      output=part(dims.hidden_size), normalized=True)  # fmt: skip


def test_importance_pull_decays_rows_by_importance_and_unwrap_removes_the_hook():
    imp = _importance()
    imp.intermediate[:, ::2] = 1.0  # every other up-projection row is fully important
    imp.intermediate[:, 1::2] = 0.0
    model = get_peft_model(tiny_model(num_layers=4), CoFiTuneConfig(layers=(1, 3), importance=imp,
                                                                     softmask_mode="none"))  # fmt: skip
    pull = ImportancePull(model, strength=10.0)
    deltas = [p for n, p in model.named_parameters() if "cofitune_delta" in n]
    with torch.no_grad():
        for p in deltas:
            p.fill_(1.0)
    optimizer = torch.optim.SGD(deltas, lr=0.01)
    optimizer.step()  # no gradients: only the pull moves the deltas
    up = next(p for n, p in model.named_parameters() if "layers.1.mlp.up_proj" in n and "cofitune_delta" in n)
    assert torch.allclose(up[::2], torch.full_like(up[::2], 0.9)) and torch.allclose(
        up[1::2], torch.ones_like(up[1::2])
    )
    assert pull.unwrap() is model
    optimizer.step()
    assert torch.allclose(up[::2], torch.full_like(up[::2], 0.9))  # the hook is gone
    with pytest.raises(CoFiTuneError, match="needs a CoFiTune model"):
        ImportancePull(tiny_model(), 1.0)


def test_restrained_importance_frees_the_window_ffn_and_slows_the_rest():
    imp = _importance()
    out = restrained_importance(imp, (1, 3), 0.25)
    assert torch.equal(out.intermediate[1:3], torch.zeros_like(out.intermediate[1:3]))
    assert torch.equal(out.output[1:3], torch.zeros_like(out.output[1:3]))
    assert torch.allclose(1 - out.intermediate[0], 0.25 * (1 - imp.intermediate[0]))
    assert torch.allclose(1 - out.heads, 0.25 * (1 - imp.heads))  # attention of every layer, window included
    with pytest.raises(CoFiTuneError, match="`restraint_rate`"):
        restrained_importance(imp, (1, 3), 1.5)


def test_l2_outside_the_window_covers_every_weight_but_the_window_ffn():
    model = tiny_model(num_layers=8)
    wrapped = build_cofitune_l2out(model, MethodSettings(layers=(2, 4)))
    covered = set(wrapped._anchor)
    names = {n for n, _ in model.named_parameters()}
    free = {n for n in names if any(f"layers.{i}.mlp." in n for i in (2, 3))}
    assert free and covered == names - free
    assert all(p.requires_grad for p in model.parameters())


def test_replay_mix_fraction_and_missing_pool():
    train = [{"prompt": str(i), "completion": "x"} for i in range(30)]
    pool = [{"prompt": "general", "completion": "answer"}] * 4
    mixed = ReplayMix(0.25)(train, MethodSettings(replay_examples=pool))
    assert len(mixed) == 40 and sum(x["prompt"] == "general" for x in mixed) == 10
    with pytest.raises(CoFiTuneError, match="replay_examples"):
        ReplayMix(0.1)(train, MethodSettings())
    with pytest.raises(CoFiTuneError, match="`fraction`"):
        ReplayMix(1.0)


def test_knowledge_splits_and_the_plain_format():
    tok = tiny_tokenizer()
    train, splits, general = task_splits("knowledge", tok, n_eval=8, n_test=12, n_general=2, importance_samples=2,
                                         progress=False)  # fmt: skip
    assert len(splits["validation"].speciality.examples) == 8 and len(splits["test"].speciality.examples) == 12
    facts = [{(x["person"], x["attribute"]) for x in s.speciality.examples} for s in splits.values()]
    assert not facts[0] & facts[1]
    assert len(splits["test"].versatility.probes) == 24 and general
    assert all(x["prompt"].endswith("?") or x["prompt"].endswith(".") for x in train)
    plain = plain_format({"prompt": "Where?", "completion": "Here."})
    assert plain == {"prompt": "Question: Where?\nAnswer:", "completion": " Here.", "first_line": True}
    assert "first_line" not in plain_format({"prompt": "Q?", "options": ["a", "b"], "answer": "a"})
    tok.chat_template = None
    _, plain_splits, _ = task_splits("knowledge", tok, n_eval=4, n_general=1, importance_samples=1, progress=False)
    assert all(x["prompt"].startswith("Question: ") and x["first_line"]
               for x in plain_splits["test"].speciality.examples)  # fmt: skip


def test_task_replay_is_made_once_and_kept(tmp_path, monkeypatch):
    from cofitune_peft.kit.data import replay

    calls = []

    def fake_pool(model, tokenizer, **kwargs):
        calls.append(kwargs)
        return [{"prompt": "Give me a tip.", "completion": "Sleep well."}]

    monkeypatch.setattr(replay, "replay_pool", fake_pool)
    tok = tiny_tokenizer()
    splits = _tiny_splits(tok)
    path = str(tmp_path / "replay.json")
    first = task_replay(lambda: tiny_model(num_layers=2), tok, splits, path, n=8)
    again = task_replay(lambda: tiny_model(num_layers=2), tok, splits, path, n=8)
    assert first == again == [{"prompt": "Give me a tip.", "completion": "Sleep well."}] and len(calls) == 1
    assert {p["subject"] for p in calls[0]["exclude"]} == {"sky"}
    task_replay(lambda: tiny_model(num_layers=2), tok, splits, path, n=9)  # other instructions: made again
    assert len(calls) == 2


def test_full_preset_task_defaults_yield_to_flags():
    args = argparse.Namespace(preset="full", steps=40, batch_size=8, given=set())
    knowledge = _task_defaults("knowledge", args)
    assert knowledge.batch_size == FULL_TASK_DEFAULTS["knowledge"]["batch_size"] == 16 and args.batch_size == 8
    assert _task_defaults("arithmetic", args).batch_size == 8
    given = argparse.Namespace(preset="full", steps=7, batch_size=4, given={"batch_size"})
    assert _task_defaults("knowledge", given).batch_size == 4
    from cofitune_peft.kit.compare.command import FULL_GRIDS, FULL_TASK_GRIDS

    grids = {"full": FULL_GRIDS["full"], "lora": (1e-2,)}
    args = argparse.Namespace(preset="full", steps=40, given=set(), grids=grids, lr=["lora=1e-2"])
    knowledge = _task_defaults("knowledge", args)
    assert knowledge.grids["full"] == FULL_TASK_GRIDS["knowledge"]["full"]  # the task's own grid
    assert knowledge.grids["lora"] == (1e-2,)  # a flag's grid stays
    assert "cofitune" not in knowledge.grids and _task_defaults("words", args).grids == grids


def test_equal_speciality_answer_holds_cofitune_against_full_lora_and_replay():
    extra = [_record("cofitune", 3e-4, spec=1, gen=0, mc=0, ce=2.2, kl=0.1),
             _record("full_replay10", 1e-4, spec=1, gen=1, mc=1, ce=2.0, kl=0.0)]  # fmt: skip
    result = ComparisonResult(
        [*_result().__dict__["_records"].values(), *extra],
        resolve_methods(["lora", "cofitune", "full_replay10"]),
        seed=0,
        weight=0.5,
    )
    answer = result.equal_speciality_answer(levels=(1.0,))["1"]
    assert answer["ours"]["method"] == "cofitune" and answer["theirs"]["method"] == "full_replay10"
    assert answer["diff"] < 0 and answer["call"] == "beyond the item noise"
    assert "At equal speciality, the best CoFiTune-family point" in result.to_markdown()


def test_auto_seed_methods_take_the_headline_and_those_near_the_best_on_validation():
    from cofitune_peft.kit.compare.command import auto_seed_methods

    extra = [_record("cofitune", 3e-4, spec=1, gen=1, mc=1, ce=2.0, kl=0.0),
             _record("cofitune_pull", 3e-4, spec=1, gen=1, mc=1, ce=2.1, kl=0.0),
             _record("vsoftmask", 1e-4, spec=0, gen=0, mc=0, ce=4.0, kl=2.0)]  # fmt: skip
    result = ComparisonResult([*_result().__dict__["_records"].values(), *extra],
                              resolve_methods(["lora", "cofitune", "cofitune_pull", "vsoftmask"]), seed=0, weight=0.5)  # fmt: skip
    chosen = auto_seed_methods(result, always=("full", "lora"), margin=0.05, limit=4)
    assert chosen == ["full", "lora", "cofitune", "cofitune_pull"]
    assert auto_seed_methods(result, always=("full",), margin=0.05, limit=2) == ["full", "cofitune"]
    assert "vsoftmask" not in auto_seed_methods(result, margin=0.05, limit=10)


def _fake_preset(monkeypatch, replay_calls=None):
    """`compare --preset full` on the tiny model with the test splits of test_compare; the replay pool is one example
    (each call's path appended to `replay_calls`). Returns `(parser, compare_command)`."""
    from test_compare import GENERAL, TEST, TRAIN, VAL, NegLoss

    from cofitune_peft.kit.compare import add_compare_arguments, command, compare_command

    def fake_splits(task, tokenizer, **kwargs):
        val = EvalSplit(NegLoss(VAL, "val"), VersatilityEval(GENERAL[:3], tokenizer=tokenizer, progress=False))
        test = EvalSplit(NegLoss(TEST, "test"), VersatilityEval(GENERAL[3:], tokenizer=tokenizer, progress=False))
        return TRAIN, {"validation": val, "test": test}, GENERAL

    def fake_replay(*args, **kwargs):
        if replay_calls is not None:
            replay_calls.append(args[3])
        return [{"prompt": "Say hi.", "completion": "Hi."}]

    monkeypatch.setattr(command, "task_splits", fake_splits)
    monkeypatch.setattr(
        command, "model_loader", lambda name, **kw: (lambda: tiny_model(num_layers=4), tiny_tokenizer())
    )
    monkeypatch.setattr(command, "task_replay", fake_replay)
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    return parser, compare_command


def test_compare_command_full_preset_auto_seeds_and_replay(tmp_path, monkeypatch, capsys):
    from cofitune_peft.kit.compare import command

    parser, compare_command = _fake_preset(monkeypatch)
    args = parser.parse_args(["--preset", "full", "--task", "arithmetic", "--output-dir", str(tmp_path), "--steps", "1",
                              "--methods", "base,full,lora,cofitune,full_replay10",
                              "--lr", "lora=1e-3", "--lr", "cofitune=1e-3", "--lr", "full=1e-3,1e-2",
                              "--seeds", "1", "--seed-methods", "auto", "--no-progress"])  # fmt: skip
    assert compare_command(args) == 0
    comparison = json.loads((tmp_path / "arithmetic" / "comparison.json").read_text())
    seeded = {m for m, r in comparison["selected"].items() if r["seeds"]["seeds"] == [0, 1]}
    assert {"full", "lora", "cofitune"} <= seeded and len(seeded) <= command.AUTO_SEEDS_MAX
    # replay trains at the rate its parent's sweep selected on validation, one point
    replay = [r for r in comparison["frontier"] if r["method"] == "full_replay10"]
    assert [r["learning_rate"] for r in replay] == [comparison["selected"]["full"]["learning_rate"]]
    assert comparison["differences"]
    assert "Differences at the selected points" in capsys.readouterr().out


def test_a_preset_resumes_its_folder_with_any_subset_of_methods(tmp_path, monkeypatch):
    """Two processes (or two calls) with different `--methods` share one folder: the replay pool belongs to the task,
    so the settings match and the second call reuses the first one's runs instead of refusing the folder."""
    pools = []
    parser, compare_command = _fake_preset(monkeypatch, pools)

    def run(methods, *grids):
        argv = ["--preset", "full", "--task", "arithmetic", "--output-dir", str(tmp_path), "--steps", "1",
                "--methods", methods, *grids, "--seeds", "", "--no-progress"]  # fmt: skip
        return compare_command(parser.parse_args(argv))

    assert run("base,full,full_replay10", "--lr", "full=1e-3,1e-2") == 0
    runs = tmp_path / "arithmetic" / "runs"
    first = {p.name: p.stat().st_mtime_ns for p in runs.iterdir()}
    assert run("base,full,lora", "--lr", "full=1e-3,1e-2", "--lr", "lora=1e-3") == 0  # no replay method this time
    second = {p.name: p.stat().st_mtime_ns for p in runs.iterdir()}
    assert {k: second[k] for k in first} == first  # the first call's runs are reused, not retrained
    assert set(second) - set(first) == {"lora_lr0.001_s0.json"}
    assert len(pools) == 2  # the pool was asked for both times (its file is the cache)


def test_a_replay_method_alone_sweeps_its_parent_on_the_preset_grid_and_reports_it(tmp_path, monkeypatch):
    """`--methods base,lora_replay10`: LoRA is swept on the preset's grid (not the registry's default one), the replay
    trains at LoRA's selected rate, and `--report-only` reports it (the parent's selection is read from the cache)."""
    from cofitune_peft.kit.compare import command, runner

    monkeypatch.setattr(command, "FULL_GRIDS", {"full": (1e-3,), "lora": (1e-3, 1e-2)})
    parser, compare_command = _fake_preset(monkeypatch)
    argv = ["--preset", "full", "--task", "arithmetic", "--output-dir", str(tmp_path), "--steps", "1",
            "--methods", "base,lora_replay10", "--seeds", "", "--no-progress"]  # fmt: skip
    assert compare_command(parser.parse_args(argv)) == 0
    runs = sorted(p.name for p in (tmp_path / "arithmetic" / "runs").iterdir())
    assert [n for n in runs if n.startswith("lora_lr")] == ["lora_lr0.001_s0.json", "lora_lr0.01_s0.json"]
    assert [n for n in runs if n.startswith("full_lr")] == ["full_lr0.001_s0.json"]
    assert len([n for n in runs if n.startswith("lora_replay10")]) == 1
    monkeypatch.setattr(runner, "train_sft", lambda *a, **k: pytest.fail("--report-only trained"))
    assert compare_command(parser.parse_args([*argv, "--report-only"])) == 0
    comparison = json.loads((tmp_path / "arithmetic" / "comparison.json").read_text())
    assert "lora_replay10" in comparison["selected"] and "lora" not in comparison["selected"]


def test_the_registry_holds_the_fine_levels_and_replay_in_a_fresh_process():
    import subprocess
    import sys

    code = "from cofitune_peft.kit.compare import METHODS; print(sorted(METHODS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("cofitune_pull", "cofitune_restrained", "cofitune_l2out", "full_replay10", "cofitune_replay25"):
        assert name in out
