"""The W̃ᵀ guess (Singhal et al. 2023; paper §2.3).

    y_b = W̃_bᵀ ε_b,    W̃_b = W_{i+1} M_i^b,    ε_b ~ N(0, I_{d_{i+2}}),

so Cov(y_b) = W̃_bᵀ W̃_b = M_b W_{i+1}ᵀ W_{i+1} M_b ≠ I: biased, bias (W̃ᵀW̃ − I) g.
One product with the next layer's weight for the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Guess, Site, gaussian

__all__ = ["WTransposeGuess"]


class WTransposeGuess(Guess):
    needs_jacobian = True

    def sample(
        self, site: Site, state: dict[str, Any], *, generator: torch.Generator | None
    ) -> Tensor:
        jac = site.require_jacobian()
        eps = gaussian((site.batch, jac.rows), site.s, generator)  # (B, m)
        return jac.apply_t(eps)  # (B, n)

    def covariance(self, site: Site, state: dict[str, Any]) -> Tensor:
        w = site.require_jacobian().dense()  # (B, m, n)
        return w.transpose(1, 2) @ w
