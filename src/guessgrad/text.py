"""Wording shared by the command line, the reports and the benchmarks."""

from __future__ import annotations

__all__ = ["counted"]


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, in the plural (``plural``, else ``noun`` + "s") unless n is 1:
    "1 step", "2 steps"."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
