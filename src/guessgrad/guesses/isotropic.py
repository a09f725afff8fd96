"""Activation perturbation (Ren et al. 2023; paper §2.2): y_b ~ N(0, I)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Guess, Site, gaussian

__all__ = ["IsotropicGuess"]


class IsotropicGuess(Guess):
    """y_b ~ N(0, I_{d_{i+1}}); C_b = I, so ĝ is unbiased."""

    def sample(
        self, site: Site, state: dict[str, Any], *, generator: torch.Generator | None
    ) -> Tensor:
        return gaussian((site.batch, site.width), site.s, generator)

    def covariance(self, site: Site, state: dict[str, Any]) -> Tensor:
        eye = torch.eye(site.width, dtype=site.s.dtype, device=site.s.device)
        return eye.expand(site.batch, -1, -1)
