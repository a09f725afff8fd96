"""Forward-gradient estimators that guess the pre-activation gradients (paper §2.2–2.7).

One step (paper §2, "How one step works"): draw one guess y_i^b per layer and example,
run one forward pass that adds every y_i to the tangent of s_i, read off d_b, and set

    ĝ_i^b = d_b y_i^b,    est(∂L/∂W_i) = Σ_b ĝ_i^b x_i^bᵀ,    est(∂L/∂b_i) = Σ_b ĝ_i^b.

Guesses are not rescaled; other layers' guesses leak into d_b (cross-layer noise, part of the
method).  Hidden layers use ``guess``; the output layer, which has no next layer, uses
``output_guess`` (activation perturbation, as the paper's code does for methods 3–7).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..guesses import Guess, IsotropicGuess, Site, WPerpGuess, WPrecondGuess, WTransposeGuess
from ..guesses.wperp import DEFAULT_CHUNK, NS_REFRESH
from ..solvers.subspace import DEFAULT_DEPTH, DEFAULT_RITZ_ITERS
from .base import Estimator
from .forward_mode import TangentPass, tangent_forward

__all__ = [
    "ForwardGradient",
    "ActivationPerturbation",
    "WTranspose",
    "WPerp",
    "WPrecond",
]


class ForwardGradient(Estimator):
    """ĝ_i^b = d_b y_i^b with y_i from ``guess`` (hidden layers) or ``output_guess`` (last layer).

    Args:
        guess: the :class:`~guessgrad.guesses.Guess` for hidden layers.
        output_guess: the guess for the output layer; defaults to activation perturbation.
            A guess that needs the upstream Jacobian (``needs_jacobian``) is refused there.
    """

    name = "forward-gradient"

    def __init__(self, guess: Guess, output_guess: Guess | None = None) -> None:
        super().__init__()
        self.guess = guess
        self.output_guess = output_guess if output_guess is not None else IsotropicGuess()
        if self.output_guess.needs_jacobian:
            raise ValueError(
                f"output_guess {self.output_guess!r} needs an upstream Jacobian, which the "
                "output layer does not have (it has no next layer); use it as `guess`"
            )

    def guess_for(self, site: Site) -> Guess:
        """The guess used at ``site``."""
        return self.guess if site.jacobian is not None else self.output_guess

    def tangent_pass(
        self,
        layers: list[nn.Linear],
        x: Tensor,
        y: Tensor,
        *,
        generator: torch.Generator | None = None,
        on_site: Callable[[Site, Guess, dict[str, Any]], None] | None = None,
    ) -> TangentPass:
        """One forward pass with fresh guesses; ``on_site(site, guess, state)`` is called
        before each layer's guess is drawn (the metrics use it to read covariances).

        A layer whose parameters are all frozen gets no guess (a zero tangent, no
        ``on_site`` call): its guess would estimate nothing and only add cross-layer noise to
        the other layers' d_b (the paper trains every layer; this is the same estimator
        with the frozen layers' terms dropped from d_b)."""
        frozen = {i for i, layer in enumerate(layers) if not _trainable(layer)}

        def inject(site: Site) -> Tensor:
            if site.index in frozen:
                return torch.zeros_like(site.s)
            guess = self.guess_for(site)
            state = self.state.setdefault(site.index, {})
            if on_site is not None:
                on_site(site, guess, state)
            return guess.sample(site, state, generator=generator)

        with torch.no_grad():
            return tangent_forward(layers, x, y, inject)

    def _estimate(
        self, layers: list[nn.Linear], x: Tensor, y: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, list[tuple[nn.Parameter, Tensor]]]:
        result = self.tangent_pass(layers, x, y, generator=generator)
        grads: list[tuple[nn.Parameter, Tensor]] = []
        for layer, site, guess in zip(layers, result.sites, result.injected):
            g_hat = guess.mul_(result.d.unsqueeze(1))  # (B, d_{i+1}) = ĝ_i, in place
            grads.append((layer.weight, g_hat.T @ site.x))
            if layer.bias is not None:
                grads.append((layer.bias, g_hat.sum(0)))
        return result.loss, grads

    def options(self) -> dict[str, Any]:
        return {"guess": repr(self.guess), "output_guess": repr(self.output_guess)}


def _trainable(layer: nn.Module) -> bool:
    return any(p.requires_grad for p in layer.parameters())


class ActivationPerturbation(ForwardGradient):
    """Activation perturbation (Ren et al. 2023; paper §2.2): y_i^b ~ N(0, I). Unbiased."""

    name = "activation-perturbation"

    def __init__(self) -> None:
        super().__init__(IsotropicGuess())

    def options(self) -> dict[str, Any]:
        return {}


class WTranspose(ForwardGradient):
    """W̃ᵀ (Singhal et al. 2023; paper §2.3): y = W̃_bᵀ ε, W̃_b = W_{i+1} M_i^b. Biased."""

    name = "w-transpose"

    def __init__(self) -> None:
        super().__init__(WTransposeGuess())

    def options(self) -> dict[str, Any]:
        return {}


class WPerp(ForwardGradient):
    """W̃⊥ (paper §2.4, the paper's method; §2.5 with ``subspace="bottom"``).

    y_b = V_k z_b, z_b ~ N(0, I_k), V_k the top-k (or bottom-k) right singular vectors of
    W̃_b; Cov(y_b) = V_k V_kᵀ.  See :class:`~guessgrad.guesses.WPerpGuess` for the options and
    for where the code departs from the paper.

    Args:
        k: subspace size (paper default and best: 10), or ``"rank"``.
        subspace: ``"top"`` or ``"bottom"``.
        solver: ``"subspace"`` (block Krylov, fast; the default), ``"svd"`` (exact, the
            paper's construction; needed for ``subspace="bottom"``) or
            ``"newton-schulz"`` (the paper's W̃⊥-NS, §2.6).
        depth, block, chunk, ritz_iters, warm_start: block Krylov depth, block size, examples
            per solve, rounds of the small Rayleigh–Ritz iteration and whether each step starts
            from the last one's subspace, for ``solver="subspace"``.
        refresh: steps between σ_k/σ_1 estimates for ``solver="newton-schulz"``.
    """

    name = "w-perp"

    def __init__(
        self,
        k: int | Literal["rank"] = 10,
        subspace: Literal["top", "bottom"] = "top",
        solver: str = "subspace",
        *,
        depth: int = DEFAULT_DEPTH,
        block: int | None = None,
        chunk: int | None = DEFAULT_CHUNK,
        refresh: int = NS_REFRESH,
        ritz_iters: int = DEFAULT_RITZ_ITERS,
        warm_start: bool = True,
    ) -> None:
        super().__init__(
            WPerpGuess(
                k,
                subspace,
                solver,
                depth=depth,
                block=block,
                chunk=chunk,
                refresh=refresh,
                ritz_iters=ritz_iters,
                warm_start=warm_start,
            )
        )

    def options(self) -> dict[str, Any]:
        g = self.guess
        assert isinstance(g, WPerpGuess)
        opts: dict[str, Any] = {"k": g.k, "subspace": g.subspace, "solver": g.solver}
        if g.solver == "subspace":
            opts.update(
                depth=g.depth,
                block=g.block,
                chunk=g.chunk,
                ritz_iters=g.ritz_iters,
                warm_start=g.warm_start,
            )
        if g.solver == "newton-schulz":
            opts.update(refresh=g.refresh)
        return opts


class WPrecond(ForwardGradient):
    """W̃P (paper §2.7): y = (W̃_σᵀW̃_σ)^{-1/2} W̃_σᵀ ε, the unbiased control.

    Args:
        sigma: σ of W̃_σ = U (Λ² + σI)^{1/2} Vᵀ (paper: 1e-5).
        solver: ``"closed-form"`` (same law, no SVD) or ``"svd"`` (the literal formula).
    """

    name = "w-precond"

    def __init__(self, sigma: float = 1e-5, solver: str = "closed-form") -> None:
        super().__init__(WPrecondGuess(sigma, solver))

    def options(self) -> dict[str, Any]:
        g = self.guess
        assert isinstance(g, WPrecondGuess)
        return {"sigma": g.sigma, "solver": g.solver}
