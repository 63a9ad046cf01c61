"""Precision study: what training CoFiTune's deltas in bf16 costs in Spec. and Vers., with plain rounding and with the
compensated update (stochastic rounding), and whether the freeze-tuning peer (the same window's bf16 weights trained
in place) loses where the delta does not.

SmolLM2-135M-Instruct loaded in bf16, on the comparison's arithmetic task at `cofitune compare --preset full`'s sizes
(`task_splits("arithmetic", ...)`: 40 AdamW steps of batch 8 at max length 128, betas (0.9, 0.95), no weight decay,
cosine schedule; 40 test questions, 40 + 40 probes and 12 general texts), CoFiTune coarse (the default window, FFN up
and down, no mask) at the coarse grid's lowest and selected learning rates on arithmetic (1e-4 and 3e-4: `FULL_GRIDS`
and docs/results.md), seeds 0, 1, 2, scored on the test split. Spec. is relative to the committed comparison's
reference (full fine-tuning in fp32 at 3e-5, seed 0: `benchmarks/results/comparison/arithmetic/runs/`), from this
study's bf16 base model; Vers. is the retention against the bf16 base, each measure capped at 1 (as the comparison).

Arms (`ARMS`; `--arms` picks): fp32 deltas (PEFT's default, torch AdamW), bf16 deltas with torch AdamW (bf16 states,
round to nearest), bf16 deltas with `CoFiTuneAdamW` stochastic rounding (bf16 states), the recommended low-memory
combination (stochastic rounding, int8 momentum, factored second moment), and the freeze-tuning peer in bf16 with torch
AdamW; `nomom` (no momentum, factored second moment) and `freeze_bf16_sr` (the peer with stochastic rounding) on
request. Every run also records the fraction of trained values that never moved from the base (`frac_unchanged`):
the updates that rounding lost.

    python benchmarks/bench_precision.py --threads 1                      # resumable: one JSON per run in --out-dir
    python benchmarks/bench_precision.py --arms fp32 bf16 --seeds 0 --lrs 3e-4 --threads 1    # a part of it
    python benchmarks/bench_precision.py --report-only                    # table and plot from the finished runs

Writes `<out-dir>/runs/<arm>_lr<lr>_s<seed>.json`, `precision.json`, `precision.md` and `precision.png`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

from _common import write_json

DEFAULT_OUT = "benchmarks/results/precision"
REFERENCE = "benchmarks/results/comparison/arithmetic/runs/full_lr3e-05_s0.json"
SETTINGS = {"task": "arithmetic", "steps": 40, "batch_size": 8, "max_length": 128, "n_eval": 40, "n_general": 12,
            "max_new_tokens": 16, "dtype": "bfloat16", "window": "default (N//4, N//2), ffn, no mask"}  # fmt: skip
# arm -> (label, method, delta dtype, optimizer: "adamw" or CoFiTuneAdamW keyword arguments)
ARMS = {
    "fp32": ("fp32 deltas, AdamW", "cofitune", None, "adamw"),
    "bf16": ("bf16 deltas, AdamW (round to nearest)", "cofitune", "bfloat16", "adamw"),
    "bf16_sr": ("bf16 deltas, stochastic rounding", "cofitune", "bfloat16", {"state_dtype": "bfloat16"}),
    "lowmem": ("bf16 deltas, stochastic rounding, int8 momentum + factored (recommended)", "cofitune", "bfloat16",
               {"state_dtype": "int8", "second_moment": "factored"}),
    "nomom": ("bf16 deltas, stochastic rounding, no momentum + factored", "cofitune", "bfloat16",
              {"second_moment": "factored", "no_momentum": True}),
    "freeze_bf16": ("freeze tuning, bf16 in place, AdamW", "freeze", None, "adamw"),
    "freeze_bf16_sr": ("freeze tuning, bf16 in place, stochastic rounding", "freeze", None,
                       {"state_dtype": "bfloat16"}),
}  # fmt: skip
DEFAULT_ARMS = ("fp32", "bf16", "bf16_sr", "lowmem", "freeze_bf16")
DEFAULT_LRS = (1e-4, 3e-4)


def run_key(arm: str, lr: float, seed: int) -> str:
    return f"{arm}_lr{lr:.3g}_s{seed}"


def optimizer_for(spec):
    """`train_sft`'s `optimizer` argument for an arm."""
    if spec == "adamw":
        return "adamw"
    from cofitune_peft import CoFiTuneAdamW

    kwargs = {k: v for k, v in spec.items() if k != "no_momentum"}

    def make(groups, lr, betas):
        betas = (0.0, betas[1]) if spec.get("no_momentum") else betas
        return CoFiTuneAdamW(groups, lr=lr, betas=betas, **kwargs)

    return make


def build(arm: str, base):
    """The model to train and its trained tensors with their starting values (to count what never moved)."""
    from peft import get_peft_model

    from cofitune_peft import CoFiTuneConfig

    _, method, delta_dtype, _ = ARMS[arm]
    if method == "freeze":
        from _lowmem import freeze_window

        freeze_window(base)
        model = base
    else:
        model = get_peft_model(base, CoFiTuneConfig(softmask_mode="none", delta_dtype=delta_dtype))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, start


def unchanged_fraction(model, start) -> float:
    params = dict(model.named_parameters())
    same = sum(int((params[n].detach() == v).sum()) for n, v in start.items())
    return same / sum(v.numel() for v in start.values())


def evaluate(split, model, tokenizer) -> dict:
    def score(evaluator):
        out = evaluator.evaluate(model, tokenizer) if hasattr(evaluator, "evaluate") else evaluator(model, tokenizer)
        return (float(out["score"]), dict(out)) if isinstance(out, dict) else (float(out), {})

    spec, _ = score(split.speciality)
    vers, details = score(split.versatility)
    versatility = {"score": vers, **{k: details[k] for k in ("components", "ce_increase", "kl") if k in details}}
    versatility["weights"] = dict(getattr(split.versatility, "weights", {}) or {})
    return {"speciality": spec, "versatility": versatility}


class Study:
    """Loads the model and the task once; runs and caches one `(arm, lr, seed)` at a time."""

    def __init__(self, out_dir: str, settings: dict, progress: bool):
        import torch

        from cofitune_peft.kit.compare.tasks import task_splits
        from cofitune_peft.kit.loading import load_smollm2

        self.out_dir, self.settings, self.progress = out_dir, settings, progress
        os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
        self._check_settings()
        self.base, self.tokenizer = load_smollm2(dtype=torch.bfloat16)
        self.base.eval()
        steps, batch = settings["steps"], settings["batch_size"]
        self.train, splits, _ = task_splits(
            "arithmetic", self.tokenizer, n_train=max(2000, steps * batch), n_eval=settings["n_eval"],
            n_general=settings["n_general"], max_new_tokens=settings["max_new_tokens"], progress=progress,
        )  # fmt: skip
        self.test = splits["test"]
        self.test.versatility.prepare(self.base, self.tokenizer)

    def _check_settings(self) -> None:
        path = os.path.join(self.out_dir, "settings.json")
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            if saved != self.settings:
                raise SystemExit(f"{path} holds other settings ({saved}); use another --out-dir.")
        else:
            write_json(path, self.settings)

    def cached(self, key: str) -> dict | None:
        path = os.path.join(self.out_dir, "runs", f"{key}.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def save(self, record: dict) -> None:
        path = os.path.join(self.out_dir, "runs", f"{record['key']}.json")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)

    def base_record(self) -> dict:
        record = self.cached("base")
        if record is None:
            started = time.perf_counter()
            record = {"key": "base", "test": evaluate(self.test, self.base, self.tokenizer)}
            record["eval_seconds"] = time.perf_counter() - started
            self.save(record)
        return record

    def run(self, arm: str, lr: float, seed: int) -> dict:
        import torch

        from cofitune_peft.kit.training import train_sft

        key = run_key(arm, lr, seed)
        record = self.cached(key)
        if record is not None:
            return record
        torch.manual_seed(seed)
        model, start = build(arm, copy.deepcopy(self.base))
        stats = train_sft(
            model, self.train, tokenizer=self.tokenizer, steps=self.settings["steps"], learning_rate=lr, seed=seed,
            batch_size=self.settings["batch_size"], max_length=self.settings["max_length"], progress=self.progress,
            optimizer=optimizer_for(ARMS[arm][3]),
        )  # fmt: skip
        started = time.perf_counter()
        scores = evaluate(self.test, model, self.tokenizer)
        record = {
            "key": key, "arm": arm, "learning_rate": lr, "seed": seed, "test": scores,
            "train": {k: stats[k] for k in ("seconds", "final_loss", "mean_loss", "trainable_parameters")},
            "frac_unchanged": unchanged_fraction(model, start), "eval_seconds": time.perf_counter() - started,
            "trained_dtypes": sorted({str(v.dtype).replace("torch.", "") for v in start.values()}),
        }  # fmt: skip
        self.save(record)
        return record


def rounding_probe(base, lrs) -> dict:
    """Arithmetic on the real weights, no training: the share of the window's bf16 weights for which a step of `lr`
    (Adam's first steps move every value by about `lr`) is below half their spacing, i.e. lost by round-to-nearest when
    the weight is trained in place; and the same for a bf16 delta that has grown to `k * lr` after `k` steps of one
    sign (half its spacing is `2**-9` to `2**-8` of its size, so a step of `lr` is lost only once `|delta|` exceeds
    `2**8 * lr` at most, `2**9 * lr` at least: after hundreds of steps of one sign)."""
    import torch
    from _lowmem import freeze_window

    probe = copy.deepcopy(base)
    freeze_window(probe)
    weights = torch.cat([p.detach().float().abs().flatten() for p in probe.parameters() if p.requires_grad])
    nonzero = weights[weights > 0]
    spacing = torch.pow(2.0, torch.floor(torch.log2(nonzero)) - 7)  # bf16: 8 significant bits
    out = {"window_values": int(weights.numel()), "median_abs_weight": float(weights.median())}
    for lr in lrs:
        lost = int((spacing / 2 > lr).sum())  # a zero weight takes any step
        out[f"in_place_lost_share_lr{lr:g}"] = lost / weights.numel()
    out["delta_size_in_lr_before_a_step_of_lr_is_lost"] = [2**8, 2**9]
    return out


def reference_speciality(path: str) -> float:
    if not os.path.isfile(path):
        raise SystemExit(f"the Spec. reference {path} is missing: run the comparison first or pass --reference.")
    with open(path) as f:
        return float(json.load(f)["test"]["speciality"])


def summarise(records: list[dict], base: dict, reference: float) -> list[dict]:
    """Mean and standard deviation over seeds of Spec., Vers. (capped), gen. probes and the unchanged fraction, per
    arm and learning rate; each arm compared with fp32 deltas at the same rate (inside the spread: the difference is
    at most the sum of the two standard deviations)."""
    from cofitune_peft.kit.compare.report import capped_retention
    from cofitune_peft.kit.evaluation.scores import speciality_score

    base_spec = base["test"]["speciality"]
    points: dict[tuple, list[dict]] = {}
    for r in records:
        _, vers = capped_retention(r["test"]["versatility"], base["test"]["versatility"]["score"])
        point = {
            "spec": speciality_score(r["test"]["speciality"], base_spec, reference), "vers": vers,
            "gen": (r["test"]["versatility"].get("components") or {}).get("probes_gen", math.nan),
            "frac_unchanged": r["frac_unchanged"], "seconds": r["train"]["seconds"] + r["eval_seconds"],
        }  # fmt: skip
        points.setdefault((r["arm"], r["learning_rate"]), []).append(point)

    def stat(values):
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else math.nan

    rows = []
    for (arm, lr), pts in sorted(points.items(), key=lambda kv: (kv[0][1], list(ARMS).index(kv[0][0]))):
        row = {"arm": arm, "label": ARMS[arm][0], "learning_rate": lr, "seeds": len(pts)}
        for k in ("spec", "vers", "gen", "frac_unchanged", "seconds"):
            row[k], row[f"{k}_sd"] = stat([p[k] for p in pts])
        rows.append(row)
    for row in rows:
        ref = next((r for r in rows if r["arm"] == "fp32" and r["learning_rate"] == row["learning_rate"]), None)
        for k in ("spec", "vers"):
            if ref is None or row["arm"] == "fp32" or row["seeds"] < 2 or ref["seeds"] < 2:
                row[f"{k}_vs_fp32"] = None
                continue
            diff = row[k] - ref[k]
            row[f"{k}_vs_fp32"] = {"diff": diff, "within_spread": abs(diff) <= row[f"{k}_sd"] + ref[f"{k}_sd"]}
    return rows


def to_markdown(rows: list[dict]) -> str:
    def f(v, d=3):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"

    def vs(c):
        return "-" if c is None else f"{c['diff']:+.3f} ({'within' if c['within_spread'] else 'beyond'} spread)"

    lines = ["| arm | lr | seeds | Spec. | Vers. | gen. probes | unchanged | Spec. vs fp32 | Vers. vs fp32 | s/run |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['learning_rate']:g} | {r['seeds']} | {f(r['spec'])} ± {f(r['spec_sd'])} | "
            f"{f(r['vers'])} ± {f(r['vers_sd'])} | {f(r['gen'], 2)} ± {f(r['gen_sd'], 2)} | "
            f"{f(r['frac_unchanged'], 4)} | {vs(r['spec_vs_fp32'])} | {vs(r['vers_vs_fp32'])} | {f(r['seconds'], 0)} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    from matplotlib.figure import Figure

    lrs = sorted({r["learning_rate"] for r in rows})
    fig = Figure(figsize=(max(7.5, 5.5 * len(lrs)), 4.8))
    axes = fig.subplots(1, len(lrs), squeeze=False)[0]
    for ax, lr in zip(axes, lrs):
        for r in (r for r in rows if r["learning_rate"] == lr):
            ax.errorbar(r["vers"], r["spec"], xerr=r["vers_sd"] if r["seeds"] > 1 else None,
                        yerr=r["spec_sd"] if r["seeds"] > 1 else None, fmt="o", capsize=3, label=r["label"])  # fmt: skip
        ax.set_title(f"lr {lr:g} (mean ± sd over seeds)")
        ax.set_xlabel("Vers. on test (retention vs the bf16 base, capped)")
        ax.set_ylabel("Spec. on test (vs fp32 full fine-tuning)")
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle("SmolLM2-135M in bf16, arithmetic, CoFiTune coarse:\ndeltas' precision and the freeze peer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="*", default=list(DEFAULT_ARMS), choices=list(ARMS))
    parser.add_argument("--lrs", nargs="*", type=float, default=list(DEFAULT_LRS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=DEFAULT_OUT)
    parser.add_argument("--reference", default=REFERENCE, help="the fp32 full fine-tuning run Spec. is relative to")
    parser.add_argument("--report-only", action="store_true", help="train nothing; report the cached runs")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--steps", type=int, default=SETTINGS["steps"], help="smaller only for a smoke test")
    parser.add_argument("--n-eval", type=int, default=SETTINGS["n_eval"], help="smaller only for a smoke test")
    parser.add_argument("--n-general", type=int, default=SETTINGS["n_general"], help="smaller only for a smoke test")
    args = parser.parse_args(argv)
    settings = {**SETTINGS, "steps": args.steps, "n_eval": args.n_eval, "n_general": args.n_general}
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    reference = reference_speciality(args.reference)
    jobs = [(arm, lr, seed) for seed in args.seeds for lr in args.lrs for arm in args.arms]
    if args.report_only:
        study = None
        records = [r for r in (_load(args.out_dir, run_key(*job)) for job in jobs) if r is not None]
        probe_path = os.path.join(args.out_dir, "rounding_probe.json")  # the training run's probe, when it wrote one
        probe = None
        if os.path.isfile(probe_path):
            with open(probe_path) as f:
                probe = json.load(f)
        base = _load(args.out_dir, "base")
        if base is None:
            raise SystemExit(f"no finished base run in {args.out_dir}; run without --report-only first.")
    else:
        study = Study(args.out_dir, settings, progress=not args.no_progress)
        probe = rounding_probe(study.base, args.lrs)
        print("rounding probe (no training):", json.dumps(probe))
        write_json(os.path.join(args.out_dir, "rounding_probe.json"), probe)
        base = study.base_record()
        records = [study.run(*job) for job in tqdm(jobs, desc="precision runs", disable=args.no_progress)]
    rows = summarise(records, base, reference)
    table = to_markdown(rows)
    print(table)
    summary = {"settings": settings, "reference_speciality": reference, "base": base["test"], "rows": rows,
               "runs": len(records), "threads": args.threads, "rounding_probe": probe}  # fmt: skip
    write_json(os.path.join(args.out_dir, "precision.json"), summary)
    with open(os.path.join(args.out_dir, "precision.md"), "w") as f:
        f.write(table + "\n")
    plot(rows, os.path.join(args.out_dir, "precision.png"))
    print(f"wrote {args.out_dir}/precision.{{json,md,png}}")
    return 0


def _load(out_dir: str, key: str) -> dict | None:
    path = os.path.join(out_dir, "runs", f"{key}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    sys.exit(main())
