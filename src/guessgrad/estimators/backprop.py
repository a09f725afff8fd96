"""Backpropagation: the exact gradient, the reference every estimator is measured against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Estimator

__all__ = ["Backprop"]


class Backprop(Estimator):
    """∂L/∂p by reverse-mode autograd (one forward and one backward pass)."""

    name = "backprop"
    uses_backprop = True

    def _estimate(
        self, layers: list[nn.Linear], x: Tensor, y: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, list[tuple[nn.Parameter, Tensor]]]:
        params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
        with torch.enable_grad():
            h = x
            for i, layer in enumerate(layers):
                h = layer(h)
                if i < len(layers) - 1:
                    h = F.relu(h)
            loss = F.cross_entropy(h, y)
            grads = torch.autograd.grad(loss, params) if params else ()
        return loss, list(zip(params, grads))
