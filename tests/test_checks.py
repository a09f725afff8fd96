"""The shared integer checks: every integer type but bool, one message for a refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import guessgrad
from guessgrad.checks import integer, optional_integer
from guessgrad.experiments.runner import run_tasks
from guessgrad.solvers.newton_schulz import power_sigma1


def test_integers_of_any_type_are_ints_and_booleans_are_refused() -> None:
    assert integer("n", np.int64(3)) == 3 and type(integer("n", np.int64(3))) is int
    assert integer("n", 0, minimum=0) == 0
    assert optional_integer("n", None) is None and optional_integer("n", np.int32(2)) == 2
    for bad, minimum, says in (
        (True, 1, "n must be a positive integer, got n=True"),
        (0, 1, "n must be a positive integer, got n=0"),
        (-1, 0, "n must be a non-negative integer, got n=-1"),
        (2.0, 1, "n must be a positive integer, got n=2.0"),
        ("3", 2, "n must be an integer >= 2, got n='3'"),
    ):
        with pytest.raises(ValueError, match=f"^{says}$"):
            integer("n", bad, minimum=minimum)
    with pytest.raises(ValueError, match="^n must be a positive integer or None, got n=0$"):
        optional_integer("n", 0)


def test_functions_that_took_booleans_for_integers_refuse_them(tmp_path) -> None:
    """``True`` passed for an integer (isinstance(True, int)) was taken as 1 by these."""
    start = torch.ones(2, 3)
    with pytest.raises(ValueError, match="iters must be a positive integer, got iters=True"):
        power_sigma1(lambda v: v, start, iters=True)
    with pytest.raises(ValueError, match="jobs must be a positive integer, got jobs=True"):
        run_tasks([], tmp_path, jobs=True)
    with pytest.raises(ValueError, match="samples must be a positive integer, got samples=True"):
        model = guessgrad.MLP([4, 3, 2])
        guessgrad.diagnose(model, torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), "backprop",
                           samples=True)  # fmt: skip
