"""Plotting helpers for the kit: matplotlib's object-oriented `Figure` API only (no pyplot, no global backend).

One colour language for every kit plot: CoFiTune (this package's method) in blue, baselines (no training, full
fine-tuning, LoRA) in neutral greys, so the method stands out the same way in every picture. Needs matplotlib
(`pip install cofitune-peft[eval]`).
"""

from __future__ import annotations

import math
import os

from cofitune_peft import CoFiTuneError
from cofitune_peft.utils import atomic_path

#: CoFiTune rows: one blue for the method, whatever its level or mask mode.
COFITUNE_COLOR = "#1f63b4"
#: Baseline rows: a neutral grey, so that only the method carries colour.
BASELINE_COLOR = "#9a9a9a"
#: Reference lines (base model, full fine-tuning) and separators.
REFERENCE_COLOR = "#555555"


#: Several CoFiTune rows in one plot (levels, mask variants): blues only, told apart by marker as well.
COFITUNE_SHADES = (COFITUNE_COLOR, "#0a2f66", "#5b9bd5", "#3b4fc4")
#: Several baselines in one plot: greys only, told apart by line style and marker as well.
BASELINE_SHADES = (BASELINE_COLOR, "#4d4d4d", "#767676", "#262626")
MARKERS = "osD^vPX<>h"


def is_cofitune(method: str) -> bool:
    """Whether a result row (by its method key, e.g. `"cofitune_update"`) is this package's method."""
    return method.startswith("cofitune")


def method_color(method: str) -> str:
    """The colour of a result row: `COFITUNE_COLOR` for CoFiTune, `BASELINE_COLOR` for everything else."""
    return COFITUNE_COLOR if is_cofitune(method) else BASELINE_COLOR


def family_styles(cofitune: list[str], baselines: list[str]) -> dict[str, dict]:
    """Line and marker styles (`color`, `marker`, `linestyle`, `linewidth`) for several rows of each family.

    CoFiTune rows get blue shades and solid, thicker lines; baselines greys with dashed, dotted or dash-dotted lines;
    within a family, the marker differs from row to row. Pass the styles to `ax.plot(..., **styles[name])`.
    """
    styles = {}
    for i, name in enumerate(cofitune):
        color = COFITUNE_SHADES[i % len(COFITUNE_SHADES)]
        styles[name] = {"color": color, "marker": MARKERS[i % len(MARKERS)], "linestyle": "-", "linewidth": 2.0}
    for i, name in enumerate(baselines):
        color, linestyle = BASELINE_SHADES[i % len(BASELINE_SHADES)], ("--", ":", "-.")[i % 3]
        styles[name] = {"color": color, "marker": MARKERS[i % len(MARKERS)], "linestyle": linestyle, "linewidth": 1.3}
    return styles


def label_points(ax, points, labels, avoid=(), clear=(), radius=5.0, styles=None, **text_kwargs) -> list:
    """Annotate each `(x, y)` of `points` with its label where it overlaps no point and no label placed before.

    Tries eight places around the point (right, left, above, below, then the diagonals), then the same further out
    with a leader line, and keeps the first free one (no overlap, nearer its own point than any other), or the one
    that overlaps least. Crowded points are labelled first.

    Args:
        avoid: other texts (e.g. contour labels) to keep clear of.
        clear: more `(x, y)` positions to keep clear of (e.g. along arrows, see `points_along`).
        radius (`float` or one per point): the room kept around each point, in points.
        styles (one `dict` per point) and `text_kwargs` (all points): the texts' style.

    Draws the figure once to measure the texts, then fixes its layout, so the positions found are the ones saved:
    call it last, after legends and titles. Returns the annotations, in the order of `points`.
    """
    placer = _LabelPlacer(ax, points, radius, clear, avoid)
    base = {"fontsize": 7, "zorder": 5, "bbox": {"facecolor": "white", "edgecolor": "none", "pad": 0.5}}
    placed = [None] * len(points)
    for i in placer.crowded_first():
        placed[i] = placer.place(i, labels[i], {**base, **text_kwargs, **(styles[i] if styles else {})})
    return placed


class _LabelPlacer:
    """`label_points`' state, in display pixels: the points, and the boxes already taken by points and labels."""

    # Directions tried, nearest first: beside, above, below, then the diagonals; then again further out (points).
    DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1))
    GAPS = (2.5, 12.0, 24.0)

    def __init__(self, ax, points, radius, clear, avoid):
        fig = ax.figure
        fig.draw_without_rendering()
        fig.set_layout_engine("none")
        self.ax, self.points, self.renderer = ax, list(points), fig.canvas.get_renderer()
        self.frame = ax.get_window_extent(self.renderer)
        self.px = fig.dpi / 72  # display pixels per point
        self.radii = [radius] * len(self.points) if isinstance(radius, (int, float)) else list(radius)
        self.centres = [ax.transData.transform(p) for p in self.points]
        extra = [(ax.transData.transform(p), 2.0) for p in clear]
        self.taken = [_box(c, r * self.px) for c, r in [*zip(self.centres, self.radii), *extra]]
        self.taken += [t.get_window_extent(self.renderer) for t in avoid if t.get_visible() and t.get_text()]

    def crowded_first(self) -> list[int]:
        """Point indices, the most crowded first, so that they choose while their surroundings are still free."""
        near = [sum(math.dist(a, b) < 40 * self.px for b in self.centres) for a in self.centres]
        return sorted(range(len(self.points)), key=lambda i: -near[i])

    def place(self, i: int, label: str, style: dict):
        best = None
        for gap in self.GAPS:
            for sx, sy in self.DIRECTIONS:
                text = self._annotate(i, label, style, gap, sx, sy)
                box = text.get_window_extent(self.renderer).padded(2 * self.px)  # widths shift a little with dpi
                cost = self._cost(i, box)
                if best is None or cost < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (cost, text, box)
                else:
                    text.remove()
                if cost == 0:
                    break
            if best[0] == 0:
                break
        self.taken.append(best[2])
        return best[1]

    def _annotate(self, i, label, style, gap, sx, sy):
        r = self.radii[i]
        align = {"ha": ("center", "left", "right")[sx], "va": ("center", "bottom", "top")[sy]}
        offset = (sx * (r + gap), sy * (r + gap * (0.5 if sx else 1)))
        # Away from its point, a label gets a thin leader line, so that it still reads as that point's.
        leader = {"arrowstyle": "-", "color": "0.55", "linewidth": 0.6, "shrinkA": 0, "shrinkB": r}
        return self.ax.annotate(label, self.points[i], xytext=offset, textcoords="offset points", **align,
                                arrowprops=leader if gap > self.GAPS[0] else None, **style)  # fmt: skip

    def _cost(self, i, box) -> float:
        """Area outside the axes (ten-fold), area over taken boxes, and a penalty per nearer point than its own."""
        clipped = box.width * box.height - _overlap(box, self.frame)
        cost = 10 * clipped + sum(_overlap(box, other) for other in self.taken)
        own = _distance(box, self.centres[i])
        return cost + 300 * sum(_distance(box, c) < own for j, c in enumerate(self.centres) if j != i)


def points_along(segments, steps: int = 10) -> list[tuple[float, float]]:
    """Positions inside each `((x0, y0), (x1, y1))` of `segments` (arrows, curves), for `label_points(clear=...)`."""
    return [
        (x0 + t / steps * (x1 - x0), y0 + t / steps * (y1 - y0))
        for (x0, y0), (x1, y1) in segments
        for t in range(1, steps)
    ]


def _box(centre, half: float):
    """A square display box of half-side `half` around `centre`."""
    from matplotlib.transforms import Bbox

    (x, y) = centre
    return Bbox([[x - half, y - half], [x + half, y + half]])


def _distance(box, centre) -> float:
    """How far a display box lies from a display point."""
    x, y = centre
    return math.hypot(max(box.x0 - x, 0.0, x - box.x1), max(box.y0 - y, 0.0, y - box.y1))


def _overlap(a, b) -> float:
    """The area two display boxes share."""
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def new_figure(figsize: tuple[float, float], **kwargs):
    """A matplotlib `Figure` with an Agg canvas and constrained layout, independent of pyplot's global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise CoFiTuneError("Plotting needs matplotlib; install it with `pip install cofitune-peft[eval]`.") from err
    fig = Figure(figsize=figsize, layout=kwargs.pop("layout", "constrained"), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> str:
    """Write `fig` to `path` atomically (the format follows the extension, PNG by default); returns the path."""
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    return path


def family_legend(fig, **kwargs) -> None:
    """A figure legend for the colour language: CoFiTune vs baselines."""
    from matplotlib.patches import Patch

    handles = [
        Patch(color=COFITUNE_COLOR, label="CoFiTune (this package)"),
        Patch(color=BASELINE_COLOR, label="baselines"),
    ]
    fig.legend(handles=handles, **{"loc": "outside lower center", "ncols": 2, "frameon": False, **kwargs})


# ---------------------------------------------------------------------- the demo's results


def plot_demo_results(results: dict[str, dict], path: str | os.PathLike, title: str | None = None) -> str:
    """Spec., Vers. and Uni. of every method of `cofitune demo`, one row per method, as a PNG.

    Args:
        results (`dict[str, dict]`):
            The demo's `results` (as in its `results.json`): method key -> record with `label`, `speciality` (raw
            accuracy), `Spec.`, `Vers.` and `Uni.`. Rows are drawn top to bottom in this order.
        path (`str`):
            Where the picture goes.
        title (`str`, *optional*):
            The figure title; defaults to a generic one.

    Returns:
        `str`: the path written.
    """
    rows = list(results.values())
    if not rows:
        raise CoFiTuneError("`results` must hold at least one method's record, got an empty dict.")
    fig = new_figure(figsize=(13, 1.1 + 0.42 * len(rows)))
    axes = fig.subplots(1, 3, sharey=True)
    ys = list(range(len(rows)))
    colors = [method_color(r["method"]) for r in rows]

    spec = [r["Spec."] for r in rows]
    notes = [f"{_fmt(s)}  (acc. {r['speciality']:.2f})" for s, r in zip(spec, rows)]
    _bar_panel(axes[0], ys, spec, colors, notes, references=(0.0, 1.0), room=0.6)
    axes[0].set_title("Spec.: gain in task accuracy\n(0 = base model, 1 = full fine-tuning)", fontsize=10)
    axes[0].set_xlabel("Spec. (higher = learned more of the task)")

    _vers_panel(axes[1], ys, [r["Vers."] for r in rows], colors)
    axes[1].set_title("Vers.: general ability kept\n(1 = base model; above 1 = better than base)", fontsize=10)
    axes[1].set_xlabel("Vers. (higher = forgot less)")

    uni = [r["Uni."] for r in rows]
    _bar_panel(axes[2], ys, uni, colors, [_fmt(u) for u in uni], references=(), room=0.3)
    axes[2].set_title("Uni.: unified score\n= (Spec. + Vers.) / 2", fontsize=10)
    axes[2].set_xlabel("Uni. (higher = better balance)")

    _row_labels(axes[0], ys, rows)
    fig.suptitle(title or "CoFiTune vs baselines: speciality, versatility and their balance", fontsize=12)
    family_legend(fig)
    return save_figure(fig, path)


# Value labels sit on a white box, so that grid and reference lines never run through the digits.
_VALUE_TEXT = {
    "va": "center",
    "fontsize": 8,
    "zorder": 4,
    "bbox": {"facecolor": "white", "edgecolor": "none", "pad": 1},
}


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def _row_labels(ax, ys: list[int], rows: list[dict]) -> None:
    """Method names on the shared y axis, CoFiTune's in its colour, with a rule between the two families."""
    ax.set_yticks(ys, [r["label"] for r in rows])
    for tick, r in zip(ax.get_yticklabels(), rows):
        if is_cofitune(r["method"]):
            tick.set_color(COFITUNE_COLOR)
            tick.set_fontweight("bold")
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top
    for y in ys[1:]:
        if is_cofitune(rows[y]["method"]) != is_cofitune(rows[y - 1]["method"]):
            for other in ax.get_shared_y_axes().get_siblings(ax):
                other.axhline(y - 0.5, color=REFERENCE_COLOR, linewidth=0.6, alpha=0.5)


def _bar_panel(ax, ys, values, colors, notes, references: tuple[float, ...], room: float) -> None:
    """Horizontal bars from 0, the value written after each bar, dotted reference lines (named in the title).

    `room` is the free space right of the largest bar for the value labels, as a share of the data's span.
    """
    finite = _finite(values)
    lo, hi = min([0.0, *finite]), max([1.0, *finite])
    span = hi - lo
    for y, value, color, note in zip(ys, values, colors, notes):
        drawn = 0.0 if value is None or math.isnan(value) else value
        ax.barh(y, drawn, color=color, height=0.62)
        ax.annotate(note, (max(drawn, 0.0), y), xytext=(4, 0), textcoords="offset points", **_VALUE_TEXT)
    for x in references:
        ax.axvline(x, color=REFERENCE_COLOR, linestyle=":", linewidth=0.9)
    ax.set_xlim(lo - 0.02 * span if lo < 0 else 0.0, hi + room * span)
    _ticks_within(ax, lo, hi)


def _vers_panel(ax, ys, values, colors) -> None:
    """Vers. sits close to 1 for every method, so it is drawn as a dot on a stem from the base model's 1."""
    finite = _finite(values) or [1.0]
    lo, hi = min([1.0, *finite]), max([1.0, *finite])
    span = max(hi - lo, 0.01)
    for y, value, color in zip(ys, values, colors):
        if value is None or math.isnan(value):
            ax.annotate("n/a", (1.0, y), xytext=(4, 0), textcoords="offset points", **_VALUE_TEXT)
            continue
        ax.hlines(y, 1.0, value, color=color, linewidth=2.5)
        ax.plot([value], [y], "o", color=color, markersize=7)
        ax.annotate(f"{value:.3f}", (max(value, 1.0), y), xytext=(7, 0), textcoords="offset points", **_VALUE_TEXT)
    ax.axvline(1.0, color=REFERENCE_COLOR, linestyle=":", linewidth=0.9)
    ax.set_xlim(lo - 0.15 * span, hi + 0.4 * span)
    _ticks_within(ax, lo - 0.15 * span, hi)


def _ticks_within(ax, lo: float, hi: float) -> None:
    """Ticks only over the data's range, not over the room kept free for the value labels; a light x grid."""
    ticks = [t for t in ax.get_xticks() if lo - 1e-9 <= t <= hi + 1e-9]
    ax.set_xticks(ticks)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="y", length=0)
