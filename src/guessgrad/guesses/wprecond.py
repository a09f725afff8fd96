"""The W̃P guess: preconditioned W̃ᵀ, the paper's unbiased control (paper §2.7).

With the reduced SVD W̃_b = U Λ Vᵀ (r = min(m, n) singular values) and
W̃_σ = U (Λ² + σI)^{1/2} Vᵀ, the paper guesses

    y_b = (W̃_σᵀ W̃_σ)^{-1/2} W̃_σᵀ ε_b,   ε_b ~ N(0, I_m).

Argument map: ``sigma`` = σ (paper: 1e-5).  (W̃_σᵀW̃_σ)^{-1/2} is taken on the range of V
(pseudo-inverse square root), which is the only reading under which it exists when r < n.

Algebra the code makes visible: the σ-factors cancel, y_b = V Uᵀ ε_b, and

    Cov(y_b) = V Vᵀ,

the projector on the r-dimensional right singular space.  For square W̃_b (hidden layers of
equal width) r = n and Cov = I: unbiased, as the paper says.  For a wide W̃_b (the last
hidden layer, m = 10 classes) Cov is a rank-10 projector, the same as W̃⊥ with k ≥ 10.  See
``docs/wprecond.md``.

``solver="svd"`` computes the paper's formula literally, with one batched SVD per step.
``solver="closed-form"`` (the default) draws from the same Gaussian law without any SVD:
y_b = z_b ~ N(0, I) when m ≥ n, and y_b = V z_b with V from the m × m closed form of
:func:`~guessgrad.solvers.subspace.exact_row_space` when m < n.  The two differ only in
which realisation is drawn, not in distribution, as long as rank(W̃_b) = min(m, n).  For an
example whose W̃_b has rank r < m < n (fewer active units than classes, which needs very
narrow layers), the literal formula's V also holds m − r null-space directions of unit
weight, which the closed form leaves out.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from ..solvers.subspace import exact_row_space
from .base import Guess, Site, gaussian

__all__ = ["WPrecondGuess"]


class WPrecondGuess(Guess):
    """y_b = (W̃_σᵀ W̃_σ)^{-1/2} W̃_σᵀ ε_b: by the closed form (no SVD; the default) or by one
    batched SVD per step (``solver="svd"``, the literal formula); see the module docstring."""

    needs_jacobian = True

    def __init__(self, sigma: float = 1e-5, solver: str = "closed-form") -> None:
        if (
            not isinstance(sigma, numbers.Real)
            or isinstance(sigma, bool)
            or not sigma > 0
            or sigma == float("inf")
        ):
            raise ValueError(f"sigma must be a positive finite number, got sigma={sigma!r}")
        if solver not in ("svd", "closed-form"):
            raise ValueError(f"unknown solver {solver!r}; available: svd, closed-form")
        self.sigma = float(sigma)
        self.solver = solver

    def factor(self, site: Site) -> Tensor:
        """F_b with y_b = F_bᵀ ε_b and Cov(y_b) = F_bᵀ F_b, ``(B, m, n)``."""
        u, lam, vh = torch.linalg.svd(site.require_jacobian().dense(), full_matrices=False)
        shifted = lam.square() + self.sigma  # (B, r): eigenvalues of W̃_σᵀ W̃_σ on span V
        # W̃_σᵀ contributes (Λ²+σ)^{1/2}, the inverse square root (Λ²+σ)^{-1/2}
        gain = shifted.sqrt() * shifted.rsqrt()  # (B, r), = 1 up to rounding
        return (u * gain.unsqueeze(1)) @ vh

    def sample(
        self, site: Site, state: dict[str, Any], *, generator: torch.Generator | None
    ) -> Tensor:
        jac = site.require_jacobian()
        if self.solver == "closed-form" and jac.rows >= jac.cols:
            return gaussian((site.batch, site.width), site.s, generator)  # Cov = I
        f = self._closed_form(site) if self.solver == "closed-form" else self.factor(site)
        eps = gaussian((site.batch, 1, f.shape[1]), site.s, generator)
        return (eps @ f).squeeze(1)

    def covariance(self, site: Site, state: dict[str, Any]) -> Tensor:
        if self.solver == "closed-form":
            jac = site.require_jacobian()
            if jac.rows >= jac.cols:
                eye = torch.eye(site.width, dtype=site.s.dtype, device=site.s.device)
                return eye.expand(site.batch, -1, -1)
            f = self._closed_form(site)
        else:
            f = self.factor(site)
        return f.mT @ f

    def _closed_form(self, site: Site) -> Tensor:
        # m < n: V of the reduced SVD spans the m-dimensional row space (zero rows where
        # W̃_b has rank < m; the paper's V then holds arbitrary null directions of weight 1)
        jac = site.require_jacobian()
        return exact_row_space(jac, jac.rows)

    def __repr__(self) -> str:
        return f"WPrecondGuess(sigma={self.sigma!r}, solver={self.solver!r})"
