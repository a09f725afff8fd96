"""Bias and variance (Eq. 17/18) of W̃⊥ with the fast solver against the exact SVD.

    python scripts/solver_agreement.py RUN_DIR [--samples 16]

RUN_DIR holds a ``model.pt`` of an MLP trained by ``guessgrad train`` (its ``config.json``
gives the width); the statistics are measured on the first 512 training examples, on those
weights and at the seed's initialisation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import guessgrad as gg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    config = json.loads((args.run_dir / "config.json").read_text())["config"]
    data = gg.data.mnist1d()
    x, y = data.x_train[:512], data.y_train[:512]
    widths = [40] + [config["width"]] * config["depth"] + [10]
    torch.manual_seed(config["seed"])
    init = gg.MLP(widths)
    trained = gg.MLP(widths)
    trained.load_state_dict(torch.load(args.run_dir / "model.pt"))
    print(
        "| weights | layer | bias svd | bias subspace | ratio "
        "| variance svd | variance subspace | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, model in (("init", init), ("trained", trained)):
        stats = {}
        for solver in ("svd", "subspace"):
            est = gg.WPerp(k=10, solver=solver)
            gen = torch.Generator().manual_seed(0)
            stats[solver] = gg.diagnose(model, x, y, est, samples=args.samples, generator=gen)
        for a, b in zip(stats["svd"], stats["subspace"]):
            print(
                f"| {label} | {a.layer} | {a.bias:.3e} | {b.bias:.3e} | {b.bias / a.bias:.3f} "
                f"| {a.variance_exact:.3e} | {b.variance_exact:.3e} "
                f"| {b.variance_exact / a.variance_exact:.3f} |"
            )


if __name__ == "__main__":
    main()
