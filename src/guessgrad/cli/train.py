"""``guessgrad train``: one training run with the defaults of the paper's §4.

Writes ``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` after each epoch (removed at the
end) and, at the end, ``final.json``, the weights ``model.pt`` and the learning curves
``curves.png`` into ``--out``
(default ``results/runs/<slug>``, the run store of ``guessgrad reproduce``, so a run trained
here is reused by the experiments and a finished run is not trained again).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from ..config import TrainConfig
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
    nonnegative_float,
    out_path,
    output_folder,
    positive_float,
    positive_int,
    seed_int,
    set_threads,
    setting_notes,
)
from .progress import TrainProgress

__all__ = ["configure_parser", "run"]

_DEFAULTS = TrainConfig()


def configure_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one MLP on MNIST-1D with an estimator",
        description="Train one MLP on MNIST-1D (paper §4 defaults) with a gradient estimator.",
    )
    add_estimator_options(p, default_method=_DEFAULTS.method)
    p.add_argument(
        "--width",
        type=positive_int,
        default=_DEFAULTS.width,
        help="hidden width (default: %(default)s)",
    )
    p.add_argument(
        "--depth",
        type=positive_int,
        default=_DEFAULTS.depth,
        help="hidden layers (default: %(default)s)",
    )
    p.add_argument(
        "--epochs", type=positive_int, default=_DEFAULTS.epochs, help="(default: %(default)s)"
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        default=_DEFAULTS.lr,
        help="AdamW learning rate (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=_DEFAULTS.batch_size,
        help="(default: %(default)s)",
    )
    p.add_argument(
        "--weight-decay",
        type=nonnegative_float,
        default=_DEFAULTS.weight_decay,
        help="AdamW weight decay (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=seed_int,
        default=_DEFAULTS.seed,
        help="seed of the initial weights, batch order and guesses (default: %(default)s)",
    )
    p.add_argument("--device", type=device_arg, default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=out_path, help="output directory (default: results/runs/<slug>)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors and warnings")
    p.set_defaults(func=run)


def _stored_config(out: Path) -> dict[str, Any] | None:
    # the configuration a run directory holds (config.json, else final.json), if any
    for name in ("config.json", "final.json"):
        try:
            record = json.loads((out / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("config"), dict):
            return record["config"]
    return None


def _stored_or_new(configs: list[TrainConfig], out: Path | None) -> tuple[TrainConfig, Path]:
    """The first of ``configs`` whose run is stored in its directory (``out``, else its slug
    in the run store), with that directory; else the first, with its own."""

    def folder(config: TrainConfig) -> Path:
        return out if out is not None else Path("results") / "runs" / config.slug()

    for config in configs:
        stored = _stored_config(folder(config))
        wanted = json.loads(json.dumps(config.to_dict()))  # tuples as JSON has them
        if stored is not None and all(
            stored.get(k) == v for k, v in wanted.items() if k != "device"
        ):
            return config, folder(config)
    return configs[0], folder(configs[0])


def _drop_idle_options(
    method: str, options: dict[str, Any], typed: list[str], defaults: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """``options`` without the ``typed`` (``--option``) keys that change nothing: the estimator
    records the same ``options()`` without them, on top of the experiments' ``defaults`` (a
    default value, or an option the chosen solver does not use), so that they neither name a
    second copy of a run nor claim an effect.  Returns the options kept and the keys dropped."""
    from ..estimators import make_estimator

    def recorded(opts: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return make_estimator(method, **{**defaults, **opts}).options()
        except ValueError:  # the others need it (block=2 with depth=4 for k = 9, say)
            return None

    full = recorded(options)  # unchanged by each key dropped: that key changed nothing
    dropped = []
    for key in typed:
        fewer = {k: v for k, v in options.items() if k != key}
        if recorded(fewer) == full:
            options, dropped = fewer, [*dropped, key]
    return options, dropped


def _unique(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``items`` without repeats, in order."""
    return [item for i, item in enumerate(items) if item not in items[:i]]


def _kept(out: Path) -> str:
    """What an interrupted ``train`` leaves in ``out``, for the message."""
    try:
        if (out / "final.json").is_file():
            return f"the run had finished; its results are in {out}"
        if (out / "checkpoint.pt").is_file():
            return (
                "the checkpoint of the last finished epoch is kept; run the same command again "
                "to resume"
            )
        if out.is_dir():  # the run's first files, written before its first epoch ended
            return "no epoch had finished: nothing to resume (the same command starts again)"
    except OSError:
        pass
    return "no epoch had finished: nothing is kept"


def run(args: argparse.Namespace) -> int:
    from ..curves import draw_curves, read_metrics
    from ..data import mnist1d
    from ..experiments.paper import default_options
    from ..experiments.runner import Terminated
    from ..training import RunDirectoryConflict, TrainingDiverged, train

    given = estimator_options(args)
    check_estimator(args.method, given)
    defaults = default_options(args.method)
    as_typed = {key: text for key, _, text in args.option}
    reduced, idle = _drop_idle_options(args.method, given, list(as_typed), defaults)
    if not args.quiet:
        for key in idle:
            print(
                f"note: --option {as_typed[key]} changes nothing here (a default, or not used "
                "with these options): left out of the run's options and name",
                file=sys.stderr,
            )
    device = device_name(args.device)
    configs = [
        make_config(
            method=args.method,
            width=args.width,
            depth=args.depth,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            weight_decay=args.weight_decay,
            seed=args.seed,
            device=device,
            options=options,
        )
        # unset options as the experiments set them, so that both name (and reuse) one run;
        # a run stored with only the options typed, or with an --option that changes nothing
        # (earlier versions), is still found
        for options in _unique([{**defaults, **reduced}, reduced, {**defaults, **given}, given])
    ]
    config, out = _stored_or_new(configs, args.out)
    set_threads(args.threads)
    # a finished run is only read: its folder may be read-only (a shared store)
    try:
        already = (out / "final.json").is_file()
    except OSError:  # a name too long, say: output_dir says so in one line
        already = False
    started = False

    def on_start(epochs_done: int) -> None:
        nonlocal started
        started = True
        progress.on_start(epochs_done)

    try:
        # an interrupt before the run writes anything leaves no empty folder behind
        with output_folder(out) if not already else contextlib.nullcontext(out):
            data = mnist1d()
            if not (args.quiet or already):
                for note in setting_notes(config, data.x_train.shape[0]):
                    print(f"note: {note}", file=sys.stderr)
            steps_per_epoch = math.ceil(data.x_train.shape[0] / config.batch_size)
            progress = TrainProgress(
                config.epochs, steps_per_epoch, quiet=args.quiet or already, desc=config.slug()
            )
            try:
                final = train(
                    config,
                    out_dir=out,
                    data=data,
                    on_epoch=progress.on_epoch,
                    on_step=progress.on_step,
                    on_start=on_start,
                )
            except RunDirectoryConflict as err:
                raise UsageError(str(err)) from None
            except TrainingDiverged as err:
                progress.close()  # the bar off the line before the message
                print(f"guessgrad train: error: {err}", file=sys.stderr)
                return 1
            finally:
                progress.close()
        # another process may have finished the run while this one waited for its lock
        finished_elsewhere = not already and not started
        title = f"{config.method}, width {config.width}, depth {config.depth}, seed {config.seed}"
        if not already or (not (out / "curves.png").exists() and os.access(out, os.W_OK | os.X_OK)):
            draw_curves(
                [(config.slug(), {config.method: [read_metrics(out)]})], out / "curves.png", title
            )
        if not args.quiet:
            if already or finished_elsewhere:
                other = "another --out" if args.out is not None else "--out"
                how = "holds a finished run" if already else "was finished by another process"
                print(f"{out} {how}: not trained again (remove it, or pass {other}).")
            print(
                f"{config.slug()}: train accuracy {final['train_accuracy']:.4f}, "
                f"test accuracy {final['test_accuracy']:.4f}, {counted(final['steps'], 'step')} in "
                f"{final['wall_seconds']:.1f} s on {final['device']} -> {out}"
            )
    except (KeyboardInterrupt, Terminated) as err:
        err.kept = _kept(out)  # type: ignore[union-attr]
        raise
    return 0
