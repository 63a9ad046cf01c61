"""What exporting a CoFiTune adapter costs: fidelity, speciality and file size per LoRA rank, and of a merged model.

One CoFiTune adapter is trained on SmolLM2-135M-Instruct (`CoFiTuneConfig()`: the default window, layers 7..14, FFN
up/down, no mask; `train_sft` on the kit's two-operand arithmetic, 60 steps of batch 8 at lr 2e-4, seed 0, as the
demo's coarse CoFiTune row) and saved. It is then exported the way `cofitune export` does it
(`export_command.export_lora` / `export_merged`): as stock LoRA adapters of each `--ranks` value (an int is a rank, a
float in (0, 1] a fraction of the singular-value energy kept per module; 576, the hidden size, is exact) and as a
merged model. Each export is loaded back with plain PEFT / transformers and compared with the unconverted adapter:

- KL(unconverted || export) of the next-token distributions per token, and top-1 agreement, on `--n-texts` held-out
  general texts (`general_texts(split="eval")`, at most `--max-length` tokens each; `export_command.fidelity`);
- exact-match accuracy on `--n-test` arithmetic test questions (greedy, 24 new tokens, `extract_number`, as the demo
  scores it), and the fraction of those questions on which its generation is identical to the unconverted adapter's;
- the size of its weight files against the CoFiTune adapter's and the full model's (`export_command.file_sizes`);
- for a LoRA, the fraction of each module's squared singular values its rank keeps (mean over modules).

The base model (no adapter) is measured the same way, for scale. Finally a fresh Python process loads the full-rank
LoRA export with plain PEFT, checks that `cofitune_peft` was never imported, and compares its logits with the
adapter's. Prints a markdown table, writes JSON to `--out` and a plot beside it (same name, `.png`).

    python benchmarks/bench_export.py [--ranks 4 16 64 256 576 0.99] [--steps 60] [--n-test 100] [--n-texts 32]
                                      [--threads 1] [--out benchmarks/results/export.json]

Measured on the project's 2-core machine, one thread, beside other jobs: 18-25 minutes (training 4-6 min, then
1.5-3.5 min per export for its fidelity and speciality passes), peak RSS 4.9 GB. The results do not depend on the load
(two runs gave the same table). The exports are written to a temporary folder (`--work-dir` keeps them);
`--replot` redraws the PNG from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field

from _common import markdown, write_json

DEFAULT_RANKS = ["4", "16", "64", "256", "576", "0.99"]


@dataclass
class Settings:
    """What the measurement depends on; stored in the JSON."""

    ranks: list[int | float] = field(default_factory=lambda: [4, 16, 64, 256, 576, 0.99])
    steps: int = 60
    batch_size: int = 8
    learning_rate: float = 2e-4
    max_length_train: int = 128
    n_test: int = 100
    n_texts: int = 32
    max_length: int = 256
    max_new_tokens: int = 24
    seed: int = 0


def parse_rank(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


# ------------------------------------------------------------------------------------------------------ the core


def train_adapter(base_path: str, tokenizer, train, settings: Settings, folder: str, progress: bool) -> dict:
    """Train `CoFiTuneConfig()` on `train` and save it at `folder`; the training statistics."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from cofitune_peft import CoFiTuneConfig
    from cofitune_peft.kit.training import train_sft

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), CoFiTuneConfig())
    stats = train_sft(
        model,
        train,
        tokenizer=tokenizer,
        steps=settings.steps,
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        max_length=settings.max_length_train,
        seed=settings.seed,
        progress=progress,
    )
    model.save_pretrained(folder)
    config = model.peft_config["default"]
    return {
        "window": list(config.layers),
        "target_modules": getattr(config, "parts", None) or config.target_modules,  # the selection ("ffn")
        "seconds": stats["seconds"],
        "final_loss": stats["final_loss"],
        "trainable_parameters": stats["trainable_parameters"],
    }


def lora_ranks(model) -> dict[str, int]:
    """The rank of each LoRA module of a loaded LoRA model, by module name in the base model."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model."): m.r["default"]
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }


def energy_curves(model) -> dict[str, list[float]]:
    """Per CoFiTune module: the fraction of its masked delta's squared singular values kept by the first r, r = 1.."""
    import torch

    curves = {}
    for name, layer in model.base_model.cofitune_layers():
        s = torch.linalg.svdvals(layer.get_delta_weight("default").detach().float())  # [min(out, in)]
        energy = (s**2).cumsum(0)
        curves[name] = (energy / energy[-1]).tolist() if energy[-1] > 0 else [1.0] * len(energy)  # zero delta
    return curves


def _score(model, tokenizer, speciality, reference_generations: list[str] | None) -> tuple[dict, list[str]]:
    """Accuracy, and the fraction of generations identical to `reference_generations`; the generations."""
    result = speciality.evaluate(model, tokenizer)
    generations = [p["generated"] for p in result["predictions"]]
    same = None
    if reference_generations is not None:
        same = sum(a == b for a, b in zip(generations, reference_generations)) / len(generations)
    return {"accuracy": result["score"], "same_generations": same}, generations


def _candidate(kind: str, rank, reference, adapter_dir: str, base_path: str, tokenizer, work_dir: str, curves):
    """Export `reference` as `kind` (`"base"`: no export) and load the export back with plain PEFT / transformers:
    `(model, folder of its weights, record fields)`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cofitune_peft.kit.export_command import export_lora, export_merged, load_adapter

    def fresh_base():
        return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()

    if kind == "base":
        return fresh_base(), base_path, {"export": "base model (no adapter)"}
    if kind == "merged":
        folder = os.path.join(work_dir, "merged")
        consumed, _ = load_adapter(adapter_dir, base_path)  # merging writes into the base weights
        export_merged(consumed, folder, tokenizer)
        del consumed
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return merged, folder, {"export": "merged model"}
    folder = os.path.join(work_dir, f"lora_{rank}")
    export_lora(reference, folder, rank, base_path=base_path)
    lora = PeftModel.from_pretrained(fresh_base(), folder).eval()
    by_module = lora_ranks(lora)
    ranks = list(by_module.values())
    kept = [curves[name][r - 1] for name, r in by_module.items()]
    return (
        lora,
        folder,
        {
            "export": f"LoRA {rank:.0%} energy" if isinstance(rank, float) else f"LoRA r{rank}",
            "ranks_min": min(ranks),
            "ranks_mean": sum(ranks) / len(ranks),
            "ranks_max": max(ranks),
            "energy_kept_mean": sum(kept) / len(kept),
            "energy_kept_min": min(kept),
            "lora_parameters": sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n),
        },
    )


def measure_exports(
    base_path: str,
    adapter_dir: str,
    tokenizer,
    speciality,
    texts: list[str],
    settings: Settings,
    work_dir: str,
    progress: bool = True,
) -> list[dict]:
    """One record per export (and for the unconverted adapter and the base model): fidelity, accuracy, file size."""
    from tqdm.auto import tqdm

    from cofitune_peft.kit.export_command import fidelity, file_sizes, load_adapter

    reference, _ = load_adapter(adapter_dir, base_path)
    # the rank at which every module's LoRA pair is exact: the smaller side of its weight
    full_rank = max(min(layer.get_base_layer().weight.shape) for _, layer in reference.base_model.cofitune_layers())
    curves = energy_curves(reference)
    t0 = time.perf_counter()
    ref_score, reference_generations = _score(reference, tokenizer, speciality, None)
    records = [
        {
            "export": "CoFiTune adapter (unconverted)",
            "kind": "cofitune",
            "full_rank": full_rank,
            "file_bytes": file_sizes(adapter_dir)[adapter_dir],
            "kl_mean": 0.0,
            "kl_max": 0.0,
            "top1_agreement": 1.0,
            **ref_score,
            "same_generations": 1.0,
            "seconds": time.perf_counter() - t0,
        }
    ]
    jobs = [("base", None), *(("lora", r) for r in settings.ranks), ("merged", None)]
    for kind, rank in tqdm(jobs, desc="exports", disable=not progress):
        t0 = time.perf_counter()
        candidate, folder, fields = _candidate(
            kind, rank, reference, adapter_dir, base_path, tokenizer, work_dir, curves
        )
        record = {"kind": kind, "rank": rank, **fields, "file_bytes": file_sizes(folder)[folder]}
        record.update(fidelity(reference, candidate, tokenizer, texts, max_length=settings.max_length))
        record.update(_score(candidate, tokenizer, speciality, reference_generations)[0])
        record["seconds"] = time.perf_counter() - t0
        records.append(record)
        del candidate
    return records


def check_plain_peft(base_path: str, lora_dir: str, adapter_dir: str, tokenizer, text: str, work_dir: str) -> dict:
    """Load `lora_dir` with plain PEFT in a fresh process (no `cofitune_peft`); its logits against the adapter's."""
    import torch

    from cofitune_peft.kit.export_command import load_adapter

    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    ids_file, logits_file = os.path.join(work_dir, "ids.pt"), os.path.join(work_dir, "plain_peft_logits.pt")
    torch.save(ids, ids_file)
    script = f"""
        import json, sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(1)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_path!r}), {lora_dir!r}).eval()
        with torch.no_grad():
            torch.save(model(torch.load({ids_file!r}, weights_only=True)).logits, {logits_file!r})
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("cofitune_peft"))))
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"loading the LoRA export with plain PEFT failed:\n{proc.stderr[-3000:]}")
    imported = json.loads(proc.stdout.strip().splitlines()[-1])
    reference, _ = load_adapter(adapter_dir, base_path)
    with torch.no_grad():
        expected = reference(ids).logits
    got = torch.load(logits_file, weights_only=True)
    return {
        "lora_dir": os.path.basename(lora_dir),
        "cofitune_peft_modules_imported": imported,
        "max_abs_logit_diff": float((got - expected).abs().max()),
        "max_abs_logit": float(expected.abs().max()),
        "tokens": ids.shape[1],
    }


def run_benchmark(
    base_path: str,
    tokenizer,
    train,
    test,
    texts: list[str],
    settings: Settings,
    work_dir: str,
    progress: bool = True,
    plain_peft_check: bool = True,
) -> dict:
    """Train, export at every rank and as a merged model, measure; everything the JSON holds except the args.

    `plain_peft_check=False` skips the fresh-process load of the full-rank export (the slow part on a tiny model).
    """
    from cofitune_peft.kit.evaluation import SpecialityEval, extract_number
    from cofitune_peft.kit.export_command import file_sizes

    started = time.perf_counter()
    speciality = SpecialityEval.exact_match(
        [dict(row) for row in test],
        answer_extractor=extract_number,
        numeric=True,
        max_new_tokens=settings.max_new_tokens,
        batch_size=16,
        tokenizer=tokenizer,
        progress=progress,
        name="arithmetic",
    )
    adapter_dir = os.path.join(work_dir, "cofitune_adapter")
    training = train_adapter(base_path, tokenizer, train, settings, adapter_dir, progress)
    records = measure_exports(base_path, adapter_dir, tokenizer, speciality, texts, settings, work_dir, progress)
    plain = None
    if plain_peft_check:
        largest = max((r for r in records if r["kind"] == "lora"), key=lambda r: r["ranks_max"])
        lora_dir = os.path.join(work_dir, f"lora_{largest['rank']}")
        plain = check_plain_peft(base_path, lora_dir, adapter_dir, tokenizer, texts[0], work_dir)
    return {
        "settings": asdict(settings),
        "training": training,
        "test_questions": len(speciality.examples),
        "full_model_bytes": file_sizes(base_path)[base_path],
        "records": records,
        "plain_peft_check": plain,
        "seconds": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------------------ table and plot


def describe(result: dict) -> str:
    """The run in one line: model, adapter, training budget."""
    training, settings = result["training"], result["settings"]
    first, last = training["window"][0], training["window"][1] - 1
    return (
        f"SmolLM2-135M-Instruct, CoFiTune {training['target_modules']} layers {first}..{last}, no mask; "
        f"{settings['steps']} steps x {settings['batch_size']} at lr {settings['learning_rate']:g}"
    )


def table_rows(result: dict) -> list[dict]:
    adapter_bytes = result["records"][0]["file_bytes"]
    full_bytes = result["full_model_bytes"]
    rows = []
    for r in result["records"]:
        if r["kind"] == "lora":
            lo, hi = r["ranks_min"], r["ranks_max"]
            rank = str(lo) if lo == hi else f"{lo}-{hi} (mean {r['ranks_mean']:.0f})"
        else:
            rank = "-"
        stored = r["kind"] != "base"
        rows.append(
            {
                "export": r["export"],
                "rank": rank,
                "energy kept": f"{r['energy_kept_mean']:.3f}" if r["kind"] == "lora" else "-",
                "KL/token": f"{r['kl_mean']:.2e}",
                "KL max": f"{r['kl_max']:.2e}",
                "top-1 agree": f"{r['top1_agreement']:.4f}",
                "arith. EM": f"{r['accuracy']:.2f}",
                "same gen.": f"{r['same_generations']:.2f}",
                "file MB": f"{r['file_bytes'] / 1e6:.1f}" if stored else "-",
                "/ adapter": f"{r['file_bytes'] / adapter_bytes:.2f}" if stored else "-",
                "/ full model": f"{r['file_bytes'] / full_bytes:.3f}" if stored else "-",
            }
        )
    return rows


def _rank_axis(ax, fixed: list[dict], full_rank: int) -> None:
    ticks = [r["rank"] for r in fixed]
    ax.set_xscale("log")
    ax.set_xticks(ticks, labels=[f"{r}\n(full)" if r >= full_rank else str(r) for r in ticks])
    ax.minorticks_off()
    ax.set_xlabel("LoRA rank (per module)")
    ax.grid(alpha=0.3, which="both")


def _plot_kl(ax, fixed: list[dict], energy: list[dict], by_kind: dict) -> None:
    floor = 1e-9  # an exact export's KL is ~0: draw it on the floor of the log axis
    xs, kls = [r["ranks_mean"] for r in fixed], [max(r["kl_mean"], floor) for r in fixed]
    ax.plot(xs, kls, "o-", color="tab:blue", label="LoRA, rank r")
    for r, x, kl in zip(fixed, xs, kls):
        ax.annotate(f"top-1 {r['top1_agreement']:.1%}", (x, kl), textcoords="offset points", xytext=(4, 6), fontsize=7)
    for r in energy:
        ax.plot([r["ranks_mean"]], [max(r["kl_mean"], floor)], "D", color="tab:green", label=f"{r['export']}")
    if "base" in by_kind:
        base = by_kind["base"]
        label = f"base model (adapter dropped), top-1 {base['top1_agreement']:.1%}"
        ax.axhline(base["kl_mean"], color="grey", linestyle="--", label=label)
    if "merged" in by_kind:
        ax.axhline(
            max(by_kind["merged"]["kl_mean"], floor),
            color="tab:purple",
            linestyle=":",
            label="merged model (KL 0: at the floor)",
        )
    ax.set_yscale("log")
    ax.set_ylabel("KL(unconverted || export) per token (nats)")
    ax.set_title("Fidelity on held-out general text", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")


def _plot_speciality(ax, fixed: list[dict], energy: list[dict], by_kind: dict, n_test: int) -> None:
    xs = [r["ranks_mean"] for r in fixed]
    ax.plot(xs, [r["accuracy"] for r in fixed], "o-", color="tab:blue", label="LoRA, rank r: exact match")
    ax.plot(xs, [r["same_generations"] for r in fixed], "^--", color="tab:cyan", label="LoRA: same generation")
    for r in energy:
        ax.plot([r["ranks_mean"]], [r["accuracy"]], "D", color="tab:green", label=f"{r['export']}: exact match")
    ax.axhline(by_kind["cofitune"]["accuracy"], color="tab:red", label="unconverted adapter: exact match")
    if "base" in by_kind:
        ax.axhline(by_kind["base"]["accuracy"], color="grey", linestyle="--", label="base model: exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(f"fraction of {n_test} arithmetic questions")
    ax.set_title("Speciality: exact match, and generations identical to the adapter's", fontsize=10)
    ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 0.06))


def _plot_size(ax, fixed: list[dict], energy: list[dict], by_kind: dict, full_model_bytes: int) -> None:
    xs = [r["ranks_mean"] for r in fixed]
    mbs = [r["file_bytes"] / 1e6 for r in fixed]
    ax.plot(xs, mbs, "s-", color="tab:orange", label="LoRA, rank r")
    for i, (x, mb) in enumerate(zip(xs, mbs)):
        last = i == len(xs) - 1  # the rightmost label goes to the left of its point, inside the axes
        offset, align = ((-6, 4), "right") if last else ((6, -10), "left")
        ax.annotate(f"{mb:.1f}", (x, mb), textcoords="offset points", xytext=offset, fontsize=7, ha=align)
    for r in energy:
        ax.plot([r["ranks_mean"]], [r["file_bytes"] / 1e6], "D", color="tab:green", label=r["export"])
    adapter_mb = by_kind["cofitune"]["file_bytes"] / 1e6
    ax.axhline(adapter_mb, color="tab:red", label=f"CoFiTune adapter ({adapter_mb:.1f} MB)")
    full_mb = full_model_bytes / 1e6
    ax.axhline(full_mb, color="grey", linestyle="--", label=f"full model = merged export ({full_mb:.0f} MB)")
    ax.set_yscale("log")
    ax.set_ylabel("weights file (MB)")
    ax.set_title("File size", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")


def plot(result: dict, path: str, title: str) -> None:
    """Three panels against the LoRA rank: KL and top-1 agreement, speciality, file size."""
    from matplotlib.figure import Figure

    records = result["records"]
    by_kind = {r["kind"]: r for r in records if r["kind"] != "lora"}
    fixed = sorted((r for r in records if r["kind"] == "lora" and isinstance(r["rank"], int)), key=lambda r: r["rank"])
    energy = [r for r in records if r["kind"] == "lora" and isinstance(r["rank"], float)]
    fig = Figure(figsize=(16, 4.8), layout="constrained")
    ax_kl, ax_spec, ax_size = fig.subplots(1, 3)
    _plot_kl(ax_kl, fixed, energy, by_kind)
    _plot_speciality(ax_spec, fixed, energy, by_kind, result["test_questions"])
    _plot_size(ax_size, fixed, energy, by_kind, result["full_model_bytes"])
    for ax in (ax_kl, ax_spec, ax_size):
        _rank_axis(ax, fixed, by_kind["cofitune"]["full_rank"])
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", nargs="+", default=DEFAULT_RANKS, help="LoRA ranks (ints) or energy fractions")
    parser.add_argument("--steps", type=int, default=60, help="training steps of the CoFiTune adapter")
    parser.add_argument("--n-test", type=int, default=100, help="arithmetic test questions")
    parser.add_argument("--n-texts", type=int, default=32, help="held-out general texts for KL and top-1 agreement")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per general text")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--work-dir", default=None, help="keep the adapter and the exports here (default: temporary)")
    parser.add_argument("--out", default="benchmarks/results/export.json")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON at --out")
    args = parser.parse_args()
    png = os.path.splitext(args.out)[0] + ".png"
    if args.replot:
        with open(args.out) as f:
            result = json.load(f)
        plot(result, png, describe(result))
        print(f"wrote {png}")
        return

    import torch

    torch.set_num_threads(args.threads)
    from cofitune_peft.kit.data import arithmetic_task, general_texts
    from cofitune_peft.kit.loading import load_smollm2, smollm2_path

    settings = Settings(
        ranks=[parse_rank(r) for r in args.ranks],
        steps=args.steps,
        n_test=args.n_test,
        n_texts=args.n_texts,
        max_length=args.max_length,
    )
    _, tokenizer = load_smollm2()
    train, test = arithmetic_task(n_train=max(2000, settings.steps * settings.batch_size), n_test=settings.n_test)
    texts = list(general_texts(n=settings.n_texts, split="eval")["text"])
    if args.work_dir:
        os.makedirs(args.work_dir, exist_ok=True)
        result = run_benchmark(smollm2_path(), tokenizer, train, test, texts, settings, args.work_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_export-") as work_dir:
            result = run_benchmark(smollm2_path(), tokenizer, train, test, texts, settings, work_dir)

    table = markdown(table_rows(result))
    header = describe(result)
    print(header)
    print(table)
    print(f"plain PEFT load (fresh process): {result['plain_peft_check']}")
    print(f"total {result['seconds'] / 60:.1f} min on {torch.get_num_threads()} thread(s)")
    result.update(args=vars(args), table=table, torch_threads=torch.get_num_threads())
    write_json(args.out, result)
    plot(result, png, header)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
