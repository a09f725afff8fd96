"""Gradient estimators: the exact reference and the forward-gradient methods."""

from .backprop import Backprop
from .base import Estimator
from .forward_gradient import ActivationPerturbation, ForwardGradient, WPerp, WPrecond, WTranspose
from .forward_mode import TangentPass, tangent_forward
from .registry import ESTIMATORS, make_estimator, register
from .weight_perturbation import WeightPerturbation

__all__ = [
    "ESTIMATORS",
    "ActivationPerturbation",
    "Backprop",
    "Estimator",
    "ForwardGradient",
    "TangentPass",
    "WPerp",
    "WPrecond",
    "WTranspose",
    "WeightPerturbation",
    "make_estimator",
    "register",
    "tangent_forward",
]
