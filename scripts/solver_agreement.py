"""The fast W̃⊥ solver against the exact SVD: subspace energy fidelity and Eq. 17/18 statistics.

    python scripts/solver_agreement.py RUN_DIR [--k 10] [--block B] [--ritz-iters 2]
        [--samples 16] [--warm 5] [--fidelity-only]

RUN_DIR holds a ``model.pt`` of an MLP trained by ``guessgrad train`` (its ``config.json``
gives the width); everything is measured on the first 512 training examples, on those weights
and at the seed's initialisation.

- Spectral gaps (``--gaps``, instead of the above): the 10%, 50% and 90% quantiles over the
  examples of λ_{k+1}(G_b)/λ_k(G_b) per hidden layer, from the exact singular values (near 1:
  a flat top, where the top-k subspace is hard to pin down), over the examples with k nonzero
  singular values ("–" where there is none).

``--block`` and ``--ritz-iters`` are the fast solver's options (``gg.WPerp``'s ``block`` and
``ritz_iters``; defaults k and 2).

- Fidelity: mean_b tr(Vᵀ G_b V) / Σ_{j≤k} λ_j(G_b) of ``WPerp(k, solver="subspace")`` per
  hidden layer solved by block Krylov (1.0 = the exact top-k subspace), after ``--warm``
  estimates on the batch, so that the warm start has moved on as it does in training.
- Statistics (unless ``--fidelity-only``): bias (Eq. 17) and exact variance (Eq. 18) of the
  fast solver and of the exact SVD, ``--samples`` guesses per example.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import guessgrad as gg
from guessgrad.bench import layer_fidelities


def fidelity_rows(
    models: dict[str, torch.nn.Sequential], x, y, warm: int, k: int = 10, **fast: Any
) -> list[str]:
    """``fast``: options of the fast solver (``block``, ``ritz_iters``)."""
    rows = ["| weights | layer | fidelity |", "|---|---|---|"]
    for label, model in models.items():
        est = gg.WPerp(k=k, solver="subspace", **fast)
        gen = torch.Generator().manual_seed(0)
        for _ in range(warm):  # moves the warm start on; the weights are not updated
            est.estimate(model, x, y, generator=gen)
        for layer, value in (layer_fidelities(est, model, x, y) or {}).items():
            rows.append(f"| {label} | {layer} | {value:.4f} |")
    return rows


def gap_rows(models: dict[str, torch.nn.Sequential], x, y, k: int = 10) -> list[str]:
    rows = ["| weights | layer | λ_{k+1}/λ_k: 10% | 50% | 90% |", "|---|---|---|---|---|"]
    levels = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    for label, model in models.items():
        layers = gg.models.linear_layers(model)
        passed = gg.WTranspose().tangent_pass(layers, x, y, generator=torch.Generator())
        for site in passed.sites:
            if site.jacobian is None or site.jacobian.rows <= k:
                continue  # the output layer; a next layer of at most k rows (closed form)
            lam = torch.linalg.svdvals(site.jacobian.dense().double()).square()
            if lam.shape[1] <= k:
                continue  # k ≥ the width: no λ_{k+1}
            alive = lam[:, k - 1] > 0
            if bool(alive.any()):
                q = [f"{v:.3f}" for v in torch.quantile(lam[alive, k] / lam[alive, k - 1], levels)]
            else:  # no example has k nonzero singular values
                q = ["–"] * 3
            rows.append(f"| {label} | {site.index} | " + " | ".join(q) + " |")
    return rows


def statistics_rows(
    models: dict[str, torch.nn.Sequential], x, y, samples: int, k: int = 10, **fast: Any
) -> list[str]:
    """``fast``: options of the fast solver (``block``, ``ritz_iters``)."""
    rows = [
        "| weights | layer | bias svd | bias subspace | ratio "
        "| variance svd | variance subspace | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, model in models.items():
        stats = {}
        for solver in ("svd", "subspace"):
            est = gg.WPerp(k=k, solver=solver, **(fast if solver == "subspace" else {}))
            gen = torch.Generator().manual_seed(0)
            stats[solver] = gg.diagnose(model, x, y, est, samples=samples, generator=gen)
        for a, b in zip(stats["svd"], stats["subspace"]):
            rows.append(
                f"| {label} | {a.layer} | {a.bias:.3e} | {b.bias:.3e} | {b.bias / a.bias:.3f} "
                f"| {a.variance_exact:.3e} | {b.variance_exact:.3e} "
                f"| {b.variance_exact / a.variance_exact:.3f} |"
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--k", type=int, default=10, help="subspace size (default: 10)")
    parser.add_argument(
        "--block", type=int, default=None, help="Krylov block size (default: k, as WPerp's)"
    )
    parser.add_argument(
        "--ritz-iters", type=int, default=None, help="Rayleigh–Ritz rounds (default: WPerp's, 2)"
    )
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--warm", type=int, default=5, help="estimates before the fidelity")
    parser.add_argument("--fidelity-only", action="store_true")
    parser.add_argument("--gaps", action="store_true", help="print the spectral gaps only")
    args = parser.parse_args(argv)
    fast = {
        name: value
        for name, value in (("block", args.block), ("ritz_iters", args.ritz_iters))
        if value is not None
    }
    config = json.loads((args.run_dir / "config.json").read_text())["config"]
    data = gg.data.mnist1d()
    x, y = data.x_train[:512], data.y_train[:512]
    widths = [40] + [config["width"]] * config["depth"] + [10]
    torch.manual_seed(config["seed"])
    init = gg.MLP(widths)
    trained = gg.MLP(widths)
    trained.load_state_dict(torch.load(args.run_dir / "model.pt"))
    models = {"init": init, "trained": trained}
    if args.gaps:
        print("\n".join(gap_rows(models, x, y, args.k)))
        return
    print("\n".join(fidelity_rows(models, x, y, args.warm, args.k, **fast)))
    if not args.fidelity_only:
        print()
        print("\n".join(statistics_rows(models, x, y, args.samples, args.k, **fast)))


if __name__ == "__main__":
    main()
