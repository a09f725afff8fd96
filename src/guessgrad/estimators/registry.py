"""Estimators by name: ``make_estimator("w-perp", k=10)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from .backprop import Backprop
from .base import Estimator
from .forward_gradient import ActivationPerturbation, WPerp, WPrecond, WTranspose
from .weight_perturbation import WeightPerturbation

__all__ = ["ESTIMATORS", "make_estimator", "register"]

_REGISTRY: dict[str, Callable[..., Estimator]] = {}
#: the options each name accepts (None: not known, the factory takes ``**options``)
_OPTIONS: dict[str, tuple[str, ...] | None] = {}


def _parameters(factory: Callable[..., Any], drop: Sequence[str] = ()) -> tuple[str, ...] | None:
    """The keyword arguments ``factory`` accepts, less ``drop``; None if it takes ``**``."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params if p.kind in kinds and p.name not in drop)


def register(
    name: str, factory: Callable[..., Estimator], *, options: Sequence[str] | None = None
) -> None:
    """Add ``factory`` under ``name``; ``make_estimator(name, **options)`` calls it.

    ``options`` names the keyword options the name accepts (default: the factory's own
    keyword parameters), so that a wrong one is reported with the right ones."""
    if name in _REGISTRY:
        raise ValueError(f"estimator {name!r} is already registered")
    _REGISTRY[name] = factory
    _OPTIONS[name] = tuple(options) if options is not None else _parameters(factory)
    ESTIMATORS[:] = list(_REGISTRY)


def make_estimator(name: str, **options: Any) -> Estimator:
    """Build the estimator registered as ``name`` with constructor ``options``.

    Raises:
        ValueError: unknown name (the message lists the known ones), an option the estimator
            does not take (the message lists those it does) or a bad option value.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; available: {', '.join(_REGISTRY)}")
    accepted = _OPTIONS[name]
    unknown = [o for o in options if accepted is not None and o not in accepted]
    if unknown:
        takes = f"its options: {', '.join(accepted)}" if accepted else "it takes no options"
        raise ValueError(f"estimator {name!r} has no option {unknown[0]!r} ({takes})")
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
register("w-perp-bottom", _w_perp_bottom, options=_parameters(WPerp, drop=("subspace",)))
register(WPrecond.name, WPrecond)
register("w-perp-ns", _w_perp_ns, options=_parameters(WPerp, drop=("solver",)))
