"""Datasets."""

from .mnist1d import MNIST1D, cache_dir, mnist1d

__all__ = ["MNIST1D", "cache_dir", "mnist1d"]
