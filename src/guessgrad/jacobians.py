"""Per-example upstream Jacobians W̃_b, applied matrix-free.

Paper §2.3: by the chain rule the pre-activation gradient of hidden layer i is

    g_i^b = M_i^b W_{i+1}ᵀ g_{i+1}^b = W̃_bᵀ g_{i+1}^b,     W̃_b = W_{i+1} M_i^b,

with M_i^b the diagonal ReLU-derivative mask of example b.  W̃_b is an (m × n) matrix,
m = d_{i+2} rows (the next layer's width) and n = d_{i+1} columns (this layer's width).

Guesses and solvers only ever touch W̃ through this small interface (``apply``,
``apply_t``, ``gram_apply`` and, for exact reference solvers, ``dense``), so that a
convolutional or residual block can supply its own Jacobian without changing them.

Vectors are batched with the example first and the coordinate last: a block of p vectors
per example has shape ``(B, p, n)``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "UpstreamJacobian",
    "MaskedLinearJacobian",
    "dense_active",
    "expand_columns",
    "active_groups",
    "column_gram",
]


@runtime_checkable
class UpstreamJacobian(Protocol):
    """The per-example upstream Jacobians W̃_b, b = 1..B, each (rows × cols)."""

    @property
    def batch(self) -> int: ...

    @property
    def rows(self) -> int: ...

    @property
    def cols(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def apply(self, v: Tensor) -> Tensor:
        """W̃_b v_b: ``(B, ..., cols) -> (B, ..., rows)``."""
        ...

    def apply_t(self, u: Tensor) -> Tensor:
        """W̃_bᵀ u_b: ``(B, ..., rows) -> (B, ..., cols)``."""
        ...

    def gram_apply(
        self, v: Tensor, *, restricted: bool = False, out: Tensor | None = None
    ) -> Tensor:
        """G_b v_b with G_b = W̃_bᵀ W̃_b: ``(B, ..., cols) -> (B, ..., cols)``.

        ``restricted=True`` promises v_b = P_b v_b (see ``restrict``), which lets an
        implementation skip work (for ReLU masks: the mask on the input side).  ``out``, a
        contiguous tensor of the result's shape, receives the result (and is returned)."""
        ...

    def dense(self) -> Tensor:
        """All W̃_b as one ``(B, rows, cols)`` tensor (for exact reference solvers)."""
        ...

    def select(self, examples: slice) -> UpstreamJacobian:
        """The Jacobians of a slice of the examples."""
        ...

    def restrict(self, v: Tensor) -> Tensor:
        """P_b v_b for a cheap orthogonal projector P_b with W̃_b P_b = W̃_b (so the row space
        of W̃_b, where the gradient lies, is inside its range): ``(B, ..., cols)``.
        The identity is always valid; ReLU masks give a better one for free."""
        ...


class MaskedLinearJacobian:
    """W̃_b = W M_b for a linear next layer W (m × n) and 0/1 masks M_b = diag(mask[b]).

    ``apply``/``apply_t`` cost one (B·p × n)·(n × m) matrix product for the whole batch:
    the weight is shared and only the cheap elementwise mask is per example.  ``gram_apply``
    uses the shared Gram A = WᵀW (computed once per object) when that is cheaper:
    G_b v = M_b A M_b v costs n² per vector against 2mn for W then Wᵀ.
    """

    def __init__(self, weight: Tensor, mask: Tensor, gram: Tensor | None = None) -> None:
        if weight.dim() != 2 or mask.dim() != 2 or mask.shape[1] != weight.shape[1]:
            raise ValueError(
                f"need weight (m, n) and mask (B, n), got {tuple(weight.shape)} and "
                f"{tuple(mask.shape)}"
            )
        self.weight = weight  # (m, n)
        self.mask = mask  # (B, n), entries 0 or 1
        self._gram = gram  # (n, n) WᵀW, shared by select()

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def rows(self) -> int:
        return self.weight.shape[0]

    @property
    def cols(self) -> int:
        return self.weight.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def _mask_like(self, v: Tensor) -> Tensor:
        return self.mask.view(self.batch, *([1] * (v.dim() - 2)), self.cols)

    def apply(self, v: Tensor) -> Tensor:
        return _matmul_2d(v * self._mask_like(v), self.weight.T)

    def apply_t(self, u: Tensor) -> Tensor:
        v = _matmul_2d(u, self.weight)
        return v.mul_(self._mask_like(v))

    def gram_apply(
        self, v: Tensor, *, restricted: bool = False, out: Tensor | None = None
    ) -> Tensor:
        mask = self._mask_like(v)
        v = v if restricted else v * mask
        if 2 * self.rows <= self.cols:
            return _matmul_2d(_matmul_2d(v, self.weight.T), self.weight, out=out).mul_(mask)
        if self._gram is None:
            self._gram = self.weight.T @ self.weight  # (n, n)
        return _matmul_2d(v, self._gram, out=out).mul_(mask)

    def restrict(self, v: Tensor) -> Tensor:
        return v * self._mask_like(v)

    def row_gram(self) -> Tensor:
        """W̃_b W̃_bᵀ = W M_b Wᵀ for every example, ``(B, m, m)``: one (B × n)·(n × m²) product
        over the outer products w_j w_jᵀ of W's columns when m² ≤ 4n, else per example."""
        m, n = self.rows, self.cols
        if m * m <= 4 * n:
            outer = self.weight.T.unsqueeze(2) * self.weight.T.unsqueeze(1)  # (n, m, m)
            return (self.mask @ outer.reshape(n, m * m)).view(self.batch, m, m)
        wm = self.weight.unsqueeze(0) * self.mask.unsqueeze(1)  # (B, m, n)
        return wm @ self.weight.T

    def dense(self) -> Tensor:
        return self.weight.unsqueeze(0) * self.mask.unsqueeze(1)  # (B, m, n)

    def active_columns(self, at_least: int = 1) -> Tensor:
        """Column indices ``(B, r)``: each example's active units (mask 1) in increasing order,
        then inactive ones, r = min(n, max(at_least, max_b #active_b)) for the whole batch.

        W̃_b = W M_b is zero outside its active columns, so those r columns hold all of it."""
        r = min(self.cols, max(at_least, int(self.mask.sum(1).max()) if self.batch else 0))
        order = torch.argsort(self.mask, dim=1, descending=True, stable=True)  # (B, n)
        return order[:, :r]

    def dense_columns(self, index: Tensor) -> Tensor:
        """The columns ``index (B, r)`` of every W̃_b, ``(B, m, r)``."""
        cols = self.weight.T[index] * torch.gather(self.mask, 1, index).unsqueeze(-1)  # (B, r, m)
        return cols.mT.contiguous()

    def column_gram(self, examples: Tensor, index: Tensor) -> Tensor:
        """W̃_bᵀW̃_b on the columns ``index (g, r)`` of the examples ``examples (g,)``,
        ``(g, r, r)``: entries of the shared WᵀW, gathered and masked (no per-example product)."""
        if self._gram is None:
            self._gram = self.weight.T @ self.weight
        mask = torch.gather(self.mask[examples], 1, index)  # (g, r)
        g, r = index.shape
        # whole rows first (contiguous copies), then the columns: faster than one 2-D gather
        rows = self._gram.index_select(0, index.reshape(-1)).view(g, r, -1)  # (g, r, n)
        out = torch.gather(rows, 2, index.unsqueeze(1).expand(-1, r, -1))  # (g, r, r)
        return out.mul_(mask.unsqueeze(-1)).mul_(mask.unsqueeze(-2))

    def select(self, examples: slice) -> MaskedLinearJacobian:
        if self._gram is None and 2 * self.rows > self.cols:
            self._gram = self.weight.T @ self.weight
        return MaskedLinearJacobian(self.weight, self.mask[examples], self._gram)


def dense_active(jacobian: UpstreamJacobian, at_least: int = 1) -> tuple[Tensor, Tensor | None]:
    """W̃_b restricted to the columns that can be nonzero: ``(B, m, r)`` and their indices
    ``(B, r)`` (at least ``at_least`` of them), or ``(dense(), None)`` when the Jacobian does not
    know such columns or they are all n.

    For ReLU masks about half of the n columns of W̃_b = W M_b are zero.  Dropping zero columns
    changes neither the nonzero singular values nor, up to those zero coordinates, the right
    singular vectors that belong to them, and an odd matrix polynomial X h(XᵀX) keeps zero
    columns zero.  So an exact top-k SVD or a Newton–Schulz factor computed on the r active
    columns and put back by :func:`expand_columns` is the dense result (null-space directions
    aside), for (r/n)² to (r/n)³ of the cost."""
    active = getattr(jacobian, "active_columns", None)
    if active is None:
        return jacobian.dense(), None
    index = active(at_least)
    if index.shape[1] == jacobian.cols:
        return jacobian.dense(), None
    return jacobian.dense_columns(index), index


def expand_columns(rows: Tensor, index: Tensor | None, n: int) -> Tensor:
    """Put ``rows (B, p, r)`` back in columns ``index (B, r)`` of zero ``(B, p, n)`` rows (the
    inverse of :func:`dense_active`'s restriction); ``index=None`` returns ``rows``."""
    if index is None:
        return rows
    out = rows.new_zeros(*rows.shape[:-1], n)
    return out.scatter_(-1, index.unsqueeze(1).expand(-1, rows.shape[1], -1), rows)


def active_groups(
    jacobian: UpstreamJacobian, at_least: int = 1, size: int | None = None
) -> list[tuple[Tensor, Tensor | None]]:
    """The examples in groups of ``size`` (``None``: one group), ordered by their number of
    active columns, each with its columns: ``[(examples (g,), columns (g, r_g))]``, r_g the
    group's largest active count (at least ``at_least``, at most n), active columns first.

    Padding each group only to its own largest count instead of the batch's makes work that
    grows like r² or r³ cheaper: at width 512 the active counts spread over about 200–300.
    A Jacobian without ``active_columns`` gives one group of all examples and columns ``None``
    (all n)."""
    bsz = jacobian.batch
    active = getattr(jacobian, "active_columns", None)
    if active is None or bsz == 0:
        return [(torch.arange(bsz, device=jacobian.device), None)]
    index = active(at_least)  # (B, r), active columns first
    ones = torch.ones(bsz, jacobian.cols, dtype=jacobian.dtype, device=jacobian.device)
    counts = torch.count_nonzero(jacobian.restrict(ones), dim=1)  # (B,)
    order = torch.argsort(counts, stable=True)
    size = bsz if size is None else size
    groups: list[tuple[Tensor, Tensor | None]] = []
    for lo in range(0, bsz, size):
        examples = order[lo : lo + size]
        r = min(index.shape[1], max(at_least, int(counts[examples].max())))
        groups.append((examples, index[examples, :r]))
    return groups


def column_gram(jacobian: UpstreamJacobian, examples: Tensor, index: Tensor | None) -> Tensor:
    """W̃_bᵀW̃_b of the examples ``examples (g,)`` on their columns ``index (g, r)`` (``None``:
    all n), ``(g, r, r)``: the Jacobian's own ``column_gram`` where it has one, else from
    ``dense()``."""
    fast = getattr(jacobian, "column_gram", None)
    if fast is not None and index is not None:
        return fast(examples, index)
    w = jacobian.dense()[examples]  # (g, m, n)
    if index is not None:
        w = torch.gather(w, 2, index.unsqueeze(1).expand(-1, w.shape[1], -1))
    return w.mT @ w


def _matmul_2d(v: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
    """``v @ w`` for a batched ``v (..., a)`` and a shared ``w (a, c)`` as one 2-D product.

    ``torch.matmul`` can dispatch a 3-D × 2-D product to a batched kernel over a broadcast
    ``w``, several times slower on CPU than one large matrix product.  ``out`` (contiguous,
    shape ``(..., c)``) receives the result.
    """
    v2 = v.reshape(-1, v.shape[-1])
    if out is None:
        return (v2 @ w).reshape(*v.shape[:-1], w.shape[-1])
    torch.mm(v2, w, out=out.view(-1, w.shape[-1]))
    return out
