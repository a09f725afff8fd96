"""Solvers for the per-example subspaces that W̃⊥ guesses in.

- :mod:`.svd`: exact batched SVD, the paper's construction and the reference.
- :mod:`.subspace`: block Krylov from large matrix products, and the closed form for
  next layers with at most k rows.
- :mod:`.newton_schulz`: the fitted odd polynomials of W̃⊥-NS.
"""

from .newton_schulz import load_coefficients, ns_factor, sigma_ratio
from .subspace import block_krylov, exact_row_space, orthonormalize_rows, rayleigh_ritz
from .svd import bottom_right_singular, numerical_rank, rank_right_singular, top_right_singular

__all__ = [
    "block_krylov",
    "bottom_right_singular",
    "exact_row_space",
    "load_coefficients",
    "ns_factor",
    "numerical_rank",
    "orthonormalize_rows",
    "rank_right_singular",
    "rayleigh_ritz",
    "sigma_ratio",
    "top_right_singular",
]
