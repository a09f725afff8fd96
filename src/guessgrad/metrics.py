"""Bias, variance, covariance norm, overlap and alignment of an estimator (paper §3).

For hidden layer i, with g_b = ∂L/∂s_i^b from backprop (L the batch-mean loss), the guess
covariance C_b = Cov(y_i^b) and the estimate ĝ_b = d_b y_i^b:

- Bias (Eq. 17):       ‖ (1/B) Σ_b (C_b − I) g_b ‖₂
- Variance (Eq. 18):   ‖ (1/B) Σ_b E(g_b − ĝ_b)^∘2 − ((1/B) Σ_b (C_b − I) g_b)^∘2 ‖₂
- Cov. norm:           sqrt(mean_b ‖C_b − I‖_F² / d²)   (the paper's code convention)
- Overlap (Eq. 19):    mean_b ‖V_k V_kᵀ g_b‖² / ‖g_b‖²  (V_k: top-k right singular vectors of W̃_b)
- Cosine:              mean over draws of cos(est ∂L/∂W_i, ∂L/∂W_i)  (logged by the paper's code)

The paper estimates the expectation in Eq. 18 from one guess per example; here it is the mean
over ``samples`` independent draws (``variance``), and also exact (``variance_exact``) from the
Gaussian moment identities, for y ~ N(0, C) and d = Σ_j g_j·y_j over all layers j:

    E[ĝ] = C g,    E[ĝ ĝᵀ] = (gᵀCg + c) C + 2 C g gᵀ C,    c = Σ_{j≠i} g_jᵀ C_j g_j,

where c is the cross-layer noise that other layers' guesses put into d_b.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import integer, optional_integer
from .estimators.base import Estimator, check_generator, prepare_batch
from .estimators.forward_gradient import ForwardGradient
from .estimators.registry import make_estimator
from .guesses import Guess, Site, WPerpGuess
from .solvers.svd import top_right_singular

__all__ = ["LayerDiagnostics", "diagnose", "true_gradients", "overlap", "subspace_fidelity"]


@dataclass(frozen=True)
class LayerDiagnostics:
    """One hidden layer's statistics; ``None`` where the estimator has no guess covariance and
    for a frozen layer, whose ``cosine`` is NaN (no estimator estimates it).  ``k`` is the
    subspace size asked for; the overlap uses min(k, rows, columns of W̃_b) directions.
    ``layer`` is the index of the hidden layer from 0 (the first hidden layer, the paper's
    "layer 1", is 0)."""

    layer: int
    width: int
    samples: int
    bias: float | None
    bias_mc: float | None
    variance: float | None
    variance_exact: float | None
    cov_norm: float | None
    overlap: float | None
    k: int
    cosine: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def true_gradients(
    layers: list[nn.Linear], x: Tensor, y: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """Backprop's per-example pre-activation gradients g_i = ∂L/∂s_i ``(B, d_{i+1})`` and
    weight gradients ∂L/∂W_i, for the batch-mean cross-entropy L."""
    with torch.enable_grad():
        h = x
        pre: list[Tensor] = []
        for i, layer in enumerate(layers):
            s = F.linear(
                h, layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
            )
            s.requires_grad_(True)
            pre.append(s)
            h = F.relu(s) if i < len(layers) - 1 else s
        loss = F.cross_entropy(h, y.long())
        g = list(torch.autograd.grad(loss, pre))
    inputs = [x] + [F.relu(s.detach()) for s in pre[:-1]]
    return g, [gi.T @ xi for gi, xi in zip(g, inputs)]


def overlap(jacobian_dense: Tensor, g: Tensor, k: int) -> float:
    """Eq. 19: mean over examples with g_b ≠ 0 of ‖V_kᵀ g_b‖² / ‖g_b‖² (exact SVD)."""
    v = top_right_singular(jacobian_dense, k)  # (B, k, n)
    proj = (v @ g.unsqueeze(-1)).squeeze(-1).square().sum(1)
    norm = g.square().sum(1)
    alive = norm > 0
    if not bool(alive.any()):
        return float("nan")
    return float((proj[alive] / norm[alive]).mean())


def subspace_fidelity(jacobian_dense: Tensor, basis: Tensor, k: int) -> float:
    """Energy fidelity of a solver's basis: mean_b tr(Vᵀ G_b V) / Σ_{j≤k} λ_j(G_b).

    ``basis`` is ``(B, r, n)`` with orthonormal (or zero) rows, G_b = W̃_bᵀ W̃_b; 1.0 = exact.
    Examples whose top-k eigenvalues are all zero are skipped.  Computed in float64 on the
    CPU, whose LAPACK runs a batch of medium-sized SVDs faster than a GPU's solvers.
    """
    w = jacobian_dense.to("cpu", torch.float64)
    sv = torch.linalg.svdvals(w)  # (B, min(m, n))
    top = sv[:, :k].square().sum(1)
    wb = w @ basis.to("cpu", torch.float64).mT  # (B, m, r)
    captured = wb.square().sum((1, 2))
    alive = top > 0
    return float((captured[alive] / top[alive]).mean())


def _norm(v: Tensor) -> float:
    return float(torch.linalg.vector_norm(v))


def diagnose(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    est: Estimator | str,
    *,
    samples: int = 16,
    k: int | None = None,
    generator: torch.Generator | None = None,
) -> list[LayerDiagnostics]:
    """Statistics of ``est`` on one batch, one record per hidden layer (paper §3).

    Args:
        model, x, y: the network and batch, as for ``est.estimate``.
        est: any estimator, or a registry name (``make_estimator(est)``, default options).
            Bias, variance, cov. norm need a guess covariance and are ``None`` for estimators
            without one (backprop, weight perturbation), and for a frozen layer, which no
            estimator estimates (its cosine is NaN).
        samples: independent draws per example for the Monte-Carlo expectations.
        k: the subspace size of the overlap, a positive integer; defaults to the estimator's
            k, else 10.
        generator: source of the guesses' randomness.

    Every draw starts from the estimator's current state (a copy): diagnosing does not
    advance warm starts or counters, and all draws share one covariance per example.
    """
    if isinstance(est, str):
        est = make_estimator(est)
    if not isinstance(est, Estimator):
        raise TypeError(
            f"est must be an estimator (e.g. guessgrad.make_estimator('w-perp')) or a registry "
            f"name, got {est!r}"
        )
    samples = integer("samples", samples)
    k = optional_integer("k", k)
    layers, x, y = prepare_batch(model, x, y, "diagnose")
    check_generator(generator, x.device)
    g_true, w_true = true_gradients(layers, x, y)
    hidden = range(len(layers) - 1)
    if k is None:
        gk = getattr(est, "guess", None)
        k = gk.k if isinstance(gk, WPerpGuess) and isinstance(gk.k, int) else 10

    with torch.no_grad():
        cos_sum = [0.0 for _ in hidden]
        if not isinstance(est, ForwardGradient):
            return _cosine_only(layers, x, y, est, samples, generator, w_true, k)

        saved = copy.deepcopy(est.state)
        covs: dict[int, Tensor] = {}
        jdense: dict[int, Tensor] = {}

        def record(site: Site, guess: Guess, state: dict[str, Any]) -> None:
            if site.index not in covs:
                covs[site.index] = guess.covariance(site, state)
                if site.jacobian is not None:
                    jdense[site.index] = site.jacobian.dense()

        g_hat_sum = [torch.zeros_like(g_true[i]) for i in hidden]
        sq_err_sum = [torch.zeros_like(g_true[i]) for i in hidden]
        for _ in range(samples):
            est.state = copy.deepcopy(saved)
            tp = est.tangent_pass(layers, x, y, generator=generator, on_site=record)
            for i in hidden:
                g_hat = tp.d.unsqueeze(1) * tp.injected[i]  # (B, n)
                g_hat_sum[i] += g_hat
                sq_err_sum[i] += (g_true[i] - g_hat).square()
                w_hat = g_hat.T @ tp.sites[i].x
                cos_sum[i] += float(
                    F.cosine_similarity(w_hat.flatten(), w_true[i].flatten(), dim=0)
                )
        est.state = saved
        for j, site in enumerate(tp.sites):  # frozen layers get no guess: C_j = 0
            if j not in covs:
                n = site.s.shape[1]
                covs[j] = site.s.new_zeros(site.s.shape[0], n, n)
                if site.jacobian is not None:
                    jdense[j] = site.jacobian.dense()

        # g_jᵀ C_j g_j for every layer (output layer included): the cross-layer noise
        gcg = [
            (covs[j] @ g_true[j].unsqueeze(-1)).squeeze(-1).mul(g_true[j]).sum(1)
            for j in range(len(layers))
        ]
        total = torch.stack(gcg).sum(0)  # (B,)
        records = []
        for i in hidden:
            g, c = g_true[i], covs[i]
            cg = (c @ g.unsqueeze(-1)).squeeze(-1)  # (B, n)
            bias_vec = (cg - g).mean(0)
            eye = torch.eye(g.shape[1], dtype=g.dtype, device=g.device)
            mse_exact = total.unsqueeze(1) * torch.diagonal(c, dim1=1, dim2=2) + 2 * cg.square()
            mse_exact = mse_exact - 2 * g * cg + g.square()
            mc_bias_vec = (g_hat_sum[i] / samples - g).mean(0)
            cov_norm = math.sqrt(float((c - eye).square().sum((1, 2)).mean()) / g.shape[1] ** 2)
            stats = LayerDiagnostics(
                layer=i,
                width=g.shape[1],
                samples=samples,
                bias=_norm(bias_vec),
                bias_mc=_norm(mc_bias_vec),
                variance=_norm((sq_err_sum[i] / samples).mean(0) - bias_vec.square()),
                variance_exact=_norm(mse_exact.mean(0) - bias_vec.square()),
                cov_norm=cov_norm,
                overlap=overlap(jdense[i], g, k),
                k=k,
                cosine=cos_sum[i] / samples,
            )
            if not any(p.requires_grad for p in layers[i].parameters()):
                # not estimated (no guess), as for backprop: no estimator statistics
                stats = replace(
                    stats,
                    bias=None,
                    bias_mc=None,
                    variance=None,
                    variance_exact=None,
                    cov_norm=None,
                    cosine=math.nan,
                )
            records.append(stats)
        return records


def _cosine_only(
    layers: list[nn.Linear],
    x: Tensor,
    y: Tensor,
    est: Estimator,
    samples: int,
    generator: torch.Generator | None,
    w_true: list[Tensor],
    k: int,
) -> list[LayerDiagnostics]:
    """Cosine similarity only, for estimators without a guess covariance.  The estimates are
    taken from the estimator directly, not through ``p.grad`` (left as it was): a frozen
    layer, whose ``p.grad`` the estimator does not write, would read a stale gradient."""
    saved_state = copy.deepcopy(est.state)
    hidden = range(len(layers) - 1)
    cos = [0.0 for _ in hidden]
    for _ in range(samples):
        est.state = copy.deepcopy(saved_state)
        _, pairs = est._estimate(layers, x, y, generator)
        found = {id(param): grad for param, grad in pairs}
        for i in hidden:
            w_hat = found.get(id(layers[i].weight))
            cos[i] += (
                float("nan")
                if w_hat is None
                else float(F.cosine_similarity(w_hat.flatten(), w_true[i].flatten(), dim=0))
            )
    est.state = saved_state
    return [
        LayerDiagnostics(
            layer=i,
            width=layers[i].out_features,
            samples=samples,
            bias=None,
            bias_mc=None,
            variance=None,
            variance_exact=None,
            cov_norm=None,
            overlap=None,
            k=k,
            cosine=cos[i] / samples,
        )
        for i in hidden
    ]
