"""Subspace solvers against a float64 SVD reference.

The exact solver (batched SVD), the closed form for few rows (``exact_row_space``) and the fast
block Krylov solver must all return orthonormal rows (zero rows past the rank) spanning the
right-singular subspaces of W̃_b; the fast one must agree with SVD where there is a spectral gap
and capture ≥ 99% of the top-k energy on flat random spectra.
"""

from __future__ import annotations

import pytest
import torch

from guessgrad.guesses.wperp import _initial_start
from guessgrad.jacobians import MaskedLinearJacobian
from guessgrad.metrics import subspace_fidelity
from guessgrad.solvers import (
    block_krylov,
    bottom_right_singular,
    exact_row_space,
    numerical_rank,
    orthonormalize_rows,
    rank_right_singular,
    rayleigh_ritz,
    top_right_singular,
)
from guessgrad.solvers.subspace import krylov_ritz, row_gram, row_space_sample

F64 = torch.float64


class DenseJacobian:
    """An ``UpstreamJacobian`` from explicit per-example matrices ``(B, m, n)``."""

    def __init__(self, w):
        self.w = w

    batch = property(lambda self: self.w.shape[0])
    rows = property(lambda self: self.w.shape[1])
    cols = property(lambda self: self.w.shape[2])
    dtype = property(lambda self: self.w.dtype)
    device = property(lambda self: self.w.device)

    def apply(self, v):
        return v @ self.w.mT

    def apply_t(self, u):
        return u @ self.w

    def gram_apply(self, v, *, restricted=False, out=None):
        g = self.apply_t(self.apply(v))
        return g if out is None else out.copy_(g)

    def dense(self):
        return self.w

    def select(self, examples):
        return DenseJacobian(self.w[examples])

    def restrict(self, v):
        return v  # the identity is always a valid restriction


def projector(rows):
    return rows.mT @ rows  # (B, n, n)


def spectral_distance(p, q):
    """Largest ‖P_b − Q_b‖₂ = sine of the largest principal angle between the subspaces."""
    return float(torch.linalg.matrix_norm(p - q, ord=2).max())


def assert_orthonormal_or_zero(rows, atol=1e-12):
    """Rows are orthonormal, except rows that are exactly zero."""
    gram = rows @ rows.mT
    alive = rows.norm(dim=-1) > 0
    expected = torch.diag_embed(alive.to(rows.dtype))
    torch.testing.assert_close(gram, expected, rtol=0, atol=atol)
    assert torch.equal(rows[~alive], torch.zeros_like(rows[~alive]))


def random_masks(batch, n, gen, p=0.5):
    return (torch.rand(batch, n, generator=gen, dtype=F64) > p).to(F64)


def decaying(batch, m, n, ratio, gen):
    """Per-example W_b = U diag(ratio^j) Vᵀ with random orthogonal U, V: a spectral gap."""
    u = torch.linalg.qr(torch.randn(batch, m, m, generator=gen, dtype=F64))[0][..., : min(m, n)]
    v = torch.linalg.qr(torch.randn(batch, n, n, generator=gen, dtype=F64))[0][..., : min(m, n)]
    s = ratio ** torch.arange(min(m, n), dtype=F64)
    return (u * s) @ v.mT


def start_for(b, n):
    """The solver's fixed orthonormal start block ``(b, n)``."""
    return _initial_start(b, n, F64, torch.device("cpu"))


# ---------------------------------------------------------------- exact SVD solver


def test_top_right_singular_is_the_svd():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 6, 9, generator=gen, dtype=F64)
    rows = top_right_singular(w, 4)
    assert rows.shape == (3, 4, 9)
    assert_orthonormal_or_zero(rows)
    sv = torch.linalg.svdvals(w)
    # ‖W v_j‖ are the singular values, largest first
    torch.testing.assert_close((w @ rows.mT).norm(dim=1), sv[:, :4], rtol=1e-12, atol=0)
    # k is clipped to min(m, n)
    assert top_right_singular(w, 50).shape == (3, 6, 9)


def test_bottom_right_singular_uses_the_full_svd():
    """For a wide W̃ (m < n) the n − m null directions are the bottom ones: W̃ v = 0 there."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2, 4, 9, generator=gen, dtype=F64)
    rows = bottom_right_singular(w, 5)
    assert rows.shape == (2, 5, 9)
    assert_orthonormal_or_zero(rows)
    torch.testing.assert_close(w @ rows.mT, torch.zeros(2, 4, 5, dtype=F64), rtol=0, atol=1e-13)
    top = top_right_singular(w, 4)
    torch.testing.assert_close(top @ rows.mT, torch.zeros(2, 4, 5, dtype=F64), rtol=0, atol=1e-13)
    # square: the smallest singular values, smallest first
    sq = torch.randn(2, 6, 6, generator=gen, dtype=F64)
    rows = bottom_right_singular(sq, 2)
    sv = torch.linalg.svdvals(sq)
    torch.testing.assert_close((sq @ rows.mT).norm(dim=1), sv[:, [-1, -2]], rtol=1e-10, atol=0)
    assert bottom_right_singular(sq, 10).shape == (2, 6, 6)


def test_rank_right_singular_projects_on_the_row_space():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4, 5, 8, generator=gen, dtype=F64) * random_masks(4, 8, gen).unsqueeze(1)
    w[0] = 0.0
    rows = rank_right_singular(w)
    assert_orthonormal_or_zero(rows)
    ranks = torch.linalg.matrix_rank(w)
    assert torch.equal((rows.norm(dim=-1) > 0).sum(1), ranks)
    row_space = torch.linalg.pinv(w) @ w  # (B, n, n) orthogonal projector on the row space
    torch.testing.assert_close(projector(rows), row_space, rtol=0, atol=1e-12)


def test_numerical_rank_matches_torch():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 6, 7, generator=gen, dtype=F64) * random_masks(5, 7, gen, 0.6).unsqueeze(1)
    w[1] = 0.0
    sv = torch.linalg.svdvals(w)
    assert torch.equal(numerical_rank(sv, (6, 7)), torch.linalg.matrix_rank(w))


# ---------------------------------------------------------------- building blocks


def test_orthonormalize_rows_keeps_the_span():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(3, 4, 10, generator=gen, dtype=F64)
    q[1, 3] = 2.0 * q[1, 0] - q[1, 2]  # rank 3
    q[2] = 0.0  # rank 0
    out = orthonormalize_rows(q)
    assert torch.isfinite(out).all()
    assert_orthonormal_or_zero(out)
    assert (out.norm(dim=-1) > 0).sum(1).tolist() == [4, 3, 0]
    torch.testing.assert_close(projector(out), torch.linalg.pinv(q) @ q, rtol=0, atol=1e-12)


def test_rayleigh_ritz_on_the_whole_space_is_an_eigendecomposition():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(2, 6, 6, generator=gen, dtype=F64)
    g = a.mT @ a  # (B, n, n) symmetric positive semi-definite
    q = torch.eye(6, dtype=F64).expand(2, 6, 6)
    values, vectors = rayleigh_ritz(q, q @ g, 3)
    lam, u = torch.linalg.eigh(g)
    torch.testing.assert_close(values, lam.flip(-1)[:, :3], rtol=1e-12, atol=0)
    torch.testing.assert_close(
        projector(vectors), projector(u.flip(-1)[..., :3].mT), rtol=0, atol=1e-10
    )


# ---------------------------------------------------------------- closed form for few rows


@pytest.mark.parametrize("k", [4, 5, 20])
def test_exact_row_space_equals_svd(k):
    """Last hidden layer (m = 4 rows ≤ k): the whole row space, exactly (any order)."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(4, 9, generator=gen, dtype=F64)
    masks = random_masks(6, 9, gen, 0.3)
    jac = MaskedLinearJacobian(w, masks)
    rows = exact_row_space(jac, k)
    assert rows.shape == (6, 4, 9)
    assert_orthonormal_or_zero(rows)
    dense = jac.dense()
    ref = top_right_singular(dense, k)
    torch.testing.assert_close(projector(rows), projector(ref), rtol=0, atol=1e-12)
    # the energy captured is all of it
    torch.testing.assert_close(
        (dense @ rows.mT).square().sum((1, 2)), dense.square().sum((1, 2)), rtol=1e-12, atol=0
    )


def test_exact_row_space_fewer_rows_than_m_when_k_is_small():
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(5, 8, generator=gen, dtype=F64)
    jac = MaskedLinearJacobian(w, torch.ones(3, 8, dtype=F64))
    rows = exact_row_space(jac, 2)
    assert rows.shape == (3, 2, 8)
    torch.testing.assert_close(
        projector(rows), projector(top_right_singular(jac.dense(), 2)), rtol=0, atol=1e-10
    )


# ---------------------------------------------------------------- block Krylov


def test_block_krylov_matches_svd_with_a_spectral_gap():
    """σ_j = 2^-j: at the default depth the subspace is within a small angle of the SVD's."""
    gen = torch.Generator().manual_seed(8)
    w = decaying(5, 12, 16, 0.5, gen)
    basis, next_start = block_krylov(DenseJacobian(w), 3, start_for(3, 16), depth=2)
    assert basis.shape == (5, 3, 16)
    assert_orthonormal_or_zero(basis)
    ref = top_right_singular(w, 3)
    assert spectral_distance(projector(basis), projector(ref)) < 1e-2
    assert subspace_fidelity(w, basis, 3) > 1 - 1e-6
    assert next_start.shape == (3, 16)
    torch.testing.assert_close(
        next_start @ next_start.T, torch.eye(3, dtype=F64), atol=1e-12, rtol=0
    )


def test_more_krylov_depth_does_not_break_on_a_steep_spectrum():
    """σ_j = 2^-j: the monomial Krylov basis saturates near 1e-3, and the vectors it adds
    beyond depth 2 carry little but rounding.  They are dropped where the float64 Gram cannot
    resolve them, so depth 3 and 4 stay within a small factor of depth 2 (with a floor on the
    residual² a tenth of this one, some of these seeds came out 33× and 226× worse than at
    depth 2, up to a spectral distance of 1.0, depending on the LAPACK)."""
    ratios = []
    for seed in range(8, 32):
        gen = torch.Generator().manual_seed(seed)
        w = decaying(5, 12, 16, 0.5, gen)
        ref = projector(top_right_singular(w, 3))
        dist = [
            spectral_distance(
                projector(block_krylov(DenseJacobian(w), 3, start_for(3, 16), depth=d)[0]), ref
            )
            for d in (2, 3, 4)
        ]
        assert max(dist) < 2e-2
        ratios.append(max(dist[1:]) / dist[0])
    assert max(ratios) < 3
    assert sorted(ratios)[len(ratios) // 2] < 1.01  # typically no worse at all


def test_block_krylov_converges_with_depth_at_a_moderate_gap():
    """σ_j = 0.8^j (λ_{k+1}/λ_k = 0.64): every extra Krylov block brings the subspace closer
    (with the small Ritz problem iterated to convergence)."""
    gen = torch.Generator().manual_seed(8)
    w = decaying(5, 12, 16, 0.8, gen)
    ref = projector(top_right_singular(w, 3))
    dist = [
        spectral_distance(
            projector(
                block_krylov(DenseJacobian(w), 3, start_for(3, 16), depth=d, ritz_iters=8)[0]
            ),
            ref,
        )
        for d in (1, 2, 3, 4)
    ]
    assert dist[0] > dist[1] > dist[2] > dist[3]
    assert dist[3] < 1e-4


def test_block_krylov_on_flat_random_spectra():
    """No gap (Gaussian weights, random ReLU masks, Krylov space smaller than the rank): with
    depth 4 the energy captured is ≥ 99% of the top k."""
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(32, 32, generator=gen, dtype=F64) / 32**0.5
    jac = MaskedLinearJacobian(w, random_masks(16, 32, gen, 0.4))
    assert int(jac.mask.sum(1).min()) > 4 * 3  # the Krylov space cannot hold the row space
    basis, _ = block_krylov(jac, 4, start_for(4, 32), depth=4)
    assert_orthonormal_or_zero(basis, atol=1e-9)
    assert subspace_fidelity(jac.dense(), basis, 4) >= 0.99
    dense = torch.randn(8, 24, 24, generator=gen, dtype=F64)
    basis, _ = block_krylov(DenseJacobian(dense), 4, start_for(4, 24), depth=4)
    assert_orthonormal_or_zero(basis, atol=1e-9)
    assert subspace_fidelity(dense, basis, 4) >= 0.99


def test_block_krylov_exhausted_space_is_the_row_space():
    """When the Krylov space can hold all of W̃_b's row space (few active units) the result is
    that row space exactly: orthonormal rows, no duplicated directions."""
    gen = torch.Generator().manual_seed(10)
    w = torch.randn(16, 6, generator=gen, dtype=F64)
    masks = random_masks(6, 6, gen, 0.4)
    masks[0] = 0.0
    masks[1] = 0.0
    masks[1, 2] = 1.0
    jac = MaskedLinearJacobian(w, masks)
    basis, _ = block_krylov(jac, 6, start_for(6, 6), depth=2)
    assert torch.isfinite(basis).all()
    assert_orthonormal_or_zero(basis)
    row_space = torch.linalg.pinv(jac.dense()) @ jac.dense()
    torch.testing.assert_close(projector(basis), row_space, rtol=0, atol=1e-12)


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_block_krylov_degenerate_masks(depth):
    """All units inactive, or fewer active units than k: zero rows past the rank, no NaN."""
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(10, 8, generator=gen, dtype=F64)
    masks = torch.zeros(4, 8, dtype=F64)
    masks[1, 3] = 1.0
    masks[2, :2] = 1.0
    masks[3] = 1.0
    jac = MaskedLinearJacobian(w, masks)
    basis, next_start = block_krylov(jac, 4, start_for(4, 8), depth=depth)
    assert torch.isfinite(basis).all() and torch.isfinite(next_start).all()
    assert_orthonormal_or_zero(basis)
    alive = (basis.norm(dim=-1) > 0).sum(1).tolist()
    assert alive[:3] == [0, 1, 2]
    row_space = torch.linalg.pinv(jac.dense()[:3]) @ jac.dense()[:3]
    torch.testing.assert_close(projector(basis[:3]), row_space, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        next_start @ next_start.T, torch.eye(4, dtype=F64), atol=1e-12, rtol=0
    )


def test_block_krylov_float32_agrees_with_svd():
    gen = torch.Generator().manual_seed(12)
    w = decaying(4, 12, 16, 0.5, gen)
    b32, _ = block_krylov(DenseJacobian(w.float()), 3, start_for(3, 16).float(), depth=3)
    assert b32.dtype == torch.float32
    assert_orthonormal_or_zero(b32.double(), atol=1e-5)
    ref = top_right_singular(w, 3)
    # float32 rounding in the (monomial) Krylov basis of a spectrum spanning 0.25^0..0.25^11:
    # the angle saturates near 1e-2, the energy captured is exact to 1e-4
    assert spectral_distance(projector(b32.double()), projector(ref)) < 3e-2
    assert subspace_fidelity(w, b32.double(), 3) > 1 - 1e-4


def test_all_solvers_no_nan_on_degenerate_masks():
    """Every solver of the W̃⊥ guess, on all-inactive and nearly inactive examples."""
    gen = torch.Generator().manual_seed(13)
    for rows_m in (3, 10):  # m ≤ k (closed form) and m > k (Krylov)
        w = torch.randn(rows_m, 8, generator=gen, dtype=F64)
        masks = torch.zeros(3, 8, dtype=F64)
        masks[1, 5] = 1.0
        jac = MaskedLinearJacobian(w, masks)
        dense = jac.dense()
        outputs = [
            top_right_singular(dense, 4),
            bottom_right_singular(dense, 4),
            rank_right_singular(dense),
            block_krylov(jac, 4, start_for(4, 8))[0] if rows_m > 4 else exact_row_space(jac, 4),
        ]
        for out in outputs:
            assert torch.isfinite(out).all()
            assert_orthonormal_or_zero(out)


# ---------------------------------------------------------------- closed-form sampling


@pytest.mark.parametrize("rows", [3, 10])  # m² ≤ 4n (outer products) and m² > 4n (per example)
def test_row_gram_matches_dense(rows):
    gen = torch.Generator().manual_seed(14)
    w = torch.randn(rows, 8, generator=gen, dtype=F64)
    jac = MaskedLinearJacobian(w, random_masks(5, 8, gen))
    dense = jac.dense()
    torch.testing.assert_close(jac.row_gram(), dense @ dense.mT, rtol=1e-12, atol=1e-12)
    # the protocol fallback, for Jacobians without row_gram
    torch.testing.assert_close(row_gram(DenseJacobian(dense)), dense @ dense.mT)


def test_row_space_sample_is_the_row_space_projector():
    """y = F z with F Fᵀ = W̃ᵀ(W̃W̃ᵀ)⁻¹W̃, the projector on the row space, for full-rank and
    rank-deficient (few active units, all inactive) examples."""
    gen = torch.Generator().manual_seed(15)
    w = torch.randn(4, 9, generator=gen, dtype=F64)
    masks = random_masks(6, 9, gen, 0.3)
    masks[4] = 0.0
    masks[4, 2] = 1.0  # rank 1
    masks[5] = 0.0  # rank 0
    jac = MaskedLinearJacobian(w, masks)
    # columns of F: the samples for z = e_1..e_m
    eye = torch.eye(4, dtype=F64)
    f = torch.stack([row_space_sample(jac, eye[j].expand(6, 4)) for j in range(4)], dim=-1)
    dense = jac.dense()
    row_space = torch.linalg.pinv(dense) @ dense
    torch.testing.assert_close(f @ f.mT, row_space, rtol=0, atol=1e-6)
    torch.testing.assert_close(f[:4] @ f[:4].mT, row_space[:4], rtol=0, atol=1e-12)


def test_krylov_ritz_combine_is_the_basis_times_z():
    """The Horner evaluation of V_bᵀ z_b agrees with the formed (polished) Ritz vectors."""
    gen = torch.Generator().manual_seed(16)
    w = torch.randn(24, 16, generator=gen, dtype=F64) / 4
    jac = MaskedLinearJacobian(w, random_masks(7, 16, gen, 0.3))
    ritz = krylov_ritz(jac, 4, start_for(4, 16), depth=2)
    z = torch.randn(7, 4, generator=gen, dtype=F64)
    v = ritz.vectors()
    assert_orthonormal_or_zero(v, atol=1e-10)
    torch.testing.assert_close(ritz.combine(z), (z.unsqueeze(1) @ v).squeeze(1), atol=1e-8, rtol=0)
    # the power step for the next warm start is Σ_b G_b P_b S
    torch.testing.assert_close(
        ritz.power, jac.gram_apply(jac.restrict(start_for(4, 16).expand(7, 4, 16))).sum(0)
    )


@pytest.mark.parametrize(
    ("chunk", "group", "sub", "threads", "gram_examples"),
    [
        (2, 64, 8, 1, 0),
        (2, 3, 8, 1, 0),
        (4, 4, 3, 1, 0),
        (9, 64, 2, 1, 0),
        (2, 2, 8, 2, 0),
        (3, 2, 8, 3, 0),
        (2, 2, 8, 1, 3),
        (2, 2, 8, 2, 1),
    ],
    ids=[
        "small-chunks",
        "groups-of-chunks",
        "sub-chunks",
        "sub-chunk-remainder",
        "groups-per-thread",
        "chunks-capped-groups-per-thread",
        "more-small-problems-per-thread",
        "never-fewer-than-the-group",
    ],
)
def test_krylov_ritz_chunks_do_not_change_the_result(
    monkeypatch, chunk, group, sub, threads, gram_examples
):
    import guessgrad.solvers.subspace as subspace

    gen = torch.Generator().manual_seed(17)
    w = torch.randn(24, 16, generator=gen, dtype=F64) / 4
    jac = MaskedLinearJacobian(w, random_masks(9, 16, gen, 0.3))
    whole = krylov_ritz(jac, 4, start_for(4, 16))
    # examples held at once (at most RITZ_GROUP), examples per small solve (per thread the
    # larger of RITZ_GROUP and the examples whose p × (p + b) Grams fit in RITZ_GRAM_BYTES, a
    # multiple of the chunk), examples per float64 product
    monkeypatch.setattr(subspace, "RITZ_GROUP", group)
    monkeypatch.setattr(subspace, "RITZ_GRAM_BYTES", gram_examples * 12 * 16 * 8)
    monkeypatch.setattr(subspace, "GRAM_BYTES", sub * (4 * 3 + 4) * 16 * 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    solved = []
    ritz = subspace._ritz_coefficients
    monkeypatch.setattr(
        subspace, "_ritz_coefficients", lambda full, *a: solved.append(len(full)) or ritz(full, *a)
    )
    chunked = krylov_ritz(jac, 4, start_for(4, 16), chunk=chunk)
    step = min(chunk, group)
    per_solve = step * -(-max(group, gram_examples) * threads // step)
    assert solved == [min(per_solve, 9 - lo) for lo in range(0, 9, per_solve)]
    torch.testing.assert_close(projector(chunked.vectors()), projector(whole.vectors()))
    torch.testing.assert_close(chunked.power, whole.power)
