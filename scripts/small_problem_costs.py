"""What the small per-example problems of the subspace solver cost, per matrix.

    python scripts/small_problem_costs.py [--batch 512] [--size 30] [--block 10] [--repeat 30]

The Rayleigh–Ritz step of ``solver="subspace"`` works on one ``size × size`` matrix per
example (p = 30 Krylov coordinates with the default depth and block) through batched calls:
Cholesky factors, triangular solves, products with ``block`` columns.  This prints the time of
each call per matrix (µs, median of ``--repeat``, one thread) for a batch of ``--batch``
well-conditioned symmetric matrices, in float64 and float32, through PyTorch (MKL on x86
builds) and through NumPy (its own BLAS/LAPACK, OpenBLAS in the PyPI wheels), so that a slow
machine can be told apart from a slow library.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads its BLAS

import numpy as np  # noqa: E402
import torch  # noqa: E402

from guessgrad.bench import median_seconds  # noqa: E402


def per_matrix_us(fn: Callable[[], object], batch: int, repeat: int) -> float:
    return median_seconds(fn, repeat) / batch * 1e6


def costs(batch: int, size: int, block: int, repeat: int) -> list[tuple[str, str, float, float]]:
    """``(call, dtype, torch µs, numpy µs)`` per matrix, float64 then float32."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.float64, torch.float32):
        rows += _costs(dtype, gen, batch, size, block, repeat)
    return rows


def _costs(
    dtype: torch.dtype, gen: torch.Generator, batch: int, size: int, block: int, repeat: int
) -> list[tuple[str, str, float, float]]:
    a = torch.randn(batch, size, size, generator=gen, dtype=dtype)
    t = a @ a.mT + size * torch.eye(size, dtype=dtype)  # symmetric positive definite
    s = torch.randn(batch, size, block, generator=gen, dtype=dtype)
    low = torch.linalg.cholesky(t)
    tn, sn = t.numpy(), s.numpy()
    calls: list[tuple[str, Callable[[], object], Callable[[], object] | None]] = [
        (f"product {size}×{size} · {size}×{block}", lambda: t @ s, lambda: tn @ sn),
        (f"product {size}×{size} · {size}×{size}", lambda: t @ t, lambda: tn @ tn),
        (f"Cholesky {size}×{size}", lambda: torch.linalg.cholesky(t),
         lambda: np.linalg.cholesky(tn)),
        (f"eigh {size}×{size}", lambda: torch.linalg.eigh(t), lambda: np.linalg.eigh(tn)),
        (f"triangular solve {size}×{size}, {block} right-hand sides",
         lambda: torch.linalg.solve_triangular(low, s, upper=False),
         None),  # NumPy has no batched triangular solve
    ]  # fmt: skip
    name = str(dtype).removeprefix("torch.")
    return [
        (
            call,
            name,
            per_matrix_us(fn_torch, batch, repeat),
            per_matrix_us(fn_numpy, batch, repeat) if fn_numpy is not None else float("nan"),
        )
        for call, fn_torch, fn_numpy in calls
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--size", type=int, default=30)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, numpy {np.__version__}, one thread, batch {args.batch}")
    print("| call | dtype | torch µs per matrix | numpy µs per matrix |")
    print("|---|---|---|---|")
    for name, dtype, t_us, n_us in costs(args.batch, args.size, args.block, args.repeat):
        numpy_cell = "–" if n_us != n_us else f"{n_us:.1f}"
        print(f"| {name} | {dtype} | {t_us:.1f} | {numpy_cell} |")


if __name__ == "__main__":
    main()
