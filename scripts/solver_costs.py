"""Where the fast W̃⊥ solver spends its time, and how close it gets to the exact subspace.

    python scripts/solver_costs.py

Prints (1) batched symmetric eigensolver vs Cholesky on 512 small matrices, (2) the fidelity of
the block Krylov solver (cold start, second hidden layer, k = 10, first 512 MNIST-1D training
examples, seed-0 initial weights) at widths 64/128/512 and depths 2/3, (3) the operator profile
of one default ``w-perp`` estimate at width 512.  One torch thread.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

import guessgrad as gg
from guessgrad.metrics import subspace_fidelity
from guessgrad.models import linear_layers
from guessgrad.solvers.subspace import block_krylov, orthonormalize_rows


def timed(fn, repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    torch.set_num_threads(1)
    print("| p | eigh of 512 p×p (ms) | cholesky of 512 p×p (ms) |\n|---|---|---|")
    for p in (10, 30):
        a = torch.randn(512, p, p)
        a = a @ a.mT + torch.eye(p)
        e = timed(lambda a=a: torch.linalg.eigh(a))
        c = timed(lambda a=a: torch.linalg.cholesky_ex(a))
        print(f"| {p} | {e * 1e3:.1f} | {c * 1e3:.2f} |")

    data = gg.data.mnist1d()
    x, y = data.x_train[:512], data.y_train[:512]
    print("\n| width | depth 2 | depth 3 |\n|---|---|---|")
    for width in (64, 128, 512):
        torch.manual_seed(0)
        model = gg.MLP([40] + [width] * 3 + [10])
        sites = []
        gg.WTranspose().tangent_pass(
            linear_layers(model), x, y, on_site=lambda s, g, st, sites=sites: sites.append(s)
        )
        jac = sites[1].jacobian
        start = orthonormalize_rows(
            torch.randn(1, 10, width, generator=torch.Generator().manual_seed(0))
        )[0]
        fid = [
            subspace_fidelity(jac.dense(), block_krylov(jac, 10, start, depth=d)[0], 10)
            for d in (2, 3)
        ]
        print(f"| {width} | {fid[0]:.3f} | {fid[1]:.3f} |")

    torch.manual_seed(0)
    model = gg.MLP([40, 512, 512, 512, 10])
    est = gg.make_estimator("w-perp")
    est.estimate(model, x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        est.estimate(model, x, y)
    print()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
