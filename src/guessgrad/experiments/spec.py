"""The vocabulary in which experiments are written down as data.

An :class:`Experiment` is a list of table :class:`Cell` s and figures.  Every cell names a
training run (a :class:`Method` at a width; seeds and epochs are filled in when the
experiment is run) and one number read from it:

- without a :class:`Probe`, a key of the run's ``final.json`` (``train_accuracy``,
  ``test_accuracy``, ``wall_seconds``);
- with a ``Probe(kind="diagnose")``, a field of :class:`~guessgrad.LayerDiagnostics` of the
  probe's estimator on the run's weights (at initialisation or at the end of training);
- with a ``Probe(kind="overlap")``, the overlap curve or the mean rank of W̃ (Fig. 1).

A :class:`Preset` (``--quick``) is data too: it keeps a subset of the cells and may change
the number of seeds or epochs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..curves import colour
from ..training import TrainConfig

__all__ = [
    "Method",
    "method",
    "Probe",
    "Cell",
    "Preset",
    "WidthFigure",
    "OverlapFigure",
    "TradeoffFigure",
    "Experiment",
    "Note",
    "PAPER_EPOCHS",
]

When = Literal["init", "final"]

#: the epochs of every training run in the paper (PAPER.md §4): its accuracies and times are
#: after this many
PAPER_EPOCHS = 300


@dataclass(frozen=True)
class Method:
    """A registered estimator with its options, under the label the paper gives it.

    ``options`` is a sorted tuple of ``(name, value)`` pairs so that methods are hashable;
    build one with :func:`method`.  ``cost`` is a rough relative cost per step, used only to
    start the slowest runs first.
    """

    label: str
    name: str
    options: tuple[tuple[str, Any], ...] = ()
    cost: float = 1.0

    @property
    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of ``make_estimator``."""
        return dict(self.options)

    def key(self) -> str:
        """A file-name-safe identifier, in the style of :meth:`TrainConfig.slug`."""
        return self.name + "".join(f"-{k}{v}" for k, v in self.options)

    def matches(self, names: Iterable[str]) -> bool:
        """Whether one of ``names`` is this method's :meth:`key` or its registry name."""
        return not {self.key(), self.name}.isdisjoint(names)

    def config(self, *, width: int, seed: int, epochs: int, device: str = "cpu") -> TrainConfig:
        """The paper §4 training run of this method (3 hidden layers, AdamW defaults)."""
        return TrainConfig(
            method=self.name,
            width=width,
            epochs=epochs,
            seed=seed,
            device=device,
            options=self.kwargs,
        )


def method(label: str, name: str, *, cost: float = 1.0, **options: Any) -> Method:
    """``Method(label, name, sorted(options))``."""
    return Method(label, name, tuple(sorted(options.items())), cost)


@dataclass(frozen=True)
class Probe:
    """A measurement on a run's weights rather than its ``final.json``.

    Attributes:
        kind: ``"diagnose"`` (``guessgrad.diagnose`` of ``estimator``) or ``"overlap"``
            (overlap of g with the top-k right singular subspace of W̃, and W̃'s rank).
        when: ``"init"`` (the run's initial weights, no training needed) or ``"final"``.
        layer: hidden layer index, 0-based (0 = the first hidden layer).
        estimator: the estimator whose statistics are measured (``kind="diagnose"``).
        k: the subspace size for ``quantity="overlap"``.
    """

    kind: Literal["diagnose", "overlap"]
    when: When
    layer: int
    estimator: Method | None = None
    k: int | None = None

    def file(self) -> str:
        """The file, relative to the run directory, that holds the measurement."""
        if self.kind == "overlap":
            return f"diagnostics/overlap-{self.when}.json"
        assert self.estimator is not None
        return f"diagnostics/{self.estimator.key()}-{self.when}.json"


@dataclass(frozen=True)
class Cell:
    """One number of a table: ``quantity`` of the run of ``run`` at ``width``.

    Attributes:
        section: which table of the experiment the cell belongs to ("" = the main one).
        row, col: the labels it is shown under.
        paper: the published value (the paper's tables), if any.
    """

    row: str
    col: str
    run: Method
    width: int
    quantity: str
    paper: float | None = None
    probe: Probe | None = None
    section: str = ""

    @property
    def needs_training(self) -> bool:
        return self.probe is None or self.probe.when == "final"


@dataclass(frozen=True)
class WidthFigure:
    """Fig. 2: ``quantity`` against width, one curve per column of the main table.

    Drawn from the experiment's cells of that quantity (x = ``cell.width``), with the
    published values (``cell.paper``) beside.
    """

    file: str
    title: str
    quantity: str
    ylabel: str


@dataclass(frozen=True)
class OverlapFigure:
    """Fig. 1: overlap against k, one curve per hidden layer, one panel per width.

    Reads the overlap curves of ``run``'s runs; the experiment's cells must ask for the
    same (width, when) pairs so that they are computed.
    """

    file: str
    title: str
    run: Method
    widths: tuple[int, ...]
    when: tuple[When, ...]
    k_marker: int
    paper_rank: dict[int, tuple[int, ...]] = field(default_factory=dict)
    #: the range the paper gives for the overlap at ``k_marker``, drawn as a bar there
    paper_overlap: tuple[float, float] | None = None


@dataclass(frozen=True)
class TradeoffFigure:
    """Table 4 as a picture: ``y`` against ``x`` (log scale), one point per row of the main
    table, one panel per width.

    Drawn from the experiment's cells of those two quantities (a row needs both), mean ± std
    over seeds, with the published values (``cell.paper``) as hollow markers beside.
    """

    file: str
    title: str
    x: str = "wall_seconds"
    y: str = "train_accuracy"
    xlabel: str = "training time (s)"
    ylabel: str = "train accuracy"


#: the figures an experiment can draw
Figure = WidthFigure | OverlapFigure | TradeoffFigure


@dataclass(frozen=True)
class Preset:
    """A cheaper version of an experiment; ``None`` fields keep the experiment's value.

    Attributes:
        seeds: number of seeds.
        epochs: training epochs.
        widths: keep only cells (and figure widths) at these widths.
        methods: keep only cells whose run (or probe estimator) is one of these methods, by
            :meth:`Method.key` (``w-perp-ns``, ``w-perp-k10-solversvd``) or registry name
            (``w-perp``: all its rows).
        drop: drop cells whose run or probe estimator has one of these labels.
        when: keep only probes at these times.
        quantities: keep only cells of these quantities.
        note: what the preset leaves out, shown with the table.
    """

    seeds: int | None = None
    epochs: int | None = None
    widths: tuple[int, ...] | None = None
    methods: tuple[str, ...] | None = None
    drop: tuple[str, ...] = ()
    when: tuple[When, ...] | None = None
    quantities: tuple[str, ...] | None = None
    note: str = ""

    def keeps(self, cell: Cell) -> bool:
        if self.widths is not None and cell.width not in self.widths:
            return False
        used = [cell.run]
        if cell.probe is not None and cell.probe.estimator is not None:
            used.append(cell.probe.estimator)
        if {m.label for m in used} & set(self.drop):
            return False
        if self.methods is not None and not any(m.matches(self.methods) for m in used):
            return False
        if self.when is not None and cell.probe is not None and cell.probe.when not in self.when:
            return False
        return self.quantities is None or cell.quantity in self.quantities


@dataclass(frozen=True)
class Note:
    """A note about some of an experiment's methods: shown only while the experiment, as a
    preset or ``--methods`` narrows it, trains or measures one of ``methods``."""

    text: str
    methods: tuple[Method, ...]


@dataclass(frozen=True)
class Experiment:
    """A paper experiment: table cells, figures, fixed notes, default seeds and epochs.

    ``row_header`` heads the tables' first column.  ``palette`` is the order in which method
    labels take the figures' colours; empty, the cells' order.  A preset keeps the full
    experiment's, so that a method has the same colour in a narrowed report as in the full one.
    """

    name: str
    title: str
    cells: tuple[Cell, ...]
    row_header: str = ""
    figures: tuple[Figure, ...] = ()
    notes: tuple[str | Note, ...] = ()
    seeds: int = 3
    epochs: int = PAPER_EPOCHS
    quick: Preset | None = None
    palette: tuple[str, ...] = ()

    def note_texts(self) -> list[str]:
        """The notes that concern the experiment's cells (see :class:`Note`)."""
        used = set(self.methods())
        return [
            n if isinstance(n, str) else n.text
            for n in self.notes
            if isinstance(n, str) or used.intersection(n.methods)
        ]

    def colors(self) -> dict[str, str]:
        """Each method label's matplotlib colour (``"C0"``, ``"C1"``, …) in every figure."""
        labels = self.palette or tuple(dict.fromkeys(c.run.label for c in self.cells))
        return {label: colour(i) for i, label in enumerate(labels)}

    def with_preset(self, preset: Preset | None) -> Experiment:
        """The experiment with ``preset`` applied (cells and figures filtered)."""
        if preset is None:
            return self
        figures: list[Figure] = []
        for fig in self.figures:
            if isinstance(fig, OverlapFigure):  # the other figures follow their cells
                widths = tuple(w for w in fig.widths if preset.widths is None or w in preset.widths)
                when = tuple(w for w in fig.when if preset.when is None or w in preset.when)
                kept = preset.methods is None or fig.run.matches(preset.methods)
                if widths and when and kept:
                    fig = replace(fig, widths=widths, when=when)
                else:
                    continue
            figures.append(fig)
        notes = self.notes + ((f"Preset: {preset.note}",) if preset.note else ())
        return replace(
            self,
            cells=tuple(c for c in self.cells if preset.keeps(c)),
            figures=tuple(figures),
            notes=notes,
            seeds=preset.seeds if preset.seeds is not None else self.seeds,
            epochs=preset.epochs if preset.epochs is not None else self.epochs,
            palette=tuple(self.colors()),
        )

    def restrict(self, widths: tuple[int, ...]) -> Experiment:
        """Only the cells and figure curves at ``widths``."""
        return self.with_preset(Preset(widths=widths))

    def only_methods(self, names: tuple[str, ...]) -> Experiment:
        """Only the cells of the methods ``names`` (keys or registry names, see :class:`Preset`)."""
        return self.with_preset(Preset(methods=names))

    def methods(self) -> list[Method]:
        """Every method the experiment's cells train or probe, in first-use order."""
        seen: dict[Method, None] = {}
        for cell in self.cells:
            seen.setdefault(cell.run)
            if cell.probe is not None and cell.probe.estimator is not None:
                seen.setdefault(cell.probe.estimator)
        return list(seen)
