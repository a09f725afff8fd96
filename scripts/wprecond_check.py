"""Closed-form check of W̃P against W̃⊥ (k = rank), activation perturbation and W̃ᵀ.

Prints, per hidden layer of a freshly initialised width-128 MLP on one MNIST-1D batch, the
exact bias and variance (Gaussian closed forms, cross-layer noise included), the cov. norm,
and the largest deviation of W̃P's covariance from I and from W̃⊥(k = rank)'s.

    python scripts/wprecond_check.py [--width 128] [--batch 256]
"""

from __future__ import annotations

import argparse

import torch

import guessgrad as gg
from guessgrad.estimators.forward_gradient import ForwardGradient
from guessgrad.models import linear_layers


def covariances(model, x, y, est: ForwardGradient) -> dict[int, torch.Tensor]:
    covs: dict[int, torch.Tensor] = {}

    def on_site(site, guess, state):
        covs[site.index] = guess.covariance(site, state)

    with torch.no_grad():
        est.tangent_pass(linear_layers(model), x, y, on_site=on_site)
    return covs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = gg.data.mnist1d(dtype=torch.float64)
    model = gg.MLP([40] + [args.width] * 3 + [10]).double()
    x, y = data.x_train[: args.batch], data.y_train[: args.batch]
    methods = {
        "w-precond (svd)": gg.WPrecond(solver="svd"),
        "w-perp k=rank (svd)": gg.WPerp(k="rank", solver="svd"),
        "activation-perturbation": gg.ActivationPerturbation(),
        "w-transpose": gg.WTranspose(),
        "w-perp k=10 (svd)": gg.WPerp(k=10, solver="svd"),
    }
    print(f"width {args.width}, batch {args.batch}, float64, init weights (seed 0)\n")
    print("| method | layer | bias (Eq. 17) | variance (exact) | cov. norm |")
    print("|---|---|---|---|---|")
    for name, est in methods.items():
        for rec in gg.diagnose(model, x, y, est, samples=1):
            print(
                f"| {name} | {rec.layer} | {rec.bias:.3e} | {rec.variance_exact:.3e} "
                f"| {rec.cov_norm:.4f} |"
            )
    cp = covariances(model, x, y, methods["w-precond (svd)"])
    cr = covariances(model, x, y, methods["w-perp k=rank (svd)"])
    print("\n| layer | max |C_P − I| | max |C_P − C_rank| | mean rank of W̃ |")
    print("|---|---|---|---|")
    for i in range(3):
        eye = torch.eye(cp[i].shape[-1], dtype=cp[i].dtype)
        rank = torch.diagonal(cr[i], dim1=1, dim2=2).sum(1).mean()
        print(
            f"| {i} | {float((cp[i] - eye).abs().max()):.2e} | "
            f"{float((cp[i] - cr[i]).abs().max()):.2e} | {float(rank):.1f} |"
        )


if __name__ == "__main__":
    main()
