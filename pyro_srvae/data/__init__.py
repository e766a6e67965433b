"""Images in: named datasets (``datasets``, the embedded ``fashion-mnist-mini`` under ``embedded/``), a folder
of your own images in patches (``folder``), image files (``images``, ``channels``), and batching
(``batching``). Imports ``utils`` only."""

from .batching import dequantize
from .datasets import load_dataset

__all__ = ["dequantize", "load_dataset"]
