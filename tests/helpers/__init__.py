"""Test helpers: a tiny in-memory stand-in for ``rcfast.data.ProxyImages``."""
from helpers.proxy import TensorProxy, toy_images

__all__ = ["TensorProxy", "toy_images"]
