"""Option types and checks shared by the subcommands.

The parsers are built without importing PyTorch (``guessgrad --help`` and a bad option answer
at once); what needs it is imported where it is used.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import MAX_SEED, METHODS, TrainConfig, check_device_name, option_value
from ..files import LOCK_FILE

__all__ = [
    "UsageError",
    "positive_int",
    "positive_float",
    "nonnegative_float",
    "nonnegative_int",
    "seed_int",
    "out_path",
    "k_value",
    "option_pair",
    "add_estimator_options",
    "estimator_options",
    "check_estimator",
    "setting_notes",
    "device_arg",
    "device_name",
    "default_jobs",
    "set_threads",
    "output_dir",
    "output_folder",
]


class UsageError(Exception):
    """A bad option value: reported in one line, exit status 2."""


def _integer(text: str, ok: Callable[[int], bool], what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


#: ``--device``'s help, the same in every command
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps (default: %(default)s)"


def positive_int(text: str) -> int:
    return _integer(text, lambda v: v >= 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _integer(text, lambda v: v >= 0, "an integer >= 0")


def seed_int(text: str) -> int:
    """A seed: an integer in [0, 2**62] (:data:`guessgrad.config.MAX_SEED`)."""
    return _integer(text, lambda v: 0 <= v <= MAX_SEED, "an integer in [0, 2**62]")


def _finite(text: str, ok: Callable[[float], bool], what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and ok(value)):  # nan and inf are no learning rates
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return _finite(text, lambda v: v > 0, "a finite positive number")


def nonnegative_float(text: str) -> float:
    return _finite(text, lambda v: v >= 0, "a finite number >= 0")


def out_path(text: str) -> Path:
    """An output directory option: any path but an empty one (an unset shell variable would
    otherwise write into the working directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a directory, got an empty path")
    return Path(text)


def k_value(text: str) -> int | str:
    """``--k``: a positive integer or ``rank``."""
    if text == "rank":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'rank', got {text!r}"
        ) from None


def option_pair(text: str) -> tuple[str, Any, str]:
    """``--option``: ``KEY=VALUE`` as ``(key, value, text)``, the value read by
    :func:`guessgrad.config.option_value`, the text as typed (for messages)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, option_value(value), text


#: the estimator options with a flag of their own
_OWN_FLAGS = ("k", "solver", "sigma")


def add_estimator_options(p: argparse.ArgumentParser, *, default_method: str) -> None:
    p.add_argument(
        "--method",
        default=default_method,
        metavar="NAME",
        help=f"estimator: {', '.join(METHODS)} (default: %(default)s)",
    )
    p.add_argument("--k", type=k_value, help="W̃⊥ subspace size k, or 'rank' (paper: 10)")
    p.add_argument("--solver", help="W̃⊥ solver: svd (exact), subspace (fast), newton-schulz")
    p.add_argument("--sigma", type=positive_float, help="W̃P's σ (paper: 1e-5)")
    p.add_argument(
        "--option",
        type=option_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other estimator constructor option, e.g. block=8 or ritz_iters=8 for "
        "W̃⊥'s fast solver; repeatable",
    )


def estimator_options(args: argparse.Namespace) -> dict[str, Any]:
    """The estimator options given on the command line (unset ones are left out)."""
    options = {k: getattr(args, k) for k in _OWN_FLAGS if getattr(args, k) is not None}
    for key, value, _ in args.option:
        if key in _OWN_FLAGS:
            raise UsageError(f"--option {key}=...: give {key} as --{key}")
        if key in options:  # only an earlier --option can have put it there
            raise UsageError(f"--option {key} is given twice")
        options[key] = value
    return options


def check_estimator(method: str, options: dict[str, Any]) -> None:
    """Build the estimator once, so that a bad name or option is a usage error."""
    from ..estimators import make_estimator

    try:
        make_estimator(method, **options)
    except ValueError as err:
        raise UsageError(str(err)) from None


def device_arg(text: str) -> str:
    """``--device``: a name torch could mean (auto, cpu, cuda, cuda:N, mps), checked when the
    command line is read, so that a misspelt one is an error in every command (also where the
    device is not used, as with ``--report-only``); whether it is there is checked on use."""
    try:
        check_device_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def device_name(device: str) -> str:
    """The concrete device for ``auto|cpu|cuda|mps``."""
    from ..training import resolve_device

    try:
        return str(resolve_device(device))
    except ValueError as err:
        raise UsageError(str(err)) from None


def setting_notes(config: TrainConfig, examples: int) -> list[str]:
    """Settings that run, but not as the numbers may suggest."""
    from ..training import build_estimator

    notes = []
    k = build_estimator(config).options().get("k")  # the estimator's own default too
    if isinstance(k, int) and k >= config.width:
        notes.append(
            f"k = {k} >= width {config.width}: each guess spans the whole row space of its "
            "example's W̃ (as with k = rank)"
        )
    if config.batch_size > examples:
        notes.append(
            f"batch size {config.batch_size} > {examples} training examples: one step of "
            f"{examples} examples per epoch"
        )
    return notes


def make_config(**fields: Any) -> TrainConfig:
    try:
        return TrainConfig(**fields)
    except ValueError as err:
        raise UsageError(str(err)) from None


def default_jobs() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def output_dir(path: Path, option: str = "--out") -> Path:
    """``path``, created if missing; a :class:`UsageError` where it cannot be (a file there, a
    parent that is a file or not writable) instead of a traceback halfway through a run."""
    _make_output_dir(path, option)
    return path


@contextmanager
def output_folder(path: Path, option: str = "--out") -> Iterator[Path]:
    """:func:`output_dir` for the block; if the block raises (Ctrl-C while the data is
    generated, say), the folders that this call created are removed where still empty, so that
    an interrupted command leaves no empty ``--out`` behind.  A folder that was there before,
    or that another process made meanwhile, is never removed."""
    created = _make_output_dir(path, option)
    try:
        yield path
    except BaseException:
        _remove_made(created)
        raise


def _make_output_dir(path: Path, option: str) -> list[Path]:
    # output_dir's work; returns the folders made here, deepest first
    try:
        if path.exists() and not path.is_dir():
            raise UsageError(f"{option} {path} is a file, not a directory")
        created = _make_folders(path)
    except OSError as err:  # a name too long, a parent that is a file, no permission
        raise UsageError(f"cannot create {option} {path}: {err.strerror or err}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        _remove_made(created)
        raise UsageError(f"{option} {path} is not writable")
    return created


def _make_folders(path: Path) -> list[Path]:
    """``path.mkdir(parents=True, exist_ok=True)``, returning the folders that this call
    itself made, deepest first (not those another process made meanwhile, nor a step such as
    ``new/..`` that names an existing folder).  If it fails halfway, what it made is removed
    again where still empty."""
    created: list[Path] = []
    try:
        for _ in range(_MKDIR_ATTEMPTS):
            missing, p = [], path
            while not _exists(p) and p.parent != p:
                missing.append(p)
                p = p.parent
            try:
                for folder in reversed(missing):
                    try:
                        os.mkdir(folder)
                    except FileExistsError:
                        _check_link_target(folder)
                        continue
                    created.append(folder)
                break
            except FileNotFoundError:
                if _exists(folder.parent):  # not removed: mkdir refuses here (/proc, say)
                    raise
                # a parent removed meanwhile (an interrupted train's): made again, counted once
                created = [made for made in created if _exists(made)]
        else:
            raise OSError("a folder on the way keeps being removed")
    except BaseException:
        _remove_made(created[::-1])
        raise
    return created[::-1]


def _check_link_target(folder: Path) -> None:
    # an OSError (not FileNotFoundError, which _make_folders takes for a parent removed
    # meanwhile) where ``folder`` is a link whose target does not exist; any other state
    # (a folder, a link to one, a target that cannot be reached) is left to the later checks
    try:
        os.stat(folder)
    except FileNotFoundError:
        if os.path.islink(folder):
            raise OSError(
                f"{folder} is a link to {os.readlink(folder)}, which is missing"
            ) from None
    except OSError:
        pass


#: times the folders of a path are made again when a parent was removed meanwhile
_MKDIR_ATTEMPTS = 10


def _remove_made(folders: list[Path]) -> None:
    # the folders given (deepest first), each where still empty, until one is not
    for folder in folders:
        try:
            _remove_empty(folder)
        except OSError:  # not empty (the run began writing), locked, or gone
            break


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long, say: left to mkdir, which says why
        return True


def _remove_empty(folder: Path) -> None:
    """Remove ``folder`` if empty; a run's lock file alone in it (a run stopped before it
    wrote anything) is removed first, unless another process holds it."""
    if [p.name for p in folder.iterdir()] == [LOCK_FILE]:
        from ..training import remove_unheld_lock  # only here: torch is loaded by then

        remove_unheld_lock(folder)
    folder.rmdir()
