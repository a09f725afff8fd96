"""Reproduction of the paper's experiments on top of the public API.

The library knows nothing of tables and figures: :mod:`.paper` writes every experiment down
as data (runs of :func:`guessgrad.training.train` and measurements on their weights),
:mod:`.runner` computes what is missing in a resumable run store, :mod:`.report` renders
tables and figures from the store.
"""

from .paper import EXPERIMENTS
from .report import collect, report
from .runner import Outcome, RunStore, Task, plan, run_tasks, unavailable_methods
from .spec import (
    Cell,
    Experiment,
    Method,
    OverlapFigure,
    Preset,
    Probe,
    TradeoffFigure,
    WidthFigure,
    method,
)

__all__ = [
    "EXPERIMENTS",
    "Cell",
    "Experiment",
    "Method",
    "Outcome",
    "OverlapFigure",
    "Preset",
    "Probe",
    "RunStore",
    "Task",
    "TradeoffFigure",
    "WidthFigure",
    "collect",
    "method",
    "plan",
    "report",
    "run_tasks",
    "unavailable_methods",
]
