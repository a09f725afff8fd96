"""Where the fast W̃⊥ solver spends its time, and what cheaper settings would cost in fidelity.

    python scripts/solver_costs.py

Prints (1) batched symmetric eigensolver vs Cholesky on 512 small matrices (why the solver
never calls ``eigh``), (2) the subspace energy fidelity of ``WPerpGuess(10, solver="subspace")``
for several Krylov depths and block sizes, after 5 warm-start steps on the first 512 MNIST-1D
training examples, first two hidden layers, seed-0 initial weights, (3) the operator profile of
one default ``w-perp`` estimate at width 512.  One torch thread.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import guessgrad as gg
from guessgrad.guesses import WPerpGuess
from guessgrad.metrics import subspace_fidelity
from guessgrad.models import linear_layers

SETTINGS = [dict(depth=1), dict(depth=2, block=8), dict(depth=2), dict(depth=3)]


def timed(fn, repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def warm_fidelity(site, **options) -> float:
    guess = WPerpGuess(10, solver="subspace", **options)
    state: dict = {}
    for _ in range(5):  # the warm start moves on as in training
        _, update = guess.basis(site, state)
        state.update(update)
    basis, _ = guess.basis(site, state)
    return subspace_fidelity(site.jacobian.dense(), basis, 10)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    print("| p | eigh of 512 p×p (ms) | cholesky of 512 p×p (ms) |\n|---|---|---|")
    for p in (10, 30):
        a = torch.randn(512, p, p)
        a = a @ a.mT + torch.eye(p)
        e = timed(lambda a=a: torch.linalg.eigh(a))
        c = timed(lambda a=a: torch.linalg.cholesky_ex(a))
        print(f"| {p} | {e * 1e3:.1f} | {c * 1e3:.2f} |")

    data = gg.data.mnist1d()
    x, y = data.x_train[:512], data.y_train[:512]
    names = ", ".join(f"depth {o['depth']}, block {o.get('block', 10)}" for o in SETTINGS)
    print(f"\n| width, layer | {names.replace(', depth', ' | depth')} |")
    print("|---|" + "---|" * len(SETTINGS))
    for width in (128, 512):
        torch.manual_seed(0)
        model = gg.MLP([40] + [width] * 3 + [10])
        sites: list = []
        gg.WTranspose().tangent_pass(
            linear_layers(model), x, y, on_site=lambda s, g, st, sites=sites: sites.append(s)
        )
        for layer in (0, 1):
            fid = [warm_fidelity(sites[layer], **o) for o in SETTINGS]
            print(f"| {width}, {layer + 1} | " + " | ".join(f"{f:.3f}" for f in fid) + " |")

    torch.manual_seed(0)
    model = gg.MLP([40, 512, 512, 512, 10])
    est = gg.make_estimator("w-perp")
    est.estimate(model, x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        est.estimate(model, x, y)
    print()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
