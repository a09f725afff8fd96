"""``guessgrad reproduce EXPERIMENT`` and ``guessgrad report EXPERIMENT``.

``reproduce`` computes whatever the experiment's tables and figures lack in the run store
``OUT/runs/`` (finished runs are never recomputed; interrupted ones resume), then writes
``OUT/<folder>/table.md``, ``summary.json`` and the figures, and prints the tables.
``report`` (or ``reproduce --report-only``) only renders from the stored runs.

The folder is the experiment's name for its full table, with a tag for each option that
narrows or changes it (:func:`folder_name`: ``table3_quick``, ``table4_w512_w-perp-ns``), so
that a quick or partial table never overwrites the full one, nor the full one a quick one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import MAX_SEED
from .common import (
    DEVICE_HELP,
    UsageError,
    default_jobs,
    device_arg,
    device_name,
    out_path,
    output_dir,
    positive_int,
)
from .progress import SweepProgress

if TYPE_CHECKING:
    from ..experiments import Experiment

__all__ = [
    "configure_parsers",
    "run_reproduce",
    "run_report",
    "Selection",
    "select",
    "folder_name",
    "EXPERIMENT_NAMES",
]

#: the experiments' names, ``guessgrad.experiments.EXPERIMENTS``' keys, known to the parser
#: without importing the experiments (and PyTorch)
EXPERIMENT_NAMES = ("table1", "table2", "table3", "table4", "table5", "fig1", "fig2")


def _seed_list(text: str) -> list[int]:
    """``--seeds``: a count N (seeds 0..N-1) or a comma-separated list of seeds."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(positive_int(text)))
    except (ValueError, argparse.ArgumentTypeError):
        hint = " (seed 0 alone: 1, or 0,)" if text.strip() == "0" else ""
        raise argparse.ArgumentTypeError(
            f"expected a number of seeds or a list like 0,1,2, got {text!r}{hint}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0 or max(seeds) > MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"expected distinct seeds, integers in [0, 2**62], got {text!r}"
        )
    return seeds


def _width_list(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(positive_int(w) for w in text.split(",") if w.strip())
    except argparse.ArgumentTypeError:
        widths = ()
    if not widths:
        raise argparse.ArgumentTypeError(f"expected widths like 64,128, got {text!r}")
    return widths


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected names like w-perp-ns,w-transpose, got {text!r}")
    return names


def _add_selection(p: argparse.ArgumentParser) -> None:
    names = ", ".join([*EXPERIMENT_NAMES, "all"])
    p.add_argument("experiment", metavar="EXPERIMENT", help=f"one of {names}")
    p.add_argument(
        "--seeds",
        type=_seed_list,
        help='number of seeds (0..N-1) or a list like 0,3,7 (seed 2 alone: "2,"); default: 3, '
        "1 with --quick",
    )
    p.add_argument("--epochs", type=positive_int, help="training epochs (default: 300)")
    p.add_argument("--widths", type=_width_list, help="only these widths, e.g. 64,128")
    p.add_argument(
        "--methods",
        type=_name_list,
        help="only these methods, by run-directory key or registry name, "
        "e.g. w-perp-ns,w-transpose",
    )
    p.add_argument("--quick", action="store_true", help="the experiment's cheap preset")
    p.add_argument(
        "--out", type=out_path, default=Path("results"), help="results directory (default: results)"
    )
    p.add_argument("--quiet", action="store_true", help="print nothing but errors and warnings")


def configure_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="run a paper experiment (resumable) and print its tables",
        description="Run the training runs and measurements of a paper experiment that are "
        "not in the run store yet, then write and print its tables and figures.",
    )
    _add_selection(p)
    p.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=default_jobs(),
        help="runs in parallel processes (default: CPU cores, %(default)s here)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        help="torch threads per process (default: 1 with --jobs > 1, else torch's)",
    )
    p.add_argument("--report-only", action="store_true", help="only render stored runs")
    p.set_defaults(func=run_reproduce)

    r = sub.add_parser(
        "report",
        help="render a paper experiment's tables and figures from stored runs",
        description="Render tables and figures from the run store, without training.",
    )
    _add_selection(r)
    r.set_defaults(func=run_report)


@dataclass(frozen=True)
class Selection:
    """An experiment with the options applied, and its seeds and epochs."""

    experiment: Experiment
    seeds: tuple[int, ...]
    epochs: int
    folder: str


def folder_name(
    name: str,
    *,
    quick: bool = False,
    widths: tuple[int, ...] = (),
    methods: tuple[str, ...] = (),
    seeds: tuple[int, ...] | None = None,
    epochs: int | None = None,
) -> str:
    """Where an experiment's table goes: ``name``, then ``_quick``, ``_w64-128`` (widths),
    ``_w-perp-k10+w-transpose`` (method keys), ``_seeds0-3`` and ``_e20`` for what is given."""
    parts = [name]
    if quick:
        parts.append("quick")
    if widths:
        parts.append("w" + "-".join(map(str, widths)))
    if methods:
        parts.append("+".join(methods))
    if seeds is not None:
        parts.append("seeds" + "-".join(map(str, seeds)))
    if epochs is not None:
        parts.append(f"e{epochs}")
    return "_".join(parts)


def select(args: argparse.Namespace) -> list[Selection]:
    """The experiments named by ``args.experiment`` with ``--quick``, ``--widths``,
    ``--methods``, ``--seeds`` and ``--epochs`` applied."""
    from ..experiments import EXPERIMENTS

    name = args.experiment
    if name != "all" and name not in EXPERIMENTS:
        raise UsageError(
            f"unknown experiment {name!r}; available: {', '.join([*EXPERIMENTS, 'all'])}"
        )
    chosen = list(EXPERIMENTS.values()) if name == "all" else [EXPERIMENTS[name]]
    # (narrow, what was asked for, what the experiment offers instead)
    filters: list[tuple[Callable[[Experiment], Experiment], str, Callable[[Experiment], str]]] = []
    if args.widths:
        filters.append(
            (
                lambda e: e.restrict(args.widths),
                f"at widths {_join(args.widths)}",
                lambda e: f"its widths: {_join(sorted({c.width for c in e.cells}))}",
            )
        )
    if args.methods:
        filters.append(
            (
                lambda e: e.only_methods(args.methods),
                f"of {_join(args.methods)}",
                lambda e: f"its methods: {_join(sorted({m.key() for m in e.methods()}))}",
            )
        )
    if args.widths:  # a width no experiment has is a typo, not a narrower table
        offers = [e.with_preset(e.quick) if args.quick else e for e in chosen]
        known_widths = sorted({c.width for e in offers for c in e.cells})
        missing = [w for w in args.widths if w not in known_widths]
        if missing:
            where = (
                f"in {name}{' --quick' if args.quick else ''}"
                if name != "all"
                else "in any experiment"
            )
            raise UsageError(f"no width {missing[0]} {where}; its widths: {_join(known_widths)}")
    if args.methods:  # a name no experiment knows is a typo, not a narrower table
        known = [m for e in chosen for m in e.methods()]
        unknown = [n for n in args.methods if not any(m.matches([n]) for m in known)]
        if unknown:
            offered = sorted({m.key() for m in known})
            where = f"in {name}" if name != "all" else "in any experiment"
            raise UsageError(f"no method {unknown[0]!r} {where}; its methods: {_join(offered)}")
    out, left_out = [], []
    for exp in chosen:
        if args.quick:
            exp = exp.with_preset(exp.quick)
        whole = exp
        for narrow, wanted, offered in filters:
            kept = narrow(exp)
            if not kept.cells:
                if name != "all":
                    raise UsageError(f"{exp.name} has no cells {wanted}; {offered(exp)}")
                left_out.append(exp.name)
                break
            exp = kept
        else:
            seeds = tuple(args.seeds) if args.seeds else tuple(range(exp.seeds))
            epochs = args.epochs or exp.epochs
            out.append(Selection(exp, seeds, epochs, _folder(whole, exp, args, seeds, epochs)))
    wanted = " ".join(w for _, w, _ in filters)
    if not out:
        raise UsageError(f"no experiment has cells {wanted}")
    if left_out and not args.quiet:
        print(f"note: {_join(left_out)} left out: no cells {wanted}", file=sys.stderr)
    return out


def _folder(
    whole: Experiment,
    kept: Experiment,
    args: argparse.Namespace,
    seeds: tuple[int, ...],
    epochs: int,
) -> str:
    """:func:`folder_name` of a selection: tags only for what the options changed (in a
    canonical order), from the experiment's own widths and method keys."""
    widths = sorted({c.width for c in kept.cells})
    methods = sorted({m.key() for m in kept.methods()})
    return folder_name(
        whole.name,
        quick=args.quick,
        widths=tuple(widths) if widths != sorted({c.width for c in whole.cells}) else (),
        methods=tuple(methods) if methods != sorted({m.key() for m in whole.methods()}) else (),
        seeds=tuple(sorted(seeds)) if sorted(seeds) != list(range(whole.seeds)) else None,
        epochs=epochs if epochs != whole.epochs else None,
    )


def _join(values: object) -> str:
    return ", ".join(map(str, values))  # type: ignore[call-overload]


def _render(selections: list[Selection], out: Path, quiet: bool) -> None:
    from ..experiments import report, unavailable_methods

    unavailable = unavailable_methods(s.experiment for s in selections)
    for s in selections:
        markdown = report(
            s.experiment,
            out,
            out,
            seeds=s.seeds,
            epochs=s.epochs,
            unavailable=unavailable,
            folder=s.folder,
        )
        if not quiet:
            print(markdown)
            print(f"(written to {out / s.folder}/)\n")


def _stored(out: Path, name: str) -> Path:
    """``out``, if it holds a run store that the tables can be written beside; a usage error
    otherwise (a mistyped ``--out`` would render a table of empty cells into a new directory,
    and a read-only store would fail at the first file written)."""
    if not (out / "runs").is_dir():
        raise UsageError(
            f"no run store at {out} (no {out / 'runs'}/): nothing to render; "
            f"`guessgrad reproduce {name} --out {out}` trains the runs first"
        )
    return output_dir(out)


def run_report(args: argparse.Namespace) -> int:
    selections = select(args)
    _render(selections, _stored(args.out, args.experiment), args.quiet)
    return 0


def run_reproduce(args: argparse.Namespace) -> int:
    from ..experiments import plan, run_tasks, unavailable_methods

    selections = select(args)
    if args.report_only:
        _render(selections, _stored(args.out, args.experiment), args.quiet)
        return 0
    device = device_name(args.device)
    output_dir(args.out)
    unavailable = unavailable_methods(s.experiment for s in selections)
    if not args.quiet:
        for m, reason in unavailable.items():
            print(f"note: {m.label} is left out: {reason}", file=sys.stderr)
    tasks = [
        task
        for s in selections
        for task in plan(
            s.experiment, seeds=s.seeds, epochs=s.epochs, device=device, skip=unavailable
        )
    ]
    progress = SweepProgress(quiet=args.quiet)
    outcomes = run_tasks(tasks, args.out, jobs=args.jobs, threads=args.threads, progress=progress)
    _render(selections, args.out, args.quiet)
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        print(
            f"failed: {o.task.label()}: {o.message} "
            f"(details in {args.out / 'runs' / o.task.config.slug() / o.task.error_log()})",
            file=sys.stderr,
        )
    return 1 if failed else 0
