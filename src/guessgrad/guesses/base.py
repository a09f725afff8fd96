"""What a guess is: a random direction for one layer's pre-activation gradient.

Paper §2: for layer i and example b a guess y_i^b ∈ R^{d_{i+1}} is drawn, the forward
pass returns d_b = Σ_i g_i^b · y_i^b (g_i^b = dL/ds_i^b), and ĝ_i^b = d_b y_i^b estimates
g_i^b.  If y ~ N(0, C) then E[ĝ] = C g (bias (C − I) g), so a guess is characterised by
its sampler and its covariance C_b, which the metrics need exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..jacobians import UpstreamJacobian

__all__ = ["Site", "Guess", "gaussian"]


@dataclass(frozen=True)
class Site:
    """Everything a guess may look at for one layer of one forward pass.

    Attributes:
        index: layer number i, 0-based.
        x: ``(B, d_i)`` the layer's input x_i.
        s: ``(B, d_{i+1})`` the layer's pre-activation s_i.
        jacobian: the upstream Jacobians W̃_b of this layer's output, or ``None`` for the
            output layer, which has no next layer.
    """

    index: int
    x: Tensor
    s: Tensor
    jacobian: UpstreamJacobian | None

    @property
    def batch(self) -> int:
        return self.s.shape[0]

    @property
    def width(self) -> int:
        return self.s.shape[1]

    def require_jacobian(self) -> UpstreamJacobian:
        """The upstream Jacobians; ``ValueError`` at the output layer, which has none."""
        if self.jacobian is None:
            raise ValueError(
                f"layer {self.index} is the output layer: it has no upstream Jacobian, which "
                "this guess needs (use it for hidden layers only)"
            )
        return self.jacobian


def gaussian(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal samples with ``like``'s dtype and device, drawn from ``generator``."""
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)


class Guess(ABC):
    """A Gaussian guess y_b ~ N(0, C_b) for the pre-activation gradient of one layer.

    ``state`` is a per-layer dictionary owned by the estimator (warm starts, refresh
    counters).  ``covariance(site, state)`` must not modify it and returns the covariance
    of the next ``sample(site, state)``.
    """

    #: whether the guess needs ``site.jacobian``: hidden layers only (``ForwardGradient`` refuses it
    #: as the output layer's guess)
    needs_jacobian: bool = False

    @abstractmethod
    def sample(
        self, site: Site, state: dict[str, Any], *, generator: torch.Generator | None
    ) -> Tensor:
        """One guess per example, ``(B, d_{i+1})``: a new tensor, which the caller owns and
        may overwrite (the estimators scale it by d_b in place)."""

    @abstractmethod
    def covariance(self, site: Site, state: dict[str, Any]) -> Tensor:
        """Exact covariance C_b of the guess, ``(B, d_{i+1}, d_{i+1})``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
