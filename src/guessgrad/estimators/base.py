"""The estimator contract, shared by every method.

    loss = est.estimate(model, x, y, *, generator=None)

computes the batch-mean cross-entropy L of ``model(x)`` against integer labels ``y``, writes
an estimate of ∂L/∂p into ``p.grad`` for every parameter p that requires grad (replacing,
never accumulating; frozen parameters, ``requires_grad=False``, are left alone: weight
perturbation does not perturb them, and a layer whose parameters are all frozen gets no guess)
and returns L as a detached 0-d tensor.  Any ``torch.optim`` optimizer then takes the step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..models import linear_layers

__all__ = ["Estimator", "check_batch", "check_generator", "prepare_batch"]


def prepare_batch(
    model: nn.Module, x: Tensor, y: Tensor, what: str
) -> tuple[list[nn.Linear], Tensor, Tensor]:
    """The model's layers and the batch as the estimators and metrics use them: validated
    (:func:`~guessgrad.models.linear_layers`, :func:`check_batch`), ``x`` a normal tensor and
    ``y`` int64 (cross-entropy and label indexing need it).

    ``torch.inference_mode()`` is refused (``what`` names the caller): gradients made there are
    inference tensors, which an optimizer (or ``clip_grad_norm_``, ``zero_grad``) cannot update
    in place afterwards, and autograd (``Backprop``) does not run there.  Tensors made under
    it and used outside it are copied, since autograd cannot save them."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} cannot run under torch.inference_mode(): its gradients would be inference "
            "tensors that an optimizer cannot update; use torch.no_grad() instead"
        )
    layers = linear_layers(model)
    check_batch(layers, x, y)
    if x.is_inference() or y.is_inference():
        x, y = x.clone(), y.clone()
    return layers, x, y.long()


def check_batch(layers: list[nn.Linear], x: Tensor, y: Tensor) -> None:
    """Raise ``TypeError``/``ValueError`` with the offending value for a bad batch."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    w = layers[0].weight
    if x.layout != torch.strided or y.layout != torch.strided:
        raise TypeError(
            f"x and y must be dense tensors, got layouts {x.layout} and {y.layout} "
            "(use .to_dense())"
        )
    if x.dim() != 2 or x.shape[1] != layers[0].in_features:
        raise ValueError(
            f"x must have shape (batch, {layers[0].in_features}), got {tuple(x.shape)}"
        )
    if x.shape[0] < 1:
        raise ValueError("empty batch: x has 0 rows")
    if x.dtype != w.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the model's parameters are {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the model is on {w.device}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
    classes = layers[-1].out_features
    labels = y.long()  # any unsigned label too large for int64 wraps below 0
    out_of_range = (labels < 0) | (labels >= classes)
    # one test for both, so that a batch on a GPU waits for the device once, not three times
    if bool(out_of_range.any() | ~torch.isfinite(x).all()):
        if bool(out_of_range.any()):
            bad = y[out_of_range][0].item()
            raise ValueError(f"label {bad} out of range for {classes} classes")
        raise ValueError("x contains NaN or infinite values")


def check_generator(generator: object, device: torch.device | None) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``generator`` is None or a ``torch.Generator``
    on the device type of the batch (torch draws on a generator's own device only; ``device``
    None: any device, for an estimator that draws nothing)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if device is not None and generator.device.type != device.type:
        raise ValueError(
            f"the generator is on {generator.device} but the batch on {device}: use "
            f"torch.Generator(device={str(device)!r})"
        )


class Estimator(ABC):
    """Base class: validates the model and batch, then runs :meth:`_estimate` under no_grad.

    ``state`` holds per-layer state (warm starts, counters) between calls, keyed by layer
    index, in the spirit of ``torch.optim.Optimizer.state``.  It belongs to one model, as an
    optimizer's does: for another model take a new estimator (a layer of another shape or
    dtype does not reuse what was measured on the old one).
    """

    #: registry name
    name: ClassVar[str] = ""
    #: whether the method uses reverse-mode autograd (only ``Backprop``)
    uses_backprop: ClassVar[bool] = False

    def __init__(self) -> None:
        self.state: dict[int, dict[str, Any]] = {}

    def estimate(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Write gradient estimates into ``p.grad`` and return the loss (detached, 0-d)."""
        layers, x, y = prepare_batch(model, x, y, "estimate")
        check_generator(generator, None if self.uses_backprop else x.device)
        with torch.no_grad():
            loss, grads = self._estimate(layers, x, y, generator)
        for param, grad in grads:
            if param.requires_grad:  # a frozen parameter is left alone, as autograd does
                param.grad = grad
        return loss.detach()

    @abstractmethod
    def _estimate(
        self, layers: list[nn.Linear], x: Tensor, y: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, list[tuple[nn.Parameter, Tensor]]]:
        """Return the loss and ``(parameter, gradient estimate)`` pairs."""

    def options(self) -> dict[str, Any]:
        """The constructor options, for configs and reports."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"
