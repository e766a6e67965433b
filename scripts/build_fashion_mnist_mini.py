#!/usr/bin/env python
"""Rebuild the embedded ``fashion-mnist-mini`` dataset from the original Fashion-MNIST files.

Selection rule (deterministic, no randomness involved):

* train: the first 1,000 images of each class in the order of
  ``train-images-idx3-ubyte`` (10,000 images);
* test: the first 200 images of each class in the order of
  ``t10k-images-idx3-ubyte`` (2,000 images).

The selected images keep their original file order (classes stay interleaved as
in the source), so the subset is the source with the surplus images of each
class removed.  The result is written with ``numpy.savez_compressed`` as uint8
arrays ``train_images`` (10000, 28, 28), ``train_labels`` (10000,),
``test_images`` (2000, 28, 28) and ``test_labels`` (2000,).

Usage, from the repository root::

    python scripts/build_fashion_mnist_mini.py \
        --source ../shared/data/fashion-mnist \
        --out pyro_srvae/data/embedded/fashion_mnist_mini.npz

The arrays are identical on every rebuild; in practice so is the .npz file,
since ``savez_compressed`` writes fixed zip timestamps (the compressed bytes
could only change with another zlib).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data" / "fashion-mnist"
DEFAULT_OUT = REPO_ROOT / "pyro_srvae" / "data" / "embedded" / "fashion_mnist_mini.npz"

PER_CLASS = {"train": 1000, "test": 200}
NUM_CLASSES = 10
SOURCE_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Reuse the package's IDX reader (one implementation to test); the fallback on
# sys.path lets the script run from a checkout without installing the package.
try:
    from pyro_srvae.data.datasets import read_idx
except ImportError:  # pragma: no cover - only without an installed package
    sys.path.insert(0, str(REPO_ROOT))
    from pyro_srvae.data.datasets import read_idx


def _source_file(source: Path, name: str) -> Path:
    for candidate in (source / name, source / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"neither {name} nor {name}.gz found in {source}")


def first_per_class(labels: np.ndarray, per_class: int, num_classes: int = NUM_CLASSES):
    """Indices of the first ``per_class`` items of every class, in ascending (file) order."""
    chosen = []
    for label in range(num_classes):
        indices = np.flatnonzero(labels == label)[:per_class]
        if len(indices) < per_class:
            raise ValueError(f"class {label} has only {len(indices)} items, {per_class} needed")
        chosen.append(indices)
    return np.sort(np.concatenate(chosen))


def build_arrays(source: Path) -> Dict[str, np.ndarray]:
    """The arrays of ``fashion_mnist_mini.npz``, built from the IDX files in ``source``."""
    arrays = {}
    for split, (images_name, labels_name) in SOURCE_FILES.items():
        images = read_idx(_source_file(source, images_name))
        labels = read_idx(_source_file(source, labels_name))
        if images.shape[1:] != (28, 28) or images.dtype != np.uint8 or len(labels) != len(images):
            raise ValueError(
                f"{source}: unexpected {split} arrays "
                f"{images.dtype} {images.shape} / {labels.shape}"
            )
        keep = first_per_class(labels, PER_CLASS[split])
        arrays[f"{split}_images"] = np.ascontiguousarray(images[keep], dtype=np.uint8)
        arrays[f"{split}_labels"] = np.ascontiguousarray(labels[keep], dtype=np.uint8)
    return arrays


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help="folder with the Fashion-MNIST IDX files, gzipped or not "
        "(default: ../shared/data/fashion-mnist relative to the repository root)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="output .npz (default: pyro_srvae/data/embedded/fashion_mnist_mini.npz)",
    )
    args = parser.parse_args(argv)

    arrays = build_arrays(args.source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    sizes = ", ".join(f"{key} {value.shape}" for key, value in arrays.items())
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes): {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
