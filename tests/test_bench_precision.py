"""benchmarks/bench_precision.py without a model: the summary over seeds, the within-spread rule, the table, the plot;
and benchmarks/_lowmem.py's mapping of the live configurations to the memory model."""

from __future__ import annotations

import math

import pytest
from bench_scripts import benchmark_script


def record(arm, lr, seed, spec_raw, gen, ce=0.99):
    components = {"ce": ce, "kl": 0.99, "probes_mc": 1.1, "probes_gen": gen}
    versatility = {"score": sum(components.values()) / 4, "components": components,
                   "weights": dict.fromkeys(components, 1.0)}  # fmt: skip
    return {"arm": arm, "learning_rate": lr, "seed": seed, "frac_unchanged": 0.5 if "freeze" in arm else 0.0,
            "train": {"seconds": 10.0}, "eval_seconds": 5.0,
            "test": {"speciality": spec_raw, "versatility": versatility}}  # fmt: skip


BASE = {"test": {"speciality": 0.0, "versatility": {"score": 1.0}}}


def test_summary_over_seeds_and_the_spread_rule(tmp_path):
    with benchmark_script("bench_precision.py") as bench:
        records = [record("fp32", 3e-4, s, 0.30 + 0.05 * s, 0.2) for s in range(3)]
        records += [record("bf16", 3e-4, s, 0.35 + 0.05 * s, 0.2) for s in range(3)]  # +0.05 raw: within the spread
        records += [record("freeze_bf16", 3e-4, s, 0.05, 0.9) for s in range(3)]  # far below: beyond it
        rows = bench.summarise(records, BASE, reference=0.5)
        by_arm = {r["arm"]: r for r in rows}
        assert by_arm["fp32"]["spec"] == pytest.approx(0.7) and by_arm["fp32"]["spec_sd"] == pytest.approx(0.1)
        assert by_arm["fp32"]["spec_vs_fp32"] is None
        assert by_arm["bf16"]["spec_vs_fp32"] == {"diff": pytest.approx(0.1), "within_spread": True}
        assert by_arm["freeze_bf16"]["spec_vs_fp32"]["within_spread"] is False
        # Vers. caps each measure at 1, as the comparison: probes_mc 1.1 counts as 1
        assert by_arm["fp32"]["vers"] == pytest.approx((0.99 + 0.99 + 1.0 + 0.2) / 4)
        assert by_arm["freeze_bf16"]["frac_unchanged"] == 0.5
        table = bench.to_markdown(rows)
        assert "within spread" in table and "beyond spread" in table
        bench.plot(rows, str(tmp_path / "p.png"))
        assert (tmp_path / "p.png").stat().st_size > 0
        one_seed = bench.summarise(records[:1] + records[3:4], BASE, reference=0.5)
        assert all(r["spec_vs_fp32"] is None and math.isnan(r["spec_sd"]) for r in one_seed)


def test_every_arm_builds_an_optimizer_argument():
    with benchmark_script("bench_precision.py") as bench:
        for arm, (_, method, _, spec) in bench.ARMS.items():
            made = bench.optimizer_for(spec)
            assert made == "adamw" or callable(made), arm
            assert method in ("cofitune", "freeze")
        assert set(bench.DEFAULT_ARMS) <= set(bench.ARMS)


def test_live_configurations_map_to_the_memory_model():
    with benchmark_script("_lowmem.py") as lowmem:
        from cofitune_peft.kit.memory import estimate_training_memory

        for name in [*lowmem.LOWMEM, "lora_r16", "full_ft"]:
            for trainer in (False, True):
                kwargs = lowmem.estimate_kwargs(name, trainer=trainer)
                est = estimate_training_memory("smollm2-135m", batch=1, seq_len=8, device="cpu", **kwargs)
                assert est.peak_bytes > 0
        assert lowmem.estimate_kwargs("cofitune_lowmem", trainer=True)["state_dtype"] == "int8"
        assert lowmem.estimate_kwargs("freeze_bf16", trainer=True)["optimizer"] == "adamw_fused"
        assert lowmem.fused("cofitune_lowmem_fused") and not lowmem.fused("cofitune_lowmem")
