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


def is_cofitune(method: str) -> bool:
    """Whether a result row (by its method key, e.g. `"cofitune_update"`) is this package's method."""
    return method.startswith("cofitune")


def method_color(method: str) -> str:
    """The colour of a result row: `COFITUNE_COLOR` for CoFiTune, `BASELINE_COLOR` for everything else."""
    return COFITUNE_COLOR if is_cofitune(method) else BASELINE_COLOR


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
