"""The coarse search: the tree it walks, caching and resume, its result, bad inputs, the CLI; and `train_sft`."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from test_evaluation import GENERAL, char_tokenizer
from tiny_models import tiny_model

from cofitune_peft import CoFiTuneConfig, CoFiTuneError
from cofitune_peft.kit.evaluation import SpecialityEval, VersatilityEval, unified_score
from cofitune_peft.kit.search import (
    LayerSearch,
    SearchResult,
    candidate_key,
    paper_windows,
    refine_windows,
    search_layers,
)
from cofitune_peft.kit.training import IGNORE_INDEX, encode_example, train_sft

N = 8
TRAIN = [{"prompt": f"What is {a} + {b}?", "completion": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]


class Loader:
    """Counts how many fresh models the search asked for."""

    def __init__(self, num_layers: int = N):
        self.calls = 0
        self.num_layers = num_layers

    def __call__(self):
        self.calls += 1
        return tiny_model("llama", num_layers=self.num_layers, seed=0)


def ce_on(texts_or_examples, tok):
    """A cheap evaluator: exp(-mean token CE), on prompt/completion examples or texts."""

    def score(model, tokenizer=None):
        total, count = 0.0, 0
        with torch.no_grad():
            for item in texts_or_examples:
                example = item if isinstance(item, dict) else {"text": item}
                ids, labels = encode_example(tok, example, max_length=64)
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
                target = torch.tensor(labels[1:])
                keep = target != IGNORE_INDEX
                total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
                count += int(keep.sum())
        return math.exp(-total / count)

    return score


def designed(window, modules):
    """(speciality, versatility) known in advance for any candidate, so the expected tree can be worked out."""
    (a, b), size = window, (window[1] - window[0]) / N
    spec = size * {"ffn": 0.8, "mha": 0.5, "ffn+mha": 1.0}[modules] + 0.02 * a
    vers = 1 - size * {"ffn": 0.5, "mha": 0.3, "ffn+mha": 0.9}[modules] - 0.01 * abs((a + b) / 2 - 3)
    return spec, vers


def designed_scores(model):
    if isinstance(model, PeftModel):
        cfg = model.peft_config["default"]
        return designed(cfg.layers, cfg.parts)
    trained = not torch.equal(model.lm_head.weight, tiny_model("llama", num_layers=N, seed=0).lm_head.weight)
    return (1.0, 0.5) if trained else (0.0, 1.0)


def expected_uni(window, modules):
    return unified_score(*designed(window, modules))  # base: (0, 1), full: (1, 0.5), so Spec. = spec, Vers. = vers


def run_search(tmp_path, name="run", speciality=None, versatility=None, loader=None, **kw):
    tok = char_tokenizer()
    kw.setdefault("budget_steps", 2)
    return search_layers(
        loader or Loader(),
        TRAIN,
        ce_on(TRAIN, tok) if speciality is None else speciality,
        ce_on(GENERAL, tok) if versatility is None else versatility,
        tokenizer=tok,
        output_dir=str(tmp_path / name),
        learning_rate=1e-2,
        full_ft_learning_rate=1e-3,
        batch_size=4,
        max_length=32,
        progress=False,
        **kw,
    )


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on 2 shared cores a second one cost up to 7x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ the tree


def test_paper_windows_and_refinements():
    assert paper_windows(30) == [(0, 7), (7, 15), (15, 22), (22, 30), (0, 15), (7, 22), (15, 30)]
    assert paper_windows(8) == [(0, 2), (2, 4), (4, 6), (6, 8), (0, 4), (2, 6), (4, 8)]
    assert paper_windows(2) == [(0, 1), (1, 2)]  # empty quarters and duplicates dropped
    assert refine_windows((7, 15), 30) == [(3, 11), (11, 19), (9, 13), (5, 17)]  # s = round(30/8) = 4, s//2 = 2
    assert refine_windows((0, 2), 8) == [(1, 3), (0, 3)]  # out-of-range and empty neighbours dropped


def test_the_tree_visits_what_it_should(tmp_path):
    spec = lambda m, t=None: designed_scores(m)[0]  # noqa: E731
    vers = lambda m, t=None: designed_scores(m)[1]  # noqa: E731
    loader = Loader()
    result = run_search(tmp_path, speciality=spec, versatility=vers, loader=loader, budget_steps=1, width=2)
    visited = [(r["level"], r["key"]) for r in result.records]
    level1 = paper_windows(N)
    top2 = sorted(level1, key=lambda w: expected_uni(w, "ffn"), reverse=True)[:2]
    level2 = [(w, m) for w in top2 for m in ("mha", "ffn+mha")]
    best = max([(w, "ffn") for w in level1] + level2, key=lambda c: expected_uni(*c))
    level3 = [(w, best[1]) for w in refine_windows(best[0], N)]
    level3 = [c for c in level3 if c not in [(w, "ffn") for w in level1] + level2]
    expected = [("reference", "base"), ("reference", "full")]
    expected += [("window", candidate_key(w, "ffn")) for w in level1]
    expected += [("module", candidate_key(*c)) for c in level2]
    expected += [("refine", candidate_key(*c)) for c in level3]
    assert visited == expected
    assert loader.calls == len(expected)  # one fresh model each (the base model's is reused to count layers)
    # parents: level 2 hangs under its level-1 window, level 3 under the best so far
    for r in result.records:
        if r["level"] == "module":
            assert r["parent"] == candidate_key(tuple(r["window"]), "ffn")
        if r["level"] == "refine":
            assert r["parent"] == candidate_key(*best)
    overall = max(
        [(w, "ffn") for w in level1] + level2 + level3, key=lambda c: (expected_uni(*c), -(c[0][1] - c[0][0]))
    )
    assert (tuple(result.best["window"]), result.best["modules"]) == overall
    assert result.best_config.layers == overall[0] and result.best_config.parts == overall[1]
    row = result.table.loc[candidate_key(*overall)]
    assert row["Uni."] == pytest.approx(expected_uni(*overall))


def test_levels_and_windows_restrict_the_tree(tmp_path):
    result = run_search(tmp_path, windows=[(0, 4), (4, 8)], levels=("window",), budget_steps=1)
    assert [r["key"] for r in result.records] == ["base", "full", "L0-4_ffn", "L4-8_ffn"]
    result = run_search(tmp_path, "r2", windows=[(0, 4), (4, 8)], levels=("window", "module"), width=1)
    assert [r["level"] for r in result.records].count("module") == 2


# ------------------------------------------------------------------ caching and resume


class CrashOn:
    """An evaluator that raises (like Ctrl-C) on its n-th call."""

    def __init__(self, inner, n):
        self.inner, self.n, self.calls = inner, n, 0

    def __call__(self, model, tokenizer=None):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.inner(model, tokenizer)


def test_crash_then_resume_gives_the_uninterrupted_table(tmp_path):
    tok = char_tokenizer()
    kw = {"windows": [(0, 2), (2, 4), (4, 8)], "levels": ("window", "module"), "width": 1}
    clean = run_search(tmp_path, "clean", **kw)

    with pytest.raises(KeyboardInterrupt):  # calls: base, full, first candidate -> crash in flight
        run_search(tmp_path, "crashed", speciality=CrashOn(ce_on(TRAIN, tok), 3), **kw)
    done = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "crashed" / "candidates" / "*")))
    assert done == ["base.json", "full.json"]  # finished ones kept, the in-flight one lost, no temp files

    loader = Loader()
    resumed = run_search(tmp_path, "crashed", loader=loader, **kw)
    assert loader.calls == len(clean.records) - 2  # base and full were not redone
    cols = ["window", "modules", "Spec.", "Vers.", "Uni.", "level"]
    assert list(resumed.table.index) == list(clean.table.index)
    for col in cols:
        a, b = resumed.table[col].tolist(), clean.table[col].tolist()
        assert a == pytest.approx(b, rel=1e-6) if col in ("Spec.", "Vers.", "Uni.") else a == b

    loader = Loader()
    again = run_search(tmp_path, "crashed", loader=loader, **kw)
    assert loader.calls == 0  # everything cached
    assert again.table[cols].equals(resumed.table[cols])


def test_layer_search_is_the_same_search_as_an_object(tmp_path):
    tok = char_tokenizer()
    loader = Loader()
    search = LayerSearch(
        loader, TRAIN, ce_on(TRAIN, tok), ce_on(GENERAL, tok), tokenizer=tok, budget_steps=2,
        output_dir=str(tmp_path / "object"), windows=[(0, 4), (4, 8)], levels=("window",), learning_rate=1e-2,
        full_ft_learning_rate=1e-3, batch_size=4, max_length=32, progress=False,
    )  # fmt: skip
    assert loader.calls == 0 and not os.path.exists(tmp_path / "object")  # building it only checks the arguments
    candidates = tmp_path / "object" / "candidates"
    candidates.mkdir(parents=True)
    stale = candidates / ".L0-4_ffn.json.tmp-x1y2"  # what a killed atomic write leaves behind
    stale.write_text("{")
    result = search.run()
    assert not stale.exists()
    assert sorted(os.listdir(tmp_path / "object")) == ["candidates", "search.json", "settings.json"]
    assert sorted(os.listdir(candidates)) == ["L0-4_ffn.json", "L4-8_ffn.json", "base.json", "full.json"]
    assert search.num_layers == N and search.windows == [(0, 4), (4, 8)]
    assert list(search.records) == ["base", "full", "L0-4_ffn", "L4-8_ffn"]
    # the cache key is sha256 of the sorted settings JSON, 16 characters: caches of earlier versions stay valid
    old_key = hashlib.sha256(json.dumps(search.settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    settings = json.loads((tmp_path / "object" / "settings.json").read_text())
    assert settings["settings_key"] == search.settings_key == old_key
    assert json.loads((candidates / "L4-8_ffn.json").read_text())["settings_key"] == old_key
    # the function form gives the same table, and running the object again is all cache
    same = run_search(tmp_path, windows=[(0, 4), (4, 8)], levels=("window",))
    cols = ["window", "modules", "Spec.", "Vers.", "Uni."]
    assert same.table[cols].equals(result.table[cols])
    calls = loader.calls
    assert search.run().table[cols].equals(result.table[cols]) and loader.calls == calls


def test_changed_settings_do_not_mix_with_cached_results(tmp_path):
    run_search(tmp_path, windows=[(0, 4)], levels=("window",), budget_steps=1)
    with pytest.raises(CoFiTuneError, match="other settings"):
        run_search(tmp_path, windows=[(0, 4)], levels=("window",), budget_steps=2)


def test_full_reference_can_be_given(tmp_path):
    first = run_search(tmp_path, "first", windows=[(0, 4)], levels=("window",))
    loader = Loader()
    second = run_search(
        tmp_path, "second", windows=[(0, 4)], levels=("window",), loader=loader, full_reference=str(tmp_path / "first")
    )
    assert loader.calls == 2  # base and the one candidate: no full fine-tuning
    assert second.table.loc["full", "speciality"] == first.table.loc["full", "speciality"]
    assert second.table.loc["L0-4_ffn", "Uni."] == pytest.approx(first.table.loc["L0-4_ffn", "Uni."])
    third = run_search(tmp_path, "third", windows=[(0, 4)], levels=("window",), full_reference={"speciality": 2.0})
    assert math.isnan(third.table.loc["full", "Vers."])


def test_search_with_the_project_evaluators(tmp_path):
    tok = char_tokenizer()
    evals = [{"prompt": ex["prompt"], "answer": ex["completion"]} for ex in TRAIN[:2]]
    speciality = SpecialityEval.exact_match(evals, tokenizer=tok, max_new_tokens=3, progress=False)
    versatility = VersatilityEval.default(GENERAL, tokenizer=tok, kl_top_k=8, progress=False)
    result = run_search(tmp_path, speciality=speciality, versatility=versatility, windows=[(0, 4)], levels=("window",))
    assert result.table.loc["base", "Vers."] == 1.0
    assert os.path.isfile(tmp_path / "run" / "versatility_reference.safetensors")
    details = result.records[-1]["versatility_details"]
    assert set(details["components"]) == {"ce", "kl"}
    # resuming restores the reference from disk instead of re-running the base model
    loader = Loader()
    run_search(tmp_path, speciality=speciality, versatility=VersatilityEval.default(GENERAL, tokenizer=tok, kl_top_k=8,
               progress=False), windows=[(0, 4), (4, 8)], levels=("window",), loader=loader)  # fmt: skip
    assert loader.calls == 1


# ------------------------------------------------------------------ the result


def test_search_result_table_markdown_plot_and_load(tmp_path):
    result = run_search(tmp_path, windows=[(0, 4), (4, 8)], levels=("window",))
    table = result.table
    assert list(table.columns[:7]) == ["window", "modules", "Spec.", "Vers.", "Uni.", "cost (s)", "level"]
    assert table.loc["base", "Spec."] == 0.0 and table.loc["base", "Vers."] == 1.0
    assert table.loc["full", "Spec."] == 1.0
    assert table.loc["L0-4_ffn", "window"] == "[0, 4)"
    md = result.to_markdown()
    assert md.splitlines()[0].startswith("| key | window | modules | Spec. | Vers. | Uni.")
    assert len(md.splitlines()) == 2 + len(table)
    loaded = SearchResult.load(str(tmp_path / "run"))
    assert loaded.to_markdown() == md
    assert json.loads((tmp_path / "run" / "search.json").read_text())["best"]["key"] == result.best["key"]
    png = result.plot(str(tmp_path / "plot.png"))
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    reweighted = result.with_weight(1.0)
    assert reweighted.table["Uni."].tolist() == pytest.approx(reweighted.table["Spec."].tolist(), nan_ok=True)
    with pytest.raises(CoFiTuneError, match="no search results"):
        SearchResult.load(str(tmp_path / "nothing"))


# ------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget_steps": 0}, "`budget_steps` must be a positive int"),
        ({"budget_steps": 2.5}, "`budget_steps` must be a positive int"),
        ({"levels": ("window", "deep")}, "unknown: \\['deep'\\]"),
        ({"levels": ("module",)}, "must include 'window'"),
        ({"width": 0}, "`width` must be a positive int"),
        ({"windows": [(6, 10)]}, "0 <= a < b <= 8"),
        ({"windows": [(3, 3)]}, "0 <= a < b <= 8"),
        ({"speciality": []}, "`speciality` eval set is empty"),
        ({"versatility": []}, "`versatility` eval set is empty"),
        ({"full_reference": {"vers": 1}}, "`full_reference` must be"),
    ],
)
def test_bad_inputs_raise(tmp_path, kwargs, match):
    loader = Loader()
    with pytest.raises(CoFiTuneError, match=match):
        run_search(tmp_path, loader=loader, **kwargs)
    assert not glob.glob(str(tmp_path / "run" / "candidates" / "*.json"))  # nothing trained


def test_empty_training_set_raises(tmp_path):
    tok = char_tokenizer()
    with pytest.raises(CoFiTuneError, match="`train_dataset` is empty"):
        search_layers(Loader(), [], ce_on(TRAIN, tok), ce_on(GENERAL, tok), tokenizer=tok, budget_steps=1,
                      output_dir=str(tmp_path))  # fmt: skip


# ------------------------------------------------------------------ command line


def test_cli_search_and_report(tmp_path, capsys):
    from cofitune_peft.kit.cli import main

    model_dir = tmp_path / "model"
    tiny_model("llama", num_layers=N).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    train, evals, general = tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "general.txt"
    train.write_text("\n".join(json.dumps(x) for x in TRAIN))
    evals.write_text("\n".join(json.dumps({"prompt": x["prompt"], "answer": x["completion"]}) for x in TRAIN[:2]))
    general.write_text("\n\n".join(GENERAL))
    out = tmp_path / "search"
    args = ["search", "--model", str(model_dir), "--train", str(train), "--eval", str(evals), "--general",
            str(general), "--budget-steps", "1", "--output-dir", str(out), "--windows", "0:4,4:8", "--levels",
            "window", "--max-new-tokens", "3", "--batch-size", "4", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| key | window" in printed and "best: CoFiTuneConfig(layers=" in printed
    os.remove(out / "search.png")

    assert main(["report", str(out), "--weight", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert "L0-4_ffn" in printed and "L4-8_ffn" in printed
    assert os.path.isfile(out / "search.png")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no search results" in capsys.readouterr().err
    bad = list(args)
    bad[bad.index("--budget-steps") + 1] = "0"
    assert main(bad) == 2


# ------------------------------------------------------------------ train_sft


def test_train_sft_is_deterministic_and_trains_only_what_requires_grad():
    tok = char_tokenizer()
    runs = []
    for _ in range(2):
        pm = get_peft_model(tiny_model("llama"), CoFiTuneConfig(layers=(2, 4)))
        before = {n: p.clone() for n, p in pm.named_parameters()}
        stats = train_sft(pm, TRAIN, tokenizer=tok, steps=3, learning_rate=1e-2, batch_size=2, progress=False)
        changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
        assert changed and all("cofitune_delta" in n for n in changed)
        runs.append((stats["losses"], [p.clone() for n, p in pm.named_parameters() if n in changed]))
        assert not pm.training
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert stats["steps"] == 3 and stats["loss_tokens"] > 0 and stats["trainable_parameters"] > 0


def test_gradient_accumulation_keeps_the_budget():
    tok = char_tokenizer()
    data = TRAIN * 2
    models = []
    for ga in (1, 4):
        model = tiny_model("llama")
        train_sft(model, data, tokenizer=tok, steps=2, learning_rate=1e-3, batch_size=8,
                  gradient_accumulation_steps=ga, progress=False)  # fmt: skip
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_loss_is_on_the_completion_only():
    tok = char_tokenizer()
    ids, labels = encode_example(tok, {"prompt": "What is 1 + 2?", "completion": "3"}, max_length=64)
    kept = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(kept, skip_special_tokens=False) == "3</s>"
    ids, labels = encode_example(tok, {"text": "abc"}, max_length=64)
    assert labels == ids
    ids, labels = encode_example(tok, {"prompt": "x" * 50, "completion": "42"}, max_length=10)
    assert len(ids) == 10 and tok.decode([t for t in labels if t != IGNORE_INDEX]) == "42</s>"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "`steps` must be a positive int"),
        ({"learning_rate": 0.0}, "`learning_rate` must be > 0"),
        ({"gradient_accumulation_steps": 3}, "must divide `batch_size`"),
        ({"train_data": []}, "`train_data` is empty"),
        ({"train_data": [{"question": "x"}]}, "needs `prompt` and `completion`"),
    ],
)
def test_train_sft_bad_inputs(kwargs, match):
    args = {"train_data": TRAIN, "steps": 1, "learning_rate": 1e-3, "batch_size": 4, **kwargs}
    with pytest.raises(CoFiTuneError, match=match):
        train_sft(tiny_model("llama"), tokenizer=char_tokenizer(), progress=False, **args)


def test_train_sft_refuses_a_frozen_model():
    model = tiny_model("llama").requires_grad_(False)
    with pytest.raises(CoFiTuneError, match="nothing would train"):
        train_sft(model, TRAIN, tokenizer=char_tokenizer(), steps=1, learning_rate=1e-3, progress=False)


# ------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_minimal_real_search_on_smollm2(tmp_path):
    import pydoc_data.topics
    import random

    from cofitune_peft.kit.loading import load_smollm2

    _, tok = load_smollm2()
    rng = random.Random(0)
    pairs = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(40)]
    train = [{"prompt": f"What is {a} + {b}?", "completion": str(a + b)} for a, b in pairs[:32]]
    evals = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in pairs[32:38]]
    general = [pydoc_data.topics.topics[k][:600] for k in ("assignment", "if", "while")]
    speciality = SpecialityEval.exact_match(evals, tokenizer=tok, max_new_tokens=6, batch_size=6, progress=False)
    versatility = VersatilityEval.default(general, tokenizer=tok, max_length=96, progress=False)
    result = search_layers(
        lambda: load_smollm2()[0], train, speciality, versatility, tokenizer=tok, budget_steps=4,
        output_dir=str(tmp_path), learning_rate=3e-4, full_ft_learning_rate=3e-5, windows=[(7, 15), (15, 22)],
        levels=("window",), batch_size=4, max_length=64, progress=False,
    )  # fmt: skip
    table = result.table
    assert list(table.index) == ["base", "full", "L7-15_ffn", "L15-22_ffn"]
    assert table.loc["base", "Vers."] == 1.0
    assert table.loc["full", "versatility"] < 1.0  # full fine-tuning moved the model on general text
    for key in ("L7-15_ffn", "L15-22_ffn"):
        assert 0 < table.loc[key, "versatility"] < 1.0
    assert result.best_config.layers in {(7, 15), (15, 22)}
