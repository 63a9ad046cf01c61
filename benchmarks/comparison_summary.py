"""The committed comparison (`cofitune compare --preset full`), summed up across its tasks: the headline table with
seed spreads, which differences exceed the spread, which mask variant wins on validation, and one plot.

Reads `DIR/<task>/comparison.json` (written by `compare_methods`; re-run `cofitune compare --preset full --output-dir
DIR` to refresh them from the cached runs) and writes `DIR/summary.json` and `DIR/summary.png`; prints markdown.

    python benchmarks/comparison_summary.py [--dir benchmarks/results/comparison]

Rules (docs/results.md):
- a method's point is its selection on validation (best validation Uni., each retention capped at 1); the numbers are
  the test split's, mean ± standard deviation over the seeds run for that point (n=1: no spread);
- a difference between two methods is *real* only when it is larger than the seed spread (the sum of their standard
  deviations, both with at least two seeds) *and* its 95% paired bootstrap interval over items (`differences` in
  comparison.json, main seed) excludes 0; it is *noise* when it is within the spread or its interval holds 0, and
  *unmeasured* when what is measured does not make it noise but a part is missing (one seed, or no per-item values);
- the best mask variant is the one with the best validation Uni. at its selected point, averaged over the tasks
  that ran every variant; it is compared with the coarse level (no mask) the same way. The library's default changes
  only when that winner leads the default (`cofitune_mask`) by more than the seed spread (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

HEADLINE = ("full", "wiseft", "lora", "cofitune", "cofitune_alpha")
MASKS = ("cofitune_mask", "cofitune_mask_mean1", "cofitune_onesided", "cofitune_fisher", "cofitune_hard")
FINE = ("cofitune_pull", "cofitune_restrained", "cofitune_l2out")  # fine levels that are not a learning rate
REPLAY = ("full_replay10", "full_replay25", "lora_replay10", "lora_replay25", "cofitune_replay10", "cofitune_replay25")
BASELINES = ("full", "wiseft", "lora", "l1", "l2", "corda_kpm", "osf")
METRICS = ("spec", "vers", "gen", "uni")
POST_HOC = ("wiseft", "cofitune_alpha")  # derived from trained runs, no training of their own


def _load(directory: str) -> dict[str, dict]:
    out = {}
    for task in sorted(os.listdir(directory)):
        path = os.path.join(directory, task, "comparison.json")
        if os.path.isfile(path):
            with open(path) as fh:
                out[task] = json.load(fh)
    if not out:
        raise SystemExit(f"no <task>/comparison.json under {directory}; run `cofitune compare --preset full` first")
    return out


def _stat(row: dict, metric: str) -> tuple[float, float, int]:
    """`(mean, sd, n)` of a selected point's test metric over its seeds (the main seed alone when no repeat ran)."""
    seeds = row.get("seeds") or {}
    n = len(seeds.get("seeds") or [])
    if metric in seeds and n:
        mean, sd = seeds[metric]
        if mean is not None and math.isfinite(mean):
            return mean, sd, n
    value = row["test"].get(metric)
    return (math.nan if value is None else value), math.nan, 1


def _fmt(stat: tuple[float, float, int], digits: int = 3) -> str:
    mean, sd, n = stat
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" if n < 2 else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def best_mask(comparisons: dict[str, dict]) -> tuple[str | None, dict[str, float]]:
    """The mask variant with the best mean validation Uni. over the tasks that ran it at all (each at its point)."""
    scores: dict[str, list[float]] = {}
    for comparison in comparisons.values():
        for name in (*MASKS, "cofitune"):
            if name in comparison["selected"]:
                scores.setdefault(name, []).append(comparison["selected"][name]["validation"]["uni"])
    complete = {m: sum(v) / len(v) for m, v in scores.items() if len(v) == len(comparisons)}
    masks = {m: v for m, v in complete.items() if m in MASKS}
    return (max(masks, key=masks.get) if masks else None), complete


def _interval(differences: list[dict] | None, a: str, b: str, metric: str) -> list[float] | None:
    """The paired bootstrap interval of `metric(a) - metric(b)` from comparison.json's `differences`, or None."""
    for entry in differences or ():
        if (entry["a"], entry["b"]) == (a, b) and entry[metric].get("interval"):
            return list(entry[metric]["interval"])
        if (entry["a"], entry["b"]) == (b, a) and entry[metric].get("interval"):
            low, high = entry[metric]["interval"]
            return [-high, -low]
    return None


def compare_pair(a: dict, b: dict, metric: str, interval: list[float] | None = None) -> dict:
    """The difference of `a`'s and `b`'s selected points in `metric` (means over seeds), the seed spread, the item
    interval (`interval`, from comparison.json) and the call: "real", "noise" or "unmeasured" (see the module)."""
    (ma, sa, na), (mb, sb, nb) = _stat(a, metric), _stat(b, metric)
    diff = ma - mb
    spread = (sa + sb) if na > 1 and nb > 1 else None
    inside = interval is not None and interval[0] <= 0.0 <= interval[1]
    if not math.isfinite(diff):
        call = "unmeasured"
    elif inside or (spread is not None and abs(diff) <= spread):
        call = "noise"
    elif spread is None or interval is None:
        call = "unmeasured" + (" (one seed)" if spread is None else " (no item interval)")
    else:
        call = "real"
    return {"diff": diff, "spread": spread, "interval": interval, "call": call}


def summarise(comparisons: dict[str, dict]) -> dict:
    mask, validation_uni = best_mask(comparisons)
    out = {"best_mask": mask, "validation_uni": validation_uni, "tasks": {}}
    ours = [m for m in ("cofitune", mask, "cofitune_alpha", *FINE, "cofitune_replay10", "cofitune_replay25") if m]
    for task, comparison in comparisons.items():
        selected = comparison["selected"]
        labels = {m: c["label"] for m, c in comparison["methods"].items()}
        rows = []
        for name in ("base", *HEADLINE, *REPLAY, *MASKS, *FINE, *[b for b in BASELINES if b not in HEADLINE],
                     "cofitune_gradient", "vsoftmask"):  # fmt: skip
            if name not in selected:
                continue
            row = selected[name]
            cost = comparison["methods"].get(name, {})
            rows.append({"method": name, "label": labels.get(name, name), "learning_rate": row["learning_rate"],
                         "alpha": row.get("alpha"), "trainable": cost.get("trainable_parameters"),
                         "step_vs_lora": cost.get("step_time_vs_lora"), **{k: _stat(row, k) for k in METRICS}})  # fmt: skip
        replays = [m for m in REPLAY if m in selected and not m.startswith("cofitune")]
        best_replay = max(replays, key=lambda m: selected[m]["validation"]["uni"], default=None)
        differences = comparison.get("differences")
        pairs = []
        for a in ours:
            for b in ("lora", "full", "wiseft", best_replay, "cofitune"):
                if not b or a == b or a not in selected or b not in selected:
                    continue
                pairs.append({"ours": a, "baseline": b, **{
                    k: compare_pair(selected[a], selected[b], k, _interval(differences, a, b, k))
                    for k in ("spec", "vers", "uni")}})  # fmt: skip
        out["tasks"][task] = {
            "rows": rows,
            "pairs": pairs,
            "reference": comparison["reference"],
            "at_equal_speciality": comparison.get("at_equal_speciality", {}),
            "equal_speciality_answer": comparison.get("equal_speciality_answer", {}),
            "item_worth": comparison.get("item_worth", {}),
            "labels": labels,
        }
    return out


def to_markdown(summary: dict) -> str:
    lines = []
    for task, data in summary["tasks"].items():
        lines += [
            f"### {task}",
            "",
            "| method | lr | Spec. | Vers. | gen. probes | Uni. | seeds | trainable | step vs LoRA |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in data["rows"]:
            lr = "-" if r["learning_rate"] is None else f"{r['learning_rate']:.0e}"
            if r["alpha"] is not None:
                lr += f", a={r['alpha']:g}"
            trainable = "-" if r.get("trainable") is None else f"{r['trainable'] / 1e6:.1f}M"
            step = "-" if r.get("step_vs_lora") is None else f"{r['step_vs_lora']:.2f}"
            lines.append(f"| {r['label']} | {lr} | {_fmt(r['spec'])} | {_fmt(r['vers'])} | {_fmt(r['gen'], 2)} | "
                         f"{_fmt(r['uni'])} | {r['uni'][2]} | {trainable} | {step} |")  # fmt: skip
        worth = (data.get("item_worth") or {}).get("uni")
        lines += ["", "Δ at the selected points (seed spread, 95% item interval: call)"
                  + (f"; one item is worth {worth:.3f} Uni." if worth else "") + ":", "",
                  "| CoFiTune method vs | Δ Spec. | Δ Vers. | Δ Uni. |", "|---|---|---|---|"]  # fmt: skip
        for p in data["pairs"]:
            cells = [_pair_cell(p[k]) for k in ("spec", "vers", "uni")]
            lines.append(
                f"| {data['labels'][p['ours']]} vs {data['labels'][p['baseline']]} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    lines += _equal_speciality_markdown(summary)
    lines += _answer_markdown(summary)
    lines.append(
        f"Best mask variant on validation (mean selected validation Uni. over the tasks): {summary['best_mask']}"
    )
    for name, value in sorted(summary["validation_uni"].items(), key=lambda kv: -kv[1]):
        lines.append(f"- {name}: {value:.3f}")
    return "\n".join(lines)


def _pair_cell(pair: dict) -> str:
    spread = "-" if pair["spread"] is None else f"±{pair['spread']:.3f}"
    bounds = "-" if not pair.get("interval") else f"[{pair['interval'][0]:+.3f}, {pair['interval'][1]:+.3f}]"
    return f"{pair['diff']:+.3f} ({spread}, {bounds}: {pair['call']})"


def _answer_markdown(summary: dict) -> list[str]:
    """Per task and Spec. level: the best CoFiTune-family point against the best of full FT, LoRA and replay."""
    lines = ["The answer: at equal speciality, the best CoFiTune-family point against the best of full fine-tuning, "
             "LoRA and replay (test Vers., main seed, 95% paired bootstrap interval):", "",
             "| task | Spec. >= | CoFiTune family | baseline | Δ Vers. | call |", "|---|---|---|---|---|---|"]  # fmt: skip
    rows = 0
    for task, data in summary["tasks"].items():
        labels = data["labels"]
        for level, entry in (data.get("equal_speciality_answer") or {}).items():
            if "diff" not in entry:
                continue
            a, b, bounds = entry["ours"], entry["theirs"], entry.get("interval")
            interval = "" if not bounds else f" [{bounds[0]:+.3f}, {bounds[1]:+.3f}]"
            lines.append(f"| {task} | {level} | {labels.get(a['method'], a['method'])} {a['vers']:.3f} | "
                         f"{labels.get(b['method'], b['method'])} {b['vers']:.3f} | {entry['diff']:+.3f}{interval} | "
                         f"{entry['call']} |")  # fmt: skip
            rows += 1
    return [*lines, ""] if rows else []


def _equal_speciality_markdown(summary: dict) -> list[str]:
    """Every method's best test Vers. (gen.-probe retention) at each speciality level, one row per task and method."""
    tasks = summary["tasks"]
    levels = sorted({level for data in tasks.values() for table in data["at_equal_speciality"].values()
                     for level in table}, key=float)  # fmt: skip
    if not levels:
        return []
    lines = [
        "At equal speciality (best test Vers. among a method's grid points whose test Spec. reaches the level, "
        "gen.-probe retention in brackets):",
        "",
        "| task | method | " + " | ".join(f"Spec. >= {level}" for level in levels) + " |",
        "|---|---|" + "---|" * len(levels),
    ]
    for task, data in tasks.items():
        for name, table in data["at_equal_speciality"].items():
            if name == "base":
                continue
            cells = []
            for level in levels:
                point = table.get(level)
                cells.append("-" if not point else f"{point['vers']:.3f} ({point['gen']:.2f})")
            lines.append(f"| {task} | {data['labels'].get(name, name)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot(comparisons: dict[str, dict], summary: dict, path: str) -> str:
    """One panel per task: test Spec. against test Vers. over each headline method's grid (the post-hoc methods as
    points only), the default mask, the best mask variant, every fine level that is not a learning rate with `l2` (the
    control of `cofitune_l2out`), the soft mask over the whole model (`vsoftmask`, the mask with no window), and the best full-FT/LoRA replay on validation; selected points starred."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from cofitune_peft.kit.plotting import family_styles, new_figure, save_figure

    def best(names):  # the best on validation Uni., averaged over the tasks that ran it
        scores = {}
        for comparison in comparisons.values():
            for name in names:
                if name in comparison["selected"]:
                    scores.setdefault(name, []).append(comparison["selected"][name]["validation"]["uni"])
        return max(scores, key=lambda m: sum(scores[m]) / len(scores[m]), default=None)

    replay = best([m for m in REPLAY if not m.startswith("cofitune")])
    shown = list(
        dict.fromkeys(
            m for m in ("cofitune", "cofitune_mask", summary["best_mask"], *FINE, "vsoftmask", "cofitune_alpha") if m
        )
    )
    others = ["full", "wiseft", "lora", "l2", *([replay] if replay else [])]
    styles = family_styles(shown, others)
    fig = new_figure(figsize=(6 * len(comparisons), 5))
    axes = [fig.add_subplot(1, len(comparisons), i + 1) for i in range(len(comparisons))]
    for ax, (task, comparison) in zip(axes, comparisons.items()):
        for name in [*others, *shown]:
            rows = [r for r in comparison["frontier"] if r["method"] == name and r["test"]["spec"] is not None
                    and math.isfinite(r["test"]["spec"])]  # fmt: skip
            if not rows:
                continue
            rows.sort(key=lambda r: (r["learning_rate"] or 0, r.get("alpha") or 0))
            style = dict(styles[name])
            if name in POST_HOC:  # points from several training runs: a line through them would mean nothing
                style["linestyle"] = "none"
            ax.plot([r["test"]["vers"] for r in rows], [r["test"]["spec"] for r in rows], markersize=5,
                    label=comparison["methods"][name]["label"], **style)  # fmt: skip
            chosen = comparison["selected"].get(name)
            if chosen and math.isfinite(chosen["test"]["spec"]):
                ax.plot([chosen["test"]["vers"]], [chosen["test"]["spec"]], marker="*", markersize=14,
                        color=styles[name]["color"], markeredgecolor="black", linestyle="none", zorder=4)  # fmt: skip
        ax.set_title(f"{task}: every learning rate (stars: selected on validation)", fontsize=10)
        ax.set_xlabel("Vers. on test (capped at 1)")
        ax.set_ylabel("Spec. on test (1 = full fine-tuning)")
        ax.grid(True, alpha=0.3)
    axes[-1].legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=os.path.join("benchmarks", "results", "comparison"))
    args = parser.parse_args()
    comparisons = _load(args.dir)
    summary = summarise(comparisons)
    summary["markdown"] = to_markdown(summary)
    with open(os.path.join(args.dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2, default=float)
    plot(comparisons, summary, os.path.join(args.dir, "summary.png"))
    print(summary["markdown"])


if __name__ == "__main__":
    main()
