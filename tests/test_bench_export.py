"""benchmarks/bench_export.py's core on a tiny random Llama: train, export at several ranks and merged, measure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_model, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_export

pytestmark = pytest.mark.filterwarnings("ignore:the importance has no values")


def test_bench_export_core_on_a_tiny_llama(tmp_path):
    from cofitune_peft.kit.data import arithmetic_task, general_texts

    base_path = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_path)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(base_path)
    train, test = arithmetic_task(n_train=16, n_test=4)
    texts = [t[:60] for t in general_texts(n=3, split="eval", source="pydoc")["text"]]
    # hidden 32 < intermediate 48: rank 32 is exact; a large learning rate so that rank 1 visibly is not
    settings = bench_export.Settings(
        ranks=[1, 32, 0.9], steps=3, batch_size=2, learning_rate=1e-2, max_length_train=48, max_new_tokens=4
    )
    work = tmp_path / "work"
    work.mkdir()
    # the fresh-process load with plain PEFT is tested in test_export.py; here it would triple the time
    result = bench_export.run_benchmark(
        str(base_path), tokenizer, train, test, texts, settings, str(work), progress=False, plain_peft_check=False
    )

    records = {r["export"]: r for r in result["records"]}
    assert list(records) == [
        "CoFiTune adapter (unconverted)",
        "base model (no adapter)",
        "LoRA r1",
        "LoRA r32",
        "LoRA 90% energy",
        "merged model",
    ]
    assert result["training"]["window"] == [2, 4] and result["test_questions"] == 4
    reference = records["CoFiTune adapter (unconverted)"]
    for exact in (records["LoRA r32"], records["merged model"]):
        assert exact["kl_mean"] < 1e-6 and exact["top1_agreement"] == 1.0
        assert exact["same_generations"] == 1.0 and exact["accuracy"] == reference["accuracy"]
    low, full = records["LoRA r1"], records["LoRA r32"]
    assert low["kl_mean"] > 100 * max(full["kl_mean"], 1e-12)
    assert records["base model (no adapter)"]["kl_mean"] > low["kl_mean"]
    assert (low["ranks_min"], low["ranks_max"], full["ranks_max"]) == (1, 1, 32)
    assert low["energy_kept_mean"] < 1.0 and full["energy_kept_min"] == pytest.approx(1.0)
    assert records["LoRA 90% energy"]["energy_kept_min"] >= 0.9
    assert 1 <= records["LoRA 90% energy"]["ranks_min"] <= records["LoRA 90% energy"]["ranks_max"] <= 32
    # 2 modules (up, down) x 2 layers, each r * (32 + 48) parameters in fp32
    assert full["lora_parameters"] == 4 * 32 * 80
    assert low["file_bytes"] < full["file_bytes"] < records["merged model"]["file_bytes"]
    assert records["CoFiTune adapter (unconverted)"]["full_rank"] == 32 and result["plain_peft_check"] is None

    json.dumps(result)  # the JSON the script writes
    rows = bench_export.table_rows(result)
    assert [r["export"] for r in rows] == list(records) and rows[3]["rank"] == "32"
    bench_export.plot(result, str(tmp_path / "export.png"), "tiny Llama")
    assert (tmp_path / "export.png").stat().st_size > 10_000
