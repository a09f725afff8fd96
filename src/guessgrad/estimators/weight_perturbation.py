"""Weight perturbation (Baydin et al. 2022; paper §2.1).

One matrix V_i ~ N(0, I) shaped like W_i (and v_i ~ N(0, I) shaped like b_i) per layer and
step, shared by the whole batch.  The tangent of s_i gains V_i x_i + v_i, the forward pass
gives d_b, and

    est(∂L/∂W_i) = (Σ_b d_b) V_i,    est(∂L/∂b_i) = (Σ_b d_b) v_i.

Unbiased, with variance that grows with the number of weights.  Frozen parameters
(``requires_grad=False``) are not perturbed, so they add no noise to the others' estimates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..guesses.base import Site, gaussian
from .base import Estimator
from .forward_mode import tangent_forward

__all__ = ["WeightPerturbation"]


class WeightPerturbation(Estimator):
    """est(∂L/∂θ) = (∇_θ L · V) V with V ~ N(0, I) over all weights and biases."""

    name = "weight-perturbation"

    def _estimate(
        self, layers: list[nn.Linear], x: Tensor, y: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, list[tuple[nn.Parameter, Tensor]]]:
        directions: list[tuple[nn.Parameter, Tensor]] = []

        def inject(site: Site) -> Tensor:
            # frozen parameters are not perturbed: their terms would only add noise to d
            layer = layers[site.index]
            v_w = v_b = None
            if layer.weight.requires_grad:
                v_w = gaussian(tuple(layer.weight.shape), layer.weight, generator)
                directions.append((layer.weight, v_w))
            if layer.bias is not None and layer.bias.requires_grad:
                v_b = gaussian(tuple(layer.bias.shape), layer.bias, generator)
                directions.append((layer.bias, v_b))
            if v_w is not None:
                return F.linear(site.x, v_w, v_b)  # (B, d_{i+1}) = V_i x_i + v_i
            out = torch.zeros_like(site.s)
            return out if v_b is None else out.add_(v_b)

        result = tangent_forward(layers, x, y, inject)
        total = result.d.sum()
        return result.loss, [(p, total * v) for p, v in directions]
