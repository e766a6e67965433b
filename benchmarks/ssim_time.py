"""SSIM as the evaluation computes it (two 1-D Gaussian passes) against torchmetrics' 2-D one.

Alternates the two on the same images (a batch of the main job's evaluation: 125 images of 28x28),
each first in every other pair, and prints both medians, their ratio and the largest difference:

    python benchmarks/ssim_time.py
"""

import argparse
import statistics
import time

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from pyro_srvae.metrics.sr_scores import ssim, ssim_kernel_size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="125,1,28,28", help="N,C,H,W of the images")
    parser.add_argument("--pairs", type=int, default=60)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    g = torch.Generator().manual_seed(0)
    target = torch.rand(shape, generator=g)
    pred = (target + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    k = ssim_kernel_size(shape[-2], shape[-1])

    def torchmetrics_ssim():
        return structural_similarity_index_measure(pred, target, gaussian_kernel=True, sigma=1.5 * k / 11,
                                                   kernel_size=k, reduction="none", data_range=1.0)  # fmt: skip

    def separable_ssim():
        return ssim(pred, target)

    difference = (torchmetrics_ssim() - separable_ssim()).abs().max().item()
    times = {"torchmetrics": [], "separable": []}
    sides = (("torchmetrics", torchmetrics_ssim), ("separable", separable_ssim))
    for pair in range(args.pairs + 5):
        for name, run in sides if pair % 2 else sides[::-1]:
            start = time.perf_counter()
            run()
            if pair >= 5:  # five warm-up pairs
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    print(f"images {shape}, window {k}: torchmetrics {medians['torchmetrics']:.2f} ms, separable "
          f"{medians['separable']:.2f} ms, ratio {medians['torchmetrics'] / medians['separable']:.2f}; "
          f"largest difference {difference:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
