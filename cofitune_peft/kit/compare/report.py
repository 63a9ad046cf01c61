"""Scores, selection and reporting of a comparison: the frontier, each method's point chosen on validation, a table,
JSON and a Spec.-vs-Vers. plot.

Selection reads validation scores only: `select` receives the validation half of each run and nothing else, and the
reference of Spec. (the full fine-tuning run with the best validation speciality) is chosen the same way. Retentions are
reported uncapped and capped at 1; ranking uses the capped value, so probe noise above the base model earns nothing.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from cofitune_peft import CoFiTuneError

from ..evaluation import speciality_score, unified_score
from .intervals import call_difference, interval, resample

logger = logging.getLogger(__name__)

SPLITS = ("validation", "test")


def capped_retention(versatility: Mapping[str, Any], base_raw: float | None) -> tuple[float, float]:
    """`(uncapped, capped)` Vers. of one run's versatility record.

    With per-measure retentions (`components`, `weights`), the capped value caps each measure at 1 before the weighted
    mean, so a probe that rose cannot pay for a drift that fell. Without them (a plain callable), Vers. is `raw /
    base_raw`, capped as a whole.
    """
    components = versatility.get("components")
    if components:
        weights = versatility.get("weights") or {}
        used = {c: r for c, r in components.items() if weights.get(c, 1.0) > 0}
        total = sum(weights.get(c, 1.0) for c in used)
        uncapped = float(versatility["score"])
        capped = sum(weights.get(c, 1.0) * min(1.0, r) for c, r in used.items()) / total
        return uncapped, capped
    if base_raw is None or not base_raw > 0:
        raise CoFiTuneError(
            f"Vers. is undefined: the base model's versatility is {base_raw!r}, it must be > 0; use probes the base "
            "model partly solves, or `VersatilityEval`'s label-free measures."
        )
    uncapped = float(versatility["score"]) / base_raw
    return uncapped, min(1.0, uncapped)


def _point_id(record: Mapping[str, Any]) -> tuple:
    return (record["method"], record.get("learning_rate"), record.get("alpha"))


def choose_reference(full_validation: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The full fine-tuning run Spec. is relative to: the best validation speciality (first in grid order on ties)."""
    if not full_validation:
        raise CoFiTuneError("no full fine-tuning run is finished: Spec. needs one (method 'full').")
    return max(full_validation, key=lambda r: r["validation"]["speciality"])


def _scores(record, split, base, reference, weight) -> dict[str, Any]:
    own, base_split, ref_split = record[split], base[split], reference[split]
    vers, vers_capped = capped_retention(own["versatility"], base_split["versatility"].get("score"))
    try:
        spec = speciality_score(own["speciality"], base_split["speciality"], ref_split["speciality"])
    except CoFiTuneError:
        if split == "validation":
            raise
        spec = math.nan
    return {
        "speciality_raw": own["speciality"],
        "spec": spec,
        "vers": vers_capped,
        "vers_uncapped": vers,
        "uni": unified_score(spec, vers_capped, weight) if math.isfinite(spec) else math.nan,
        "uni_uncapped": unified_score(spec, vers, weight) if math.isfinite(spec) else math.nan,
        "ce_increase": own["versatility"].get("ce_increase"),
        "kl": own["versatility"].get("kl"),
        # retention of generated short answers (accuracy / the base model's), where forgetting shows first
        "gen": (own["versatility"].get("components") or {}).get("probes_gen"),
    }


def select(validation_rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each method's chosen points from validation scores alone.

    Args:
        validation_rows: `{"method", "learning_rate", "alpha", "uni", "speciality_raw"}` per grid point, validation
            scores only (`uni` with the capped Vers.).

    Returns:
        `{method: {"uni": point_id, "speciality": point_id}}`: the best validation Uni. and the best validation
        speciality (first in grid order on ties).
    """
    by_method: dict[str, list] = {}
    for row in validation_rows:
        by_method.setdefault(row["method"], []).append(row)
    out = {}
    for method, rows in by_method.items():
        best_uni = max(rows, key=lambda r: r["uni"] if math.isfinite(r["uni"]) else -math.inf)
        best_spec = max(rows, key=lambda r: r["speciality_raw"])
        out[method] = {"uni": _point_id(best_uni), "speciality": _point_id(best_spec)}
    return out


#: Spec. levels of `ComparisonResult.at_equal_speciality` (1 = full fine-tuning's selected speciality).
EQUAL_SPECIALITY_LEVELS = (0.25, 0.5, 0.75, 1.0)
#: The methods CoFiTune is held against in `ComparisonResult.equal_speciality_answer`: full fine-tuning, LoRA, replay.
ANSWER_BASELINES = ("full", "lora", "full_replay10", "full_replay25", "lora_replay10", "lora_replay25")


def _mean_spread(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


class ComparisonResult:
    """The outcome of `compare_methods`: every grid point's scores, each method's selection, per-method costs.

    Attributes:
        frontier (`list[dict]`): one row per grid point at the main seed: method, learning rate (and a derived
            method's `alpha`), validation and test `spec`, `vers` (capped), `vers_uncapped`, `uni`, `uni_uncapped`,
            `ce_increase`, `kl`.
        selected (`dict[str, dict]`): per method, the row selected on validation Uni. (plus `seeds`: mean and spread
            of its test scores over the seeds run).
        best_speciality (`dict[str, dict]`): per method, the row with the best validation speciality.
        methods (`dict[str, dict]`): per method, label, family, trainable parameters and step time relative to LoRA.
        reference (`dict`): the full fine-tuning point Spec. is relative to.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], methods: Mapping[str, Any], *, seed: int, weight: float):
        self.weight = weight
        self.seed = seed
        self._methods = dict(methods)
        main = [r for r in records if r["seed"] == seed]
        base = next((r for r in main if r["method"] == "base"), None)
        if base is None:
            raise CoFiTuneError("the base model's run is missing: a comparison always scores it first.")
        reference = choose_reference([r for r in main if r["method"] == "full"])
        self.reference = {"learning_rate": reference["learning_rate"], "seed": seed}

        def row(record):
            out = {
                "key": record.get("key"),
                "method": record["method"],
                "label": self._methods[record["method"]].label if record["method"] in self._methods else "",
                "learning_rate": record.get("learning_rate"),
                "alpha": record.get("alpha"),
                "seed": record["seed"],
            }
            for split in SPLITS:
                if split in record:  # a seed's repeat is scored on test only
                    out[split] = _scores(record, split, base, reference, weight)
            return out

        rows = [row(r) for r in main if r["method"] in self._methods and all(split in r for split in SPLITS)]
        self.frontier = rows
        self._records = {r["key"]: r for r in main if r.get("key") and r["method"] in self._methods}
        self._base_key, self._reference_key = base.get("key"), reference.get("key")
        self._draws: dict[str, dict] = {}
        # Selection sees the validation half only.
        validation_only = [
            {**r["validation"], **{k: r[k] for k in ("method", "learning_rate", "alpha")}} for r in rows
        ]
        choice = select(validation_only)
        index = {_point_id(r): r for r in rows}
        order = [m for m in self._methods if m in choice]  # the registry's order, not the files'
        self.selected = {m: dict(index[choice[m]["uni"]]) for m in order}
        self.best_speciality = {m: dict(index[choice[m]["speciality"]]) for m in order}
        for _method, chosen in self.selected.items():
            repeats = [row(r) for r in records if _point_id(r) == _point_id(chosen)]
            chosen["seeds"] = {
                "seeds": sorted(r["seed"] for r in repeats),
                **{
                    k: _mean_spread([r["test"][k] for r in repeats])
                    for k in ("spec", "vers", "vers_uncapped", "uni", "gen")
                },
            }
        self.methods = self._costs(records)

    def _costs(self, records) -> dict[str, dict[str, Any]]:
        per_step: dict[str, list[float]] = {}
        params: dict[str, int] = {}
        for r in records:
            train = r.get("train")
            if train and r.get("alpha") is None:
                per_step.setdefault(r["method"], []).append(train["seconds"] / train["steps"])
                params[r["method"]] = train["trainable_parameters"]
        lora = statistics.median(per_step["lora"]) if per_step.get("lora") else None
        out = {}
        for name, method in self._methods.items():
            step = statistics.median(per_step[name]) if per_step.get(name) else None
            out[name] = {
                "label": method.label,
                "family": method.family,
                "trainable_parameters": params.get(name, 0),
                "seconds_per_step": step,
                "step_time_vs_lora": step / lora if step is not None and lora else None,
            }
        return out

    # -- noise: paired bootstrap intervals over items, seed spreads, one item's worth

    def draws(self, split: str = "test") -> dict[str, dict[str, Any]]:
        """Every main-seed run's Spec., Vers. and Uni. over paired bootstrap draws of `split`'s items, by run key
        (`intervals.resample`; empty when the runs kept no per-item values)."""
        if split not in self._draws:
            self._draws[split] = resample(
                self._records, self._base_key, self._reference_key, split, weight=self.weight, seed=self.seed
            )
        return self._draws[split]

    def interval(self, a: str, b: str, metric: str, split: str = "test") -> tuple[float, float] | None:
        """The 95% paired bootstrap interval of `metric(a) - metric(b)` on `split`, for two runs given by their keys
        (a row's `key`), or None when either has no per-item values."""
        draws = self.draws(split)
        if a not in draws or b not in draws:
            return None
        return interval(draws[a][metric], draws[b][metric])

    def item_worth(self, metric: str, split: str = "test") -> float | None:
        """How much `metric` moves when one item flips: one question for Spec., the probe kind that moves Vers. most
        for Vers., the larger of the two weighted shares for Uni. (None when the runs kept no per-item values)."""
        base, ref = self._records.get(self._base_key), self._records.get(self._reference_key)
        items = ((base or {}).get(split) or {}).get("items") or {}
        ref_items = ((ref or {}).get(split) or {}).get("items") or {}
        if not items.get("speciality") or not ref_items.get("speciality"):
            return None
        n = len(items["speciality"])
        gain = abs(sum(ref_items["speciality"]) - sum(items["speciality"])) / n
        spec = 1.0 / (n * gain) if gain > 0 else math.inf
        versatility = base[split]["versatility"]
        weights, present = versatility.get("weights") or {}, versatility.get("components") or {}
        total = sum(weights.get(c, 1.0) for c in present) or 1.0
        vers = 0.0
        for kind in ("probes_gen", "probes_mc"):
            values = items.get(kind)
            if kind in present and values and sum(values):
                vers = max(vers, weights.get(kind, 1.0) / total / sum(values))  # 1 / (n * accuracy) = 1 / correct
        worth = {"spec": spec, "vers": vers, "uni": max(self.weight * spec, (1.0 - self.weight) * vers)}
        return worth.get(metric)

    def difference(self, a: str, b: str, metric: str, split: str = "test") -> dict[str, Any]:
        """Method `a`'s selected point against method `b`'s: the difference of the means over seeds, the seed spread
        (sum of the standard deviations, None with one seed on either side), the paired bootstrap interval (main seed)
        and the call (`intervals.call_difference`: "real", "noise" or "unmeasured")."""
        ra, rb = self.selected[a], self.selected[b]
        (ma, sa), (mb, sb) = ra["seeds"][metric], rb["seeds"][metric]
        diff = ma - mb
        one_seed = len(ra["seeds"]["seeds"]) < 2 or len(rb["seeds"]["seeds"]) < 2
        spread = None if one_seed else sa + sb
        bounds = self.interval(ra["key"], rb["key"], metric, split)
        return {"diff": diff, "spread": spread, "interval": bounds, "call": call_difference(diff, spread, bounds)}

    def differences(self, metrics: Sequence[str] = ("spec", "vers", "uni")) -> list[dict[str, Any]]:
        """`difference` for every pair of selected methods (in registry order, base left out), test split."""
        names = [m for m in self.selected if m != "base"]
        return [
            {"a": a, "b": b, **{k: self.difference(a, b, k) for k in metrics}}
            for i, a in enumerate(names)
            for b in names[i + 1 :]
        ]

    def at_equal_speciality(self, levels: Sequence[float] = EQUAL_SPECIALITY_LEVELS) -> dict[str, dict[float, Any]]:
        """Per method and Spec. level `s`: the best test Vers. among the method's grid points whose test Spec. is at
        least `s` (`None` where none reaches it), with that point's gen.-probe retention.

        The frontier's shape: at equal speciality, which method keeps more? A step function over the grid points, no
        interpolation; it reads the test split, so it describes the frontier and chooses nothing.
        """
        out: dict[str, dict[float, Any]] = {}
        for name in self._methods:
            rows = [r for r in self.frontier if r["method"] == name and math.isfinite(r["test"]["spec"])]
            out[name] = {}
            for level in levels:
                reaching = [r for r in rows if r["test"]["spec"] >= level]
                best = max(reaching, key=lambda r: r["test"]["vers"], default=None)
                out[name][level] = None if best is None else {
                    "vers": best["test"]["vers"], "gen": best["test"].get("gen"), "spec": best["test"]["spec"],
                    "learning_rate": best["learning_rate"], "alpha": best.get("alpha"), "key": best.get("key"),
                }  # fmt: skip
        return out

    def equal_speciality_answer(
        self, levels: Sequence[float] = EQUAL_SPECIALITY_LEVELS, baselines: Sequence[str] = ANSWER_BASELINES
    ) -> dict[str, Any]:
        """At each Spec. level: the CoFiTune-family grid point with the best test Vers. (among those whose test Spec.
        reaches the level) against the best of `baselines` (full fine-tuning, LoRA and their replay variants), the
        difference, its paired bootstrap interval and whether it is beyond the item noise (main seed: the frontier's
        points have one seed each, so a difference beyond the item noise is still unmeasured against the seeds)."""
        table = self.at_equal_speciality(levels)
        ours = [m for m in table if self.methods.get(m, {}).get("family") == "cofitune"]
        theirs = [m for m in baselines if m in table]
        out = {}
        worth = self.item_worth("vers")
        for level in levels:

            def best(names, level=level):
                points = [(m, table[m][level]) for m in names if table[m][level]]
                return max(points, key=lambda p: p[1]["vers"], default=None)

            a, b = best(ours), best(theirs)
            if a is None or b is None:
                out[f"{level:g}"] = {"ours": a and {"method": a[0], **a[1]}, "theirs": b and {"method": b[0], **b[1]}}
                continue
            diff = a[1]["vers"] - b[1]["vers"]
            bounds = self.interval(a[1]["key"], b[1]["key"], "vers")
            noise = (worth is not None and abs(diff) < worth) or (bounds is not None and bounds[0] <= 0 <= bounds[1])
            out[f"{level:g}"] = {
                "ours": {"method": a[0], **a[1]},
                "theirs": {"method": b[0], **b[1]},
                "diff": diff,
                "interval": bounds,
                "call": "within noise" if noise else ("beyond the item noise" if bounds else "unmeasured"),
            }
        return out

    # -- output

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight": self.weight,
            "seed": self.seed,
            "reference": self.reference,
            "methods": self.methods,
            "selected": self.selected,
            "best_speciality": self.best_speciality,
            "frontier": self.frontier,
            "at_equal_speciality": {
                m: {f"{k:g}": v for k, v in d.items()} for m, d in self.at_equal_speciality().items()
            },
            "item_worth": {k: self.item_worth(k) for k in ("spec", "vers", "uni")},
            "equal_speciality_answer": self.equal_speciality_answer(),
            "differences": self.differences(),
        }

    def to_markdown(self) -> str:
        def f(x, digits=3):
            return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"

        def grid(r):
            lr = f"{r['learning_rate']:.0e}" if r["learning_rate"] else "-"
            return f"{lr}, a={r['alpha']:g}" if r.get("alpha") is not None else lr

        lines = [
            "Selected on validation (best validation Uni.; Vers. capped at 1, uncapped in brackets), scored on test:",
            "",
            "| method | lr | val Uni. | Spec. | Vers. | gen. probes | Uni. | CE drift | trainable | step vs LoRA | "
            "seeds: Spec. | seeds: Vers. | seeds: Uni. |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in self.selected.items():
            t, cost, s = r["test"], self.methods[name], r["seeds"]
            seeds = " | ".join(f"{f(s[k][0])} ± {f(s[k][1])} (n={len(s['seeds'])})" for k in ("spec", "vers", "uni"))
            ratio = f(cost["step_time_vs_lora"], 2)
            lines.append(
                f"| {cost['label']} | {grid(r)} | {f(r['validation']['uni'])} | {f(t['spec'])} | {f(t['vers'])} "
                f"({f(t['vers_uncapped'])}) | {f(t.get('gen'), 2)} | {f(t['uni'])} | {f(t['ce_increase'], 4)} | "
                f"{cost['trainable_parameters']:,} | {ratio} | {seeds} |"
            )
        lines += ["", "Best validation speciality per method (test scores):", ""]
        lines += ["| method | lr | Spec. | Vers. | Uni. |", "|---|---|---|---|---|"]
        for name, r in self.best_speciality.items():
            t = r["test"]
            lines.append(
                f"| {self.methods[name]['label']} | {grid(r)} | {f(t['spec'])} | {f(t['vers'])} | {f(t['uni'])} |"
            )
        lines += ["", "Frontier (every grid point, test scores; validation Uni. in the last column):", ""]
        lines += [
            "| method | lr | Spec. | Vers. | Vers. uncapped | gen. probes | Uni. | CE drift | KL | val Uni. |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.frontier:
            t = r["test"]
            lines.append(
                f"| {r['label']} | {grid(r)} | {f(t['spec'])} | {f(t['vers'])} | {f(t['vers_uncapped'])} | "
                f"{f(t.get('gen'), 2)} | {f(t['uni'])} | {f(t['ce_increase'], 4)} | {f(t['kl'], 4)} | "
                f"{f(r['validation']['uni'])} |"
            )
        levels = EQUAL_SPECIALITY_LEVELS
        lines += ["", "At equal speciality: the best test Vers. (gen.-probe retention) among a method's grid points "
                  "whose test Spec. reaches the level (- where none does):", ""]  # fmt: skip
        lines += ["| method | " + " | ".join(f"Spec. >= {x:g}" for x in levels) + " |", "|---|" + "---|" * len(levels)]
        for name, cells in self.at_equal_speciality(levels).items():
            if name == "base":
                continue
            shown = [f"{f(c['vers'])} ({f(c['gen'], 2)})" if c else "-" for c in cells.values()]
            lines.append(f"| {self.methods[name]['label']} | " + " | ".join(shown) + " |")
        lines += self._differences_markdown()
        ref = self.reference
        lines += ["", f"Spec. is relative to full fine-tuning at lr {ref['learning_rate']:.0e} (best validation "
                  f"speciality); Uni. = {self.weight:g} Spec. + {1 - self.weight:g} Vers."]  # fmt: skip
        return "\n".join(lines)

    def _differences_markdown(self) -> list[str]:
        """CoFiTune's selected points against full fine-tuning, LoRA and the best replay baseline (validation Uni.)."""
        replay = [m for m in self.selected if "replay" in m and self.methods[m]["family"] != "cofitune"]
        best_replay = max(replay, key=lambda m: self.selected[m]["validation"]["uni"], default=None)
        baselines = [m for m in ("full", "lora", best_replay) if m in self.selected]
        ours = [m for m in self.selected if self.methods[m]["family"] == "cofitune"]
        if not baselines or not ours:
            return []
        worth = self.item_worth("uni")
        lines = ["", "Differences at the selected points (test; mean over seeds; seed spread = sum of the two standard "
                 "deviations; 95% paired bootstrap interval over items, main seed; real = beyond both"
                 + (f"; one item is worth {worth:.3f} Uni." if worth else "") + "):", "",
                 "| CoFiTune method vs | Δ Spec. | Δ Vers. | Δ Uni. |", "|---|---|---|---|"]  # fmt: skip

        def cell(d):
            spread = "-" if d["spread"] is None else f"±{d['spread']:.3f}"
            bounds = "-" if d["interval"] is None else f"[{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]"
            diff = "-" if not math.isfinite(d["diff"]) else f"{d['diff']:+.3f}"
            return f"{diff} ({spread}, {bounds}: {d['call']})"

        for a in ours:
            for b in baselines:
                cells = [cell(self.difference(a, b, k)) for k in ("spec", "vers", "uni")]
                lines.append(
                    f"| {self.methods[a]['label']} vs {self.methods[b]['label']} | " + " | ".join(cells) + " |"
                )
        lines += ["", "At equal speciality, the best CoFiTune-family point against the best of full fine-tuning, LoRA "
                  "and replay (test Vers.; main seed; 95% paired bootstrap interval):", "",
                  "| Spec. >= | CoFiTune family | baseline | Δ Vers. | call |", "|---|---|---|---|---|"]  # fmt: skip
        for level, entry in self.equal_speciality_answer().items():
            if "diff" not in entry:
                continue
            a, b = entry["ours"], entry["theirs"]
            bounds = (
                "" if entry["interval"] is None else f" [{entry['interval'][0]:+.3f}, {entry['interval'][1]:+.3f}]"
            )
            lines.append(
                f"| {level} | {self.methods[a['method']]['label']} {a['vers']:.3f} | "
                f"{self.methods[b['method']]['label']} {b['vers']:.3f} | {entry['diff']:+.3f}{bounds} | {entry['call']} |"
            )
        return lines

    def plot(self, path: str) -> str:
        """Test Spec. (y) against test Vers. (x, capped) per method, one curve over its grid; selected points starred.

        CoFiTune variants in blues with solid lines, the reference runs and other baselines in greys with dashed or
        dotted lines (the kit's colour language); markers tell the curves of one family apart. The legend sits
        outside the axes, so no label covers a point.
        """
        from matplotlib.lines import Line2D

        from ..plotting import family_styles, new_figure, save_figure

        cofitune = [m for m, c in self.methods.items() if c["family"] == "cofitune"]
        others = [m for m, c in self.methods.items() if c["family"] != "cofitune"]
        styles = family_styles(cofitune, others)
        fig = new_figure(figsize=(10, 5.5))
        ax = fig.add_subplot(1, 1, 1)
        curves = {}
        for name in [*others, *cofitune]:  # CoFiTune drawn last, on top
            rows = [r for r in self.frontier if r["method"] == name and math.isfinite(r["test"]["spec"])]
            if not rows:
                continue
            rows.sort(key=lambda r: (r["learning_rate"] or 0, r.get("alpha") or 0))
            xs = [r["test"]["vers"] for r in rows]
            ys = [r["test"]["spec"] for r in rows]
            (curves[name],) = ax.plot(xs, ys, markersize=5, alpha=0.9, **styles[name])
            chosen = self.selected.get(name)
            if chosen and math.isfinite(chosen["test"]["spec"]):
                ax.plot([chosen["test"]["vers"]], [chosen["test"]["spec"]], marker="*", markersize=15,
                        color=styles[name]["color"], markeredgecolor="black", linestyle="none", zorder=4)  # fmt: skip
        shown = [m for m in [*cofitune, *others] if m in curves]  # the legend lists CoFiTune first
        star = Line2D([], [], marker="*", markersize=12, color="white", markeredgecolor="black", linestyle="none")
        fig.legend([*(curves[m] for m in shown), star], [*(self.methods[m]["label"] for m in shown), "selected on "
                   "validation"], loc="outside right upper", fontsize=8, frameon=False)  # fmt: skip
        ax.set_xlabel("Vers. on test (retention vs base, capped at 1)")
        ax.set_ylabel("Spec. on test (gain vs full fine-tuning)")
        ax.set_title("Spec. vs Vers.: every learning rate of every method (CoFiTune in blue)", fontsize=11)
        ax.grid(True, alpha=0.3)
        return save_figure(fig, path)
