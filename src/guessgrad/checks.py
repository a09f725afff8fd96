"""Checks of the library's integer arguments, shared so that every function takes the same
values (integers of any type, NumPy's too, but not booleans) and says the same thing when it
refuses one: a ``ValueError`` naming the argument and the value given."""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["integer", "optional_integer"]

_KINDS = {0: "a non-negative integer", 1: "a positive integer"}


def integer(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an ``int``, if it is an integer of at least ``minimum``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum:
        return int(value)
    kind = _KINDS.get(minimum, f"an integer >= {minimum}")
    raise ValueError(f"{name} must be {kind}, got {name}={value!r}")


def optional_integer(name: str, value: Any, *, minimum: int = 1) -> int | None:
    """:func:`integer`, or ``None`` for ``None``."""
    if value is None:
        return None
    try:
        return integer(name, value, minimum=minimum)
    except ValueError:
        kind = _KINDS.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {kind} or None, got {name}={value!r}") from None
