"""`SearchResult`: what a coarse search found, one record per candidate, scored by Spec. / Vers. / Uni.

It ranks the candidates, renders them as a table (pandas, markdown, JSON) and as a Spec.-Vers. plot, and reads a
finished or partial search back from its per-candidate JSON files.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cofitune_peft import CoFiTuneConfig, CoFiTuneError
from cofitune_peft.errors import import_extra
from cofitune_peft.utils import write_json_atomic

from ..evaluation import speciality_score, unified_score, versatility_score

TABLE_COLUMNS = ["window", "modules", "Spec.", "Vers.", "Uni.", "cost (s)", "level", "speciality", "versatility"]


@dataclass
class SearchResult:
    """What a search found: one record per candidate, the base model and the full fine-tuning reference.

    Args:
        records (`list[dict]`): raw per-candidate results, as stored in `output_dir/candidates/*.json`.
        weight (`float`, *optional*, defaults to 0.5): weight `w` of Spec. in `Uni. = w*Spec. + (1-w)*Vers.`.
        output_dir (`str`, *optional*): where the search lives.
    """

    records: list[dict]
    weight: float = 0.5
    output_dir: str | None = None

    def _get(self, kind: str) -> dict | None:
        return next((r for r in self.records if r["kind"] == kind), None)

    def scores(self, record: Mapping[str, Any]) -> dict[str, float]:
        """Spec., Vers., Uni. of one record (NaN where undefined, e.g. full fine-tuning gained nothing)."""
        base, full = self._get("base"), self._get("full")
        nan = float("nan")
        spec = vers = nan
        if base is not None and full is not None:
            with contextlib.suppress(CoFiTuneError):
                spec = speciality_score(record["speciality"], base["speciality"], full["speciality"])
        versatility = record.get("versatility")
        if base is not None and versatility is not None:
            with contextlib.suppress(CoFiTuneError):
                vers = versatility_score(versatility, base["versatility"])
        return {"Spec.": spec, "Vers.": vers, "Uni.": unified_score(spec, vers, self.weight)}

    @property
    def table(self):
        """A pandas DataFrame, one row per candidate (base and full first), indexed by candidate key."""
        pd = import_extra("pandas", "`SearchResult.table`", extra="eval")

        rows = []
        for r in self.records:
            window = (
                "all"
                if r["kind"] == "full"
                else "-"
                if r["kind"] == "base"
                else f"[{r['window'][0]}, {r['window'][1]})"
            )
            rows.append(
                {
                    "key": r["key"],
                    "window": window,
                    "modules": r.get("modules") or "-",
                    **self.scores(r),
                    "cost (s)": r.get("cost_seconds", 0.0),
                    "level": r["level"],
                    "speciality": r["speciality"],
                    "versatility": r.get("versatility", float("nan")),
                }
            )
        return pd.DataFrame(rows, columns=["key", *TABLE_COLUMNS]).set_index("key")

    def candidates(self) -> list[dict]:
        return [r for r in self.records if r["kind"] == "cofitune"]

    def _rank_key(self, record: Mapping[str, Any]) -> tuple:
        uni = self.scores(record)["Uni."]
        width = record["window"][1] - record["window"][0]
        # Undefined Uni. (full fine-tuning gained nothing) falls back to raw speciality, then versatility.
        finite = 0 if math.isnan(uni) else 1
        return (finite, uni if finite else 0.0, record["speciality"], record.get("versatility") or 0.0, -width)

    def ranked(self, level: str | None = None) -> list[dict]:
        """CoFiTune candidates (of `level`, or all), best first by Uni. (ties: the narrower window)."""
        pool = [r for r in self.candidates() if level is None or r["level"] == level]
        return sorted(pool, key=self._rank_key, reverse=True)

    @property
    def best(self) -> dict:
        ranked = self.ranked()
        if not ranked:
            raise CoFiTuneError("the search has no finished CoFiTune candidate yet.")
        return ranked[0]

    @property
    def best_config(self) -> CoFiTuneConfig:
        """The best candidate as a `CoFiTuneConfig` (no importance: add it for the fine level)."""
        best = self.best
        return CoFiTuneConfig(layers=tuple(best["window"]), parts=best["modules"])

    def with_weight(self, weight: float) -> SearchResult:
        """The same records scored with another Spec. weight."""
        unified_score(0.0, 0.0, weight)  # validates
        return SearchResult(self.records, weight, self.output_dir)

    def to_markdown(self, digits: int = 3) -> str:
        """The table as GitHub markdown (own writer: `DataFrame.to_markdown` needs the optional `tabulate`)."""
        table = self.table.reset_index()

        def cell(value) -> str:
            if isinstance(value, float):
                return "nan" if math.isnan(value) else f"{value:.{digits}f}"
            return str(value).replace("|", "\\|")

        header = list(table.columns)
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---:" if table[c].dtype.kind == "f" else "---" for c in header) + "|",
        ]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        best = self.best if self.candidates() else None
        return {
            "weight": self.weight,
            "best": None
            if best is None
            else {"key": best["key"], "layers": best["window"], "modules": best["modules"]},
            "table": json.loads(self.table.reset_index().to_json(orient="records")),
            "records": self.records,
        }

    def save(self, path: str | None = None) -> str:
        """Write `search.json` (table, best, records) to `path` or the output directory; returns the path."""
        path = path or os.path.join(self._dir(), "search.json")
        write_json_atomic(path, self.to_dict())
        return path

    def _dir(self) -> str:
        if self.output_dir is None:
            raise CoFiTuneError("this SearchResult has no `output_dir`; pass a path.")
        return self.output_dir

    @classmethod
    def load(cls, output_dir: str, weight: float | None = None) -> SearchResult:
        """Read a finished or partial search from `output_dir` (its per-candidate JSON files)."""
        files = sorted(glob.glob(os.path.join(output_dir, "candidates", "*.json")))
        if not files:
            raise CoFiTuneError(f"no search results in {output_dir!r} (expected {output_dir}/candidates/*.json).")
        records = []
        for f in files:
            with open(f) as fh:
                records.append(json.load(fh))
        records.sort(key=lambda r: r["order"])
        if weight is None:
            settings_path = os.path.join(output_dir, "settings.json")
            weight = 0.5
            if os.path.isfile(settings_path):
                with open(settings_path) as fh:
                    weight = json.load(fh).get("weight", 0.5)
        return cls(records, weight, output_dir)

    def plot(self, path: str) -> str:
        """Spec. (x) vs Vers. (y) of every candidate, with Uni. contours and the search tree's edges, as a PNG.

        CoFiTune candidates in blue (one marker per level), the base model and full fine-tuning in grey, the best
        candidate ringed; every point carries its window and modules, placed so that no label covers another.
        """
        from ..plotting import family_styles, label_points, new_figure, save_figure

        points = {r["key"]: (self.scores(r)["Spec."], self.scores(r)["Vers."]) for r in self.records}
        finite = {k: p for k, p in points.items() if not (math.isnan(p[0]) or math.isnan(p[1]))}
        fig = new_figure(figsize=(9, 6.5))
        ax = fig.add_subplot()
        xs = [p[0] for p in finite.values()] or [0.0, 1.0]
        ys = [p[1] for p in finite.values()] or [0.0, 1.0]
        x0, x1 = min(*xs, 0.0) - 0.1, max(*xs, 1.0) + 0.22  # room right of the best candidates for their labels
        y0, y1 = min(ys) - 0.05, max(*ys, 1.0) + 0.05
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        contour_labels = self._uni_contours(ax, (x0, x1), (y0, y1))
        along = self._tree_edges(ax, finite)
        levels = list(dict.fromkeys(r["level"] for r in self.candidates()))
        styles = family_styles(levels, ["base", "full"])
        shown, labels, radii, text_styles = self._candidate_points(ax, finite, styles)
        _search_legend(fig, styles, levels)
        ax.set_xlabel("Spec. (speciality gain / full fine-tuning's gain; 0 = base model, 1 = full fine-tuning)")
        ax.set_ylabel("Vers. (versatility / base model's; 1 = base model)")
        ax.set_title(f"CoFiTune coarse search (grey lines: Uni. = {self.weight:g} Spec. + {1 - self.weight:g} Vers.)")
        ax.grid(alpha=0.15)
        label_points(
            ax, shown, labels, avoid=contour_labels, clear=along, radius=radii, styles=text_styles, fontsize=8
        )
        return save_figure(fig, path)

    def _tree_edges(self, ax, finite: dict) -> list:
        """The search tree's edges as arrows, parent to child; returns positions along them (kept free of labels)."""
        from ..plotting import points_along

        edges = [
            (finite[r["parent"]], finite[r["key"]])
            for r in self.records
            if r.get("parent") in finite and r["key"] in finite
        ]
        for start, end in edges:
            arrow = {"arrowstyle": "->", "color": "0.6", "shrinkA": 7, "shrinkB": 7}
            ax.annotate("", xy=end, xytext=start, arrowprops=arrow)
        return points_along(edges, steps=12)

    def _candidate_points(self, ax, finite: dict, styles: dict) -> tuple[list, list, list, list]:
        """One marker per record (the best one ringed); returns `label_points`' points, labels, radii and styles."""
        from ..plotting import COFITUNE_COLOR, REFERENCE_COLOR

        best_key = self.best["key"] if self.candidates() else None
        shown, labels, radii, text_styles = [], [], [], []
        for r in self.records:
            if r["key"] not in finite:
                continue
            cofitune, best = r["kind"] == "cofitune", r["key"] == best_key
            style = styles[r["level"] if cofitune else r["kind"]]
            ax.plot(*finite[r["key"]], style["marker"], color=style["color"], markersize=7, zorder=3)
            label = f"[{r['window'][0]}, {r['window'][1]}) {r['modules']}" if cofitune else _REFERENCE_NAMES[r["kind"]]
            if best:
                ax.plot(*finite[r["key"]], "o", markersize=17, fillstyle="none", color=COFITUNE_COLOR, zorder=3)
                label = f"best: {label}"
            shown.append(finite[r["key"]])
            labels.append(label)
            radii.append(9.0 if best else 5.0)
            color = COFITUNE_COLOR if cofitune else REFERENCE_COLOR
            text_styles.append({"color": color, "fontweight": "bold" if best else "normal"})
        return shown, labels, radii, text_styles

    def _uni_contours(self, ax, xlim: tuple[float, float], ylim: tuple[float, float]) -> list:
        """Light Uni. contours, labelled along the bottom edge (away from the candidates); returns the labels."""
        import numpy as np

        (x0, x1), (y0, y1) = xlim, ylim
        gx, gy = np.meshgrid(np.linspace(x0, x1, 100), np.linspace(y0, y1, 100))
        contours = ax.contour(
            gx, gy, self.weight * gx + (1 - self.weight) * gy, levels=8, colors="0.82", linewidths=0.8
        )
        y_label = y0 + 0.1 * (y1 - y0)
        manual = []
        if self.weight > 0:
            for level in contours.levels:
                x = (level - (1 - self.weight) * y_label) / self.weight
                if x0 + 0.03 * (x1 - x0) < x < x1 - 0.03 * (x1 - x0):
                    manual.append((x, y_label))
        labels = ax.clabel(contours, fmt="Uni. %.2f", fontsize=7, manual=manual or False)
        for label in labels:
            label.set_color("0.5")
        return labels


_REFERENCE_NAMES = {"base": "base model", "full": "full fine-tuning"}


def _search_legend(fig, styles: dict, levels: list[str]) -> None:
    """The search plot's legend, below the axes: the levels' markers, the references, the best ring, the edges."""
    from matplotlib.lines import Line2D

    from ..plotting import COFITUNE_COLOR

    def marker(key: str, label: str):
        return Line2D([], [], **{**styles[key], "linestyle": "none"}, label=label)

    handles = [marker(level, f"CoFiTune, level {level}") for level in levels]
    handles += [marker(kind, name) for kind, name in _REFERENCE_NAMES.items()]
    handles += [
        Line2D([], [], marker="o", markersize=12, fillstyle="none", color=COFITUNE_COLOR, linestyle="none",
               label="best (highest Uni.)"),
        Line2D([], [], color="0.6", marker=">", markersize=5, label="search tree: parent to child"),
    ]  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False, fontsize=8)
