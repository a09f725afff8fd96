"""Fast top-k right-singular subspaces of all W̃_b from large matrix products.

The top-k right singular subspace of W̃_b is the top-k eigenspace of the Gram matrix
G_b = W̃_bᵀ W̃_b (for an MLP, G_b = M_b W_{i+1}ᵀ W_{i+1} M_b).  A randomized block Krylov method with
Rayleigh–Ritz (Musco & Musco 2015, "Randomized block Krylov methods for stronger and faster
approximate SVD"; Saad, *Numerical Methods for Large Eigenvalue Problems*, §6) touches G_b
only through ``jacobian.apply``/``apply_t`` on a block of b vectors per example, which for the
whole batch is one (B·b × n)·(n × m) product: large, fast matrix products.  The only
factorizations are batched small symmetric eigendecompositions (at most b·(depth+1) wide),
never an SVD or QR of a tall matrix.  Krylov spaces converge with the square root of the
spectral gap, which matters here: at initialisation the top of the spectrum of G_b is flat.

Warm start: every example starts from Q_b = P_b S, the shared block S (b × n) restricted to
the coordinates that can carry gradient (for ReLU, the active units), and S tracks the top-b
eigenspace of the batch-mean Gram across steps by one power step per call whose product
(G_b Q_b) is computed anyway.

Departure from the exact solver: where G_b has fewer than k nonzero eigenvalues (an example
with fewer active units than k), the rows beyond its rank are returned as zero instead of
arbitrary null-space directions, so the guess lives in the range of W̃_b only.  The gradient
has no component in the null space, so the bias is the same and the variance smaller.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..jacobians import UpstreamJacobian

__all__ = [
    "orthonormalize_rows",
    "rayleigh_ritz",
    "block_krylov",
    "exact_row_space",
    "DEFAULT_DEPTH",
]

#: block Krylov depth: the search space is span{Q, GQ, …, G^depth Q}
DEFAULT_DEPTH = 2
#: Rayleigh–Ritz by subspace iteration: ``DEFAULT_RITZ_ITERS`` products with T^power
DEFAULT_RITZ_POWER = 4
DEFAULT_RITZ_ITERS = 6


def _rtol(dtype: torch.dtype) -> float:
    # relative eigenvalue floor below which a direction counts as numerically zero
    return 1e3 * torch.finfo(dtype).eps


def _lowdin(q: Tensor, noise: Tensor | None = None) -> Tensor:
    """C with C q orthonormal rows: C = Λ^{-1/2} Uᵀ from q qᵀ = U Λ Uᵀ, ``(B, p, p)``.

    Numerically zero eigenvalues give zero rows of C instead of NaN: "zero" is below
    ``_rtol`` times the largest eigenvalue, or below ``noise`` ``(B, 1)`` (a squared norm)
    when given.
    """
    gram = q @ q.mT  # (B, p, p)
    lam, u = torch.linalg.eigh(gram)
    floor = _rtol(q.dtype) * lam[..., -1:]
    if noise is not None:
        floor = torch.maximum(floor, noise)
    floor = floor.clamp_min(torch.finfo(q.dtype).tiny)
    inv_sqrt = torch.where(lam > floor, lam.clamp_min(torch.finfo(q.dtype).tiny).rsqrt(), 0.0)
    return (u * inv_sqrt.unsqueeze(-2)).mT


def orthonormalize_rows(q: Tensor) -> Tensor:
    """Orthonormal rows spanning the rows of each ``q[b]``, ``(B, p, n) -> (B, p, n)``.

    Symmetric (Löwdin) orthonormalisation Q ← Λ^{-1/2} Uᵀ Q from the p × p Gram Q Qᵀ = U Λ Uᵀ.
    Rank-deficient blocks give zero rows for the numerically zero eigenvalues instead of NaN.
    """
    return _lowdin(q) @ q


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
    dead = new.norm(dim=1) == 0
    if not bool(dead.any()):
        return new
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
    p = gram.shape[-1]
    mean_diag = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1, keepdim=True)  # (B, 1)
    eye = torch.eye(p, dtype=q.dtype, device=q.device)
    tiny = torch.finfo(q.dtype).tiny

    def factor(c: float) -> tuple[Tensor, Tensor]:
        jitter = (c * torch.finfo(q.dtype).eps * mean_diag).clamp_min(tiny)  # (B, 1)
        return torch.linalg.cholesky_ex(gram + jitter.unsqueeze(-1) * eye)

    chol, info = factor(_JITTERS[0])
    for c in _JITTERS[1:]:  # a larger jitter only where the smaller one failed
        failed = info != 0
        if not bool(failed.any()):
            break
        retry, retry_info = factor(c)
        chol = torch.where(failed.view(-1, 1, 1), retry, chol)
        info = torch.where(failed, retry_info, info)
    return torch.linalg.solve_triangular(chol, q, upper=False)


def _dominant_subspace(t: Tensor, k: int, power: int, iters: int) -> Tensor:
    """``(B, p, k)`` orthonormal columns spanning ≈ the top-k eigenspace of each PSD ``t``.

    Subspace iteration Z ← orth(T^power Z) from a fixed random start, ``iters`` times: the
    k-th/(k+1)-th eigenvalue ratio enters as its (power·iters)-th power.  Orthonormalising
    between products keeps all k directions representable in float32, which one high power
    of T would not.  Only small matrix products and Cholesky QR.
    """
    p = t.shape[-1]
    scale = torch.diagonal(t, dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(t.dtype).tiny)
    tp = t / scale.view(-1, 1, 1)
    for _ in range(power - 1):
        tp = tp @ (t / scale.view(-1, 1, 1))
    fixed = torch.Generator().manual_seed(0)
    z = torch.randn(p, k, generator=fixed, dtype=torch.float64).to(t.dtype).to(t.device)
    z = z.expand(t.shape[0], p, k)
    for _ in range(iters):
        z = cholesky_orthonormalize((tp @ z).mT, equilibrate=True).mT  # (B, p, k)
    return cholesky_orthonormalize(z.mT, equilibrate=True).mT


def block_krylov(
    jacobian: UpstreamJacobian,
    k: int,
    start: Tensor,
    *,
    depth: int = DEFAULT_DEPTH,
    ritz_power: int = DEFAULT_RITZ_POWER,
    ritz_iters: int = DEFAULT_RITZ_ITERS,
) -> tuple[Tensor, Tensor]:
    """Approximate top-k right singular vectors of every W̃_b by block Krylov + Rayleigh–Ritz.

    The search space of example b is the block Krylov space
    K_b = span{Q_b, G_b Q_b, …, G_b^depth Q_b} with Q_b = P_b S (S the shared warm start,
    P_b = ``jacobian.restrict``, the ReLU mask for an MLP), of dimension p = b·(depth + 1)
    where b = ``start.shape[0]``.  The Rayleigh–Ritz step takes the top-k eigenspace of the
    p × p projection T_b = K_bᵀ G_b K_b by subspace iteration with T_b^ritz_power, ritz_iters
    times, rather than by a batched eigensolver (see :func:`cholesky_orthonormalize` for why).

    Args:
        jacobian: the W̃_b, batch B, shape m × n.
        k: subspace size (≤ b·(depth + 1)).
        start: ``(b, n)`` orthonormal rows S shared by all examples.
        depth: Krylov depth q ≥ 0; the cost is q + 1 block products with G_b.
        ritz_power, ritz_iters: the Rayleigh–Ritz subspace iteration.

    Returns:
        ``(basis (B, k, n), next_start (b, n))``: orthonormal rows (zero rows past the rank)
        and the warm start for the next call, orth(mean_b G_b Q_b), a power step of the
        batch-mean Gram.
    """
    bsz, b = jacobian.batch, start.shape[0]
    x = jacobian.restrict(start.unsqueeze(0).expand(bsz, b, -1))  # (B, b, n) = P_b S
    q = cholesky_orthonormalize(x, equilibrate=True)
    gq = jacobian.gram_apply(q)  # (B, b, n)
    next_start = _fill_rows(orthonormalize_rows(gq.mean(0, keepdim=True))[0], start)
    p = b * (depth + 1)
    kk = q.new_empty(bsz, p, q.shape[-1])  # (B, p, n) the Krylov basis, filled block by block
    gk = torch.empty_like(kk)  # (B, p, n) G applied to it
    kk[:, :b], gk[:, :b] = q, gq
    for j in range(1, depth + 1):
        basis = kk[:, : b * j]  # (B, b·j, n), orthonormal rows
        w = gk[:, b * (j - 1) : b * j]  # (B, b, n) G times the previous block
        v = w - (w @ basis.mT) @ basis
        v = v - (v @ basis.mT) @ basis  # block Gram–Schmidt twice, for float32
        # Where the Krylov space of an example is exhausted (rank(G_b) < b·j), rows of v are
        # rounding noise of size ~eps·‖G Q‖: zero them rather than normalising noise into
        # spurious unit directions; scale the others to unit norm.
        scale = w.norm(dim=-1).amax(-1).view(-1, 1, 1)  # (B, 1, 1)
        norms = v.norm(dim=-1, keepdim=True)  # (B, b, 1)
        v = v * torch.where(
            norms > _rtol(v.dtype) * scale, norms.clamp_min(1e-30).reciprocal(), 0.0
        )
        q = cholesky_orthonormalize(v)
        kk[:, b * j : b * (j + 1)] = q
        gk[:, b * j : b * (j + 1)] = jacobian.gram_apply(q)
    t = kk @ gk.mT  # (B, p, p) = Kᵀ G K
    t = 0.5 * (t + t.mT)
    z = _dominant_subspace(t, k, ritz_power, ritz_iters)  # (B, p, k)
    vectors = cholesky_orthonormalize(z.mT @ kk, equilibrate=True)  # (B, k, n)
    # directions the Krylov space does not really hold come out of the jittered Cholesky
    # with norm ≪ 1: drop them, renormalise the rest exactly
    norms = vectors.norm(dim=-1, keepdim=True)
    return torch.where(norms > 0.5, vectors / norms.clamp_min(1e-30), 0.0), next_start


def exact_row_space(jacobian: UpstreamJacobian, k: int) -> Tensor:
    """Exact top-k right singular vectors when W̃_b has few rows (closed form).

    With the small row Gram W̃_b W̃_bᵀ = U Λ Uᵀ (m × m), the right singular vectors are
    V = W̃_bᵀ U Λ^{-1/2}.  For the last hidden layer of a classifier (m = number of classes
    ≤ k) this is the whole row space of W̃_b, computed with m matrix-vector products and one
    batched m × m eigendecomposition.

    Returns ``(B, min(k, m), n)`` orthonormal rows, largest singular value first; zero rows
    for numerically zero singular values.
    """
    bsz, m = jacobian.batch, jacobian.rows
    eye = torch.eye(m, dtype=jacobian.dtype, device=jacobian.device).expand(bsz, m, m)
    wt = jacobian.apply_t(eye)  # (B, m, n): rows are W̃_bᵀ e_j
    gram = wt @ wt.mT  # (B, m, m) = W̃_b W̃_bᵀ
    lam, u = torch.linalg.eigh(0.5 * (gram + gram.mT))
    lam, u = lam.flip(-1)[..., :k], u.flip(-1)[..., :k]
    floor = _rtol(gram.dtype) * lam[..., :1].clamp_min(torch.finfo(gram.dtype).tiny)
    scale = torch.where(lam > floor, lam.clamp_min(torch.finfo(gram.dtype).tiny).rsqrt(), 0.0)
    return (u * scale.unsqueeze(-2)).mT @ wt
