"""``guessgrad bench``: the options, the progress display and the table; the measurements are
:func:`guessgrad.bench.bench_methods`'."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict

from .common import (
    DEVICE_HELP,
    UsageError,
    device_arg,
    nonnegative_int,
    positive_int,
    seed_int,
    set_threads,
)

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
    parser.add_argument("--device", type=device_arg, default="cpu", help=DEVICE_HELP)
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=seed_int, default=0, help="(default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON records instead")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    try:
        return _bench(args)
    except ValueError as err:  # bad option values
        raise UsageError(str(err)) from None


def _bench(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..bench import bench_methods, bench_units, markdown, parse_method
    from ..estimators import make_estimator
    from ..text import counted
    from ..training import resolve_device

    device = resolve_device(args.device)
    specs = [s.strip() for s in args.methods.split(",") if s.strip()]
    if not specs:
        raise ValueError(f"--methods: expected names like backprop,w-perp, got {args.methods!r}")
    seen: dict[str, str] = {}
    for spec in specs:  # fail on a bad name, or a method listed twice, before timing anything
        name, options = parse_method(spec)
        # the estimator's repr names every option, defaults included: w-perp:k=2 is
        # w-perp:k=02, and w-perp is w-perp:k=10
        key = repr(make_estimator(name, **options))
        if key in seen:
            raise ValueError(f"--methods lists {name} twice: {seen[key]} and {spec}")
        seen[key] = spec
    total = bench_units(len(specs), steps=args.steps, warmup=args.warmup)
    # a bar on a terminal (tqdm's disable=None), else about twenty plain lines, on stderr:
    # stdout keeps the table
    every, start, units = max(1, math.ceil(total / 20)), time.perf_counter(), 0
    with tqdm(total=total, desc="bench", unit="step", file=sys.stderr, disable=None) as bar:

        def advance(what: str) -> None:
            nonlocal units
            bar.set_postfix_str(what, refresh=False)
            bar.update()
            units += 1
            if bar.disable and (units % every == 0 or units == total):
                elapsed = time.perf_counter() - start
                print(f"bench: {units}/{total} ({what}), {elapsed:.0f} s", file=sys.stderr)

        records = bench_methods(
            specs,
            width=args.width,
            depth=args.depth,
            batch_size=args.batch_size,
            steps=args.steps,
            warmup=args.warmup,
            device=device,
            seed=args.seed,
            on_progress=advance,
        )
    if args.json:
        print(json.dumps([asdict(r) for r in records], indent=2))
    else:
        print(
            f"width {args.width}, depth {args.depth}, batch {args.batch_size}, device {device}, "
            f"torch {torch.__version__} ({counted(torch.get_num_threads(), 'thread')}), "
            f"{platform.processor() or platform.machine()}; median of {counted(args.steps, 'step')}"
        )
        print(markdown(records))
    return 0
