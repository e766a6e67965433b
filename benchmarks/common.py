"""What the benchmark scripts share: their test images and their memory figure."""

import argparse
import resource

import torch

from pyro_srvae.data import load_dataset


def image_shape(text):
    """argparse type of ``--shape C,H,W``."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers C,H,W, got {text!r}")
    return shape


def benchmark_images(num_images, shape=None, split="train"):
    """uint8 images: the embedded Fashion-MNIST subset, or seeded random ones of ``shape``
    (e.g. CIFAR-10's 3,32,32, where the time of a step does not depend on the pixels)."""
    if shape is None:
        return load_dataset("fashion-mnist-mini", split).images[:num_images]
    return torch.randint(0, 256, (num_images, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def peak_memory_mb(device):
    """Peak GPU memory allocated by torch, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
