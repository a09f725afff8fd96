"""Learning curves: accuracy and loss per epoch, read from runs' ``metrics.jsonl``.

A figure is a grid with one column per panel (for an experiment: one hidden width) and two
rows: train (solid) and test (dashed) accuracy after each epoch on top, the epoch's mean train
loss below (the legend, one entry per method, sits in the last loss panel).
Each curve is one method, the mean over its seeds with a band of ± one sample standard
deviation where there are several (train accuracy and loss; the test curves get none, which
would hide the others); seeds whose runs stopped at different epochs are drawn up to the last
epoch they all reached, and a curve that stops before the others in its panel ends in a dot.
A curve whose loss stops being finite (a diverged seed) ends in a cross at its last finite
point, and its legend entry says "diverged".  The accuracy panels share their y axis, so that
widths compare at a glance; each loss panel keeps its own.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["read_metrics", "draw_curves", "curves_figure", "seed_std", "COLOURS", "colour"]

#: the methods' colours: matplotlib's tab10 ("C0"–"C9"), then the lighter twins of tab20, so
#: that twenty methods get twenty colours before one repeats
COLOURS = (
    *(f"C{i}" for i in range(10)),
    *("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5"),
    *("#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"),
)


def colour(i: int) -> str:
    """The ``i``-th colour of :data:`COLOURS`, cyclically."""
    return COLOURS[i % len(COLOURS)]


#: one run's per-epoch records, as written to ``metrics.jsonl``
Records = Sequence[Mapping[str, Any]]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run (``[]`` if it has none); a line cut short by an
    interrupted write, and everything after it, is left out."""
    records = []
    try:
        with open(Path(run_dir) / "metrics.jsonl") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    break
    except OSError:
        return []
    return records


def _mean_band(runs: Sequence[Records], key: str) -> tuple[list[int], list[float], list[float]]:
    """Epochs, seed mean and seed std (0 for one seed) of ``key`` over the common epochs."""
    length = min(len(r) for r in runs)
    epochs = [int(rec["epoch"]) for rec in runs[0][:length]]
    columns = [[float(r[i][key]) for r in runs] for i in range(length)]
    means = [statistics.fmean(c) for c in columns]
    stds = [seed_std(c) if len(c) > 1 else 0.0 for c in columns]
    return epochs, means, stds


def seed_std(values: Sequence[float]) -> float:
    """The sample standard deviation (n − 1) over seeds, NaN where a value is NaN or infinite
    (a diverged run), for which ``statistics.stdev`` raises."""
    if not all(math.isfinite(v) for v in values):
        return math.nan
    return statistics.stdev(values)


def draw_curves(
    panels: Sequence[tuple[str, Mapping[str, Sequence[Records]]]],
    path: str | Path,
    title: str,
    *,
    colors: Mapping[str, str] | None = None,
    faded: Collection[str] = (),
) -> bool:
    """Draw ``panels`` — ``(panel title, {curve label: [one run's records per seed]})`` — into
    ``path`` (PNG).  Returns ``False``, drawing nothing, when no panel has a run with records.
    ``colors`` fixes labels' colours (the others take the next free ones); labels in ``faded``
    are drawn thin and pale (unfinished runs beside the finished ones of their method).
    """
    fig = curves_figure(panels, title, colors=colors, faded=faded)
    if fig is None:
        return False
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return True


def _palette(labels: Sequence[str], fixed: Mapping[str, str]) -> dict[str, str]:
    """``fixed``'s colours for its labels, the unused ones of :data:`COLOURS` in turn for the
    others."""
    free = [c for c in COLOURS if c not in set(fixed.values())] or [COLOURS[0]]
    out, n = {}, 0
    for label in labels:
        if label in fixed:
            out[label] = fixed[label]
        else:
            out[label] = free[n % len(free)]
            n += 1
    return out


def _last_finite(values: Sequence[float]) -> int | None:
    """Index of the last value before the first non-finite one (-1 if the first is not
    finite); ``None`` if all are finite."""
    for i, v in enumerate(values):
        if not math.isfinite(v):
            return i - 1
    return None


def curves_figure(
    panels: Sequence[tuple[str, Mapping[str, Sequence[Records]]]],
    title: str,
    *,
    colors: Mapping[str, str] | None = None,
    faded: Collection[str] = (),
) -> Figure | None:
    """The figure :func:`draw_curves` saves (``None`` without records); a label keeps its
    colour in every panel."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    kept = []
    for name, curves in panels:
        runs_of = {label: [r for r in runs if r] for label, runs in curves.items()}
        runs_of = {label: runs for label, runs in runs_of.items() if runs}
        if runs_of:
            kept.append((name, runs_of))
    if not kept:
        return None
    labels = list(dict.fromkeys(label for _, curves in kept for label in curves))
    palette = _palette(labels, colors or {})
    diverged: set[str] = set()
    fig = Figure(figsize=(max(6.0, 4.2 * len(kept)), 6.4))
    axes = fig.subplots(2, len(kept), squeeze=False, sharex="col")
    for ax in axes[0, 1:]:  # accuracies on one scale; each loss on its own (one run blowing up
        ax.sharey(axes[0, 0])  # would flatten every panel's curves)
    for col, (name, curves) in enumerate(kept):
        top, bottom = axes[0, col], axes[1, col]
        end = max(int(r[-1]["epoch"]) for runs in curves.values() for r in runs)
        for label, runs in curves.items():
            color = palette[label]
            pale = {"alpha": 0.5, "linewidth": 0.9} if label in faded else {"linewidth": 1.2}
            for ax, key, style, band in (
                (top, "train_accuracy", "-", True),
                (top, "test_accuracy", "--", False),
                (bottom, "train_loss", "-", True),
            ):
                epochs, mean, std = _mean_band(runs, key)
                ax.plot(epochs, mean, color=color, linestyle=style, **pale)
                stop = _last_finite(mean) if key == "train_loss" else None
                if stop is not None:  # diverged: a cross where the loss was last finite
                    diverged.add(label)
                    if stop >= 0:
                        ax.plot(epochs[stop], mean[stop], color=color, marker="x", markersize=7)
                elif epochs[-1] < end:  # a curve that stops before the others: mark where
                    ax.plot(epochs[-1:], mean[-1:], color=color, marker="o", markersize=4)
                if band and len(runs) > 1:
                    lo = [m - s for m, s in zip(mean, std)]
                    hi = [m + s for m, s in zip(mean, std)]
                    alpha = 0.07 if label in faded else 0.15
                    ax.fill_between(epochs, lo, hi, color=color, alpha=alpha, linewidth=0)
        top.set_title(name, fontsize=10)
        bottom.set_xlabel("epoch")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.ticklabel_format(axis="y", useOffset=False)
    axes[0, 0].set_ylabel("accuracy (train —, test - -)")
    for ax in axes[1]:
        ax.set_ylabel("train loss")
    last = axes[1, -1]
    handles = [
        last.plot(
            [], [], color=c, label=f"{label} (diverged)" if label in diverged else label,
            **({"alpha": 0.5} if label in faded else {}),
        )[0]
        for label, c in palette.items()
    ]  # fmt: skip
    last.legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
