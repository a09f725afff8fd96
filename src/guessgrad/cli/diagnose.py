"""``guessgrad diagnose``: an estimator's bias, variance, cov. norm, overlap and cosine per
hidden layer (paper §3) on a batch of MNIST-1D, at initialisation or on saved weights."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..text import counted
from .common import (
    DEVICE_HELP,
    UsageError,
    add_estimator_options,
    check_estimator,
    device_arg,
    device_name,
    estimator_options,
    make_config,
    out_path,
    positive_int,
    seed_int,
    set_threads,
    setting_notes,
)

if TYPE_CHECKING:
    import torch

__all__ = ["configure_parser", "run"]

#: width and depth without --checkpoint (the paper's Table 2 setting)
_WIDTH, _DEPTH = 128, 3


def configure_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose",
        help="bias, variance, cov. norm, overlap of an estimator per hidden layer",
        description="Statistics of an estimator (paper §3) on the first --batch training "
        "examples, at the seed's initial weights or on --checkpoint.",
    )
    add_estimator_options(p, default_method="w-perp")
    p.add_argument(
        "--width",
        type=positive_int,
        help=f"hidden width (default: the --checkpoint's, else {_WIDTH})",
    )
    p.add_argument(
        "--depth",
        type=positive_int,
        help=f"hidden layers (default: the --checkpoint's, else {_DEPTH})",
    )
    p.add_argument(
        "--seed", type=seed_int, default=0, help="initial weights and guesses (default: 0)"
    )
    p.add_argument(
        "--checkpoint",
        type=out_path,
        help="weights: a run directory (its model.pt, or the checkpoint.pt of an unfinished "
        "run), a model.pt or a checkpoint.pt (default: the seed's initial weights)",
    )
    p.add_argument(
        "--batch", type=positive_int, default=512, help="first BATCH train examples (default: 512)"
    )
    p.add_argument(
        "--samples", type=positive_int, default=16, help="guesses per example (default: 16)"
    )
    p.add_argument("--overlap-k", type=positive_int, help="k of the overlap (default: k or 10)")
    p.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON instead of a table (its 'layer' counts from 0, the table's from 1)",
    )
    p.set_defaults(func=run)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a run directory, ``model.pt`` or ``checkpoint.pt``, loaded without
    running code from the file (``weights_only``)."""
    import torch
    from torch.torch_version import TorchVersion

    from ..training import load_error_summary

    if path.is_dir():
        found = [path / n for n in ("model.pt", "checkpoint.pt") if (path / n).exists()]
        if not found:
            raise UsageError(f"no weights in {path} (neither model.pt nor checkpoint.pt)")
        path = found[0]
    if not path.exists():
        raise UsageError(f"no weights at {path}")
    # older checkpoints record torch's version as a TorchVersion: allowed where torch (>= 2.5)
    # can; newer ones record a str
    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        with safe([TorchVersion]) if safe is not None else contextlib.nullcontext():
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None
    except Exception as err:
        raise UsageError(
            f"{path} is not a guessgrad model.pt or checkpoint.pt ({load_error_summary(path, err)})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint
    if not (isinstance(state, dict) and state and _shape(state) is not None):
        raise UsageError(f"{path} holds no MLP weights")
    return state


def _shape(state: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """(hidden width, hidden layers) of an MLP's ``state_dict``, None if it is not one."""
    import torch

    weights = [v for k, v in state.items() if k.endswith("weight")]
    if len(weights) < 2 or not all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in weights):
        return None
    return weights[0].shape[0], len(weights) - 1


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import mnist1d
    from ..estimators import make_estimator
    from ..metrics import diagnose
    from ..training import initial_model

    options = estimator_options(args)
    check_estimator(args.method, options)
    state = _load_weights(args.checkpoint) if args.checkpoint is not None else None
    width, depth = args.width or _WIDTH, args.depth or _DEPTH
    if state is not None:
        stored = _shape(state)
        assert stored is not None
        for option, given, there in (
            ("--width", args.width, stored[0]),
            ("--depth", args.depth, stored[1]),
        ):
            if given is not None and given != there:
                raise UsageError(
                    f"{args.checkpoint} holds width {stored[0]}, depth {stored[1]}: "
                    f"{option} {given} does not fit (leave it out to use the checkpoint's)"
                )
        width, depth = stored
    config = make_config(
        method=args.method,
        width=width,
        depth=depth,
        seed=args.seed,
        device=device_name(args.device),
        options=options,
    )
    set_threads(args.threads)
    data = mnist1d().to(config.device)
    for note in setting_notes(config, data.x_train.shape[0]):
        print(f"note: {note}", file=sys.stderr)
    model = initial_model(config, data.num_features, data.num_classes)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as err:  # e.g. another input size or number of classes
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            raise UsageError(
                f"{args.checkpoint} does not fit an MLP of width {width}, depth {depth} on "
                f"MNIST-1D: {lines[-1] if lines else err}"
            ) from None
    model = model.to(config.device)
    est = make_estimator(args.method, **options)
    x, y = data.x_train[: args.batch], data.y_train[: args.batch]
    gen = torch.Generator(device=config.device).manual_seed(args.seed)
    records = diagnose(model, x, y, est, samples=args.samples, k=args.overlap_k, generator=gen)
    if args.json:
        print(json.dumps({"estimator": repr(est), "layers": [r.as_dict() for r in records]}))
        return 0
    examples, guesses = counted(x.shape[0], "example"), counted(args.samples, "guess", "guesses")
    print(f"{est!r}, width {width}, {examples}, {guesses} each")
    head = (
        "hidden layer",
        "bias",
        "variance",
        "variance (exact)",
        "cov. norm",
        "overlap",
        "cosine",
    )
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
