"""``guessgrad bench``: the options; the measurements are :func:`guessgrad.bench.main`'s."""

from __future__ import annotations

import argparse

from .common import DEVICE_HELP, UsageError, nonnegative_int, positive_int, seed_int, set_threads

__all__ = ["configure_parser", "run"]


def configure_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="benchmarks of the estimators and solvers")
    parser.description = (
        "Time one estimate-plus-AdamW step of each method side by side (median and IQR), "
        "measure its peak memory and, for W̃⊥ solvers, the subspace fidelity; print a Markdown "
        "table with ratios to w-transpose and backprop."
    )
    parser.add_argument(
        "--methods",
        default="backprop,w-transpose,w-perp",
        help="comma list of registry names, each with options as name:key=value:key=value "
        "(the estimator's constructor options, e.g. w-perp:solver=svd, w-perp:depth=3 for "
        "the Krylov depth of its subspace solver; default: %(default)s)",
    )
    parser.add_argument("--width", type=positive_int, default=512, help="(default: %(default)s)")
    parser.add_argument(
        "--depth", type=positive_int, default=3, help="hidden layers (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=512, help="(default: %(default)s)"
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=20,
        help="timed steps per method (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=nonnegative_int,
        default=3,
        help="untimed steps first (default: %(default)s)",
    )
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=seed_int, default=0, help="(default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON records instead")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import bench

    set_threads(args.threads)
    try:
        return bench.main(args)
    except ValueError as err:  # bad option values
        raise UsageError(str(err)) from None
