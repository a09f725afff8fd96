"""The W̃⊥ guess (paper §2.4) and its bottom-k control (§2.5).

With the SVD W̃_b = U Λ Vᵀ and V_k the right singular vectors of the k largest singular
values, the paper guesses

    y_b = V_k U_kᵀ ε_b,   ε_b ~ N(0, I_{d_{i+2}}),   so   Cov(y_b) = V_k V_kᵀ,

the orthogonal projector on the top-k right singular subspace of W̃_b.  Argument map:
``k`` = k, ``subspace="top"|"bottom"`` picks the largest or smallest singular values.

Departure (same law): since U_kᵀ ε_b ~ N(0, I_k), the code draws z_b ~ N(0, I_k) and
returns y_b = V_k z_b; it never needs U.  ``solver`` picks how V_k is computed:

- ``"svd"``: exact batched SVD of W̃_b (the paper's construction, slow); for the top-k
  subspace, of W̃_b's r active columns only (the others are zero; the same V_k, exactly, at
  about (r/n)² of the cost: :func:`~guessgrad.jacobians.dense_active`);
- ``"subspace"``: block Krylov from matrix products with Rayleigh–Ritz in the Krylov
  coordinates (:mod:`guessgrad.solvers.subspace`); y_b = V_k z_b is evaluated from the shared
  start block by Horner's rule, so no (B, k, n) basis is formed.  Where the next layer has at
  most k rows the top-k subspace is the whole row space of W̃_b and the guess is drawn in
  closed form, y_b = W̃_bᵀ L_b⁻ᵀ z_b with L_b L_bᵀ = W̃_b W̃_bᵀ (same law: Cov = the row-space
  projector; :func:`~guessgrad.solvers.subspace.row_space_sample`);
- ``"newton-schulz"``: the paper's W̃⊥-NS (§2.6, :mod:`guessgrad.solvers.newton_schulz`): a
  fitted odd polynomial applied 5 times to W̃_b/σ_1 gives F_b ≈ U_k V_kᵀ and y_b = F_bᵀ ε_b;
  σ_k/σ_1 is computed on the batch's first example and refreshed every ``refresh`` steps (50,
  as in the paper); where the first example's W̃_b is zero (no active unit), on the first
  example after it whose W̃_b is not (a departure: the paper's code would take 0).  The
  polynomial is iterated on the Gram matrix W̃_bᵀW̃_b restricted to W̃_b's active columns (the
  others are zero and stay zero), gathered from the shared W_{i+1}ᵀW_{i+1}, with the examples
  grouped by their number of active units so that each group is padded only to its own largest
  count; y_bᵀ = (ε_bᵀW̃_b) q(A_0) ⋯ q(A_{N−1}) needs
  W̃_b only through one shared product (:func:`~guessgrad.solvers.newton_schulz.ns_gram_apply`).
  σ̂_1 comes from power iteration through ``gram_apply``.  Same F_b as the dense polynomial
  (to rounding).  Where the next layer has at most k rows the top-k subspace is the whole row
  space and the closed form is used, as for ``"subspace"``.

``k="rank"`` (Table 1's "k = rank") takes every direction with a nonzero singular value,
per example: the whole row space of W̃_b, which contains g_b, so the guess is unbiased.
With ``solver="subspace"`` it is computed without any SVD: for a next layer with m ≥ n rows
and full column rank, the row space of W̃_b = W_{i+1} M_b is exactly the span of the active
units (any set of columns of a full-column-rank matrix is independent), so the guess is
y_b = M_b z_b, activation perturbation restricted to the active units; for m < n the closed
form above gives the m-dimensional row space.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ..checks import integer, optional_integer
from ..jacobians import (
    UpstreamJacobian,
    active_groups,
    column_gram,
    dense_active,
    expand_columns,
)
from ..solvers.newton_schulz import (
    load_coefficients,
    ns_gram_apply,
    power_sigma1,
    power_start,
    sigma_ratio,
)
from ..solvers.subspace import (
    DEFAULT_DEPTH,
    DEFAULT_RITZ_ITERS,
    exact_row_space,
    krylov_ritz,
    next_start,
    orthonormalize_rows,
    row_space_sample,
)
from ..solvers.svd import bottom_right_singular, rank_right_singular, top_right_singular
from .base import Guess, Site, gaussian

__all__ = ["WPerpGuess", "SOLVERS"]

#: solver names accepted by ``WPerpGuess``
SOLVERS = ("svd", "subspace", "newton-schulz")
#: steps between two σ_k/σ_1 estimates of the Newton–Schulz solver (paper §2.6)
NS_REFRESH = 50
#: examples whose Newton–Schulz Gram matrices are iterated together (grouped by active count)
NS_GROUP = 64
#: examples per block Krylov solve: bounds the solver's memory, keeps products large
DEFAULT_CHUNK: int | None = None
#: with ``chunk=None``, the solver's per-chunk workspace stays within this many bytes
CHUNK_BYTES = 5 * 2**20


class WPerpGuess(Guess):
    """y_b = V_k z_b, z_b ~ N(0, I_k): guesses in the top-k (or bottom-k) subspace of W̃_b.

    Args:
        k: subspace size k ≥ 1, or ``"rank"``.
        subspace: ``"top"`` (W̃⊥) or ``"bottom"`` (the W̃⊥-bottom control).
        solver: ``"svd"`` (the default of this low-level class: the exact reference),
            ``"subspace"`` or ``"newton-schulz"``; the ``WPerp`` estimator defaults to
            ``"subspace"``.
        depth: block Krylov depth for ``solver="subspace"`` (cost: depth + 1 block products).
        block: Krylov block size for ``solver="subspace"``; defaults to k.  A block larger
            than k (oversampling) widens the search space.
        ritz_iters: rounds of subspace iteration (each: T⁴ on k vectors, then a k × k
            Cholesky) that find the top-k eigenvectors of the small Rayleigh–Ritz matrix T of
            ``solver="subspace"`` (:func:`~guessgrad.solvers.subspace.krylov_ritz`).  The
            default, 2, suits k = 10; with k = 1 and a flat top of the spectrum (λ_2/λ_1 ≈ 0.9
            at initialisation) the Ritz vector converges only with more rounds and a block
            larger than k (``block=8, ritz_iters=8``; docs/benchmarks.md, "The other k of
            Table 1").
        warm_start: for ``solver="subspace"``, start each step's Krylov space from the block
            S carried over from the step before (True, the default: S follows the top-b
            eigenspace of the batch-mean Gram, one power step per call) or from the same fixed
            random block at every step (False: every call is independent of the earlier ones).
        chunk: examples whose Krylov blocks are held at once by ``solver="subspace"``; bounds
            the solver's extra memory instead of letting it grow with the batch.  ``None``
            (default) picks the largest chunk whose Krylov blocks, (depth + 2)·block·n
            numbers in the working dtype per example, fit in ``CHUNK_BYTES`` (5 MiB): 64
            examples at width 512 with k = 10; on CPU never more than
            :data:`~guessgrad.solvers.subspace.RITZ_GROUP` (64; the small Rayleigh–Ritz
            problems are solved for that many examples per torch thread at once, more for
            smaller problems than k = 10's).  Elsewhere
            the chunk may be as large as the batch (more memory, fewer kernel launches; not
            measured yet).
    """

    needs_jacobian = True

    def __init__(
        self,
        k: int | Literal["rank"] = 10,
        subspace: Literal["top", "bottom"] = "top",
        solver: str = "svd",
        *,
        depth: int = DEFAULT_DEPTH,
        block: int | None = None,
        chunk: int | None = DEFAULT_CHUNK,
        refresh: int = NS_REFRESH,
        ritz_iters: int = DEFAULT_RITZ_ITERS,
        warm_start: bool = True,
    ) -> None:
        # integers of any kind (NumPy's too) are taken as ints, booleans are not
        refresh = integer("refresh", refresh)
        chunk = optional_integer("chunk", chunk)
        depth = integer("depth", depth, minimum=0)
        block = optional_integer("block", block)
        ritz_iters = integer("ritz_iters", ritz_iters)
        if not (isinstance(k, str) and k == "rank"):
            try:
                k = integer("k", k)
            except ValueError:
                raise ValueError(f"k must be a positive integer or 'rank', got k={k!r}") from None
        if subspace not in ("top", "bottom"):
            raise ValueError(f"subspace must be 'top' or 'bottom', got subspace={subspace!r}")
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; available: {', '.join(SOLVERS)}")
        if solver != "svd" and subspace == "bottom":
            raise ValueError(
                f"solver={solver!r} computes top-k subspaces only; subspace='bottom' needs "
                "solver='svd'"
            )
        if solver == "newton-schulz" and k == "rank":
            raise ValueError(
                "k='rank' needs solver='svd' or solver='subspace' (the method 'w-perp'), not "
                "the Newton–Schulz solver of 'w-perp-ns'"
            )
        if k == "rank" and subspace == "bottom":
            raise ValueError("k='rank' is defined for subspace='top' only")
        if not isinstance(warm_start, (bool, np.bool_)):
            raise ValueError(f"warm_start must be True or False, got warm_start={warm_start!r}")
        if block is not None and isinstance(k, int) and block * (depth + 1) < k:
            raise ValueError(
                f"block·(depth + 1) = {block * (depth + 1)} is smaller than k={k}: the Krylov "
                "space cannot hold k directions"
            )
        self.k = k
        self.subspace = subspace
        self.solver = solver
        self.depth = depth
        # block = k is the default (None): one setting, one record in options() and run names
        self.block = None if block == k else block
        self.chunk = chunk
        self.refresh = refresh
        self.ritz_iters = ritz_iters
        self.warm_start = bool(warm_start)

    def basis(self, site: Site, state: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """Rows spanning the guessing subspace, ``(B, r, n)``, and the state updates."""
        jac = site.require_jacobian()
        if self.solver == "svd":
            if self.k == "rank":
                return rank_right_singular(jac.dense()), {}
            if self.subspace == "bottom":
                return bottom_right_singular(jac.dense(), self.k), {}
            w, index = dense_active(jac, self.k)  # (B, m, r): the columns that can be nonzero
            return expand_columns(top_right_singular(w, self.k), index, jac.cols), {}
        if self.k == "rank":
            if jac.rows < jac.cols:
                return exact_row_space(jac, jac.rows), {}
            eye = torch.eye(jac.cols, dtype=jac.dtype, device=jac.device)
            return jac.restrict(eye.expand(jac.batch, -1, -1)), {}  # (B, n, n) = M_b
        k = int(self.k)
        if jac.rows <= k:
            return exact_row_space(jac, k), {}
        if self.solver == "newton-schulz":  # F_b = I_m F_b
            eye = torch.eye(jac.rows, dtype=jac.dtype, device=jac.device)
            return self._ns_apply(jac, state, eye.expand(jac.batch, -1, -1))
        ritz, start = self._krylov(jac, state)
        return ritz.vectors(), {"start": start}

    def _ns_apply(
        self, jac: UpstreamJacobian, state: dict[str, Any], u: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        """u_b F_b with F_b = p^N(W̃_b/σ̂_b) ≈ U_k V_kᵀ for every example, ``u (B, c, m) ->
        (B, c, n)``, and the state updates (step count, σ_k/σ_1).

        From the Gram matrices alone (:func:`~guessgrad.solvers.newton_schulz.ns_gram_apply`):
        G_b on the active columns, in groups of ``NS_GROUP`` examples with similar active
        counts (:func:`~guessgrad.jacobians.active_groups`), the rows u_b W̃_b from one shared
        product, σ̂_b by power iteration through ``gram_apply``."""
        k = int(self.k)
        steps = state.get("ns_steps", 0)
        ratio = state.get("sigma_ratio")
        update: dict[str, Any] = {"ns_steps": steps + 1}
        # a ratio measured on a layer of another shape or dtype (the estimator moved to another
        # model) is not reused; a state without the key (older checkpoints) keeps its ratio
        key = (jac.rows, jac.cols, str(jac.dtype))
        if ratio is None or steps % self.refresh == 0 or state.get("ns_layer", key) != key:
            # the first example, as the paper's code, or the first with W̃_b ≠ 0 after it: an
            # example with no active unit would give 0 and the coarsest polynomial for 50 steps
            for b in range(jac.batch):
                first, _ = dense_active(jac.select(slice(b, b + 1)), k)
                if bool(first.any()):
                    break
            ratio = sigma_ratio(first[0], k)
            update.update(sigma_ratio=ratio, ns_layer=key)
        bsz, n = jac.batch, jac.cols
        start = jac.restrict(power_start(n, jac.dtype, jac.device).expand(bsz, n))
        sigma1 = power_sigma1(lambda v: jac.gram_apply(v, restricted=True), start)
        rows = jac.apply_t(u)  # (B, c, n)
        out = torch.zeros_like(rows)
        table = load_coefficients()
        for examples, index in active_groups(jac, k, NS_GROUP):
            part = rows[examples]
            if index is not None:
                part = torch.gather(part, 2, index.unsqueeze(1).expand(-1, part.shape[1], -1))
            gram = column_gram(jac, examples, index)
            res = ns_gram_apply(gram, part, sigma1[examples], ratio, table)
            out.index_copy_(0, examples, expand_columns(res, index, n))
        return out, update

    def _krylov(self, jac: UpstreamJacobian, state: dict[str, Any]) -> tuple[Any, Tensor]:
        """The block Krylov solve (:func:`~guessgrad.solvers.subspace.krylov_ritz`) and the
        next warm start."""
        k = int(self.k)
        b = min(self.block or k, jac.cols)
        start = state.get("start") if self.warm_start else None
        if start is None or start.shape != (b, jac.cols):
            start = _initial_start(b, jac.cols, jac.dtype, jac.device)
        else:  # a model moved to another device or dtype keeps its warm start
            start = start.to(dtype=jac.dtype, device=jac.device)
        per_example = (self.depth + 2) * b * jac.cols * _itemsize(jac.dtype)
        chunk = self.chunk or max(1, CHUNK_BYTES // per_example)
        ritz = krylov_ritz(
            jac,
            min(k, jac.cols),
            start,
            depth=self.depth,
            ritz_iters=self.ritz_iters,
            chunk=chunk,
        )
        return ritz, next_start(ritz.power, start) if self.warm_start else start

    def sample(
        self, site: Site, state: dict[str, Any], *, generator: torch.Generator | None
    ) -> Tensor:
        jac = site.require_jacobian()
        if self.solver == "subspace" and self.k == "rank" and jac.rows >= jac.cols:
            return jac.restrict(gaussian((site.batch, site.width), site.s, generator))
        if self.solver == "subspace" and self.k != "rank" and jac.rows > int(self.k):
            ritz, state["start"] = self._krylov(jac, state)
            return ritz.combine(gaussian((site.batch, ritz.k), site.s, generator))  # (B, n)
        if self.solver != "svd" and (self.k == "rank" or jac.rows <= int(self.k)):
            # the closed form: the whole row space of W̃_b, sampled without forming a basis
            z = gaussian((site.batch, jac.rows), site.s, generator)
            return row_space_sample(jac, z)
        if self.solver == "newton-schulz":  # y_bᵀ = ε_bᵀ F_b
            eps = gaussian((site.batch, 1, jac.rows), site.s, generator)  # (B, 1, m)
            y, update = self._ns_apply(jac, state, eps)
            state.update(update)
            return y.squeeze(1)  # (B, n)
        basis, update = self.basis(site, state)
        state.update(update)
        z = gaussian((site.batch, 1, basis.shape[1]), site.s, generator)  # (B, 1, r)
        return (z @ basis).squeeze(1)  # (B, n)

    def covariance(self, site: Site, state: dict[str, Any]) -> Tensor:
        basis, _ = self.basis(site, state)
        return basis.mT @ basis  # (B, n, n)

    def __repr__(self) -> str:
        return f"WPerpGuess(k={self.k!r}, subspace={self.subspace!r}, solver={self.solver!r})"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _initial_start(b: int, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # A fixed-seed random start: deterministic, and it neither reads nor advances the
    # caller's generator, so covariance() and sample() see the same basis.
    fixed = torch.Generator().manual_seed(0)
    start = torch.randn(b, m, generator=fixed, dtype=torch.float64).to(dtype=dtype, device=device)
    return orthonormalize_rows(start.unsqueeze(0))[0]
