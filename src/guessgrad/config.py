"""What a training run is: :class:`TrainConfig`, and the names of the built-in estimators.

Nothing here imports PyTorch, so that the command line can build its parser (and answer
``--help`` or a bad option) without loading it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_SEED", "METHODS", "TrainConfig", "check_device_name", "option_value"]

#: the largest seed: a run's generators are seeded with seed + 2 000 003 at most, which must
#: fit torch's 64-bit seeds
MAX_SEED = 2**62

#: the registry names of the built-in estimators, in registration order (what
#: ``guessgrad.estimators.ESTIMATORS`` holds before anything else is registered)
METHODS: tuple[str, ...] = (
    "backprop",
    "weight-perturbation",
    "activation-perturbation",
    "w-transpose",
    "w-perp",
    "w-perp-bottom",
    "w-precond",
    "w-perp-ns",
)


def check_device_name(device: str) -> None:
    """``ValueError`` unless ``device`` is a name torch could mean: auto, cpu, cuda, cuda:N or
    mps (whether that device is there is another question, for the code that uses it)."""
    index = device[5:] if device.startswith("cuda:") else None
    if device not in ("auto", "cpu", "cuda", "mps") and not (index and index.isdecimal()):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")


def option_value(text: str) -> Any:
    """An estimator option's value as typed (``block=8``, ``chunk=None``): an integer, else a
    float, else ``None``, ``True`` or ``False``, else the text itself."""
    constants = {"None": None, "True": True, "False": False}
    if text in constants:
        return constants[text]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are paper §4.

    ``options`` are extra estimator constructor options (e.g. ``{"k": 10, "solver": "svd"}``).
    """

    method: str = "w-perp"
    width: int = 128
    depth: int = 3
    epochs: int = 300
    lr: float = 1e-4
    batch_size: int = 512
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("width", "depth", "epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                # a Python int: the run's name and record are made from it
                raise ValueError(
                    f"{name} must be a positive integer (a Python int), got {name}={value!r}"
                )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got seed={self.seed!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**62], got seed={self.seed!r}")
        for name, ok, what in (
            ("lr", lambda v: v > 0, "positive"),
            ("weight_decay", lambda v: v >= 0, ">= 0"),
        ):
            value = getattr(self, name)
            real = isinstance(value, (int, float)) and not isinstance(value, bool)
            try:
                finite = real and math.isfinite(value)
            except OverflowError:  # an int too large for a float
                finite = False
            if not (finite and ok(value)):
                raise ValueError(f"{name} must be a finite number {what}, got {name}={value!r}")
            # kept as given (not made a float): the directory name of a run stored with an
            # int value through the Python API hashes that int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def slug(self) -> str:
        """A readable, unique directory name for this configuration (device excluded)."""
        opts = "".join(f"-{k}{v}" for k, v in sorted(self.options.items()))
        base = f"{self.method}{opts}-w{self.width}-d{self.depth}-e{self.epochs}-s{self.seed}"
        extra = {
            k: v
            for k, v in self.to_dict().items()
            if k not in ("method", "options", "width", "depth", "epochs", "seed", "device")
        }
        if extra != {"lr": 1e-4, "batch_size": 512, "weight_decay": 0.01}:
            digest = hashlib.sha1(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8]
            base += f"-{digest}"
        return base
