"""MNIST-1D (Greydanus 2020), generated offline and cached on disk (paper §4).

The ``mnist1d`` package's generator with its default arguments: 5000 samples, 80/20 split
into 4000 train and 1000 test, 40 features, 10 classes, generation seed 42.  The data are
never downloaded (the package's ``get_dataset`` would).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..files import atomic_path

__all__ = ["MNIST1D", "mnist1d", "cache_dir"]


@dataclass(frozen=True)
class MNIST1D:
    """Train and test tensors: ``x_*`` (N, 40) floats, ``y_*`` (N,) int64 labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        return 10

    def to(self, device: torch.device | str) -> MNIST1D:
        return MNIST1D(
            *(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test))
        )


def cache_dir() -> Path:
    """``$GUESSGRAD_CACHE``, else ``$XDG_CACHE_HOME/guessgrad``, else ``~/.cache/guessgrad``.

    An empty ``GUESSGRAD_CACHE`` counts as unset (not as the working directory), and a relative
    ``XDG_CACHE_HOME`` is ignored, as the XDG specification says."""
    if os.environ.get("GUESSGRAD_CACHE"):
        return Path(os.environ["GUESSGRAD_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "guessgrad"


def _package_version() -> str:
    try:
        return importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:  # imported from a source tree
        return "unknown"


def _generate() -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or ``None`` when the file is missing, unreadable or damaged
    (truncated, corrupted): the data are then generated again."""
    try:  # the file opened here: np.load leaves its own open when a damaged one fails
        with open(path, "rb") as raw, np.load(raw) as f:
            return {k: f[k] for k in ("x", "y", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the cache atomically; a folder that cannot be written costs a warning, not the
    run (the data are generated again next time)."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except OSError as err:
        # a file where the cache folder (or a folder above it) should be: say so, rather
        # than the bare "File exists" or "Not a directory" of the mkdir that failed
        files = (p for p in path.parents if os.path.exists(p) and not os.path.isdir(p))
        blocker = next(files, None)  # (os.path's tests never raise)
        reason = f"{blocker} is a file, not a folder" if blocker else err.strerror or err
        warnings.warn(
            f"could not write the MNIST-1D cache {path} ({reason}); the data "
            "will be generated again next time (set GUESSGRAD_CACHE to a writable folder)",
            stacklevel=3,
        )


def mnist1d(*, dtype: torch.dtype = torch.float32, cache: bool = True) -> MNIST1D:
    """The MNIST-1D train/test split, generated once and then read from the cache.

    Args:
        dtype: floating dtype of the features.
        cache: read and write the on-disk cache (:func:`cache_dir`); the file is keyed by
            the generator's arguments and the ``mnist1d`` package's version, and written
            atomically.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
    from mnist1d.data import get_dataset_args

    args = {k: v for k, v in get_dataset_args(as_dict=True).items() if k != "url"}
    args["mnist1d version"] = _package_version()  # another generator may give other data
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"mnist1d-{key}.npz"
    arrays = _read_cache(path) if cache else None
    if arrays is None:
        arrays = _generate()
        if cache:
            _write_cache(path, arrays)
    return MNIST1D(
        x_train=torch.as_tensor(arrays["x"], dtype=dtype),
        y_train=torch.as_tensor(arrays["y"], dtype=torch.int64),
        x_test=torch.as_tensor(arrays["x_test"], dtype=dtype),
        y_test=torch.as_tensor(arrays["y_test"], dtype=torch.int64),
    )
