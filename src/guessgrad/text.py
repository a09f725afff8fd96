"""Wording shared by the command line, the reports and the benchmarks."""

from __future__ import annotations

__all__ = ["counted"]


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, in the plural unless n is 1: "1 step", "2 steps"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
