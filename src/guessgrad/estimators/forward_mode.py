"""One forward pass that carries a single tangent, with guesses injected at every layer.

Paper §2 ("How one step works"): the tangent of s_i gains the guess of layer i on top
of what flows in from earlier layers through W_i and the ReLU masks,

    ṡ_i = W_i ẋ_i + v_i,    ẋ_{i+1} = M_i ṡ_i,    ẋ_1 = 0,

and the per-example loss CE_b / B gives one directional derivative per example,

    d_b = ∇_{s_l} (CE_b / B) · ṡ_l^b = Σ_i g_i^b · v_i^b,    g_i^b = ∂(CE_b / B)/∂s_i^b.

The tangent is propagated by hand (each supported module has a one-line rule), which
costs one extra matrix product per layer and builds no autograd graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..guesses.base import Site
from ..jacobians import MaskedLinearJacobian

__all__ = ["TangentPass", "tangent_forward"]


@dataclass
class TangentPass:
    """What one forward pass with a tangent returns.

    Attributes:
        loss: 0-d batch-mean cross-entropy.
        d: ``(B,)`` directional derivatives d_b of CE_b / B along the injected tangent.
        sites: one :class:`Site` per layer (inputs, pre-activations, upstream Jacobians).
        injected: the tangent v_i added at each layer's pre-activation, ``(B, d_{i+1})``.
        logits: ``(B, C)``.
    """

    loss: Tensor
    d: Tensor
    sites: list[Site]
    injected: list[Tensor]
    logits: Tensor


def tangent_forward(
    layers: list[nn.Linear], x: Tensor, y: Tensor, inject: Callable[[Site], Tensor]
) -> TangentPass:
    """Run the MLP given by ``layers`` on ``x`` with tangent injections ``inject(site)``."""
    bsz = x.shape[0]
    h, t = x, None  # x_i and its tangent ẋ_i (None = 0)
    sites: list[Site] = []
    injected: list[Tensor] = []
    s = x
    last = len(layers) - 1
    for i, linear in enumerate(layers):
        s = F.linear(h, linear.weight, linear.bias)  # (B, d_{i+1})
        jac = None
        if i < last:
            # M_i; ReLU'(0) = 0 as in autograd (written as floats directly, not as a bool
            # mask converted in a second pass)
            mask = torch.gt(s, 0, out=torch.empty_like(s))
            jac = MaskedLinearJacobian(layers[i + 1].weight, mask)
        site = Site(index=i, x=h, s=s, jacobian=jac)
        v = inject(site)
        ts = v if t is None else torch.addmm(v, t, linear.weight.T)  # W_i ẋ_i + v_i
        sites.append(site)
        injected.append(v)
        if jac is not None:
            # masked in place unless ts is the injected guess itself, which the caller keeps
            h, t = torch.relu(s), ts.mul_(jac.mask) if ts is not v else ts * jac.mask
    log_p = F.log_softmax(s, dim=1)
    loss = F.nll_loss(log_p, y)
    residual = log_p.exp()  # ∂CE_b/∂s_l = softmax − onehot
    residual[torch.arange(bsz, device=s.device), y] -= 1.0
    d = (residual * ts).sum(dim=1) / bsz
    return TangentPass(loss=loss, d=d, sites=sites, injected=injected, logits=s)
