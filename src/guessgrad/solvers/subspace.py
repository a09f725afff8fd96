"""Fast top-k right-singular subspaces of all W̃_b from large matrix products.

The top-k right singular subspace of W̃_b is the top-k eigenspace of the Gram matrix
G_b = W̃_bᵀ W̃_b (for an MLP, G_b = M_b W_{i+1}ᵀ W_{i+1} M_b).  A randomized block Krylov method with
Rayleigh–Ritz (Musco & Musco 2015, "Randomized block Krylov methods for stronger and faster
approximate SVD"; Saad, *Numerical Methods for Large Eigenvalue Problems*, §6) touches G_b
only through ``jacobian.gram_apply`` on a block of b vectors per example, which for the whole
batch is one (B·b × n)·(n × n) product: large, fast matrix products.  Krylov spaces converge
with the square root of the spectral gap, which matters here: at initialisation the top of the
spectrum of G_b is flat.

Everything else happens in the small coordinates of the Krylov space (:func:`krylov_ritz`):
one batched float64 Gram of the Krylov vectors, then p × p Cholesky factors, triangular
solves and products, p = b·(depth + 1).  The solve runs no SVD, QR or eigendecomposition of
anything, and no orthogonalisation of n-vectors (the reference and fallback helpers below do,
and so do the rare examples whose rebuilt rows would not be orthonormal): batched LAPACK on
many small matrices is slow on CPU and GPU alike (a batched symmetric eigensolver is >10×
slower than a batched Cholesky of the same matrices), and Gram–Schmidt on n-vectors costs more
than the products themselves.

Warm start: every example starts from Y_0 = P_b S, the shared block S (b × n) restricted to
the coordinates that can carry gradient (for ReLU, the active units), and S tracks the top-b
eigenspace of the batch-mean Gram across steps by one power step per call whose product
(G_b Y_0) is computed anyway.

Departure from the exact solver: where G_b has fewer than k nonzero eigenvalues (an example
with fewer active units than k), the rows beyond its rank are returned as zero instead of
arbitrary null-space directions, so the guess lives in the range of W̃_b only.  The gradient
has no component in the null space, so the bias is the same and the variance smaller.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..jacobians import UpstreamJacobian, _matmul_2d, dense_active, expand_columns

__all__ = [
    "orthonormalize_rows",
    "rayleigh_ritz",
    "block_krylov",
    "krylov_ritz",
    "KrylovRitz",
    "next_start",
    "cholesky_orthonormalize",
    "exact_row_space",
    "row_gram",
    "row_space_sample",
    "DEFAULT_DEPTH",
]

#: block Krylov depth: the search space is span{Q, GQ, …, G^depth Q}
DEFAULT_DEPTH = 2
#: Rayleigh–Ritz by subspace iteration: ``DEFAULT_RITZ_ITERS`` products with T^power
DEFAULT_RITZ_POWER = 4
DEFAULT_RITZ_ITERS = 2
#: on CPU, examples whose Krylov blocks are held at once at most, and examples per torch thread
#: whose small Rayleigh–Ritz problems are solved together (their (p+b)² float64 Grams are held
#: at once): few enough to bound memory and stay in cache, many enough that the small batched
#: operations are not dominated by their per-call overhead, and on several threads enough
#: matrices per call for each thread (the grouping changes no number: each example's small
#: problem is its own)
RITZ_GROUP = 64
#: on CPU, bytes of the float64 p × (p + b) Grams of one thread's group of small problems: with
#: smaller problems than k = 10's (p = 30, b = 10: ``RITZ_GROUP`` examples) more examples are
#: solved per call, never fewer than ``RITZ_GROUP``, so that the per-call overhead, which
#: dominates for small k, is shared by more of them (k = 1: the whole batch per call)
RITZ_GRAM_BYTES = RITZ_GROUP * 30 * 40 * 8
#: bytes of float64 Krylov vectors copied and multiplied at once on CPU (small enough to stay
#: in cache: 8 examples at width 512 with k = 10, depth 2)
GRAM_BYTES = 1280 * 2**10


def _rtol(dtype: torch.dtype) -> float:
    # relative eigenvalue floor below which a direction counts as numerically zero
    return 1e3 * torch.finfo(dtype).eps


def orthonormalize_rows(q: Tensor) -> Tensor:
    """Orthonormal rows spanning the rows of each ``q[b]``, ``(B, p, n) -> (B, p, n)``.

    Symmetric (Löwdin) orthonormalisation Q ← Λ^{-1/2} Uᵀ Q from the p × p Gram Q Qᵀ = U Λ Uᵀ.
    Rank-deficient blocks give zero rows for the numerically zero eigenvalues (below ``_rtol``
    times the largest) instead of NaN.
    """
    lam, u = torch.linalg.eigh(q @ q.mT)
    floor = (_rtol(q.dtype) * lam[..., -1:]).clamp_min(torch.finfo(q.dtype).tiny)
    inv_sqrt = torch.where(lam > floor, lam.clamp_min(torch.finfo(q.dtype).tiny).rsqrt(), 0.0)
    return (u * inv_sqrt.unsqueeze(-2)).mT @ q


def rayleigh_ritz(q: Tensor, gq: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k Ritz pairs of G on the row span of orthonormal ``q``, given ``gq`` = G q.

    Returns ``(values (B, k), vectors (B, k, n))``, largest first; vectors of numerically
    zero Ritz values are returned as zero rows.
    """
    t = q @ gq.mT  # (B, p, p) = Qᵀ G Q
    t = 0.5 * (t + t.mT)
    lam, u = torch.linalg.eigh(t)  # ascending
    lam, u = lam[..., -k:].flip(-1), u[..., -k:].flip(-1)  # (B, k), (B, p, k)
    vectors = u.mT @ q  # (B, k, n)
    floor = _rtol(q.dtype) * lam[..., :1].clamp_min(torch.finfo(q.dtype).tiny)
    keep = (lam > floor).to(q.dtype)
    return lam * keep, vectors * keep.unsqueeze(-1)


def _fill_rows(new: Tensor, old: Tensor) -> Tensor:
    # keep old directions where the mean Gram gave (numerically) zero rows, so the
    # warm start never loses rank
    norms = new.norm(dim=1, keepdim=True)
    dead = norms[:, 0] < 0.5  # zero, or (numerically) spanned by the rows before it
    if not bool(dead.any()):
        return new / norms
    return orthonormalize_rows(torch.where(dead.unsqueeze(1), old, new).unsqueeze(0))[0]


#: jitter factors, in units of eps·mean(diag(q qᵀ)), tried in turn by cholesky_orthonormalize
_JITTERS = (2.0, 1e2, 1e4)


def cholesky_orthonormalize(q: Tensor, *, equilibrate: bool = False) -> Tensor:
    """Cholesky QR of the rows of each ``q[b]``: L⁻¹ q with L Lᵀ = q qᵀ + δ I, ``(B, p, n)``.

    The jitter δ = c·eps·mean(diag(q qᵀ)), with the smallest c in ``_JITTERS`` for which the
    factorization succeeds (per example), keeps it finite on rank-deficient blocks: a row that
    is (numerically) a combination of the others comes out with a norm of order eps/sqrt(δ) ≪ 1
    instead of being blown up to a unit vector of rounding noise; a small c keeps its error on
    well-conditioned blocks at the level of rounding.
    Batched Cholesky is more than 10× faster than a batched symmetric eigensolver on small
    matrices, which is why the solver never calls one.

    ``equilibrate=True`` scales every row to unit norm first, so that rows of very different
    sizes (a decaying spectrum) all survive the jitter; only (numerically) dependent rows and
    zero rows then come out small.
    """
    if equilibrate:
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
    gram = q @ q.mT  # (B, p, p)
    mean_diag = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1, keepdim=True)  # (B, 1)
    chol = _jittered_cholesky(gram, mean_diag, _JITTERS)
    return torch.linalg.solve_triangular(chol, q, upper=False)


def _jittered_cholesky(gram: Tensor, scale: Tensor, jitters: tuple[float, ...]) -> Tensor:
    """Cholesky factor of ``gram + c·eps·scale·I`` (``scale (B, 1)``) per matrix, with the
    smallest c in ``jitters`` for which the factorization succeeds."""
    eps, tiny = torch.finfo(gram.dtype).eps, torch.finfo(gram.dtype).tiny

    def factor(c: float) -> tuple[Tensor, Tensor]:
        shifted = gram.clone()  # the jitter goes on the diagonal only: no (B, p, p) c·I
        shifted.diagonal(dim1=-2, dim2=-1).add_((c * eps * scale).clamp_min(tiny))
        return torch.linalg.cholesky_ex(shifted)

    chol, info = factor(jitters[0])
    for c in jitters[1:]:  # a larger jitter only where the smaller one failed
        failed = info != 0
        if not bool(failed.any()):
            break
        retry, retry_info = factor(c)
        chol = torch.where(failed.view(-1, 1, 1), retry, chol)
        info = torch.where(failed, retry_info, info)
    return chol


#: jitters δ of the Krylov Gram's Cholesky factor, in units of eps64 (the Gram has unit
#: diagonal), tried in turn; the last (δ ≈ 2e-6, far above the dependence floor, so nothing
#: is amplified) only where rounding makes the smaller ones fail
_GRAM_JITTERS = (10.0, 1e2, 1e10)
#: a Krylov vector whose residual², after projecting out the earlier ones, is below
#: max((_DEPENDENT·eps)², _GRAM_FLOOR·eps64) of its own norm² counts as dependent and is dropped
#: from the Ritz problem: rounding in Y_{j+1} = ωG Y_j (relative size eps) enters T amplified
#: by 1/residual, and a residual computed from the float64 Gram (Cholesky QR, whose error grows
#: as eps64·κ²) is trustworthy only above sqrt(eps64): the second floor is a residual of
#: 100·sqrt(eps64) ≈ 1.5e-6.  For float32 vectors the first term (a residual of 1e3·eps32 ≈
#: 1.2e-4) is the larger; the second decides for float64 ones, where a floor of 1e3·eps64 on
#: residual² kept vectors whose residual² the Gram gave only to within 10% (at depth 3 and 4 on
#: a steep spectrum, subspaces up to 1.0 off in spectral distance, depending on the LAPACK)
_DEPENDENT = 1e3
_GRAM_FLOOR = 1e4
#: eps·amplification above which an example's Ritz vectors are not rebuilt from the
#: coefficients but computed exactly (:func:`_exact_rows`): the rebuilt rows would be
#: orthonormal only to about that (float32: coefficients of unit vectors past ~8e4)
REBUILD_TOL = 1e-2


@dataclass(frozen=True)
class KrylovRitz:
    """Top-k Ritz vectors of every G_b as polynomials in G_b applied to the start block.

    With Y_j = (ωG_b)^j P_b S the Krylov blocks, the Ritz vectors are V_b = Σ_j C_{j,b}ᵀ Y_{j,b},
    coefficients ``coeffs (B, q+1, b, k)``.  The blocks are not stored: V_bᵀ z_b is evaluated
    by Horner's rule, V_bᵀ z = u_0 + ωG_b(u_1 + ωG_b(u_2 + …)) with u_j = P_b Sᵀ C_{j,b} z, which
    costs q products of one vector per example (:meth:`combine`).  ``power (b, n)`` is
    Σ_b G_b P_b S, for the next warm start (:func:`next_start`).  The rows of V_b are
    orthonormal up to rounding and zero past the numerical rank.  Rounding in the Krylov
    vectors reaches V amplified by the coefficients of the unit vectors; where that could
    exceed ``REBUILD_TOL`` (float32, an example with few active units whose Krylov vectors
    are nearly dependent) the example's rows are instead the exact ones of an SVD
    (``exact_examples``, ``exact_rows``), in :meth:`combine` and :meth:`vectors` alike, so the
    sampler and the covariance always describe the same law.
    """

    jacobian: UpstreamJacobian
    start: Tensor
    omega: Tensor
    coeffs: Tensor
    power: Tensor
    #: examples whose rows are not rebuilt from the coefficients but exact, and those rows
    exact_examples: Tensor | None = None
    exact_rows: Tensor | None = None

    @property
    def batch(self) -> int:
        return self.coeffs.shape[0]

    @property
    def k(self) -> int:
        return self.coeffs.shape[-1]

    def _horner(self, w: Tensor) -> Tensor:
        # w (B, q+1, b, r) → Σ_j (ωG)^j P Sᵀ w_j, (B, r, n)
        out = None
        for j in reversed(range(w.shape[1])):
            u = self.jacobian.restrict(_matmul_2d(w[:, j].mT, self.start))  # (B, r, n)
            if out is not None:
                g = self.jacobian.gram_apply(out, restricted=True)
                u = u.add_(g.mul_(self.omega))
            out = u
        assert out is not None
        return out

    def combine(self, z: Tensor) -> Tensor:
        """V_bᵀ z_b for ``z (B, k)``: ``(B, n)``."""
        out = self._horner(self.coeffs @ z.view(z.shape[0], 1, -1, 1)).squeeze(-2)
        if self.exact_examples is not None and self.exact_rows is not None:
            exact = (z[self.exact_examples].unsqueeze(1) @ self.exact_rows).squeeze(1)
            out.index_copy_(0, self.exact_examples, exact)
        return out

    def vectors(self) -> Tensor:
        """The Ritz vectors V_b, ``(B, k, n)``, polished to orthonormal rows (zero past rank)."""
        v = cholesky_orthonormalize(self._horner(self.coeffs))
        # a row the Gram–Schmidt order finds already spanned comes out with norm ≪ 1
        norms = v.norm(dim=-1, keepdim=True)
        v = torch.where(norms > 0.5, v / norms.clamp_min(1e-30), 0.0)
        if self.exact_examples is not None and self.exact_rows is not None:
            v.index_copy_(0, self.exact_examples, self.exact_rows)
        return v


def _orthonormal_columns(z: Tensor) -> Tensor:
    """Jittered Cholesky QR of the columns of ``z (B, p, k)`` (float64), columns scaled to unit
    norm first: columns that are (numerically) combinations of earlier ones, or zero, come out
    with norm ≪ 1."""
    gram = z.mT @ z  # (B, k, k)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    s = torch.where(diag > 0, diag.clamp_min(torch.finfo(z.dtype).tiny).rsqrt(), 0.0)
    ones = torch.ones_like(diag[..., :1])
    chol = _jittered_cholesky(s.unsqueeze(-1) * gram * s.unsqueeze(-2), ones, _JITTERS)
    return torch.linalg.solve_triangular(chol, (z * s.unsqueeze(-2)).mT, upper=False).mT


def _top_eigenspace(t: Tensor, z: Tensor, power: int, iters: int) -> Tensor:
    """Orthonormal columns ≈ spanning the top-k eigenspace of each PSD ``t (B, p, p)``.

    Subspace iteration Z ← orth(T^power Z) from the start ``z (B, p, k)``, ``iters`` times:
    the k-th/(k+1)-th eigenvalue ratio enters as its (power·iters)-th power.  Orthonormalising
    between products keeps all k directions representable.  Small products and Cholesky only
    (a batched symmetric eigensolver is ~10× slower than Cholesky on 512 small matrices).
    """
    # T/tr(T) applied ``power`` times to the k columns, never T^power itself: iters·power·p²k
    # multiply-adds against 2p³ + iters·p²k for T⁴ by squaring (equal for the defaults, p = 3k),
    # and no (B, p, p) power of T is held
    scale = torch.diagonal(t, dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(t.dtype).tiny)
    scale = scale.view(-1, 1, 1)
    for _ in range(iters):
        for _ in range(power):
            z = (t @ z).div_(scale)
        z = _orthonormal_columns(z)
    return _orthonormal_columns(z)


@functools.cache
def _fixed_normal(p: int, k: int, device: torch.device) -> Tensor:
    # a fixed-seed standard normal (p, k) block in float64, the same on every call
    fixed = torch.Generator().manual_seed(0)
    return torch.randn(p, k, generator=fixed, dtype=torch.float64).to(device)


def _krylov_gram(
    jacobian: UpstreamJacobian,
    start: Tensor,
    depth: int,
    omega: Tensor | None,
    ys: Tensor,
    kall: Tensor,
    out: Tensor,
) -> tuple[Tensor, Tensor]:
    """Products Y_i · Y_j, i ≤ q, j ≤ q + 1, of one chunk of examples in float64 into ``out
    (c, p, p + b)``; returns Σ_b G_b Y_0 and ω.

    ``ys (q+2, c, b, n)`` (working dtype) and ``kall (s, (q+2)·b, n)`` (float64) are
    workspaces: the float64 copies are made and multiplied s examples at a time.
    """
    bsz, b, n = jacobian.batch, start.shape[0], start.shape[1]
    torch.mul(start, jacobian.restrict(torch.ones_like(ys[0, :, :1])), out=ys[0])  # P_b S
    for j in range(depth + 1):
        g = jacobian.gram_apply(ys[j], restricted=True, out=ys[j + 1])
        if omega is None:  # ω = ‖Y_0‖/‖G Y_0‖ on a few examples (1 if that is 0): a scale only
            den = torch.linalg.vector_norm(g[:8])
            omega = torch.where(den > 0, torch.linalg.vector_norm(ys[0, :8]) / den, 1.0)
        g.mul_(omega)
    power = ys[1].sum(0) / omega  # Σ_b G_b Y_0 (b, n)
    # one batched product per sub-chunk (faster than the 9 of 16 blocks needed, one by one)
    sub = kall.shape[0]
    for lo in range(0, bsz, sub):
        c = min(sub, bsz - lo)
        k64 = kall[:c]
        k64.view(c, depth + 2, b, n).copy_(ys[:, lo : lo + c].transpose(0, 1))
        torch.bmm(k64[:, : (depth + 1) * b], k64.mT, out=out[lo : lo + c])
    return power, omega


def _ritz_coefficients(
    full: Tensor,
    b: int,
    depth: int,
    k: int,
    dtype: torch.dtype,
    ritz_power: int,
    ritz_iters: int,
) -> tuple[Tensor, Tensor]:
    """Coefficients C ``(B, p, k)`` (float64) of the top-k Ritz vectors in the Krylov vectors,
    from the products ``full (B, p, p + b)`` of :func:`_krylov_gram`, and their amplification
    ``(B,)``: the largest absolute column sum of the coefficients of the unit-norm Krylov
    vectors, by which rounding in the vectors reaches V (see :func:`krylov_ritz`).

    Everything here is float64: the Gram is ill-conditioned by design, and T^power must keep
    directions with λ_k/λ_1 ≈ 1e-2 representable (float32 loses them on steep spectra).
    ``dtype`` (the vectors' precision) sets the rounding floors."""
    f64, device = full.dtype, full.device
    eps = torch.finfo(dtype).eps
    p = b * (depth + 1)
    gram = full[:, :p, :p]
    a = full[:, :p, b:]  # Y_i · Y_{j+1} = Y_i (ωG) Y_j
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)  # (B, p) squared norms
    alive = diag > eps * diag.amax(-1, keepdim=True)
    d = torch.where(alive, diag.clamp_min(torch.finfo(f64).tiny).rsqrt(), 0.0)
    ones = torch.ones_like(diag[..., :1])
    # (B, p, p) temporaries are made in place where that changes no number: their memory grows
    # with the group (RITZ_GROUP examples per thread at k = 10, RITZ_GRAM_BYTES of Grams)
    scaled = (d.unsqueeze(-1) * gram).mul_(d.unsqueeze(-2))
    chol = _jittered_cholesky(scaled, ones, _GRAM_JITTERS)
    del scaled
    floor = max((_DEPENDENT * eps) ** 2, _GRAM_FLOOR * torch.finfo(f64).eps)
    dependent = torch.diagonal(chol, dim1=-2, dim2=-1).square() <= floor
    keep = (alive & ~dependent).to(f64).unsqueeze(-1)  # (B, p, 1)
    # L⁻¹D once (a triangular solve is slower than a product on small matrices), then
    # T = L⁻¹ D A D L⁻ᵀ on the kept coordinates
    ld = torch.linalg.solve_triangular(chol, torch.diag_embed(d), upper=False).mul_(keep)
    # start: the coordinates of the last k Krylov vectors (the most powered ones) plus a fixed
    # random block, so that no column starts at zero where those vectors were dropped
    z = (chol[:, -k:, :].mT + 1e-3 * _fixed_normal(p, k, device)) * keep  # (B, p, k)
    del chol
    half = ld @ a
    t = half @ ld.mT
    t = torch.add(t, t.mT, out=half).mul_(0.5)  # symmetric, in the first product's memory
    del half
    z = _top_eigenspace(t, z, ritz_power, ritz_iters) * keep
    theta = (z * (t @ z)).sum(-2)  # (B, k) Rayleigh quotients
    norms = (z * z).sum(-2).sqrt()
    rtol = 1e3 * eps  # relative Ritz value below which a direction counts as zero
    floor_theta = rtol * theta.amax(-1, keepdim=True).clamp_min(torch.finfo(f64).tiny)
    good = ((norms > 0.5) & (theta > floor_theta)).to(f64)  # (B, k)
    z = z * (good / norms.clamp_min(torch.finfo(f64).tiny)).unsqueeze(-2)
    # V = Zᵀ L⁻¹ D K; V Vᵀ = Zᵀ(I − δ L⁻¹L⁻ᵀ)Z = I to δ/floor ≈ 1e-7 on the kept coordinates
    coeffs = ld.mT @ z
    # the coefficients of the unit Krylov vectors, D⁻¹C: rounding in those vectors (relative
    # size eps) enters V's rows times their absolute column sum
    unit = coeffs / torch.where(alive, d, 1.0).unsqueeze(-1)
    return coeffs, unit.abs().sum(-2).amax(-1)


def krylov_ritz(
    jacobian: UpstreamJacobian,
    k: int,
    start: Tensor,
    *,
    depth: int = DEFAULT_DEPTH,
    ritz_power: int = DEFAULT_RITZ_POWER,
    ritz_iters: int = DEFAULT_RITZ_ITERS,
    chunk: int | None = None,
) -> KrylovRitz:
    """Approximate top-k right singular vectors of every W̃_b: block Krylov + Rayleigh–Ritz.

    Search space of example b: K_b = span{Y_0, …, Y_q} (q = ``depth``), Y_0 = P_b S (S the
    shared warm start ``start (b, n)``, P_b = ``jacobian.restrict``, the ReLU mask for an MLP)
    and Y_{j+1} = ω G_b Y_j, with one scalar ω per call to keep the powers in range: q + 1
    block products with G_b, each one (B·b × n)·(n × n) product for the whole batch.  The
    blocks are *not* orthogonalised in Rⁿ: the Rayleigh–Ritz problem is solved entirely in
    the p = b·(q+1) dimensional coordinates, from one batched float64 Gram of all q + 2 blocks
    (Y_{q+1} supplies K G Kᵀ):

        B = K Kᵀ,  A = K (ωG) Kᵀ,  D = diag(B)^{-1/2},  D B D + δI = L Lᵀ,
        T = L⁻¹ D A D L⁻ᵀ,   T Z ≈ Z Θ (top k, by subspace iteration),   V = Zᵀ L⁻¹ D K.

    Krylov vectors whose residual after the earlier ones is at the rounding level are dropped
    from T, so no direction of rounding noise is promoted; Ritz directions with numerically
    zero Ritz values, or not carried by the blocks, get zero coefficients; a last k × k
    Cholesky step makes V's rows orthonormal.

    Memory: the blocks of ``chunk`` examples at a time in the working dtype (Gram, then
    discarded), copied to float64 ``GRAM_BYTES`` at a time (a copy that stays in cache);
    the p × (p + b) Grams of ``RITZ_GROUP`` examples per torch thread (on CPU; more where the
    problems are smaller than k = 10's, up to ``RITZ_GRAM_BYTES``; of the whole batch
    elsewhere) are kept, and their small problems solved together.
    The Ritz vectors are re-formed from S by Horner's rule when needed (:class:`KrylovRitz`),
    so neither the blocks nor V are ever held for the whole batch.

    Args:
        jacobian: the W̃_b, batch B, shape m × n.
        k: subspace size (≤ b·(depth + 1)).
        start: ``(b, n)`` orthonormal rows S shared by all examples.
        depth: Krylov depth q ≥ 0.
        ritz_power, ritz_iters: the subspace iteration on T (T^ritz_power, ritz_iters times).
        chunk: examples whose blocks are held at once (``None``: all), on CPU at most
            ``RITZ_GROUP``.

    Returns:
        the :class:`KrylovRitz`; :func:`next_start` turns its ``power`` into the next warm
        start.
    """
    bsz, n, b = jacobian.batch, jacobian.cols, start.shape[0]
    dtype, device = jacobian.dtype, jacobian.device
    # on CPU, chunks of at most RITZ_GROUP examples and small problems RITZ_GROUP examples per
    # thread at a time, more where they are smaller (their workspace stays in cache);
    # elsewhere one group for the whole batch (fewer, larger launches)
    cpu = device.type == "cpu"
    step = min(chunk or bsz, bsz, RITZ_GROUP if cpu else bsz)
    p = b * (depth + 1)
    per_thread = max(RITZ_GROUP, RITZ_GRAM_BYTES // (p * (p + b) * 8))
    per_solve = per_thread * torch.get_num_threads() if cpu else bsz
    group = step * max(1, -(-per_solve // step))  # examples per small solve, chunk multiple
    ys = torch.empty((depth + 2, step, b, n), dtype=dtype, device=device)
    # on CPU the float64 copies are made a cache-sized piece at a time; elsewhere at once
    sub = min(step, max(1, GRAM_BYTES // ((p + b) * n * 8))) if device.type == "cpu" else step
    kall = torch.empty((sub, p + b, n), dtype=torch.float64, device=device)
    grams = torch.empty((min(group, bsz), p, p + b), dtype=torch.float64, device=device)
    coeffs, amplification, power, omega = [], [], None, None
    for first in range(0, bsz, group):
        last = min(first + group, bsz)
        for lo in range(first, last, step):
            part = jacobian.select(slice(lo, min(lo + step, last)))
            c = part.batch
            out = grams[lo - first : lo - first + c]
            pw, omega = _krylov_gram(part, start, depth, omega, ys[:, :c], kall[:c], out)
            power = pw if power is None else power + pw
        full = grams[: last - first]
        c, amp = _ritz_coefficients(full, b, depth, k, dtype, ritz_power, ritz_iters)
        coeffs.append(c)
        amplification.append(amp)
    del ys, kall, grams
    assert power is not None and omega is not None
    coeff = coeffs[0] if len(coeffs) == 1 else torch.cat(coeffs)
    amp = amplification[0] if len(amplification) == 1 else torch.cat(amplification)
    unstable = torch.nonzero(amp * torch.finfo(dtype).eps > REBUILD_TOL).flatten()
    exact = _exact_rows(jacobian, unstable, k) if unstable.numel() else None
    return KrylovRitz(
        jacobian,
        start,
        omega,
        coeff.to(dtype).view(bsz, depth + 1, b, k),
        power,
        unstable if exact is not None else None,
        exact,
    )


def _exact_rows(jacobian: UpstreamJacobian, examples: Tensor, k: int) -> Tensor:
    """Exact top-k right singular vectors of the ``examples`` (few: one at a time), by a
    float64 SVD of their active columns; zero rows where σ² ≤ 1e3·eps·σ_1² (as the Ritz
    values of :func:`krylov_ritz`): ``(len(examples), k, n)``."""
    rows = []
    for i in examples.tolist():
        w, index = dense_active(jacobian.select(slice(i, i + 1)), k)
        _, sv, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
        keep = sv[:, :k] > _rtol(jacobian.dtype) ** 0.5 * sv[:, :1]
        rows.append(expand_columns(vh[:, :k] * keep.unsqueeze(-1), index, jacobian.cols))
    return torch.cat(rows).to(jacobian.dtype)


def block_krylov(
    jacobian: UpstreamJacobian,
    k: int,
    start: Tensor,
    *,
    depth: int = DEFAULT_DEPTH,
    ritz_power: int = DEFAULT_RITZ_POWER,
    ritz_iters: int = DEFAULT_RITZ_ITERS,
) -> tuple[Tensor, Tensor]:
    """:func:`krylov_ritz` with the Ritz vectors formed: ``(basis (B, k, n), next_start)``.

    The rows of ``basis`` are orthonormal to rounding, largest Ritz values not necessarily
    first, zero rows past the numerical rank.
    """
    ritz = krylov_ritz(
        jacobian, k, start, depth=depth, ritz_power=ritz_power, ritz_iters=ritz_iters
    )
    return ritz.vectors(), next_start(ritz.power, start)


def next_start(power: Tensor, start: Tensor) -> Tensor:
    """The warm start for the next call: orth(Σ_b G_b P_b S), one power step of the batch-mean
    Gram from S = ``start``; rows the power step zeroes keep S's direction."""
    return _fill_rows(cholesky_orthonormalize(power.unsqueeze(0), equilibrate=True)[0], start)


def exact_row_space(jacobian: UpstreamJacobian, k: int) -> Tensor:
    """Exact top-k right singular vectors when W̃_b has few rows (closed form).

    The rows of W̃_b (m of them: W̃_bᵀ e_j, m matrix-vector products) span its row space.  For
    k ≥ m (the last hidden layer of a classifier: m = number of classes ≤ k) the answer is
    that whole row space, and a Cholesky QR of those rows gives an orthonormal basis of it:
    L⁻¹ W̃_b with L Lᵀ = W̃_b W̃_bᵀ (rows in Gram–Schmidt order; zero rows where a row of W̃_b
    depends on the earlier ones).  For k < m the top-k singular directions are picked from
    the row Gram W̃_b W̃_bᵀ = U Λ Uᵀ: V = Λ^{-1/2} Uᵀ W̃_b, largest first, zero rows for
    numerically zero singular values.

    Returns ``(B, min(k, m), n)`` orthonormal (or zero) rows.
    """
    bsz, m = jacobian.batch, jacobian.rows
    eye = torch.eye(m, dtype=jacobian.dtype, device=jacobian.device).expand(bsz, m, m)
    wt = jacobian.apply_t(eye)  # (B, m, n): rows are W̃_bᵀ e_j
    if k >= m:
        rows = cholesky_orthonormalize(wt, equilibrate=True)
        norms = rows.norm(dim=-1, keepdim=True)
        return torch.where(norms > 0.5, rows / norms.clamp_min(1e-30), 0.0)
    gram = wt @ wt.mT  # (B, m, m) = W̃_b W̃_bᵀ
    lam, u = torch.linalg.eigh(0.5 * (gram + gram.mT))
    lam, u = lam.flip(-1)[..., :k], u.flip(-1)[..., :k]
    floor = _rtol(gram.dtype) * lam[..., :1].clamp_min(torch.finfo(gram.dtype).tiny)
    scale = torch.where(lam > floor, lam.clamp_min(torch.finfo(gram.dtype).tiny).rsqrt(), 0.0)
    return (u * scale.unsqueeze(-2)).mT @ wt


def row_gram(jacobian: UpstreamJacobian) -> Tensor:
    """W̃_b W̃_bᵀ ``(B, m, m)``: the Jacobian's own ``row_gram`` where it has one, else from m
    products with W̃_bᵀ."""
    fast = getattr(jacobian, "row_gram", None)
    if fast is not None:
        return fast()
    m = jacobian.rows
    eye = torch.eye(m, dtype=jacobian.dtype, device=jacobian.device)
    wt = jacobian.apply_t(eye.expand(jacobian.batch, m, m))  # (B, m, n)
    return wt @ wt.mT


def row_space_sample(jacobian: UpstreamJacobian, z: Tensor) -> Tensor:
    """y_b = W̃_bᵀ L_b⁻ᵀ z_b, L_b L_bᵀ = W̃_b W̃_bᵀ (+ a jitter of a few eps): ``z (B, m)``.

    Cov(y_b) = W̃_bᵀ (W̃_b W̃_bᵀ)⁻¹ W̃_b, the orthogonal projector on the row space of W̃_b,
    the same law as :func:`exact_row_space`'s basis times a standard normal vector, without
    forming any (B, m, n) tensor: one m × m Cholesky per example and one product with W̃_bᵀ.
    Rank-deficient W̃_b: the jitter shrinks directions with σ² below a few eps·‖W̃_b‖²."""
    gram = row_gram(jacobian)
    mean_diag = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1, keepdim=True)
    chol = _jittered_cholesky(gram, mean_diag, _JITTERS)
    u = torch.linalg.solve_triangular(chol.mT, z.unsqueeze(-1), upper=True)  # (B, m, 1)
    return jacobian.apply_t(u.squeeze(-1))
