"""Newton–Schulz polynomials that turn W̃_b into ≈ U_k V_kᵀ: the numerical core of W̃⊥-NS.

Paper §2.6: normalise W̃_b = U Λ Vᵀ (m × n) to unit spectral norm, X = W̃_b / σ_1, and apply
the odd degree-7 polynomial

    p(x) = a x + b x³ + c x⁵ + d x⁷

N = 5 times as a matrix function,

    p(X) = a X + b X (XᵀX) + c X (XᵀX)² + d X (XᵀX)³ = a X + (b A + c A² + d A³) X,  A = X Xᵀ.

An odd polynomial acts on the singular values alone: X (XᵀX)^j = U Λ^{2j+1} Vᵀ, so
p(X) = U p(Λ) Vᵀ and p^N(X) = U p^N(Λ) Vᵀ, with the same singular vectors.  The coefficients
are fitted so that the scalar composition p^N is a step at the threshold t: ≈ 1 on singular
values with σ_j/σ_1 ≥ t and ≈ 0 below the band (t − 2δ_t, t), δ_t = min(t/4, 0.05).  One set
per t ∈ {0.1, …, 0.9}; the set used for a given σ_k/σ_1 is the bin floor(10·σ_k/σ_1), so every
σ_j ≥ σ_k is in the region mapped to 1 and p^N(W̃_b / σ_1) ≈ U_k V_kᵀ.  With F_b that matrix,
the guess y_b = F_bᵀ ε_b, ε_b ~ N(0, I_m), has covariance F_bᵀF_b ≈ V_k V_kᵀ.

Argument map: ``w`` = W̃ (B examples, each m × n), ``x`` = X, ``coeffs`` = (a, b, c, d),
``iterations`` = N, ``k`` = k, ``sigma_ratio`` = σ_k/σ_1.

Departures from the paper:

- The coefficients are ours (the paper's are unpublished), fitted by
  ``scripts/fit_ns_coefficients.py`` and shipped in ``ns_coefficients.json`` together with
  their band and their error outside it (``docs/newton_schulz.md``).
- σ_1 for the normalisation is estimated per example by power iteration, where the paper's
  code uses the first example's σ_1 for the whole batch.  Each example's spectrum then lies in
  the fitted range whatever the spread of norms across the batch.
- The estimate σ̂_1 is not inflated by a safety factor: power iteration never overestimates
  σ_1, and an inflated σ̂_1 would push σ_k below the step.  Instead the polynomials are fitted
  on [0, 1.15] and map [−1.15, 1.15] into themselves, so an underestimate of up to 13 % still
  sends the top singular values to ≈ 1 (20 iterations left σ̂_1 up to 12 % low on flat,
  random-weight spectra: σ_1/σ̂_1 up to 1.133 over 20 seeds, docs/newton_schulz.md).
  Just past 1.15 the compositions for t ≤ 0.6 blow up; ``ns_gram_apply`` detects
  such an example (a Gram trace or the last step's growth above its bound, or rows not
  finite: :func:`ns_rows`) and redoes it with the exact σ_1.
  Those for t ≥ 0.7 decay towards 0 there instead, which goes undetected.
- The polynomial is iterated on the Gram matrix A = XᵀX instead of on X
  (:func:`gram_newton_schulz`): X ← X q(A) with q(A) = a I + b A + c A² + d A³ is
  A ← A q(A)², and the guess needs only ε_bᵀ p^N(X) = (ε_bᵀ X) q(A_0) ⋯ q(A_{N−1}).  Same
  matrix function, without X: for W̃_b = W_{i+1} M_b, A is a masked submatrix of the shared
  W_{i+1}ᵀW_{i+1} and ε_bᵀX one shared product.  :func:`newton_schulz` is the X iteration as
  the paper writes it, kept as the reference.
- σ_k/σ_1 is computed for one matrix (the first example, as the paper's code does, or the
  first after it with W̃_b ≠ 0 where it has no active unit) with
  ARPACK's implicitly restarted Lanczos method (``scipy.sparse.linalg.svds``), falling back
  to a dense ``torch.linalg.svdvals`` where ARPACK cannot be used or fails.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np
import torch
from torch import Tensor

from ..checks import integer

__all__ = [
    "NSCoefficients",
    "load_coefficients",
    "coefficients_for",
    "odd_polynomial",
    "ns_step_function",
    "newton_schulz",
    "gram_newton_schulz",
    "q_bound",
    "ns_rows",
    "power_sigma1",
    "power_start",
    "power_iteration_sigma1",
    "sigma_ratio",
    "ns_factor",
    "ns_gram_apply",
    "POWER_ITERS",
]

#: the shipped fit, written by ``scripts/fit_ns_coefficients.py``
COEFFICIENTS_FILE = "ns_coefficients.json"
#: power iterations on W̃ᵀW̃ for σ_1 (up to about 12 % low on flat random spectra)
POWER_ITERS = 20
#: seed of the fixed power-iteration start (a generic vector, shared by the batch)
POWER_START_SEED = 0
#: seed of ARPACK's fixed starting vector in ``sigma_ratio``
LANCZOS_START_SEED = 0

Coefficients = tuple[float, float, float, float]


@dataclass(frozen=True)
class NSCoefficients:
    """One fitted coefficient set per threshold t (paper §2.6), as read from the JSON.

    Attributes:
        degree: degree of p (7).
        iterations: N, how many times p is applied (5).
        thresholds: ``(S,)`` thresholds t_s = 0.1, …, 0.9, increasing.
        coefficients: ``(S, 4)`` rows (a, b, c, d) of p(x) = a x + b x³ + c x⁵ + d x⁷.
        bands: ``(S, 2)`` the ignored transition band (t − 2δ_t, t) of each set.
        max_errors: ``(S,)`` max |p^N(x) − step_t(x)| on the fitted range outside the band.
        rms_errors: ``(S,)`` RMS of the same error.
        domain: the fitted range [0, x_max] of normalised singular values.
    """

    degree: int
    iterations: int
    thresholds: tuple[float, ...]
    coefficients: tuple[Coefficients, ...]
    bands: tuple[tuple[float, float], ...]
    max_errors: tuple[float, ...]
    rms_errors: tuple[float, ...]
    domain: tuple[float, float]

    def tensor(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        """The coefficient table as a ``(S, 4)`` tensor of rows (a, b, c, d)."""
        return torch.tensor(self.coefficients, dtype=dtype, device=device)


def _parse(doc: dict) -> NSCoefficients:
    sets = sorted(doc["sets"], key=lambda s: s["threshold"])
    thresholds = tuple(float(s["threshold"]) for s in sets)
    expected = tuple(j / 10 for j in range(1, 10))
    if not all(math.isclose(t, e) for t, e in zip(thresholds, expected)) or len(sets) != 9:
        raise ValueError(f"need one set per threshold 0.1, …, 0.9, got {thresholds}")
    return NSCoefficients(
        degree=int(doc["degree"]),
        iterations=int(doc["iterations"]),
        thresholds=thresholds,
        coefficients=tuple(tuple(float(c) for c in s["coefficients"]) for s in sets),
        bands=tuple((float(s["band"][0]), float(s["band"][1])) for s in sets),
        max_errors=tuple(float(s["max_error_outside_band"]) for s in sets),
        rms_errors=tuple(float(s["rms_error_outside_band"]) for s in sets),
        domain=(float(doc["domain"][0]), float(doc["domain"][1])),
    )


@cache
def _load_shipped() -> NSCoefficients:
    text = resources.files(__package__).joinpath(COEFFICIENTS_FILE).read_text(encoding="utf-8")
    return _parse(json.loads(text))


def load_coefficients(path: str | os.PathLike | None = None) -> NSCoefficients:
    """Read the fitted coefficient sets: the shipped package data, or ``path`` if given."""
    if path is None:
        return _load_shipped()
    with open(path, encoding="utf-8") as f:
        return _parse(json.load(f))


def coefficients_for(sigma_ratio: float, table: NSCoefficients) -> Coefficients:
    """(a, b, c, d) of the bin floor(10·σ_k/σ_1), clamped to 1..9 (paper §2.6, authors' code).

    ``sigma_ratio`` = σ_k/σ_1.  Ratios below 0.1 use the t = 0.1 set, 1.0 uses t = 0.9.
    """
    if not math.isfinite(sigma_ratio) or sigma_ratio < 0:
        raise ValueError(f"sigma_ratio must be finite and non-negative, got {sigma_ratio!r}")
    j = min(max(math.floor(10 * sigma_ratio), 1), 9)
    return table.coefficients[j - 1]


def odd_polynomial(x: Tensor, coeffs: Coefficients) -> Tensor:
    """p(x) = a x + b x³ + c x⁵ + d x⁷ elementwise, in Horner form in s = x²."""
    a, b, c, d = coeffs
    s = x * x
    return x * (a + s * (b + s * (c + s * d)))


def ns_step_function(x: Tensor, coeffs: Coefficients, iterations: int) -> Tensor:
    """p^N(x) = p(p(…p(x))) elementwise: what ``newton_schulz`` does to each singular value."""
    for _ in range(iterations):
        x = odd_polynomial(x, coeffs)
    return x


def newton_schulz(x: Tensor, coeffs: Coefficients, iterations: int) -> Tensor:
    """p^N(X) for a batch of matrices, X = U Λ Vᵀ ↦ U p^N(Λ) Vᵀ.

    Uses the smaller Gram matrix: for m ≤ n, A = X Xᵀ (m × m) and X ← a X + (b A + c A² + d A³) X;
    for m > n, A = XᵀX (n × n) and X ← a X + X (b A + c A² + d A³).  Each iteration costs four
    batched products (the Gram, A², A³ and the update), each at most r × r × max(m, n) with
    r = min(m, n).

    Args:
        x: ``(B, m, n)`` matrices; singular values should lie in the fitted range
            (``NSCoefficients.domain``, [0, 1.15]).
        coeffs: (a, b, c, d).
        iterations: N ≥ 0.

    Returns:
        ``(B, m, n)``, same dtype and device as ``x``.
    """
    if x.dim() < 2:
        raise ValueError(f"need matrices (B, m, n), got shape {tuple(x.shape)}")
    iterations = integer("iterations", iterations, minimum=0)
    a, b, c, d = coeffs
    wide = x.shape[-2] <= x.shape[-1]
    shape = x.shape
    x = x.reshape(math.prod(shape[:-2]), *shape[-2:])  # (B, m, n), B ≥ 0
    for _ in range(iterations):
        gram = x @ x.mT if wide else x.mT @ x  # (B, r, r)
        gram2 = gram @ gram
        # b A + c A² + d A³ and a X + poly·X with the scalings and sums fused into the products
        poly = torch.baddbmm(gram, gram2, gram, beta=b, alpha=d).add_(gram2, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a) if wide else torch.baddbmm(x, x, poly, beta=a)
    return x.reshape(shape)


def gram_newton_schulz(
    gram: Tensor,
    coeffs: Coefficients,
    iterations: int,
    rows: Tensor,
) -> tuple[Tensor, Tensor]:
    """p^N(X) from the Gram matrix alone: ``(A_N, u p^N(X))`` from A = XᵀX and the rows u X.

    One step X ← p(X) = X q(A), q(A) = a I + b A + c A² + d A³, maps the Gram matrix to
    A ← q(A) A q(A) = A q(A)² (q(A) is a polynomial in A, so they commute).  After N steps
    p^N(X) = X Q with Q = q(A_{N-1}) ⋯ q(A_0), so for any rows u, u p^N(X) = (u X) Q: the
    rows are carried along, v ← v q(A), and X itself is never needed.

    Cost per step: four batched r × r × r products (A², A·(…) for q, q², A q²) and one
    (c × r)·(r × r) product per example, r = X's column count, against two r × r × r and two
    r × r × m products of :func:`newton_schulz` (X is m × r, m ≥ r for W̃_b's active columns).
    Rounding: A holds squared singular values, so a direction with σ below about
    sqrt(eps)·σ_1 is resolved only to that level (3e-4 in float32); the fitted steps send such
    directions towards 0 anyway (p(x) ≈ a x near 0, |a|^N ≤ 4.2 for the shipped sets).

    Args:
        gram: ``(B, r, r)`` symmetric A = XᵀX.
        coeffs: (a, b, c, d).
        iterations: N ≥ 0.
        rows: ``(B, c, r)`` the rows u X.

    Returns:
        ``(A_N (B, r, r), u p^N(X) (B, c, r))``; p^N(X)ᵀ p^N(X) = A_N.
    """
    if gram.dim() != 3 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"need square Gram matrices (B, r, r), got {tuple(gram.shape)}")
    if rows.dim() != 3 or rows.shape[0] != gram.shape[0] or rows.shape[-1] != gram.shape[-1]:
        raise ValueError(
            f"need rows (B, c, r) for gram {tuple(gram.shape)}, got {tuple(rows.shape)}"
        )
    iterations = integer("iterations", iterations, minimum=0)
    a, b, c, d = coeffs
    for _ in range(iterations):
        # q = a I + A (b I + c A + d A²): the scalings and sums fused into the products
        inner = torch.baddbmm(gram, gram, gram, beta=c, alpha=d)
        inner.diagonal(dim1=-2, dim2=-1).add_(b)
        q = gram @ inner
        q.diagonal(dim1=-2, dim2=-1).add_(a)
        rows = rows @ q
        gram = gram @ (q @ q)
    return gram, rows


def q_bound(coeffs: Coefficients, x_max: float) -> float:
    """max |q(λ)| over λ ∈ [0, x_max²] for q(λ) = a + bλ + cλ² + dλ³: how much one step
    X ← X q(A) can lengthen a row while every singular value lies in [0, x_max].

    Exact: q at both ends and at the roots of q' = b + 2cλ + 3dλ² inside the interval."""
    a, b, c, d = coeffs
    top = x_max * x_max
    points = [0.0, top]
    for root in np.roots([3 * d, 2 * c, b]) if (d or c) else []:
        if abs(root.imag) < 1e-12 and 0.0 < root.real < top:
            points.append(float(root.real))
    return max(abs(a + lam * (b + lam * (c + lam * d))) for lam in points)


def ns_rows(
    gram: Tensor, coeffs: Coefficients, iterations: int, rows: Tensor, x_max: float
) -> tuple[Tensor, Tensor]:
    """u p^N(X) from A = XᵀX and the rows u X, and whether the steps stayed in bounds.

    The first N − 1 steps are :func:`gram_newton_schulz`'s; the last one needs no A_N, so it
    applies q(A_{N−1}) to the rows alone, in Horner form
    v ← (((d v A + c v) A + b v) A + a v): three (c × r)·(r × r) products instead of three
    r × r × r ones (of 4N − 1 in all: 16% of the work at N = 5) for the guesses' single row
    (c = 1); for the whole factor (c = m rows, diagnostics only) it costs 3·m·r² where forming
    q took 2·r³ + m·r².  The rows equal :func:`gram_newton_schulz`'s up to rounding.

    While every normalised singular value stays in the invariant interval [0, x_max],
    tr(A_t) ≤ x_max²·r for every t and the last step lengthens no row more than
    ``q_bound(coeffs, x_max)``.  ``ok`` is False where either fails (by 0.1%, for rounding) or
    the rows are not finite: a composition that left the interval and blew up.

    Args:
        gram: ``(B, r, r)`` symmetric A = XᵀX.
        coeffs: (a, b, c, d).
        iterations: N ≥ 0.
        rows: ``(B, c, r)`` the rows u X.
        x_max: the top of the invariant interval (``NSCoefficients.domain[1]``).

    Returns:
        ``(u p^N(X) (B, c, r), ok (B,) bool)``.
    """
    iterations = integer("iterations", iterations, minimum=0)
    limit = x_max * x_max * gram.shape[-1] * (1 + 1e-3)
    ok = torch.ones(gram.shape[0], dtype=torch.bool, device=gram.device)
    for step in range(iterations):
        ok &= torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1) <= limit
        if step < iterations - 1:
            gram, rows = gram_newton_schulz(gram, coeffs, 1, rows)
            continue
        a, b, c, d = coeffs
        before = rows.flatten(1).norm(dim=1)
        v = torch.baddbmm(rows, rows, gram, beta=c, alpha=d)  # c v + d v A
        v = torch.baddbmm(rows, v, gram, beta=b)  # b v + (…) A
        rows = torch.baddbmm(rows, v, gram, beta=a)  # a v + (…) A
        ok &= rows.flatten(1).norm(dim=1) <= q_bound(coeffs, x_max) * (1 + 1e-3) * before
    return rows, ok & torch.isfinite(rows).flatten(1).all(1)


def power_sigma1(
    gram_apply: Callable[[Tensor], Tensor], start: Tensor, iters: int = POWER_ITERS
) -> Tensor:
    """σ_1 of every W̃_b by power iteration on G_b = W̃_bᵀW̃_b given as a map, ``(B,)``.

    v ← G v / ‖G v‖ from ``start (B, n)``, with ``gram_apply`` the batched G_b v_b,
    ``(B, n) -> (B, n)``; the estimate σ̂_1 = ‖G v‖^{1/2} for the last unit v never exceeds
    σ_1.  Examples whose G_b is zero (or whose start is) give 0, never NaN.
    """
    iters = integer("iters", iters)
    tiny = torch.finfo(start.dtype).tiny
    gv = start
    for _ in range(iters):
        v = gv / gv.norm(dim=-1, keepdim=True).clamp_min(tiny)
        gv = gram_apply(v)
    return gv.norm(dim=-1).sqrt()


def power_iteration_sigma1(w: Tensor, iters: int = POWER_ITERS) -> Tensor:
    """σ_1 of every W̃_b by power iteration on W̃_bᵀW̃_b, ``(B, m, n) -> (B,)``.

    :func:`power_sigma1` with G_b v = W̃_bᵀ(W̃_b v) from a fixed generic start (seed
    ``POWER_START_SEED``); never exceeds σ_1; all-zero matrices give 0 (never NaN).
    """
    if w.dim() != 3:
        raise ValueError(f"need w of shape (B, m, n), got {tuple(w.shape)}")
    start = power_start(w.shape[-1], w.dtype, w.device).expand(w.shape[0], -1)

    def gram_apply(v: Tensor) -> Tensor:
        return (w.mT @ (w @ v.unsqueeze(-1))).squeeze(-1)

    return power_sigma1(gram_apply, start, iters)


def power_start(n: int, dtype: torch.dtype, device=None) -> Tensor:
    """The fixed generic start vector ``(n,)`` of the σ_1 power iterations."""
    gen = torch.Generator().manual_seed(POWER_START_SEED)
    return torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def _dense_ratio(a: np.ndarray, k: int) -> float:
    sv = torch.linalg.svdvals(torch.from_numpy(a))  # descending
    return float(sv[k - 1] / sv[0]) if sv[0] > 0 else 0.0


def sigma_ratio(w0: Tensor, k: int) -> float:
    """σ_k/σ_1 of one matrix W̃ (the batch's first example), by implicitly restarted Lanczos.

    ARPACK (``scipy.sparse.linalg.svds``, Lanczos on the smaller Gram matrix) from a fixed
    start, in float64.  Dense ``torch.linalg.svdvals`` is used when k ≥ min(m, n) − 1, where
    ARPACK cannot run, or when it fails.  k is clipped to min(m, n), as the exact W̃⊥ solver
    clips it.

    Args:
        w0: ``(m, n)`` the matrix.
        k: the k of σ_k, k ≥ 1.

    Returns:
        σ_k/σ_1 in [0, 1]; 0.0 when σ_1 = 0.
    """
    if w0.dim() != 2:
        raise ValueError(f"need one matrix (m, n), got shape {tuple(w0.shape)}")
    k = integer("k", k)
    a = w0.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(a).all():
        raise ValueError("w0 has non-finite entries")
    if not a.any():
        return 0.0
    r = min(a.shape)
    k = min(k, r)
    if k >= r - 1:
        return _dense_ratio(a, k)
    # imported here: scipy.sparse.linalg takes ~0.4 s to import, and only W̃⊥-NS needs it
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, svds

    v0 = np.random.default_rng(LANCZOS_START_SEED).standard_normal(r)
    try:
        sv = svds(a, k=k, which="LM", v0=v0, return_singular_vectors=False, solver="arpack")
    except (ArpackError, ArpackNoConvergence):
        return _dense_ratio(a, k)
    return float(sv.min() / sv.max()) if sv.max() > 0 else 0.0


def ns_factor(
    w: Tensor,
    sigma_ratio: float,
    table: NSCoefficients,
    *,
    iterations: int | None = None,
    power_iters: int = POWER_ITERS,
) -> Tensor:
    """F_b = p^N(W̃_b / σ̂_1(W̃_b)) ≈ U_k V_kᵀ for every example, ``(B, m, n) -> (B, m, n)``.

    :func:`ns_gram_apply` with G_b = W̃_bᵀW̃_b, the rows u = I_m (so u W̃_b = W̃_b) and σ̂_1 from
    :func:`power_iteration_sigma1`.

    Args:
        w: ``(B, m, n)`` the W̃_b.
        sigma_ratio: σ_k/σ_1 (of the first example, from :func:`sigma_ratio`); picks the set.
        table: the fitted sets (:func:`load_coefficients`).
        iterations: N; defaults to the N the table was fitted for.
        power_iters: power iterations for each example's σ̂_1.

    Returns:
        ``(B, m, n)`` in ``w``'s dtype.  Covariance of the guess F_bᵀε_b: F_bᵀF_b ≈ V_k V_kᵀ.
        All-zero examples give zero matrices.
    """
    sigma1 = power_iteration_sigma1(w, power_iters)
    return ns_gram_apply(w.mT @ w, w, sigma1, sigma_ratio, table, iterations=iterations)


def ns_gram_apply(
    gram: Tensor,
    rows: Tensor,
    sigma1: Tensor,
    sigma_ratio: float,
    table: NSCoefficients,
    *,
    iterations: int | None = None,
) -> Tensor:
    """u_b F_b for F_b = p^N(W̃_b / σ̂_b) ≈ U_k V_kᵀ, from G_b = W̃_bᵀW̃_b and the rows u_b W̃_b.

    The normalised Gram and rows, G_b/σ̂_b² and u_b W̃_b/σ̂_b, go through
    :func:`gram_newton_schulz`; W̃_b itself is never needed.  With u_b = ε_bᵀ, ε_b ~ N(0, I_m),
    the result is the W̃⊥-NS guess y_bᵀ = (F_bᵀ ε_b)ᵀ; with u_b = I_m it is F_b.

    Args:
        gram: ``(B, r, r)`` the G_b (on any r columns that hold all of W̃_b's nonzero ones).
        rows: ``(B, c, r)`` the u_b W̃_b on the same columns.
        sigma1: ``(B,)`` σ̂_b ≤ σ_1(W̃_b), e.g. from :func:`power_sigma1`; 0 gives zero rows.
        sigma_ratio: σ_k/σ_1 (of the first example, from :func:`sigma_ratio`); picks the set.
        table: the fitted sets (:func:`load_coefficients`).
        iterations: N; defaults to the N the table was fitted for.

    Returns:
        ``(B, c, r)`` in ``rows``' dtype.

    Safety net: examples whose steps leave the bounds that hold inside the invariant interval
    [0, x_max] (:func:`ns_rows`: a trace above x_max²·r, a last step that lengthens the rows
    more than q can there, rows not finite), whose σ̂_b was too low, are redone with the exact
    σ_1 = λ_max(G_b)^{1/2}.
    """
    if iterations is None:
        iterations = table.iterations
    coeffs = coefficients_for(sigma_ratio, table)

    def run(g: Tensor, u: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        positive = sigma > 0
        scale = torch.where(positive, 1.0 / torch.where(positive, sigma, 1.0), 0.0)
        scale = scale.to(g.dtype).view(-1, 1, 1)
        return ns_rows(g * scale.square(), coeffs, iterations, u * scale, table.domain[1])

    out, ok = run(gram, rows, sigma1)
    bad = ~ok
    if bool(bad.any()):
        redo = gram[bad]
        exact = torch.linalg.eigvalsh(redo).amax(-1).clamp_min(0).sqrt()
        out = out.index_put((bad,), run(redo, rows[bad], exact)[0])
    return out
