"""Estimators by name: ``make_estimator("w-perp", k=10)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .backprop import Backprop
from .base import Estimator
from .forward_gradient import ActivationPerturbation, WPerp, WPrecond, WTranspose
from .weight_perturbation import WeightPerturbation

__all__ = ["ESTIMATORS", "make_estimator", "register"]

_REGISTRY: dict[str, Callable[..., Estimator]] = {}


def register(name: str, factory: Callable[..., Estimator]) -> None:
    """Add ``factory`` under ``name``; ``make_estimator(name, **options)`` calls it."""
    if name in _REGISTRY:
        raise ValueError(f"estimator {name!r} is already registered")
    _REGISTRY[name] = factory
    ESTIMATORS[:] = list(_REGISTRY)


def make_estimator(name: str, **options: Any) -> Estimator:
    """Build the estimator registered as ``name`` with constructor ``options``.

    Raises:
        ValueError: unknown name (the message lists the known ones) or bad options.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; available: {', '.join(_REGISTRY)}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as err:
        raise ValueError(f"bad options for estimator {name!r}: {err}") from err


def _w_perp_bottom(**options: Any) -> Estimator:
    options.setdefault("solver", "svd")  # bottom-k subspaces need the exact SVD
    return WPerp(subspace="bottom", **options)


def _w_perp_ns(**options: Any) -> Estimator:
    return WPerp(solver="newton-schulz", **options)


#: the registered names, in registration order
ESTIMATORS: list[str] = []

register(Backprop.name, Backprop)
register(WeightPerturbation.name, WeightPerturbation)
register(ActivationPerturbation.name, ActivationPerturbation)
register(WTranspose.name, WTranspose)
register(WPerp.name, WPerp)
register("w-perp-bottom", _w_perp_bottom)
register(WPrecond.name, WPrecond)
register("w-perp-ns", _w_perp_ns)
