"""Where a default ``w-perp`` step spends its time, by phase of the subspace solver.

    python scripts/wperp_step_split.py [--widths 64,128,512] [--steps 20] [--threads 1]

For each width (batch 512, depth 3, seed-0 initial weights, the first 512 MNIST-1D training
examples), times estimate-plus-AdamW steps of ``make_estimator("w-perp")`` after 5 warm-up
steps, and within them the two phases of :func:`guessgrad.solvers.subspace.krylov_ritz`:
the Krylov block products with their float64 Gram (``_krylov_gram``) and the small
Rayleigh–Ritz problems (``_ritz_coefficients``, RITZ_GROUP examples per torch thread at a
time).  The rest is the tangent pass, the guesses (Horner's rule), the closed form of the last
hidden layer and AdamW.  Prints a Markdown table of milliseconds per step (each column the
median over ``--steps`` steps, so the parts need not add up exactly) and each part's share of
the median step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import guessgrad as gg
import guessgrad.solvers.subspace as subspace

PHASES = {"Krylov products and Gram": "_krylov_gram", "Rayleigh–Ritz": "_ritz_coefficients"}


def _timed(fn: Callable[..., Any], spent: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    return wrapper


def split(width: int, steps: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Median milliseconds per step: the whole step, each phase of ``PHASES`` and the rest."""
    torch.manual_seed(0)
    model = gg.MLP([x.shape[1], width, width, width, 10])
    est = gg.make_estimator("w-perp")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    spent: dict[str, list[float]] = {name: [] for name in PHASES}
    originals = {name: getattr(subspace, attr) for name, attr in PHASES.items()}
    for name, attr in PHASES.items():
        setattr(subspace, attr, _timed(originals[name], spent[name]))
    try:
        per_step: dict[str, list[float]] = {k: [] for k in ("step", *PHASES, "rest")}
        for i in range(5 + steps):
            for times in spent.values():
                times.clear()
            t0 = time.perf_counter()
            opt.zero_grad()
            est.estimate(model, x, y, generator=gen)
            opt.step()
            if i >= 5:
                total = time.perf_counter() - t0
                per_step["step"].append(total)
                for name, times in spent.items():
                    per_step[name].append(sum(times))
                per_step["rest"].append(total - sum(sum(t) for t in spent.values()))
    finally:
        for name, attr in PHASES.items():
            setattr(subspace, attr, originals[name])
    return {name: statistics.median(v) * 1e3 for name, v in per_step.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="64,128,512")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = gg.data.mnist1d()
    x, y = data.x_train[:512], data.y_train[:512]
    names = list(PHASES)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.steps} steps\n")
    heads = [f"{n} (ms, share)" for n in (*names, "rest")]
    print("| width | step (ms) | " + " | ".join(heads) + " |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for width in (int(w) for w in args.widths.split(",")):
        ms = split(width, args.steps, x, y)
        cells = [f"{ms[n]:.1f} ({ms[n] / ms['step']:.0%})" for n in (*names, "rest")]
        print(f"| {width} | {ms['step']:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
