"""What the benchmark scripts share: their test images, their memory figure, the photographs in the
wheels and the README's training commands."""

import argparse
import importlib.util
import resource
import sys
from pathlib import Path

import torch

from pyro_srvae.cli import build_train_parser, config_from_args
from pyro_srvae.data.datasets import load_dataset


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


def package_photographs(script, wanted):
    """The folders of the photographs that ship in scikit-image's and matplotlib's wheels, as
    ``{"skimage": ..., "matplotlib": ...}``, once every ``(package, name)`` in ``wanted`` is found there;
    otherwise ``script`` exits with one line (nothing is downloaded: ``pip install -e ".[photos]"``)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f'{script}: scikit-image is not installed: pip install -e ".[photos]" (its wheel ships the photographs)')
    import matplotlib  # a dependency of the package; imported here only to find its sample data

    folders = {"skimage": Path(list(spec.submodule_search_locations)[0]) / "data",
               "matplotlib": Path(matplotlib.get_data_path()) / "sample_data"}  # fmt: skip
    missing = [str(folders[package] / name) for package, name in wanted if not (folders[package] / name).is_file()]
    if missing:
        sys.exit(f"{script}: the photographs {', '.join(missing)} are missing (another scikit-image version?)")
    return folders


def readme_training_config(command, folder, out, seed, extra=()):
    """The TrainConfig of a README training ``command`` (argv with ``{folder}`` in it) on ``folder``, as the
    command line builds it, plus a benchmark's bookkeeping (``--out``, ``--seed``, no figures, its own
    evaluation cut to 1,024 images) and ``extra`` flags (another recipe)."""
    parser = build_train_parser()
    argv = [arg.format(folder=folder) for arg in command]
    argv += ["--out", str(out), "--seed", str(seed), "--no-figures", "--eval-limit", "1024", *extra]
    return config_from_args(parser, parser.parse_args(argv))
