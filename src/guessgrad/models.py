"""Models the estimators understand, and the check that a model is one of them.

Paper §1: a ReLU MLP with layers i = 1..l,

    s_i = W_i x_i + b_i,    x_{i+1} = ReLU(s_i),

whose logits are s_l.  Every estimator accepts an ``nn.Sequential`` that alternates
``nn.Linear`` and ``nn.ReLU`` and ends in ``nn.Linear``, with or without biases.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules import module as torch_module

__all__ = ["MLP", "linear_layers"]

_SUPPORTED = (
    "an nn.Sequential that alternates nn.Linear and nn.ReLU and ends in nn.Linear "
    "(e.g. guessgrad.MLP([40, 128, 128, 128, 10]))"
)


def MLP(widths: Sequence[int], bias: bool = True) -> nn.Sequential:  # noqa: N802 - a model constructor
    """ReLU MLP ``widths[0] -> widths[1] -> ... -> widths[-1]``.

    PyTorch's default initialisation for the weights; biases start at zero (paper §4).

    Args:
        widths: layer widths, input first and number of classes last; at least two entries.
        bias: whether the linear layers have biases.
    """
    widths = list(widths)
    if len(widths) < 2:
        raise ValueError(f"MLP needs at least an input and an output width, got widths={widths}")
    for w in widths:
        if not isinstance(w, numbers.Integral) or isinstance(w, bool) or w < 1:
            raise ValueError(f"MLP widths must be positive integers, got widths={widths}")
    widths = [int(w) for w in widths]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        linear = nn.Linear(n_in, n_out, bias=bias)
        if bias:
            nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers of a supported model, in order.

    Raises:
        TypeError: ``model`` is not an ``nn.Sequential``, or holds a module other than
            ``nn.Linear``/``nn.ReLU``; the message names the offending module.
        ValueError: the modules are of supported types but in an unsupported order, with
            mismatched widths, one ``nn.Linear`` at two positions or two layers sharing a
            parameter (tied weights), a weight or bias that is not an ``nn.Parameter`` (a
            pruned layer: ``torch.nn.utils.prune`` computes the weight in a hook), a
            parameter the layers do not use (registered on the ``nn.Sequential`` itself, or
            beside a layer's weight and bias), or hooks that would change the function or its
            gradient: forward or backward hooks on the model or its modules, global module
            hooks (``torch.nn.modules.module.register_module_forward_hook`` and the like) and
            gradient hooks on a parameter (``p.register_hook``).  The estimators compute each
            layer from its parameters and write ``p.grad`` directly, so they would skip them.
            One ``nn.ReLU`` at several positions is fine.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"unsupported model {type(model).__name__}: expected {_SUPPORTED}")
    if type(model).forward is not nn.Sequential.forward or "forward" in vars(model):
        raise TypeError(
            f"model {type(model).__name__} overrides nn.Sequential.forward: the estimators "
            f"compute the layers one by one and would skip it; expected {_SUPPORTED}"
        )
    _check_hooks("the model", model)
    if model._parameters:
        raise ValueError(
            f"the model has its own parameter {next(iter(model._parameters))!r}, which no layer "
            f"uses: expected {_SUPPORTED}"
        )
    # every position, a module used at several of them included (named_children lists it once)
    modules = list(model._modules.items())
    if not modules:
        raise ValueError(f"empty nn.Sequential: expected {_SUPPORTED}")
    linears: list[nn.Linear] = []
    for pos, (name, module) in enumerate(modules):
        want = nn.Linear if pos % 2 == 0 else nn.ReLU
        if type(module) not in (nn.Linear, nn.ReLU):
            raise TypeError(
                f"unsupported module {name!r} ({type(module).__name__}) at position {pos}: "
                f"expected {_SUPPORTED}"
            )
        if not isinstance(module, want):
            raise ValueError(
                f"module {name!r} at position {pos} is {type(module).__name__} but "
                f"{want.__name__} was expected there: expected {_SUPPORTED}"
            )
        if isinstance(module, nn.ReLU) and module.inplace:
            raise ValueError(f"module {name!r}: in-place ReLU is not supported, use nn.ReLU()")
        if "forward" in vars(module):
            raise TypeError(
                f"module {name!r} has its own forward: the estimators compute the layer from "
                f"its parameters and would skip it; expected {_SUPPORTED}"
            )
        _check_hooks(f"module {name!r}", module)
        if isinstance(module, nn.Linear):
            extra = set(module._parameters) - {"weight", "bias"}
            if extra or module._modules:
                raise ValueError(
                    f"module {name!r} holds {'parameter' if extra else 'submodule'} "
                    f"{min(extra or module._modules)!r} beside its weight and bias: not supported"
                )
            if any(module is earlier for earlier in linears):
                raise ValueError(
                    f"module {name!r} at position {pos} is a Linear already used at an earlier "
                    "position: tied weights are not supported"
                )
            for attr in ("weight", "bias"):
                value = getattr(module, attr)
                if value is not None and not isinstance(value, nn.Parameter):
                    raise ValueError(
                        f"module {name!r}: its {attr} is not an nn.Parameter (a pruned or "
                        "reparametrised layer): not supported"
                    )
                if value is not None and (
                    value._backward_hooks or getattr(value, "_post_accumulate_grad_hooks", None)
                ):
                    raise ValueError(
                        f"module {name!r}: its {attr} has gradient hooks (register_hook, "
                        "register_post_accumulate_grad_hook): the estimators write p.grad "
                        "directly and would skip them; remove them"
                    )
                if value is not None and any(
                    value is p for earlier in linears for p in (earlier.weight, earlier.bias)
                ):
                    raise ValueError(
                        f"module {name!r}: its {attr} is a parameter of an earlier layer: tied "
                        "weights are not supported"
                    )
            if linears and linears[-1].out_features != module.in_features:
                raise ValueError(
                    f"module {name!r} expects {module.in_features} inputs but the previous "
                    f"layer gives {linears[-1].out_features}"
                )
            linears.append(module)
    if isinstance(modules[-1][1], nn.ReLU):
        raise ValueError(f"model ends in nn.ReLU {modules[-1][0]!r}: expected {_SUPPORTED}")
    _check_global_hooks()
    dtypes = {p.dtype for lin in linears for p in lin.parameters()}
    if len(dtypes) > 1 or not dtypes <= {torch.float32, torch.float64}:
        raise TypeError(f"model parameters must all be float32 or all float64, got {dtypes}")
    return linears


def _check_hooks(what: str, module: nn.Module) -> None:
    """Refuse forward and backward hooks on ``module`` (``what`` names it)."""
    if module._forward_hooks or module._forward_pre_hooks:
        raise ValueError(
            f"{what} has forward hooks (pruning and the old weight_norm work through them): "
            "the estimators compute the layers from their parameters and would skip them; "
            "remove them (torch.nn.utils.prune.remove makes pruning permanent)"
        )
    if module._backward_hooks or module._backward_pre_hooks:
        raise ValueError(
            f"{what} has backward hooks: the estimators compute the layers from their "
            "parameters and write p.grad directly, so they would skip them; remove them"
        )


#: torch's global module hooks (private names, absent ones skipped), each with what sets it
_GLOBAL_HOOKS = {
    "_global_forward_hooks": "register_module_forward_hook",
    "_global_forward_pre_hooks": "register_module_forward_pre_hook",
    "_global_backward_hooks": "register_module_full_backward_hook",
    "_global_backward_pre_hooks": "register_module_full_backward_pre_hook",
}


def _check_global_hooks() -> None:
    """Refuse global module hooks: they would run for backprop's autograd only."""
    for attr, setter in _GLOBAL_HOOKS.items():
        if getattr(torch_module, attr, None):
            raise ValueError(
                f"global module hooks are registered (torch.nn.modules.module.{setter}): the "
                "estimators compute the layers from their parameters and would skip them; "
                "remove them"
            )
