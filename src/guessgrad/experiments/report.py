"""Tables, figures and summaries of an experiment, read from the run store (no training).

For each cell: the value of every seed's run, their mean and sample standard deviation, the
paper's number and the comparison, ``ours − paper`` for accuracies, overlaps and ranks, and
``ours ÷ paper`` for quantities that span orders of magnitude (variance, bias, wall time).

Writes ``OUT/<folder>/table.md``, ``OUT/<folder>/summary.json``, the figures and the
learning curves of the finished runs (``curves.png``, :mod:`guessgrad.curves`).
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..curves import colour, draw_curves, read_metrics, seed_std
from ..files import atomic_path, atomic_write_json, atomic_write_text
from ..text import counted
from ..training import describe_code, same_code
from .runner import RunStore
from .spec import (
    PAPER_EPOCHS,
    Cell,
    Experiment,
    Method,
    OverlapFigure,
    Probe,
    TradeoffFigure,
    WidthFigure,
)

__all__ = [
    "CellResult",
    "UnfinishedRun",
    "collect",
    "unfinished_runs",
    "render_markdown",
    "summarize",
    "draw_figures",
    "report",
]

#: how each quantity is printed, and compared with the paper ("diff" or "ratio")
_STYLE: dict[str, tuple[str, str]] = {
    "train_accuracy": ("{:.3f}", "diff"),
    "test_accuracy": ("{:.3f}", "diff"),
    "wall_seconds": ("time", "ratio"),
    "variance_exact": ("{:.2e}", "ratio"),
    "variance": ("{:.2e}", "ratio"),
    "bias": ("{:.2e}", "ratio"),
    "bias_mc": ("{:.2e}", "ratio"),
    "cov_norm": ("{:.3f}", "diff"),
    "overlap": ("{:.3f}", "diff"),
    "cosine": ("{:.3f}", "diff"),
    "rank_mean": ("{:.1f}", "diff"),
}


#: an accuracy cell is marked (FLAG_MARK) where it differs from the paper's by more than
#: FLAG_STDS standard deviations over seeds or by more than FLAG_ACCURACY
FLAGGED_QUANTITIES = ("train_accuracy", "test_accuracy")
FLAG_STDS = 2.0
FLAG_ACCURACY = 0.03
#: half the last digit the paper prints its accuracies to: a smaller gap is no difference
FLAG_PRECISION = 0.0005
FLAG_MARK = "†"


@dataclass
class CellResult:
    """A cell's values, one per seed (``None`` where the run or measurement is missing)."""

    cell: Cell
    seeds: list[int]
    values: list[float | None]
    unavailable: str = ""
    #: whether the runs trained the paper's number of epochs (else nothing is flagged)
    comparable: bool = True

    @property
    def present(self) -> list[float]:
        return [v for v in self.values if v is not None]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.present) if self.present else None

    @property
    def std(self) -> float | None:
        return seed_std(self.present) if len(self.present) > 1 else None

    @property
    def diff(self) -> float | None:
        if self.mean is None or self.cell.paper is None:
            return None
        return self.mean - self.cell.paper

    @property
    def ratio(self) -> float | None:
        if self.mean is None or not self.cell.paper:
            return None
        return self.mean / self.cell.paper

    @property
    def flagged(self) -> bool | None:
        """For an accuracy beside the paper's, from runs of the paper's number of epochs:
        whether the mean differs from it by more than ``FLAG_ACCURACY``, or by more than
        ``FLAG_STDS`` standard deviations over seeds and more than half the paper's last
        printed digit (the cells ``docs/results.md`` accounts for); ``None`` where there is
        nothing to compare.  Differences are taken to 9 decimals, so that a gap of exactly
        0.03 between accuracies (k/N averaged over seeds) is not decided by rounding."""
        if not self.comparable or self.cell.quantity not in FLAGGED_QUANTITIES or self.diff is None:
            return None
        gap = round(abs(self.diff), 9)
        spread = max(FLAG_STDS * self.std, FLAG_PRECISION) if self.std is not None else None
        return gap > FLAG_ACCURACY or (spread is not None and gap > spread)

    def as_dict(self) -> dict[str, Any]:
        c = self.cell
        return {
            "section": c.section,
            "row": c.row,
            "col": c.col,
            "quantity": c.quantity,
            "method": c.run.name,
            "options": c.run.kwargs,
            "width": c.width,
            "probe": None
            if c.probe is None
            else {
                "kind": c.probe.kind,
                "when": c.probe.when,
                "layer": c.probe.layer,
                "k": c.probe.k,
                "estimator": None
                if c.probe.estimator is None
                else {"name": c.probe.estimator.name, "options": c.probe.estimator.kwargs},
            },
            "seeds": self.seeds,
            "values": self.values,
            "n": len(self.present),
            "mean": self.mean,
            "std": self.std,
            "paper": c.paper,
            "diff": self.diff,
            "ratio": self.ratio,
            "flag": self.flagged,
            "unavailable": self.unavailable or None,
        }


def _read_value(cell: Cell, store: RunStore, seed: int, epochs: int) -> float | None:
    config = cell.run.config(width=cell.width, seed=seed, epochs=epochs)
    if cell.probe is None:
        final = store.finished(config)
        value = None if final is None else final.get(cell.quantity)
        return None if value is None else float(value)
    record = store.probe_record(config, cell.probe)
    if record is None or cell.probe.layer >= len(record.get("layers", [])):
        return None
    layer = record["layers"][cell.probe.layer]
    if cell.quantity == "overlap":
        curve = layer["overlap"]
        k = cell.probe.k or 1
        return float(curve[min(k, len(curve)) - 1])
    value = layer.get(cell.quantity)
    return None if value is None else float(value)


def collect(
    experiment: Experiment,
    store: RunStore,
    *,
    seeds: Sequence[int],
    epochs: int,
    unavailable: Mapping[Method, str] | None = None,
) -> list[CellResult]:
    """Every cell's values from the store."""
    unavailable = unavailable or {}
    comparable = epochs == PAPER_EPOCHS
    results = []
    for cell in experiment.cells:
        reason = unavailable.get(cell.run) or (
            unavailable.get(cell.probe.estimator)
            if cell.probe is not None and cell.probe.estimator is not None
            else None
        )
        values = [None if reason else _read_value(cell, store, s, epochs) for s in seeds]
        results.append(CellResult(cell, list(seeds), values, reason or "", comparable))
    return results


def _fmt(quantity: str, value: float) -> str:
    style = _STYLE.get(quantity, ("{:.4g}", "diff"))[0]
    if style == "time":
        return _fmt_time(value)
    return style.format(value)


def _fmt_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _fmt_cell(r: CellResult) -> str:
    q = r.cell.quantity
    if r.unavailable or r.mean is None:
        text = "n/a" if r.unavailable else "—"
        return text if r.cell.paper is None else f"{text} ({_fmt(q, r.cell.paper)})"
    text = _fmt(q, r.mean)
    if r.std is not None:
        text += f" ± {_fmt(q, r.std)}"
    if len(r.present) < len(r.values):
        text += f" [{len(r.present)}/{len(r.values)}]"
    if r.cell.paper is not None:
        how = _STYLE.get(q, ("", "diff"))[1]
        comp = f"×{r.ratio:.2g}" if how == "ratio" and r.ratio is not None else f"{r.diff:+.3f}"
        if how == "diff" and q == "rank_mean":
            comp = f"{r.diff:+.1f}"
        text += f" ({_fmt(q, r.cell.paper)}, {comp})"
    if r.flagged:
        text += f" {FLAG_MARK}"
    return text


def _ordered(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _table(results: Sequence[CellResult], row_header: str) -> list[str]:
    rows = _ordered([r.cell.row for r in results])
    cols = _ordered([r.cell.col for r in results])
    grid = {(r.cell.row, r.cell.col): _fmt_cell(r) for r in results}
    lines = [
        "| " + " | ".join([row_header or " "] + cols) + " |",
        "|" + "---|" * (len(cols) + 1),
    ]
    for row in rows:
        lines.append("| " + " | ".join([row] + [grid.get((row, c), "") for c in cols]) + " |")
    return lines


def _run_notes(
    experiment: Experiment, store: RunStore, seeds: Sequence[int], epochs: int
) -> list[str]:
    """The estimators, hardware and code (version, commit) the stored runs actually used."""
    estimators: dict[str, str] = {}
    hardware: dict[str, None] = {}
    code: dict[str, int] = {}
    seen: set[str] = set()
    for cell in experiment.cells:
        if not cell.needs_training:
            continue
        for seed in seeds:
            config = cell.run.config(width=cell.width, seed=seed, epochs=epochs)
            final = store.finished(config)
            if final is None or config.slug() in seen:
                continue
            seen.add(config.slug())
            estimators.setdefault(cell.run.label, final.get("estimator", "?"))
            source = _code_label(final)
            code[source] = code.get(source, 0) + 1
            hw = final.get("hardware") or {}
            if hw:
                cpu = hw.get("cpu", "?")
                if hw.get("cpu_capability"):
                    cpu += f" ({hw['cpu_capability']})"
                threads = hw.get("torch_threads")
                if isinstance(threads, int):
                    desc = f"{cpu}, {counted(threads, 'torch thread')}"
                else:
                    desc = f"{cpu}, ? torch threads"
                desc += f", device {hw.get('device', final.get('device', '?'))}"
                if hw.get("gpu"):
                    desc += f" ({hw['gpu']})"
                hardware.setdefault(desc)
            else:
                hardware.setdefault(f"device {final.get('device', '?')}")
    notes = []
    if estimators:
        notes.append(
            "Estimators of the stored runs: "
            + "; ".join(f"{label}: `{rep}`" for label, rep in estimators.items())
            + "."
        )
    if hardware:
        notes.append("Hardware of the stored runs: " + "; ".join(hardware) + ".")
    if code:
        notes.append(
            "Code of the stored runs: "
            + "; ".join(f"{counted(n, 'run')} with guessgrad {label}" for label, n in code.items())
            + "."
        )
    return notes


#: recorded epochs whose pace estimates an unfinished run's time left
PACE_EPOCHS = 10


@dataclass(frozen=True)
class UnfinishedRun:
    """A run of the experiment with epochs recorded but no ``final.json`` yet (interrupted, or
    still training): left out of the tables, drawn apart in the learning curves."""

    label: str
    width: int
    seed: int
    slug: str
    epochs: int
    records: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        last = self.records[-1]
        return {
            "method": self.label,
            "width": self.width,
            "seed": self.seed,
            "run": self.slug,
            "epoch": int(last["epoch"]),
            "epochs": self.epochs,
            "train_accuracy": last.get("train_accuracy"),
            "test_accuracy": last.get("test_accuracy"),
            "wall_seconds": last.get("wall_seconds"),
            "seconds_left": self.seconds_left(),
        }

    def seconds_left(self) -> float | None:
        """The time its remaining epochs take at the pace of its last ``PACE_EPOCHS`` recorded
        epochs (training time per epoch, from ``wall_seconds``); ``None`` without two timed
        epochs.  Training time only: a stopped run's time between sessions does not count."""
        timed = [r for r in self.records if r.get("wall_seconds") is not None]
        if len(timed) < 2:
            return None
        first, last = timed[-min(len(timed), PACE_EPOCHS + 1)], timed[-1]
        epochs = int(last["epoch"]) - int(first["epoch"])
        if epochs <= 0:
            return None
        per_epoch = (float(last["wall_seconds"]) - float(first["wall_seconds"])) / epochs
        return max(per_epoch, 0.0) * max(self.epochs - int(last["epoch"]), 0)

    def describe(self) -> str:
        d = self.as_dict()
        text = f"{self.label}, width {self.width}, seed {self.seed}: epoch {d['epoch']} of "
        text += f"{self.epochs}"
        for key, name in (("train_accuracy", "train"), ("test_accuracy", "test")):
            if d[key] is not None:
                text += f", {name} {d[key]:.3f}"
        if d["wall_seconds"] is not None:
            text += f", {_fmt_time(float(d['wall_seconds']))} of training so far"
        if d["seconds_left"] is not None:
            text += f", about {_fmt_time(d['seconds_left'])} left at its recent pace"
        return text


def unfinished_runs(
    experiment: Experiment, store: RunStore, seeds: Sequence[int], epochs: int
) -> list[UnfinishedRun]:
    """The experiment's runs that have recorded epochs but no ``final.json``."""
    found: dict[str, UnfinishedRun] = {}
    for cell in experiment.cells:
        if not cell.needs_training:
            continue
        for seed in seeds:
            config = cell.run.config(width=cell.width, seed=seed, epochs=epochs)
            slug = config.slug()
            if slug in found or store.final_state(config) != "absent":
                continue
            records = read_metrics(store.run_dir(config))
            if records:
                found[slug] = UnfinishedRun(cell.run.label, cell.width, seed, slug, epochs, records)
    return list(found.values())


def damaged_runs(
    experiment: Experiment, store: RunStore, seeds: Sequence[int], epochs: int
) -> list[Path]:
    """The experiment's run directories whose ``final.json`` is there but cannot be read as a
    finished run's record (cut short, edited, another program's)."""
    found: dict[Path, None] = {}
    for cell in experiment.cells:
        if cell.needs_training:
            for seed in seeds:
                config = cell.run.config(width=cell.width, seed=seed, epochs=epochs)
                if store.final_state(config) == "damaged":
                    found.setdefault(store.run_dir(config))
    return list(found)


def _code_label(final: dict[str, Any]) -> str:
    """The code a stored run was trained with (:func:`guessgrad.training.describe_code`); for a
    run resumed with other code (:func:`guessgrad.training.same_code`), each version with the
    epoch it took over at: ``0.1.0 1ce2447 → 0.1.0 9aa0302 (from epoch 67)``.  A session that
    ran the same code as the one before it is not named, whatever its commit."""
    labels: list[str] = []
    previous: dict[str, Any] | None = None
    for s in final.get("sessions") or [final]:
        if previous is None:
            labels.append(describe_code(s))
        elif not same_code(previous, s):
            labels.append(f"{describe_code(s)} (from epoch {s['from_epoch']})")
        previous = s
    return " → ".join(labels)


#: runs and measurements the notes name when some are missing (the rest are counted)
MISSING_SHOWN = 12


def _missing(results: Sequence[CellResult], store: RunStore, epochs: int) -> list[str]:
    """What ``guessgrad reproduce`` would still compute for the table, one entry per run or
    measurement with the seeds it lacks: ``W̃⊥ (k=10) at width 128 (seed 1)``,
    ``overlap-final at width 512, W̃⊥ run (seeds 0, 1)`` (the train and test cells of one run
    count once).  A value missing from a finished run's record, or from a measurement, is not
    listed (nothing would compute it), nor a damaged run (named in its own note)."""
    lacking: dict[str, list[int]] = {}
    for r in results:
        if r.unavailable:
            continue
        cell = r.cell
        what = f"{cell.run.label} at width {cell.width}"
        if cell.probe is not None:
            what = f"{Path(cell.probe.file()).stem} at width {cell.width}, {cell.run.label} run"
        seeds = lacking.setdefault(what, [])
        for seed, value in zip(r.seeds, r.values):
            if value is not None or seed in seeds:
                continue
            config = cell.run.config(width=cell.width, seed=seed, epochs=epochs)
            if cell.probe is None:
                todo = store.final_state(config) == "absent"
            else:
                todo = store.probe_record(config, cell.probe) is None
            if todo:
                seeds.append(seed)
    return [
        f"{what} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, sorted(seeds)))})"
        for what, seeds in lacking.items()
        if seeds
    ]


def render_markdown(
    experiment: Experiment,
    results: Sequence[CellResult],
    *,
    seeds: Sequence[int],
    epochs: int,
    notes: Sequence[str] = (),
    figures: Sequence[str] = (),
) -> str:
    """The experiment's Markdown: one table per section, the legend and the notes."""
    lines = [f"## {experiment.title}", ""]
    lines.append(
        f"{counted(len(seeds), 'seed')} ({', '.join(map(str, seeds))}), "
        f"{counted(epochs, 'epoch')}. "
        "Each cell: ours, mean ± std over seeds ([n/N] when runs are missing) "
        "(paper, ours − paper; or ours ÷ paper as ×r for variance, bias and time). "
        "— = not computed yet, n/a = estimator not available."
    )
    lines.append("")
    for section in _ordered([r.cell.section for r in results]):
        if section:
            lines += [f"**{section}**", ""]
        lines += _table([r for r in results if r.cell.section == section], experiment.row_header)
        lines.append("")
    for fig in figures:
        lines += [f"![{experiment.name}]({fig})", ""]
    all_notes = experiment.note_texts() + list(notes)
    if all_notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in all_notes] + [""]
    return "\n".join(lines)


def summarize(
    experiment: Experiment,
    results: Sequence[CellResult],
    *,
    seeds: Sequence[int],
    epochs: int,
    notes: Sequence[str],
    figures: Sequence[str],
    unfinished: Sequence[UnfinishedRun] = (),
) -> dict[str, Any]:
    """The content of ``summary.json``."""
    return {
        "experiment": experiment.name,
        "title": experiment.title,
        "seeds": list(seeds),
        "epochs": epochs,
        "cells": [r.as_dict() for r in results],
        "unfinished": [u.as_dict() for u in unfinished],
        "notes": experiment.note_texts() + list(notes),
        "figures": list(figures),
        "version": __version__,
    }


# ---------------------------------------------------------------------------------------
# Figures (matplotlib's object-oriented API with the Agg canvas: no display needed).


def _mathtext(label: str) -> str:
    for plain, tex in (("W̃ᵀ", r"$\tilde{W}^\top$"), ("W̃⊥", r"$\tilde{W}^\perp$"),
                       ("W̃P", r"$\tilde{W}P$"), ("W̃", r"$\tilde{W}$")):  # fmt: skip
        label = label.replace(plain, tex)
    return label


def _draw_widths(
    fig_spec: WidthFigure,
    results: Sequence[CellResult],
    path: Path,
    subtitle: str,
    colors: Mapping[str, str],
) -> bool:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    cells = [r for r in results if r.cell.quantity == fig_spec.quantity and r.cell.section == ""]
    if not any(r.mean is not None for r in cells):
        return False
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    handles: list[Any] = []
    for i, col in enumerate(_ordered([r.cell.col for r in cells])):
        curve = sorted((r for r in cells if r.cell.col == col), key=lambda r: r.cell.width)
        color = colors.get(curve[0].cell.run.label, colour(i))
        pts = [(r.cell.width, r.mean, r.std or 0.0) for r in curve if r.mean is not None]
        if pts:
            x, y, e = zip(*pts)
            handles.append(
                ax.errorbar(x, y, yerr=e, color=color, marker="o", capsize=3, label=_mathtext(col))
            )
        paper = [(r.cell.width, r.cell.paper) for r in curve if r.cell.paper is not None]
        if paper:
            x, y = zip(*paper)
            ax.plot(x, y, color=color, linestyle="--", marker="o", mfc="none", alpha=0.6)
            if not pts:  # the paper's curve alone: named, so that its colour is not a riddle
                handles.append(
                    Line2D([], [], color=color, linestyle="--", marker="o", mfc="none",
                           alpha=0.6, label=f"{_mathtext(col)} (paper only)")
                )  # fmt: skip
    widths = sorted({r.cell.width for r in cells})
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.set_xlabel("width")
    ax.set_ylabel(fig_spec.ylabel)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{fig_spec.title}, {subtitle}", fontsize=10)
    (paper_handle,) = ax.plot([], [], color="gray", linestyle="--", marker="o", mfc="none")
    labels = [*(h.get_label() for h in handles), f"paper ({PAPER_EPOCHS} epochs)"]
    ax.legend([*handles, paper_handle], labels, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    return True


def _draw_tradeoff(
    fig_spec: TradeoffFigure,
    results: Sequence[CellResult],
    path: Path,
    subtitle: str,
    colors: Mapping[str, str],
) -> bool:
    from matplotlib.figure import Figure

    main = [r for r in results if r.cell.section == ""]
    # per width, per row: the (x, y) cells; one colour per method across panels
    panels: dict[int, dict[str, dict[str, CellResult]]] = {}
    for r in main:
        if r.cell.quantity in (fig_spec.x, fig_spec.y):
            panels.setdefault(r.cell.width, {}).setdefault(r.cell.row, {})[r.cell.quantity] = r
    pairs = {
        w: [(row[fig_spec.x], row[fig_spec.y]) for row in rows.values() if len(row) == 2]
        for w, rows in panels.items()
    }
    # a panel for every width with at least one run of ours
    widths = sorted(
        w for w, p in pairs.items() if any(x.mean is not None and y.mean is not None for x, y in p)
    )
    if not widths:
        return False
    labels = _ordered([r.cell.run.label for r in main])
    colors = {label: colors.get(label, colour(i)) for i, label in enumerate(labels)}
    fig = Figure(figsize=(max(5.5, 4.8 * len(widths)), 4.4))
    axes = fig.subplots(1, len(widths), squeeze=False)[0]
    for ax, width in zip(axes, widths):
        paper_drawn: set[tuple[float, float]] = set()
        for x, y in pairs[width]:
            color = colors[x.cell.run.label]
            if x.mean is not None and y.mean is not None:
                err = {"xerr": [x.std or 0.0], "yerr": [y.std or 0.0]}
                ax.errorbar(
                    [x.mean], [y.mean], **err, color=color, marker="o", capsize=3, ls="none"
                )
            point = (x.cell.paper, y.cell.paper)
            # rows that share a published value (W̃⊥ by the exact SVD and by the fast solver)
            # draw it once, in the first such row's colour
            if point[0] is not None and point[1] is not None and point not in paper_drawn:
                paper_drawn.add((point[0], point[1]))
                ax.plot([point[0]], [point[1]], color=color, marker="o", mfc="none")
        ax.set_xscale("log")
        ax.set_xlabel(fig_spec.xlabel)
        ax.set_ylabel(fig_spec.ylabel)
        ax.set_title(f"width {width}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    # one legend for all panels: every method (ours filled, mean ± std), then the paper's
    handles = [
        axes[0].plot([], [], color=c, marker="o", linestyle="none", label=_mathtext(label))[0]
        for label, c in colors.items()
    ]
    paper = {"color": "gray", "marker": "o", "mfc": "none", "linestyle": "none"}
    handles += axes[0].plot([], [], **paper, label=f"paper ({PAPER_EPOCHS} epochs)")
    axes[0].legend(handles=handles, fontsize=7)
    fig.suptitle(f"{_mathtext(fig_spec.title)}, {subtitle}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    return True


def _draw_overlap(
    fig_spec: OverlapFigure,
    store: RunStore,
    seeds: Sequence[int],
    epochs: int,
    path: Path,
    subtitle: str,
) -> bool:
    from matplotlib.figure import Figure

    panels: list[tuple[int, dict[str, list[dict[str, Any]]]]] = []
    for width in fig_spec.widths:
        by_when: dict[str, list[dict[str, Any]]] = {}
        for when in fig_spec.when:
            records = []
            for seed in seeds:
                config = fig_spec.run.config(width=width, seed=seed, epochs=epochs)
                rec = store.probe_record(config, Probe("overlap", when, 0))  # none if stale
                if rec is not None:
                    records.append(rec)
            if records:
                by_when[when] = records
        if by_when:
            panels.append((width, by_when))
    if not panels:
        return False
    fig = Figure(figsize=(max(6.5, 5.5 * len(panels)), 6.2))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (width, by_when) in zip(axes, panels):
        paper_rank = fig_spec.paper_rank.get(width, ())
        max_k = 1
        for when, records in by_when.items():
            style = "-" if when == "final" else ":"
            for layer in range(len(records[0]["layers"])):
                curves = [rec["layers"][layer]["overlap"] for rec in records]
                curve = [statistics.fmean(v) for v in zip(*curves)]
                rank = statistics.fmean(rec["layers"][layer]["rank_mean"] for rec in records)
                k = list(range(1, len(curve) + 1))
                max_k = max(max_k, len(curve))
                stage = "end" if when == "final" else "init"
                label = f"layer {layer + 1} ({stage}), rank {rank:.0f}"
                if when == "final" and layer < len(paper_rank):
                    label += f" (paper {paper_rank[layer]})"
                ax.plot(k, curve, color=f"C{layer}", linestyle=style, label=label)
                km = fig_spec.k_marker
                if km <= len(curve):
                    ax.plot([km], [curve[km - 1]], color=f"C{layer}", marker="o")
        ax.axvline(fig_spec.k_marker, color="gray", linewidth=0.8, linestyle="--")
        if fig_spec.paper_overlap is not None:
            lo, hi = fig_spec.paper_overlap
            ax.vlines(
                fig_spec.k_marker, lo, hi, color="gray", linewidth=6, alpha=0.35,
                label=f"paper at k={fig_spec.k_marker}: {lo:g}–{hi:g}",
            )  # fmt: skip
        ax.set_xscale("log")
        ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500) if t <= max_k]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("k")
        ax.set_ylabel("overlap")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"width {width}", fontsize=10)
        # below the axes: inside, it would cover the curves wherever it went
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{_mathtext(fig_spec.title)}\n{subtitle}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    return True


def draw_figures(
    experiment: Experiment,
    results: Sequence[CellResult],
    store: RunStore,
    out_dir: Path,
    *,
    seeds: Sequence[int],
    epochs: int,
) -> list[str]:
    """Draw the experiment's figures into ``out_dir``; return the files drawn."""
    drawn = []
    subtitle = f"{counted(epochs, 'epoch')}, {counted(len(seeds), 'seed')}"
    colors = experiment.colors()  # a method has one colour in every figure
    for spec in experiment.figures:
        path = out_dir / spec.file
        if isinstance(spec, WidthFigure):
            ok = _draw_widths(spec, results, path, subtitle, colors)
        elif isinstance(spec, TradeoffFigure):
            ok = _draw_tradeoff(spec, results, path, subtitle, colors)
        else:
            ok = _draw_overlap(spec, store, seeds, epochs, path, subtitle)
        if ok:
            drawn.append(spec.file)
    if _draw_learning_curves(experiment, store, seeds, epochs, out_dir / CURVES_FILE, subtitle):
        drawn.append(CURVES_FILE)
    return drawn


#: the learning curves every experiment with trained runs gets, beside its own figures
CURVES_FILE = "curves.png"


#: what the learning curves call runs without ``final.json``
UNFINISHED = "unfinished"


def _draw_learning_curves(
    experiment: Experiment,
    store: RunStore,
    seeds: Sequence[int],
    epochs: int,
    path: Path,
    subtitle: str,
) -> bool:
    """Accuracy and loss per epoch: one panel per width, one curve per method over its
    finished runs (:func:`guessgrad.curves.draw_curves`), and one more per method over its
    unfinished runs, up to the last epoch they all reached, in the method's colour, faded."""
    panels: dict[int, dict[str, list[list[dict[str, Any]]]]] = {}
    colors = {_mathtext(label): c for label, c in experiment.colors().items()}
    faded: set[str] = set()
    for cell in experiment.cells:
        if not cell.needs_training:
            continue
        curves = panels.setdefault(cell.width, {})
        label = _mathtext(cell.run.label)
        if label in curves:
            continue
        runs, unfinished = [], []
        for seed in seeds:
            config = cell.run.config(width=cell.width, seed=seed, epochs=epochs)
            records = read_metrics(store.run_dir(config))
            # finished runs as in the tables; unfinished ones apart, as far as they got;
            # damaged ones (named in the notes) not at all
            state = store.final_state(config)
            if state != "damaged":
                (runs if state == "finished" else unfinished).append(records)
        curves[label] = runs
        if any(unfinished):
            curves[f"{label} ({UNFINISHED})"] = unfinished
            colors[f"{label} ({UNFINISHED})"] = colors.get(label, "gray")
            faded.add(f"{label} ({UNFINISHED})")
    return draw_curves(
        [(f"width {w}", panels[w]) for w in sorted(panels)],
        path,
        f"{_mathtext(experiment.title)}: learning curves, {subtitle}",
        colors=colors,
        faded=faded,
    )


def report(
    experiment: Experiment,
    store_root: str | Path,
    out_root: str | Path,
    *,
    seeds: Sequence[int],
    epochs: int,
    unavailable: Mapping[Method, str] | None = None,
    folder: str | None = None,
) -> str:
    """Write ``table.md``, ``summary.json`` and the figures of ``experiment`` into
    ``out_root/folder`` (default: the experiment's name); return the Markdown.  Reads the run
    store only: nothing is trained."""
    store = RunStore(store_root)
    out_dir = Path(out_root) / (folder or experiment.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    unavailable = unavailable or {}
    results = collect(experiment, store, seeds=seeds, epochs=epochs, unavailable=unavailable)
    notes = _run_notes(experiment, store, seeds, epochs)
    for m, reason in unavailable.items():
        if any(r.unavailable == reason for r in results):
            notes.append(f"{m.label} ({m.name}) is not available here: {reason}.")
    missing = _missing(results, store, epochs)
    if missing:
        shown = "; ".join(missing[:MISSING_SHOWN])
        if len(missing) > MISSING_SHOWN:
            shown += f"; and {len(missing) - MISSING_SHOWN} more"
        notes.append(
            f"Not computed yet: {shown}. `guessgrad reproduce {experiment.name}` "
            "with this report's options (--quick, --widths, --methods, --seeds, --epochs, "
            "--out) computes them."
        )
    if epochs != PAPER_EPOCHS and any(r.cell.paper is not None and r.cell.needs_training
                                      for r in results):  # fmt: skip
        notes.append(
            f"These runs trained {counted(epochs, 'epoch')}, the paper's {PAPER_EPOCHS}: its "
            "accuracies, "
            "times and measurements on final weights are not comparable with them, nor the "
            "differences beside them."
        )
    if any(r.flagged for r in results):
        notes.append(
            f"{FLAG_MARK} differs from the paper by more than {FLAG_STDS:g} standard deviations "
            f"over seeds or by more than {FLAG_ACCURACY:g}."
        )
    damaged = damaged_runs(experiment, store, seeds, epochs)
    if damaged:
        text = (
            f"{counted(len(damaged), 'run')} not in the table: "
            f"{'its' if len(damaged) == 1 else 'their'} final.json cannot be read as the run's "
            "finished record (damaged, or another configuration's); look at it, or remove it "
            "for `guessgrad reproduce` to train the run again (from its checkpoint, where there "
            "is one): " + ", ".join(str(d / "final.json") for d in damaged)
        )
        warnings.warn(text, stacklevel=2)
        notes.append(text + ".")
    unfinished = unfinished_runs(experiment, store, seeds, epochs)
    if unfinished:
        notes.append(
            "Unfinished runs, not in the table (`guessgrad reproduce` resumes them; the "
            "learning curves draw them apart): " + "; ".join(u.describe() for u in unfinished) + "."
        )
    figures = draw_figures(experiment, results, store, out_dir, seeds=seeds, epochs=epochs)
    markdown = render_markdown(
        experiment, results, seeds=seeds, epochs=epochs, notes=notes, figures=figures
    )
    atomic_write_text(out_dir / "table.md", markdown)
    atomic_write_json(
        out_dir / "summary.json",
        _finite(summarize(experiment, results, seeds=seeds, epochs=epochs, notes=notes,
                          figures=figures, unfinished=unfinished)),
    )  # fmt: skip
    return markdown


def _finite(obj: Any) -> Any:
    """NaN and infinities become ``None`` so that ``summary.json`` is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
