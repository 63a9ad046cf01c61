"""compare_methods: grids, validation-only selection, caching and resume, retention capping, the method builders."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model, tiny_tokenizer

from cofitune_peft import CoFiTuneError
from cofitune_peft.kit.compare import (
    METHODS,
    ComparisonResult,
    EvalSplit,
    MethodSettings,
    PenaltyToBase,
    add_compare_arguments,
    capped_retention,
    compare_methods,
    select,
)
from cofitune_peft.kit.compare import runner as runner_module
from cofitune_peft.kit.compare.command import parse_grids
from cofitune_peft.kit.evaluation import VersatilityEval
from cofitune_peft.kit.training import collate, encode_example, pad_id_of

TRAIN = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(10, 16) for b in range(20, 24)]
VAL = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(30, 33) for b in range(40, 42)]
TEST = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(50, 53) for b in range(60, 62)]
GENERAL = [
    "The river runs through the old town and past the mill.",
    "Paris is the capital of France; Rome is the capital of Italy.",
    "A library keeps books, maps and old newspapers for readers.",
    "Mountains rise to the north of the valley, snow on the peaks.",
    "The market opens at dawn and closes when the bell rings.",
    "Ships sailed from the harbour carrying grain and wool.",
]


class NegLoss:
    """A continuous speciality: minus the completion loss on `examples` (it moves after any training step)."""

    def __init__(self, examples, name):
        self.examples, self.name = examples, name
        self.fingerprint = f"negloss-{name}"
        self.calls = 0

    @torch.no_grad()
    def __call__(self, model, tokenizer):
        self.calls += 1
        pairs = [encode_example(tokenizer, ex, 64) for ex in self.examples]
        batch = collate(pairs, pad_id_of(tokenizer))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return -float(
            F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        )


class Poisoned(NegLoss):
    """Test scores that would flip any choice made from them: the opposite of the true score, plus noise."""

    def __call__(self, model, tokenizer):
        return -10.0 * super().__call__(model, tokenizer) + float(torch.rand(()))


def _splits(tok, poisoned=False):
    val = EvalSplit(NegLoss(VAL, "val"), VersatilityEval(GENERAL[:3], tokenizer=tok, progress=False))
    spec = (Poisoned if poisoned else NegLoss)(TEST, "test")
    test = EvalSplit(spec, VersatilityEval(GENERAL[3:], tokenizer=tok, progress=False))
    return val, test


def _loader():
    return tiny_model(num_layers=4)


FAST = {"steps": 2, "batch_size": 4, "max_length": 32, "progress": False}


def test_all_methods_end_to_end_resume_and_settings_mismatch(tmp_path, monkeypatch):
    import cofitune_peft

    tok = tiny_tokenizer()
    val, test = _splits(tok)
    grids = {name: (1e-3, 1e-2) for name, m in METHODS.items() if m.trains}
    derived = [m for m in METHODS.values() if m.derived_from is not None]
    grids.update({m.name: (0.5, 1.0) for m in derived})
    replay = [{"prompt": "Say hello.", "completion": "Hello!"}, {"prompt": "Name a colour.", "completion": "Blue."}]
    settings = MethodSettings(general_texts=GENERAL, lora_rank=2, corda_samples=4, replay_examples=replay)
    importance_kwargs = {"num_samples": 4, "batch_size": 2}
    kwargs = {"tokenizer": tok, "validation": val, "test": test, "output_dir": str(tmp_path), "learning_rates": grids,
                  "methods": list(METHODS), "settings": settings, "importance_kwargs": importance_kwargs}  # fmt: skip
    estimates = []
    real_estimate = cofitune_peft.estimate_importance
    monkeypatch.setattr(
        cofitune_peft, "estimate_importance", lambda *a, **k: estimates.append(k) or real_estimate(*a, **k)
    )
    result = compare_methods(_loader, TRAIN, seeds=[1], **kwargs, **FAST)
    names = set(METHODS)
    assert set(result.selected) == names and set(result.best_speciality) == names
    # Every grid point is on the frontier: 2 learning rates per trained method, 2 x 2 points per derived one, the base.
    trained = [m for m in METHODS.values() if m.trains]
    assert len(result.frontier) == 2 * len(trained) + 4 * len(derived) + 1
    for row in result.frontier:
        for split in ("validation", "test"):
            s = row[split]
            assert s["vers"] <= 1.0 + 1e-12 and s["vers"] <= s["vers_uncapped"] + 1e-12
            assert s["ce_increase"] is not None and s["kl"] is not None
    base = next(r for r in result.frontier if r["method"] == "base")
    assert base["test"]["spec"] == 0.0 and base["test"]["vers_uncapped"] == pytest.approx(1.0)
    # Every derived method at 1 is its parent's run itself (WiSE-FT: full fine-tuning; strength 1: the adapter).
    for method in derived:
        for lr in (1e-3, 1e-2):
            parent = next(
                r for r in result.frontier if r["method"] == method.derived_from and r["learning_rate"] == lr
            )
            point = next(
                r
                for r in result.frontier
                if r["method"] == method.name and r["learning_rate"] == lr and r["alpha"] == 1
            )
            assert point["test"]["speciality_raw"] == pytest.approx(parent["test"]["speciality_raw"], abs=1e-5)
    # Cache file names are those of earlier versions, so existing comparison folders resume.
    assert (tmp_path / "runs" / "wiseft_lr0.001_a0.5_s0.json").is_file()
    assert (tmp_path / "runs" / "full_lr0.01_s0.json").is_file()
    # Every importance (the shared one, and those of the variants with their own spec) used the comparison's settings.
    assert len(estimates) >= 3 and all(k["batch_size"] == 2 and k["num_samples"] == 4 for k in estimates)
    costs = result.methods
    assert costs["lora"]["step_time_vs_lora"] == pytest.approx(1.0)
    assert costs["full"]["trainable_parameters"] > costs["lora"]["trainable_parameters"] > 0
    assert costs["l2"]["trainable_parameters"] == costs["full"]["trainable_parameters"]
    assert costs["base"]["trainable_parameters"] == 0
    assert all(costs[m.name]["step_time_vs_lora"] is None for m in derived)
    assert all(costs[m.name]["step_time_vs_lora"] > 0 for m in trained)
    # The selected points ran again with seed 1.
    assert all(row["seeds"]["seeds"] == [0, 1] for name, row in result.selected.items() if name != "base")
    assert math.isfinite(result.selected["lora"]["seeds"]["uni"][1])
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"comparison.{ext}").stat().st_size > 0
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["selected"]["lora"]["learning_rate"] == result.selected["lora"]["learning_rate"]
    assert "Frontier" in (tmp_path / "comparison.md").read_text()

    # Resume: every run is cached, nothing trains again, the same result comes back.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner_module, "train_sft", no_training)
    again = compare_methods(_loader, TRAIN, seeds=[1], **kwargs, **FAST)
    assert again.to_dict() == result.to_dict()
    with pytest.raises(CoFiTuneError, match="other settings"):
        compare_methods(_loader, TRAIN, **kwargs, **{**FAST, "steps": 3})


def test_killed_comparison_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    val, test = _splits(tok)
    calls = []
    real = runner_module.train_sft

    def dies_on_third(*args, **kwargs):
        calls.append(kwargs["learning_rate"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    kwargs = {"tokenizer": tok, "validation": val, "test": test, "output_dir": str(tmp_path), "methods": ["lora"],
                  "learning_rates": {"full": (1e-3,), "lora": (1e-3, 3e-3, 1e-2)}}  # fmt: skip
    monkeypatch.setattr(runner_module, "train_sft", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        compare_methods(_loader, TRAIN, **kwargs, **FAST)
    done = {p.name for p in (tmp_path / "runs").glob("*.json")}
    assert len(done) == 3  # base, full, the first LoRA run
    calls.clear()
    monkeypatch.setattr(runner_module, "train_sft", real)
    monkeypatch.setattr(runner_module, "train_sft", lambda *a, **k: calls.append(k["learning_rate"]) or real(*a, **k))
    compare_methods(_loader, TRAIN, **kwargs, **FAST)
    assert calls == [3e-3, 1e-2]


def test_post_hoc_strength_traces_the_parent_run_without_training(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    val, test = _splits(tok)
    calls = []
    real = runner_module.train_sft
    monkeypatch.setattr(runner_module, "train_sft", lambda *a, **k: calls.append(k["learning_rate"]) or real(*a, **k))
    grids = {"full": (1e-3,), "cofitune": (1e-2, 3e-2), "cofitune_alpha": (0.0, 0.5, 1.0)}
    # The parent is compared too although only the derived method is named.
    result = compare_methods(_loader, TRAIN, tokenizer=tok, validation=val, test=test, output_dir=str(tmp_path),
                             methods=["cofitune_alpha"], learning_rates=grids, **FAST)  # fmt: skip
    assert list(result.selected) == ["base", "full", "cofitune", "cofitune_alpha"]
    assert sorted(calls) == [1e-3, 1e-2, 3e-2]  # one training run per parent grid point, none for the 6 alphas
    points = {(r["learning_rate"], r["alpha"]): r for r in result.frontier if r["method"] == "cofitune_alpha"}
    assert set(points) == {(lr, a) for lr in (1e-2, 3e-2) for a in (0.0, 0.5, 1.0)}
    assert result.methods["cofitune_alpha"]["trainable_parameters"] == 0
    base = next(r for r in result.frontier if r["method"] == "base")
    for lr in (1e-2, 3e-2):
        parent = next(r for r in result.frontier if r["method"] == "cofitune" and r["learning_rate"] == lr)
        for split in ("validation", "test"):
            for key in ("speciality_raw", "vers_uncapped", "ce_increase", "kl"):
                # strength 1 is the trained adapter, strength 0 the base model, exactly
                assert points[(lr, 1.0)][split][key] == pytest.approx(parent[split][key], abs=1e-6), (lr, split, key)
                assert points[(lr, 0.0)][split][key] == pytest.approx(base[split][key], abs=1e-6), (lr, split, key)
        assert points[(lr, 0.5)]["test"]["speciality_raw"] != pytest.approx(parent["test"]["speciality_raw"], abs=1e-6)
    assert result.selected["cofitune_alpha"]["alpha"] in (0.0, 0.5, 1.0)  # selectable like any grid point
    # A new value is scored on a fresh training of its parent (the trained adapter is not kept); cached ones are not.
    calls.clear()
    grids["cofitune_alpha"] = (0.0, 0.5, 1.0, 0.75)
    again = compare_methods(_loader, TRAIN, tokenizer=tok, validation=val, test=test, output_dir=str(tmp_path),
                            methods=["cofitune_alpha"], learning_rates=grids, **FAST)  # fmt: skip
    assert sorted(calls) == [1e-2, 3e-2]
    assert sum(r["method"] == "cofitune_alpha" for r in again.frontier) == 8
    cofitune_rows = [r for r in again.frontier if r["method"] == "cofitune"]
    assert cofitune_rows == [r for r in result.frontier if r["method"] == "cofitune"]  # the parent's own runs: cached


def test_derived_methods_are_declared_and_checked():
    import dataclasses

    from cofitune_peft.kit.compare import Method, register_method
    from cofitune_peft.kit.compare.methods import interpolate_weights, resolve_methods, scale_strength

    assert METHODS["cofitune_alpha"].derived_from == "cofitune" and METHODS["cofitune_alpha"].derive is scale_strength
    assert METHODS["cofitune_mask_alpha"].derived_from == "cofitune_mask"
    assert METHODS["wiseft"].derive is interpolate_weights
    assert list(resolve_methods(["cofitune_mask_alpha"])) == ["base", "full", "cofitune_mask", "cofitune_mask_alpha"]
    with pytest.raises(CoFiTuneError, match=r"lie in \[0, 1\]"):
        resolve_methods(["wiseft"], {"wiseft": [0.5, 1.5]})
    assert resolve_methods(["cofitune_alpha"], {"cofitune_alpha": [0, 1.5]})["cofitune_alpha"].learning_rates == (
        0,
        1.5,
    )
    with pytest.raises(CoFiTuneError, match="both `derived_from` and `derive`"):
        register_method(dataclasses.replace(METHODS["wiseft"], name="x", derive=None))
    with pytest.raises(CoFiTuneError, match="trains nothing"):
        register_method(Method("x", METHODS["full"].build, (0.5,), "x", derived_from="full", derive=scale_strength))
    assert "x" not in METHODS
    # The derivations themselves: WiSE-FT interpolates every weight; the strength needs a CoFiTune model.
    model = tiny_model(num_layers=2, tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    base_state = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    half = interpolate_weights(model, base_state, 0.5).state_dict()
    for key, start in base_state.items():  # tied weights too: interpolated once
        torch.testing.assert_close(half[key], start + 0.5, msg=key)
        torch.testing.assert_close(model.state_dict()[key], start + 1.0, msg=key)  # the trained model is left alone
    with pytest.raises(CoFiTuneError, match="needs a CoFiTune model"):
        scale_strength(model, base_state, 0.5)


def test_selection_never_reads_the_test_split(tmp_path):
    tok = tiny_tokenizer()
    grids = {"full": (1e-3, 3e-3, 1e-2), "lora": (1e-3, 3e-3, 1e-2), "cofitune": (1e-3, 3e-3, 1e-2)}
    picks = []
    for i, poisoned in enumerate((False, True)):
        val, test = _splits(tok, poisoned=poisoned)
        result = compare_methods(_loader, TRAIN, tokenizer=tok, validation=val, test=test,
                                 output_dir=str(tmp_path / str(i)), methods=["lora", "cofitune"],
                                 learning_rates=grids, **FAST)  # fmt: skip
        assert test.speciality.calls == 10  # test scores are computed (for the report) ...
        picks.append(
            (
                {m: (r["learning_rate"], r["alpha"]) for m, r in result.selected.items()},
                {m: (r["learning_rate"], r["alpha"]) for m, r in result.best_speciality.items()},
                result.reference,
            )
        )
    assert picks[0] == picks[1]  # ... but poisoned test scores change no choice
    # The choice is a function of the validation half alone.
    rows = [
        {"method": "a", "learning_rate": 1e-3, "alpha": None, "uni": 0.7, "speciality_raw": 0.1},
        {"method": "a", "learning_rate": 1e-2, "alpha": None, "uni": 0.6, "speciality_raw": 0.9},
    ]
    assert select(rows) == {"a": {"uni": ("a", 1e-3, None), "speciality": ("a", 1e-2, None)}}


def test_retention_is_capped_for_ranking():
    record = {"score": 1.1, "components": {"probes_mc": 1.5, "ce": 0.9}, "weights": {"probes_mc": 1.0, "ce": 1.0}}
    uncapped, capped = capped_retention(record, None)
    assert uncapped == 1.1 and capped == pytest.approx(0.95)  # the probe that rose cannot pay for the drift
    assert capped_retention({"score": 3.0}, 2.0) == (1.5, 1.0)
    with pytest.raises(CoFiTuneError, match="base model's versatility"):
        capped_retention({"score": 3.0}, 0.0)

    # A grid point whose versatility rose above the base model's by noise does not win selection over one that kept
    # it at 1.0 with more speciality.
    def rec(method, lr, spec, vers):
        split = {"speciality": spec, "versatility": {"score": vers}}
        return {"method": method, "learning_rate": lr, "alpha": None, "seed": 0, "validation": split, "test": split}

    records = [
        rec("base", None, 0.0, 1.0),
        rec("full", 1e-3, 1.0, 0.5),
        rec("x", 1e-3, 0.6, 1.3),
        rec("x", 1e-2, 0.7, 1.0),
    ]
    methods = {m: METHODS[m] for m in ("base", "full")} | {"x": METHODS["lora"]}
    result = ComparisonResult(records, methods, seed=0, weight=0.5)
    assert result.selected["x"]["learning_rate"] == 1e-2
    assert result.selected["x"]["validation"]["uni_uncapped"] < 0.95  # uncapped it would have lost


@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_penalty_to_base_adds_the_penalty_gradient(kind, micro_batches):
    model = tiny_model(num_layers=2)
    wrapped = PenaltyToBase(model, kind, strength=0.3, micro_batches=micro_batches)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids = torch.randint(3, 100, (2, 8))
    wrapped.train()
    for _ in range(micro_batches):  # train_sft's micro-batches: the penalty enters once per step in total
        wrapped(input_ids=ids).logits.float().logsumexp(-1).mean().div(micro_batches).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = model(input_ids=ids).logits.float().logsumexp(-1).mean() + wrapped.penalty()
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)
    assert wrapped.unwrap() is model and wrapped.last_penalty > 0
    wrapped.eval()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids).logits, model(input_ids=ids).logits)


def test_builders_keep_the_base_function_at_init():
    tok = tiny_tokenizer()
    ids = torch.randint(3, 100, (2, 8))
    ref = tiny_model(num_layers=4)(input_ids=ids).logits
    settings = MethodSettings(tokenizer=tok, general_texts=GENERAL, lora_rank=2, corda_samples=4)
    for name in ("full", "lora", "cofitune", "corda_kpm", "osf", "l1"):
        built = METHODS[name].build(tiny_model(num_layers=4), settings)
        built.eval()
        with torch.no_grad():
            torch.testing.assert_close(built(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4, msg=name)
        assert any(p.requires_grad for p in built.parameters()), name
    with pytest.raises(CoFiTuneError, match=r"needs `settings\.importance`"):
        METHODS["cofitune_mask"].build(tiny_model(num_layers=4), settings)


def test_bad_arguments_raise(tmp_path):
    tok = tiny_tokenizer()
    val, test = _splits(tok)
    common = {"tokenizer": tok, "output_dir": str(tmp_path), "steps": 1}
    with pytest.raises(CoFiTuneError, match="unknown"):
        compare_methods(_loader, TRAIN, validation=val, test=test, methods=["nope"], **common)
    with pytest.raises(CoFiTuneError, match="must be disjoint"):
        compare_methods(_loader, TRAIN, validation=val, test=val, **common)
    leaky = EvalSplit(NegLoss(TRAIN[:2], "leak"), test.versatility)
    with pytest.raises(CoFiTuneError, match="training data"):
        compare_methods(_loader, TRAIN, validation=val, test=leaky, methods=["lora"], **common)
    with pytest.raises(CoFiTuneError, match="positive values"):
        compare_methods(
            _loader, TRAIN, validation=val, test=test, methods=["lora"], learning_rates={"lora": [0]}, **common
        )
    with pytest.raises(CoFiTuneError, match="`steps`"):
        compare_methods(_loader, TRAIN, validation=val, test=test, **{**common, "steps": 0})
    with pytest.raises(CoFiTuneError, match="general text"):
        compare_methods(_loader, TRAIN, validation=val, test=test, methods=["cofitune_mask"],
                        learning_rates={"full": [1e-3], "cofitune_mask": [1e-3]}, progress=False, **common)  # fmt: skip


def test_cli_arguments():
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    args = parser.parse_args(["--steps", "5", "--output-dir", "x", "--lr", "lora=1e-4,1e-3", "--seeds", "1,2"])
    assert parse_grids(args.lr) == {"lora": [1e-4, 1e-3]}
    with pytest.raises(CoFiTuneError, match="METHOD=v1"):
        parse_grids(["lora"])


def test_seeds_run_only_for_seed_methods(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    val, test = _splits(tok)
    calls = []
    real = runner_module.train_sft
    monkeypatch.setattr(
        runner_module, "train_sft", lambda *a, **k: calls.append((k["learning_rate"], k["seed"])) or real(*a, **k)
    )
    grids = {"full": (1e-3,), "lora": (1e-3, 1e-2)}
    result = compare_methods(_loader, TRAIN, tokenizer=tok, validation=val, test=test, output_dir=str(tmp_path),
                             methods=["lora"], learning_rates=grids, seeds=[1], seed_methods=["lora"], **FAST)  # fmt: skip
    lora_lr = result.selected["lora"]["learning_rate"]
    assert sorted(c for c in calls if c[1] == 1) == [(lora_lr, 1)]  # full fine-tuning kept its one seed
    with pytest.raises(CoFiTuneError, match="seed_methods"):
        compare_methods(_loader, TRAIN, tokenizer=tok, validation=val, test=test, output_dir=str(tmp_path),
                        methods=["lora"], learning_rates=grids, seeds=[1], seed_methods=["osf"], **FAST)  # fmt: skip


def test_full_preset_fills_unset_options_and_keeps_given_ones():
    from cofitune_peft.kit.compare.command import FULL_DEFAULTS, FULL_GRIDS, FULL_METHODS, _with_defaults

    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    args = _with_defaults(parser.parse_args(["--preset", "full", "--output-dir", "x"]))
    assert args.steps == FULL_DEFAULTS["steps"] and args.n_eval == FULL_DEFAULTS["n_eval"]
    assert args.methods.split(",") == list(FULL_METHODS) and set(FULL_METHODS) <= set(METHODS)
    assert args.grids == {k: v for k, v in FULL_GRIDS.items() if k in FULL_METHODS}
    assert all(len(v) >= 2 for k, v in FULL_GRIDS.items() if METHODS[k].trains)
    assert args.seed_methods == FULL_DEFAULTS["seed_methods"] == "auto" and args.n_test == FULL_DEFAULTS["n_test"]
    # a subset of methods: the preset's grids shrink to it; flags win over the preset
    given = ["--preset", "full", "--output-dir", "x", "--methods", "lora", "--steps", "7", "--lr", "lora=1e-3,2e-3",
             "--seed-methods", "full,lora,osf"]  # fmt: skip
    args = _with_defaults(parser.parse_args(given))
    assert args.steps == 7 and args.grids == {"full": FULL_GRIDS["full"], "lora": [1e-3, 2e-3]}
    assert args.seed_methods == "full,lora,osf"  # a flag is taken as given
    plain = _with_defaults(parser.parse_args(["--preset", "words", "--output-dir", "x", "--steps", "3"]))
    assert plain.n_eval == 100 and plain.grids == {} and plain.seeds == ""
    with pytest.raises(CoFiTuneError, match="--steps"):
        _with_defaults(parser.parse_args(["--preset", "words", "--output-dir", "x"]))
    with pytest.raises(CoFiTuneError, match="--task"):
        _with_defaults(
            parser.parse_args(["--preset", "words", "--task", "words", "--output-dir", "x", "--steps", "1"])
        )


def test_report_only_trains_nothing_and_reports_the_cached_runs(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    val, test = _splits(tok)
    kwargs = {"tokenizer": tok, "validation": val, "test": test, "output_dir": str(tmp_path), "methods": ["lora"],
              "learning_rates": {"full": (1e-3,), "lora": (1e-3, 1e-2)}}  # fmt: skip
    monkeypatch.setattr(runner_module, "train_sft", lambda *a, **k: pytest.fail("report_only trained"))
    with pytest.raises(CoFiTuneError, match="base model's run is missing"):
        compare_methods(_loader, TRAIN, report_only=True, **kwargs, **FAST)
    monkeypatch.undo()
    done = compare_methods(_loader, TRAIN, **{**kwargs, "learning_rates": {"full": (1e-3,), "lora": (1e-3,)}}, **FAST)
    monkeypatch.setattr(runner_module, "train_sft", lambda *a, **k: pytest.fail("report_only trained"))
    again = compare_methods(_loader, TRAIN, report_only=True, **kwargs, **FAST)  # lora 1e-2 never ran: left out
    assert again.frontier == done.frontier and again.selected.keys() == done.selected.keys()
