"""Shared fixtures: small ReLU MLPs, batches, and the registry-driven estimator cases.

Every estimator registered in ``guessgrad.ESTIMATORS`` becomes one or more test cases through
the ``estimator_case`` and ``forward_case`` fixtures, so a newly registered estimator is picked
up by the contract, exactness and Monte-Carlo tests without editing them.  ``TEST_OPTIONS``
lists the constructor options a name is tested with (small k so that bias is visible at the
tiny widths used here, and the fast solver besides the exact one); unlisted names are tested
with their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import guessgrad
from guessgrad.estimators import ForwardGradient

# Batched small eigh/svd calls are far slower with several intra-op threads on a busy machine.
torch.set_num_threads(1)

#: constructor options each registered estimator is tested with (default: one case, no options)
TEST_OPTIONS: dict[str, list[dict[str, Any]]] = {
    # the exact solver and the fast one (the default) side by side
    "w-perp": [
        {"k": 3, "solver": "svd"},
        {"k": 3, "solver": "subspace"},
        {"k": 10, "solver": "subspace"},
        {"k": "rank", "solver": "svd"},
        {"k": "rank", "solver": "subspace"},
    ],
    "w-perp-bottom": [{"k": 3}],
    # k = 3: a proper top-k subspace at every layer of the test network (the default k = 10
    # spans the whole row space of each W̃ there)
    "w-perp-ns": [{}, {"k": 3}],
}

#: widths of the default test network: a tall W̃ (12 × 8) at layer 0, a wide one (6 × 12)
#: at layer 1, and the output layer's 4 rows above layer 2
WIDTHS = (10, 8, 12, 6, 4)


@dataclass(frozen=True)
class EstimatorCase:
    """A registered estimator name with the options it is tested with."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def make(self) -> guessgrad.Estimator:
        return guessgrad.make_estimator(self.name, **self.options)

    @property
    def id(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}[{opts}]" if opts else self.name


def estimator_cases() -> list[EstimatorCase]:
    return [
        EstimatorCase(name, dict(opts))
        for name in guessgrad.ESTIMATORS
        for opts in TEST_OPTIONS.get(name, [{}])
    ]


def forward_cases() -> list[EstimatorCase]:
    """The cases whose estimator guesses pre-activation gradients (a ``ForwardGradient``)."""
    return [c for c in estimator_cases() if isinstance(c.make(), ForwardGradient)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for fixture, cases in (("estimator_case", estimator_cases), ("forward_case", forward_cases)):
        if fixture in metafunc.fixturenames:
            found = cases()
            metafunc.parametrize(fixture, found, ids=[c.id for c in found])


def build_mlp(
    widths: tuple[int, ...] = WIDTHS,
    *,
    dtype: torch.dtype = torch.float64,
    bias: bool = True,
    seed: int = 0,
) -> nn.Sequential:
    """``guessgrad.MLP(widths)`` with a fixed seed and small random biases (so that the bias
    gradients are not all alike), in ``dtype``."""
    torch.manual_seed(seed)
    model = guessgrad.MLP(list(widths), bias=bias).to(dtype)
    if bias:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in guessgrad.linear_layers(model):
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=gen, dtype=dtype))
    return model


def build_batch(
    model: nn.Sequential,
    batch: int,
    *,
    seed: int = 0,
    inactive: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch for ``model``; example ``inactive`` (if given) has every unit of the
    first hidden layer switched off (its pre-activations are all exactly -1)."""
    layers = guessgrad.linear_layers(model)
    first = layers[0]
    dtype = first.weight.dtype
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, first.in_features, generator=gen, dtype=dtype)
    y = torch.randint(0, layers[-1].out_features, (batch,), generator=gen)
    if inactive is not None:
        w = first.weight.detach().double()
        b = torch.zeros(w.shape[0], dtype=torch.float64)
        if first.bias is not None:
            b = first.bias.detach().double()
        # W x + b = -1 has a solution: W is (width × inputs) with full row rank
        target = -torch.ones(w.shape[0], dtype=torch.float64) - b
        x[inactive] = (torch.linalg.pinv(w) @ target).to(dtype)
    return x, y


@pytest.fixture
def make_mlp():
    return build_mlp


@pytest.fixture
def make_batch():
    return build_batch


@pytest.fixture
def model():
    """The default float64 test network."""
    return build_mlp()


@pytest.fixture
def batch(model):
    """A float64 batch of 5 for ``model``."""
    return build_batch(model, 5, seed=1)
