"""Fit the odd degree-7 Newton–Schulz polynomials of the W̃⊥-NS guess (paper §2.6).

For each threshold t ∈ {0.1, 0.2, …, 0.9} this fits p(x) = a x + b x³ + c x⁵ + d x⁷ so that
the N = 5 fold composition f = p∘p∘p∘p∘p is a step on the normalised singular values:

    f(x) ≈ 0  for 0 ≤ x ≤ t − 2δ_t,        f(x) ≈ 1  for t ≤ x ≤ 1.15,

and the fit ignores the transition band (t − 2δ_t, t) of half-width δ_t = min(t/4, 0.05).

Where the step sits.  The guess uses the set of bin t = floor(10·σ_k/σ_1)/10, so the true
ratio σ_k/σ_1 lies anywhere in [t, t + 0.1).  The band therefore ends at the bin's lower edge:
every singular value ≥ σ_k (ratio ≥ t) is in the region fitted to 1, wherever the ratio lies
inside the bin.  For t ≥ 0.2 the band is the bin below, [t − 0.1, t); for t = 0.1 it is
[0.05, 0.1): near zero p(x) ≈ a x, so the polynomial can only separate values in a fixed ratio
and the band must be relative there.  Singular values inside the band get a weight between 0
and 1.

Why the fitted range is [0, 1.15].  Each example is normalised by its power-iteration estimate
of σ_1, which never exceeds σ_1 (the Rayleigh quotient of WᵀW is at most σ_1²) and at a flat top
of the spectrum (random weights) can sit several percent below it: after 20 iterations the
largest σ_1/σ̂_1 seen over 512 ReLU-masked 64 × 64 matrices at PyTorch's default
initialisation was 1.071–1.133 over 20 seeds of the weights and masks (median 1.086).  So
normalised singular values may exceed 1.  The fit covers
[0, 1.15] and requires p to map [−1.15, 1.15] into itself (max |p| ≤ 1.15 on [0, 1.15]; p is
odd), so any number of iterations keeps singular values up to 1.15 inside [−1.15, 1.15]: an
underestimate of σ_1 by up to 13 % neither leaves the fitted range nor overflows.  (Just past
the invariant interval the compositions for t ≤ 0.6 grow without bound.)  Inflating σ̂_1 by a
safety factor instead would push σ_k below the band's upper edge t.

Objective (float64, all thresholds and starts batched), a weighted least-squares problem in
the four coefficients:

    Σ_x ω(x) e(x)² + (100 / G') Σ_y relu(|p(y)| − 1.14)²,   y ∈ [0, 1.15] (G' points),

e the error of p^N outside the band; the second term enforces the invariance above with a
margin of 0.01.  The cost is minimised by Levenberg–Marquardt with the exact Jacobian of the
composition (chain rule through the N steps).  The weights ω start uniform (least squares);
after each round they are multiplied by (|e| / max|e|)^{1/2} (Lawson's reweighting towards the
minimax fit), so later rounds trade RMS error for a smaller maximum error.  The reported set is
the round and start with the smallest maximum error among those with max |p| ≤ 1.15 on
[0, 1.15].  Starts: the best such candidates of a coarse grid of (a, b, c) with
d = 1 − a − b − c (so p(1) = 1).  Nothing is random, so the output is reproducible.

Usage::

    python scripts/fit_ns_coefficients.py [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

#: the bins of the paper's §2.6: one coefficient set per σ_k/σ_1 ∈ {0.1, …, 0.9}
THRESHOLDS = tuple(round(0.1 * j, 1) for j in range(1, 10))
#: the paper's §2.6: degree-7 odd polynomial, applied N = 5 times
DEGREE = 7
ITERATIONS = 5
#: band half-width δ_t = min(BAND_RELATIVE · t, BAND_ABSOLUTE); the band is (t − 2δ_t, t)
BAND_RELATIVE = 0.25
BAND_ABSOLUTE = 0.05
#: the fitted range of normalised singular values is [0, X_MAX] (see the module docstring)
X_MAX = 1.15
#: p must map [−X_MAX, X_MAX] into itself; the penalty acts above PENALTY_BOUND
PENALTY_BOUND = 1.14
PENALTY_WEIGHT = 100.0
PENALTY_POINTS = 1151
#: training and evaluation grids on [0, X_MAX]
TRAIN_POINTS = 1151
EVAL_POINTS = 23001
#: the coarse start grid: a, b, c on these ranges (first, last, count), d = 1 − a − b − c
START_GRID = ((-0.5, 1.5, 17), (-10.0, 25.0, 36), (-50.0, 10.0, 31))
START_POINTS = 201
STARTS = 10
#: Levenberg–Marquardt iterations per round, and rounds of Lawson reweighting
LM_ITERS = 30
ROUNDS = 10
LAWSON_POWER = 0.5
LAWSON_FLOOR = 1e-3

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/guessgrad/solvers/ns_coefficients.json"
COMMAND = "python scripts/fit_ns_coefficients.py"


def band(t: float) -> tuple[float, float]:
    """The ignored transition band (t − 2δ_t, t), δ_t = min(t/4, 0.05)."""
    delta = min(BAND_RELATIVE * t, BAND_ABSOLUTE)
    return t - 2.0 * delta, t


def compositions(
    coeffs: Tensor, x: Tensor, iterations: int = ITERATIONS, *, jacobian: bool = False
) -> tuple[list[Tensor], list[Tensor]]:
    """[p(x), p(p(x)), …, p^N(x)] for every coefficient row, and their Jacobians.

    Args:
        coeffs: ``(..., 4)`` rows (a, b, c, d).
        x: ``(G,)`` grid.
        jacobian: also return ∂p^j(x)/∂(a, b, c, d), by the chain rule
            ∂p^j/∂θ = p'(p^{j−1}) ∂p^{j−1}/∂θ + (y, y³, y⁵, y⁷) at y = p^{j−1}.

    Returns:
        ``(values, jacobians)``: ``iterations`` tensors ``(..., G)`` and, if asked,
        ``(..., G, 4)`` (else an empty list).  Inputs to each p are clamped to [−2, 2] so that a
        bad candidate stays finite.
    """
    a, b, c, d = (coeffs[..., i : i + 1] for i in range(4))
    y = x.expand(*coeffs.shape[:-1], x.shape[0])
    jac = torch.zeros(*y.shape, 4, dtype=x.dtype) if jacobian else None
    values, jacobians = [], []
    for _ in range(iterations):
        if jac is not None:
            jac = jac * (y.abs() < 2.0).to(x.dtype)[..., None]
        y = y.clamp(-2.0, 2.0)
        s = y * y
        if jac is not None:
            slope = a + s * (3 * b + s * (5 * c + s * 7 * d))  # p'(y)
            basis = torch.stack([y, y * s, y * s * s, y * s * s * s], -1)  # ∂p/∂(a, b, c, d)
            jac = slope[..., None] * jac + basis
            jacobians.append(jac)
        y = y * (a + s * (b + s * (c + s * d)))
        values.append(y)
    return values, jacobians


def step_masks(x: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """``(outside, target)``, each ``(T, G)``: points outside the band and the step's value."""
    outside = (x <= lo[:, None]) | (x >= hi[:, None])
    target = (x >= hi[:, None]).to(x.dtype)
    return outside, target


def reach(coeffs: Tensor, points: int = EVAL_POINTS) -> Tensor:
    """max |p(y)| over y ∈ [0, X_MAX], ``(..., 4) -> (...)``; ≤ X_MAX means p maps
    [−X_MAX, X_MAX] into itself (p is odd)."""
    y = torch.linspace(0.0, X_MAX, points, dtype=coeffs.dtype)
    ys, _ = compositions(coeffs, y, 1)
    return ys[0].abs().amax(-1)


def errors(coeffs: Tensor, x: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Max and RMS error of p^N outside the band, and :func:`reach`, each ``(T, S)``.

    ``coeffs`` is ``(T, S, 4)``: S candidates for each of the T thresholds.
    """
    ys, _ = compositions(coeffs, x)
    outside, target = step_masks(x, lo, hi)
    outside, target = outside[:, None], target[:, None]  # (T, 1, G)
    e = (ys[-1] - target).abs() * outside
    count = outside.sum(-1).to(x.dtype)
    return e.amax(-1), ((e * e).sum(-1) / count).sqrt(), reach(coeffs, x.shape[0])


def start_candidates(lo: Tensor, hi: Tensor, starts: int = STARTS) -> Tensor:
    """The ``starts`` best bounded grid candidates per threshold, ``(T, starts, 4)``."""
    axes = [torch.linspace(a, b, n, dtype=torch.float64) for a, b, n in START_GRID]
    a, b, c = (g.reshape(-1) for g in torch.meshgrid(*axes, indexing="ij"))
    grid = torch.stack([a, b, c, 1.0 - a - b - c], -1)  # (P, 4), p(1) = 1
    x = torch.linspace(0.0, X_MAX, START_POINTS, dtype=torch.float64)
    picked = []
    for t in range(lo.shape[0]):
        mx, rms, bound = errors(grid[None], x, lo[t : t + 1], hi[t : t + 1])
        score = torch.where(bound[0] <= X_MAX, mx[0] + rms[0], math.inf)
        picked.append(grid[score.argsort()[:starts]])
    return torch.stack(picked)


def objective(
    coeffs: Tensor, x: Tensor, target: Tensor, weight: Tensor, *, derivatives: bool = True
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The weighted least-squares cost of the module docstring with its gradient and
    Gauss–Newton matrix: ``(cost (T, S), JᵀWr (T, S, 4), JᵀWJ (T, S, 4, 4))``.

    ``target`` is ``(T, G)``; ``weight`` ``(T, S, G)`` is zero inside the band.
    """
    ys, jacs = compositions(coeffs, x, jacobian=derivatives)
    e = ys[-1] - target[:, None]  # (T, S, G)
    cost = (weight * e * e).sum(-1)
    grad = hess = None
    if derivatives:
        grad = torch.einsum("tsg,tsgk->tsk", weight * e, jacs[-1])
        hess = torch.einsum("tsg,tsgk,tsgl->tskl", weight, jacs[-1], jacs[-1])
    y = torch.linspace(0.0, X_MAX, PENALTY_POINTS, dtype=x.dtype)
    py, pjac = compositions(coeffs, y, 1, jacobian=derivatives)
    over = (py[0].abs() - PENALTY_BOUND).clamp_min(0.0)  # (T, S, G')
    pen = PENALTY_WEIGHT / PENALTY_POINTS
    cost = cost + pen * (over * over).sum(-1)
    if derivatives:
        sign = py[0].sign() * (over > 0).to(x.dtype)  # ∂ over / ∂ p
        grad = grad + pen * torch.einsum("tsg,tsgk->tsk", over * sign, pjac[0])
        hess = hess + pen * torch.einsum("tsg,tsgk,tsgl->tskl", sign * sign, pjac[0], pjac[0])
    return cost, grad, hess


def levenberg_marquardt(
    coeffs: Tensor, x: Tensor, target: Tensor, weight: Tensor, iters: int = LM_ITERS
) -> Tensor:
    """``iters`` Levenberg–Marquardt steps on every candidate, ``(T, S, 4) -> (T, S, 4)``.

    Step Δ = −(H + μ diag H)⁻¹ g with H, g from :func:`objective`; a step is kept only if it
    lowers the cost (μ ← μ/3), else μ ← 2μ.
    """
    damping = torch.full(coeffs.shape[:-1], 1e-3, dtype=coeffs.dtype)
    for _ in range(iters):
        cost, grad, hess = objective(coeffs, x, target, weight)
        diag = torch.diagonal(hess, dim1=-2, dim2=-1).clamp_min(1e-12)
        lhs = hess + torch.diag_embed(damping[..., None] * diag + 1e-15)
        trial = coeffs - torch.linalg.solve(lhs, grad[..., None])[..., 0]
        trial_cost, _, _ = objective(trial, x, target, weight, derivatives=False)
        better = trial_cost < cost
        coeffs = torch.where(better[..., None], trial, coeffs)
        damping = torch.where(better, damping / 3, damping * 2).clamp(1e-12, 1e12)
    return coeffs


def fit(thresholds: Sequence[float] = THRESHOLDS, rounds: int = ROUNDS) -> list[dict]:
    """Fit one coefficient set per threshold; returns the JSON ``sets`` entries."""
    lo = torch.tensor([band(t)[0] for t in thresholds], dtype=torch.float64)
    hi = torch.tensor([band(t)[1] for t in thresholds], dtype=torch.float64)
    coeffs = start_candidates(lo, hi)  # (T, S, 4)
    x = torch.linspace(0.0, X_MAX, TRAIN_POINTS, dtype=torch.float64)
    x_eval = torch.linspace(0.0, X_MAX, EVAL_POINTS, dtype=torch.float64)
    outside, target = step_masks(x, lo, hi)
    weight = (outside.to(x.dtype) / outside.sum(-1, keepdim=True))[:, None]
    weight = weight.expand(*coeffs.shape[:-1], -1)  # (T, S, G)
    best = coeffs
    best_max = torch.full(coeffs.shape[:-1], math.inf, dtype=torch.float64)
    for _ in range(rounds):
        coeffs = levenberg_marquardt(coeffs, x, target, weight)
        mx, _, bound = errors(coeffs, x_eval, lo, hi)
        score = torch.where(bound <= X_MAX, mx, math.inf)
        improved = score < best_max
        best = torch.where(improved[..., None], coeffs, best)
        best_max = torch.where(improved, score, best_max)
        # Lawson: raise the weight where the error is large, towards the minimax fit
        ys, _ = compositions(coeffs, x)
        err = (ys[-1] - target[:, None]).abs() * outside[:, None]
        rel = (err / err.amax(-1, keepdim=True).clamp_min(1e-300)).clamp_min(LAWSON_FLOOR)
        weight = weight * rel.pow(LAWSON_POWER) * outside[:, None]
        weight = weight / weight.sum(-1, keepdim=True)
    if not bool(torch.isfinite(best_max).any(-1).all()):
        raise RuntimeError("no start kept [-X_MAX, X_MAX] invariant for some threshold")
    mx, rms, bound = errors(best, x_eval, lo, hi)
    pick = torch.where(bound <= X_MAX, mx, math.inf).argmin(-1)  # (T,)
    sets = []
    for i, t in enumerate(thresholds):
        j = int(pick[i])
        sets.append(
            {
                "threshold": t,
                "coefficients": best[i, j].tolist(),
                "band": [float(lo[i]), float(hi[i])],
                "max_error_outside_band": float(mx[i, j]),
                "rms_error_outside_band": float(rms[i, j]),
                "max_abs_p_on_domain": float(bound[i, j]),
            }
        )
    return sets


def document(sets: list[dict]) -> dict:
    """The JSON document written next to the solver."""
    return {
        "degree": DEGREE,
        "iterations": ITERATIONS,
        "domain": [0.0, X_MAX],
        "invariant_interval": [-X_MAX, X_MAX],
        "band": {
            "rule": "the fit ignores (t - 2*delta, t), delta = min(relative*t, absolute)",
            "relative": BAND_RELATIVE,
            "absolute": BAND_ABSOLUTE,
        },
        "fit": {
            "command": COMMAND,
            "description": (
                "p(x) = a x + b x^3 + c x^5 + d x^7 composed 5 times on x in [0, 1.15]; target 0 "
                "up to the band and 1 from the threshold t up; float64 Levenberg-Marquardt on "
                f"{TRAIN_POINTS} grid points ({ROUNDS} rounds of {LM_ITERS} steps with Lawson "
                "reweighting towards the minimax fit) from the "
                f"{STARTS} best bounded starts of a coarse (a, b, c) grid with p(1) = 1, "
                "penalty 100 * mean relu(|p(y)| - 1.14)^2 on y in [0, 1.15] so that p maps "
                "[-1.15, 1.15] into itself (kept only if max |p| <= 1.15 there); "
                f"errors measured on {EVAL_POINTS} grid points of [0, 1.15]"
            ),
            "evaluation_points": EVAL_POINTS,
        },
        "sets": sets,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small tensors: one thread is fastest, and the sums are ordered
    start = time.perf_counter()
    sets = fit()
    args.out.write_text(json.dumps(document(sets), indent=2) + "\n")
    for s in sets:
        print(
            f"t={s['threshold']:.1f} band=({s['band'][0]:.2f}, {s['band'][1]:.2f}) "
            f"max={s['max_error_outside_band']:.2e} rms={s['rms_error_outside_band']:.2e} "
            f"max|p| on [0, 1.15]={s['max_abs_p_on_domain']:.3f}"
        )
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
