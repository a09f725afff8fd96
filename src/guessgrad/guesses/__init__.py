"""Guess directions for the pre-activation gradient of one layer (paper §2)."""

from .base import Guess, Site, gaussian
from .isotropic import IsotropicGuess
from .wperp import SOLVERS, WPerpGuess
from .wprecond import WPrecondGuess
from .wtranspose import WTransposeGuess

__all__ = [
    "Guess",
    "IsotropicGuess",
    "SOLVERS",
    "Site",
    "WPerpGuess",
    "WPrecondGuess",
    "WTransposeGuess",
    "gaussian",
]
