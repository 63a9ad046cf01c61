"""Plotting helpers for the kit: matplotlib's object-oriented `Figure` API only (no pyplot, no global backend).

One colour language for every kit plot: CoFiTune (this package's method) in blue, baselines (no training, full
fine-tuning, LoRA) in neutral greys, so the method stands out the same way in every picture. Needs matplotlib
(`pip install "cofitune-peft[eval]"`).
"""

from __future__ import annotations

import math
import os

from cofitune_peft.errors import missing_extra
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
    except ModuleNotFoundError as err:
        raise missing_extra("matplotlib", "Plotting", "eval") from err
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
