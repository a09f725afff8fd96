"""Measurements on a run's weights: estimator statistics (Tables 2, 5) and overlap (Fig. 1).

Both are taken on a fixed batch, the first ``batch`` training examples, at the run's initial
weights (``when="init"``, rebuilt from the seed: no training needed) or at its final weights
(``when="final"``, ``model.pt`` of a finished run).  A measurement at the final weights records
the SHA-256 of the ``model.pt`` it read (``weights_sha256``), so that one taken before the run
was trained again is recognised as stale (:meth:`.runner.RunStore.probe_record`).

Overlap (paper Eq. 19) for every k at once: with the reduced SVD W̃_b = U Λ Vᵀ (singular
values in decreasing order, r = min(m, n) of them) and c_b = Vᵀ g_b,

    overlap(k) = mean_b  Σ_{j≤k} c_{b,j}² / ‖g_b‖²,      k = 1..r,

over the examples with g_b ≠ 0: one SVD per example instead of one per k.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from ..data import MNIST1D
from ..estimators import make_estimator
from ..estimators.forward_mode import tangent_forward
from ..metrics import diagnose, true_gradients
from ..models import linear_layers
from ..solvers.svd import numerical_rank
from ..training import TrainConfig, initial_model
from .spec import Method

__all__ = ["run_weights", "weights_digest", "overlap_curve", "diagnostics_record", "overlap_record"]

#: offset of the diagnostics generator's seed from the run's seed
_DIAG_SEED_OFFSET = 4_000_037


def run_weights(config: TrainConfig, run_dir: Path, when: str, data: MNIST1D) -> nn.Module:
    """The run's model at initialisation or at the end of training, on ``config.device``."""
    return _weights(config, run_dir, when, data)[0]


def _weights(
    config: TrainConfig, run_dir: Path, when: str, data: MNIST1D
) -> tuple[nn.Module, str | None]:
    """:func:`run_weights` and the SHA-256 of the ``model.pt`` bytes it loaded (``None`` at
    initialisation): the digest names exactly the weights measured."""
    if when not in ("init", "final"):
        raise ValueError(f"when must be 'init' or 'final', got when={when!r}")
    model = initial_model(config, data.num_features, data.num_classes)
    digest = None
    if when == "final":
        raw = (Path(run_dir) / "model.pt").read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.to(config.device), digest


def weights_digest(run_dir: Path) -> str | None:
    """SHA-256 (hex) of the run's final weights file ``model.pt``; ``None`` if it has none or
    it cannot be read (then no measurement can be judged stale)."""
    try:
        return hashlib.sha256((Path(run_dir) / "model.pt").read_bytes()).hexdigest()
    except OSError:
        return None


def overlap_curve(w: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Overlap of each g_b with the top-k right singular subspace of W̃_b, for every k.

    Args:
        w: ``(B, m, n)`` the matrices W̃_b.
        g: ``(B, n)`` the gradients g_b.

    Returns:
        ``(sums, alive, rank)``: ``sums`` ``(r,)`` is Σ_b over examples with g_b ≠ 0 of
        ‖V_kᵀ g_b‖²/‖g_b‖² for k = 1..r (divide by ``alive``, their count, for the mean);
        ``rank`` ``(B,)`` is the numerical rank of each W̃_b.
    """
    _, sv, vh = torch.linalg.svd(w, full_matrices=False)  # sv (B, r), vh (B, r, n)
    c2 = (vh @ g.unsqueeze(-1)).squeeze(-1).square()  # (B, r)
    norm = g.square().sum(1)  # (B,)
    alive = norm > 0
    ratios = c2[alive].cumsum(1) / norm[alive].unsqueeze(1)  # (B_alive, r)
    return ratios.sum(0), alive.sum(), numerical_rank(sv, (w.shape[1], w.shape[2]))


def _batch(data: MNIST1D, size: int) -> tuple[Tensor, Tensor]:
    return data.x_train[:size], data.y_train[:size]


def _provenance(config: TrainConfig, digest: str | None, when: str, batch: int) -> dict[str, Any]:
    weights = {"weights_sha256": digest} if when == "final" else {}
    return {
        "config": config.to_dict(),
        "when": when,
        **weights,
        "batch": {"split": "train", "first": batch},
        "version": __version__,
    }


def diagnostics_record(
    config: TrainConfig,
    run_dir: Path,
    estimator: Method,
    when: str,
    data: MNIST1D,
    *,
    batch: int,
    samples: int,
) -> dict[str, Any]:
    """``guessgrad.diagnose`` of ``estimator`` on the run's weights, as a JSON-able dict.

    The guesses come from a generator seeded from ``config.seed``, so the record is
    reproducible.
    """
    model, digest = _weights(config, run_dir, when, data)
    device = next(model.parameters()).device
    est = make_estimator(estimator.name, **estimator.kwargs)
    x, y = (t.to(device) for t in _batch(data, batch))
    gen = torch.Generator(device=device).manual_seed(config.seed + _DIAG_SEED_OFFSET)
    records = diagnose(model, x, y, est, samples=samples, generator=gen)
    return {
        **_provenance(config, digest, when, batch),
        "estimator": repr(est),
        "method": estimator.name,
        "options": estimator.kwargs,
        "samples": samples,
        "layers": [r.as_dict() for r in records],
    }


def overlap_record(
    config: TrainConfig, run_dir: Path, when: str, data: MNIST1D, *, batch: int, chunk: int = 64
) -> dict[str, Any]:
    """Overlap curves and ranks of W̃ for every hidden layer, in float64, as a JSON-able dict.

    ``chunk`` examples are factorised at a time to bound memory (W̃ is m × n per example).
    """
    model, digest = _weights(config, run_dir, when, data)
    model = model.double()
    layers = linear_layers(model)
    device = layers[0].weight.device
    x, y = _batch(data, batch)
    x, y = x.to(device, torch.float64), y.to(device)
    with torch.no_grad():
        g_all, _ = true_gradients(layers, x, y)
        sites = tangent_forward(layers, x, y, lambda site: torch.zeros_like(site.s)).sites
    out = []
    for i, site in enumerate(sites[:-1]):
        jac = site.jacobian
        assert jac is not None
        sums = torch.zeros(min(jac.rows, jac.cols), dtype=torch.float64, device=device)
        alive = 0
        ranks = []
        for start in range(0, x.shape[0], chunk):
            part = slice(start, start + chunk)
            s, a, r = overlap_curve(jac.select(part).dense(), g_all[i][part])
            sums += s
            alive += int(a)
            ranks.append(r)
        rank = torch.cat(ranks).double()
        out.append(
            {
                "layer": i,
                "width": jac.cols,
                "rows": jac.rows,
                "overlap": (sums / max(alive, 1)).tolist(),
                "examples": alive,
                "rank_mean": float(rank.mean()),
                "rank_min": int(rank.min()),
                "rank_max": int(rank.max()),
            }
        )
    return {**_provenance(config, digest, when, batch), "layers": out}
