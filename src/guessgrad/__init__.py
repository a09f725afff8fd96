"""guessgrad: training neural networks without backpropagation, by guessing gradients.

Forward-mode directional derivatives along well-chosen guesses (the W̃⊥ method of
arXiv 2511.03110 and its baselines) written into ``p.grad`` for any ``torch.optim`` optimizer.
"""

from importlib.metadata import PackageNotFoundError, version

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

try:
    __version__ = version("guessgrad")
except PackageNotFoundError:  # pragma: no cover - source tree without installation
    __version__ = "0.0.0"

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
