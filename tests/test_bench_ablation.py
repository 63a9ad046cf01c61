"""benchmarks/bench_importance_ablation.py on a tiny random Llama: unit selection, the zeroing hook, the whole run."""

from __future__ import annotations

import pytest
import torch
from bench_scripts import benchmark_script
from tiny_models import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("bench_importance_ablation.py") as module:
        yield module


def test_select_units_ranks_globally_across_layers(bench):
    scores = torch.tensor([[0.1, 5.0, 0.2], [3.0, 0.0, 4.0]])  # [layers, intermediate]
    top = bench.select_units(scores, 3, "top")
    assert top.tolist() == [[False, True, False], [True, False, True]]
    bottom = bench.select_units(scores, 2, "bottom")
    assert bottom.tolist() == [[True, False, False], [False, True, False]]
    rand = bench.select_units(scores, 4, "random", seed=1)
    assert int(rand.sum()) == 4 and torch.equal(rand, bench.select_units(scores, 4, "random", seed=1))
    assert not bench.select_units(scores, 0, "top").any()
    big = torch.rand(6, 50, generator=torch.Generator().manual_seed(2))  # [layers, intermediate]
    matched = bench.select_units(big, 40, "matched", seed=0)
    assert torch.equal(matched.sum(-1), bench.select_units(big, 40, "top").sum(-1)), "same units per layer as top-k"


def test_zeroing_hook_equals_zeroed_down_projection_columns_and_is_removed(bench):
    model = tiny_model("llama", num_layers=3)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        zeroed = bench.select_units(torch.rand(3, 48, generator=torch.Generator().manual_seed(1)), 20, "top")
        with bench.ablated(model, zeroed):
            hooked = model(ids).logits
        after = model(ids).logits
        for layer, down in enumerate(bench.down_projections(model)):
            down.weight[:, zeroed[layer]] = 0.0
        edited = model(ids).logits
    assert torch.equal(before, after), "the hooks must be gone after the block"
    assert not torch.allclose(hooked, before)
    torch.testing.assert_close(hooked, edited)


@pytest.mark.filterwarnings("ignore:the base model scores 0")
def test_run_ablation_end_to_end_on_a_tiny_llama(bench, tmp_path):
    model, tok = tiny_model("llama", num_layers=2), tiny_tokenizer()
    general = ["The river runs north to the sea.", "Trade grew in the old port town."] * 2
    domain = [{"messages": [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]}]
    probes = [{"prompt": "What is the capital of France?", "answer": "Paris", "aliases": []}]
    sources = {"general_kl": (general, "kl"), "domain_kl": (domain * 2, "kl"), "general_fisher": (general, "fisher")}
    evals = {"eval_texts": ["A quiet valley with farms and a mill."], "probes": probes}
    kwargs = {"sources": sources, **evals, "seeds": [0, 1], "max_length": 24, "max_new_tokens": 2, "kl_top_k": 16}
    first = bench.run_ablation(model, tok, ks=[0, 32], progress=False, **kwargs)
    result = bench.run_ablation(model, tok, ks=[4], previous=first, progress=False, **kwargs)
    assert len(first["points"]) == 8
    assert [p for p in result["points"] if p["k"] == 32] == first["points"], "stored points are kept as they were"
    assert abs(result["base"]["kl"]) < 1e-6 and abs(result["base"]["ce_increase"]) < 1e-6
    rules = {(p["rule"], p["seed"]) for p in result["points"]}
    seeded = {(r, s) for r in ("random", "random_matched") for s in (0, 1)}
    assert rules == {(r, None) for r in bench.RULES if r not in ("random", "random_matched")} | seeded
    assert {p["k"] for p in result["points"]} == {4, 32} and len(result["points"]) == 16
    assert all(p["kl"] > 0 and p["probe_accuracy"] in (0.0, 1.0) for p in result["points"])
    assert set(result["agreement"]) == {"domain_kl", "general_fisher"}
    assert sum(result["layers"]["general_kl"]["32"]) == 32
    rows = bench.table_rows(result, "kl")
    assert len(rows) == len(bench.RULES) and list(rows[0]) == ["rule", "k=0", "k=4", "k=32"]
    assert "2 seeds: mean (min..max)" in rows[-1]["rule"] and "(" in rows[-1]["k=4"]
    png = tmp_path / "ablation.png"
    bench.plot(result, str(png), num_units=2 * 48, title="tiny")
    assert png.stat().st_size > 10_000
