"""guessgrad: training neural networks without backpropagation, by guessing gradients.

Forward-mode directional derivatives along well-chosen guesses (the W̃⊥ method of
arXiv 2511.03110 and its baselines) written into ``p.grad`` for any ``torch.optim`` optimizer.

The names below are loaded on first use (PEP 562), so that ``import guessgrad.cli`` and
``guessgrad --help`` do not wait for PyTorch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("guessgrad")
except PackageNotFoundError:  # pragma: no cover - source tree without installation
    __version__ = "0.0.0"

if TYPE_CHECKING:
    from . import data
    from .estimators import (
        ESTIMATORS,
        ActivationPerturbation,
        Backprop,
        Estimator,
        ForwardGradient,
        WeightPerturbation,
        WPerp,
        WPrecond,
        WTranspose,
        make_estimator,
    )
    from .metrics import LayerDiagnostics, diagnose
    from .models import MLP, linear_layers

#: public name -> the submodule that defines it
_SOURCES = {
    "ESTIMATORS": "estimators",
    "ActivationPerturbation": "estimators",
    "Backprop": "estimators",
    "Estimator": "estimators",
    "ForwardGradient": "estimators",
    "WPerp": "estimators",
    "WPrecond": "estimators",
    "WTranspose": "estimators",
    "WeightPerturbation": "estimators",
    "make_estimator": "estimators",
    "LayerDiagnostics": "metrics",
    "diagnose": "metrics",
    "MLP": "models",
    "linear_layers": "models",
    "data": "data",
}

__all__ = [
    "ESTIMATORS",
    "MLP",
    "ActivationPerturbation",
    "Backprop",
    "Estimator",
    "ForwardGradient",
    "LayerDiagnostics",
    "WPerp",
    "WPrecond",
    "WTranspose",
    "WeightPerturbation",
    "__version__",
    "data",
    "diagnose",
    "linear_layers",
    "make_estimator",
]


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{source}", __name__)
    value = module if name == source else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})
