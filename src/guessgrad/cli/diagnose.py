"""``guessgrad diagnose``: an estimator's bias, variance, cov. norm, overlap and cosine per
hidden layer (paper §3) on a batch of MNIST-1D, at initialisation or on saved weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..data import mnist1d
from ..estimators import make_estimator
from ..metrics import diagnose
from ..training import initial_model
from .common import (
    UsageError,
    add_estimator_options,
    check_estimator,
    device_name,
    estimator_options,
    make_config,
    positive_int,
    set_threads,
)

__all__ = ["configure_parser", "run"]


def configure_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose",
        help="bias, variance, cov. norm, overlap of an estimator per hidden layer",
        description="Statistics of an estimator (paper §3) on the first --batch training "
        "examples, at the seed's initial weights or on --checkpoint.",
    )
    add_estimator_options(p, default_method="w-perp")
    p.add_argument("--width", type=positive_int, default=128)
    p.add_argument("--depth", type=positive_int, default=3)
    p.add_argument("--seed", type=int, default=0, help="initial weights and guesses")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="weights: a run directory, its model.pt, or a checkpoint.pt (default: init)",
    )
    p.add_argument("--batch", type=positive_int, default=512, help="first BATCH train examples")
    p.add_argument("--samples", type=positive_int, default=16, help="guesses per example")
    p.add_argument("--overlap-k", type=positive_int, help="k of the overlap (default: k or 10)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise UsageError(f"no weights at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint
    return state


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def run(args: argparse.Namespace) -> int:
    options = estimator_options(args)
    check_estimator(args.method, options)
    config = make_config(
        method=args.method,
        width=args.width,
        depth=args.depth,
        seed=args.seed,
        device=device_name(args.device),
        options=options,
    )
    set_threads(args.threads)
    data = mnist1d().to(config.device)
    model = initial_model(config, data.num_features, data.num_classes)
    if args.checkpoint is not None:
        try:
            model.load_state_dict(_load_weights(args.checkpoint))
        except RuntimeError as err:
            raise UsageError(
                f"{args.checkpoint} does not fit width {args.width}, depth {args.depth}: "
                f"{str(err).splitlines()[0]}"
            ) from None
    model = model.to(config.device)
    est = make_estimator(args.method, **options)
    x, y = data.x_train[: args.batch], data.y_train[: args.batch]
    gen = torch.Generator(device=config.device).manual_seed(args.seed)
    records = diagnose(model, x, y, est, samples=args.samples, k=args.overlap_k, generator=gen)
    if args.json:
        print(json.dumps({"estimator": repr(est), "layers": [r.as_dict() for r in records]}))
        return 0
    print(f"{est!r}, width {args.width}, {x.shape[0]} examples, {args.samples} guesses each")
    head = ("layer", "bias", "variance", "variance (exact)", "cov. norm", "overlap", "cosine")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in records:
        cells = (
            str(r.layer + 1),
            _fmt(r.bias, ".3e"),
            _fmt(r.variance, ".3e"),
            _fmt(r.variance_exact, ".3e"),
            _fmt(r.cov_norm, ".4f"),
            "—" if r.overlap is None else f"{r.overlap:.3f} (k={r.k})",
            f"{r.cosine:.4f}",
        )
        print("| " + " | ".join(cells) + " |")
    return 0
