"""Exact right-singular subspaces of W̃_b by batched SVD: the reference solver.

Paper §2.4: with the SVD W̃_b = U Λ Vᵀ, W̃⊥ guesses in span(V_k), the right singular
vectors of the k largest singular values; §2.5 (W̃⊥-bottom) uses the k smallest.  This is
the paper's own (slow) construction, one SVD per example.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "top_right_singular",
    "bottom_right_singular",
    "rank_right_singular",
    "numerical_rank",
]


def top_right_singular(w: Tensor, k: int) -> Tensor:
    """Rows V_kᵀ of the k largest right singular vectors of each W̃_b.

    Args:
        w: ``(B, m, n)`` the matrices W̃_b.
        k: subspace size; clipped to min(m, n), the number of singular values of the
            reduced SVD (for the last hidden layer, m = 10 < k is common).

    Returns:
        ``(B, min(k, m, n), n)`` orthonormal rows, largest singular value first.  Where W̃_b
        has rank r_b < k the rows past r_b span part of its null space, as the SVD returns.
    """
    _, _, vh = torch.linalg.svd(w, full_matrices=False)  # vh: (B, min(m, n), n)
    return vh[:, : min(k, vh.shape[1])]


def bottom_right_singular(w: Tensor, k: int) -> Tensor:
    """Rows of the k right singular vectors of the smallest singular values, (B, min(k, n), n).

    Uses the full SVD, so for a wide W̃_b (m < n) the n − m null-space directions, whose
    singular value is zero, count among the smallest: the gradient g_b = W̃_bᵀ g_{i+1}
    lies in the row space and has no component there.
    """
    _, _, vh = torch.linalg.svd(w, full_matrices=True)  # (B, n, n)
    n = vh.shape[-1]
    return vh[:, n - min(k, n) :].flip(1)


def numerical_rank(sv: Tensor, shape: tuple[int, int]) -> Tensor:
    """Per-example rank from singular values ``(B, r)``: count of σ_j > max(m, n)·eps·σ_1.

    The tolerance is ``torch.linalg.matrix_rank``'s default.
    """
    eps = torch.finfo(sv.dtype).eps
    tol = max(shape) * eps * sv[:, :1]
    return (sv > tol).sum(dim=1)


def rank_right_singular(w: Tensor) -> Tensor:
    """All right singular vectors with nonzero singular value, zero rows elsewhere.

    k = rank(W̃_b) chosen per example (paper Table 1's "k = rank"): the guess spans the
    whole row space of W̃_b, which contains g_b, so the guess is unbiased.  ``(B, min(m, n), n)``.
    """
    _, sv, vh = torch.linalg.svd(w, full_matrices=False)
    rank = numerical_rank(sv, (w.shape[1], w.shape[2]))  # (B,)
    keep = torch.arange(vh.shape[1], device=w.device).unsqueeze(0) < rank.unsqueeze(1)
    return vh * keep.unsqueeze(-1).to(vh.dtype)
