#!/usr/bin/env python
"""How much ``fd`` moves with the sampling seed alone, for every cell of a comparison.

    python scripts/fd_seed_spread.py runs/compare-fashion-mnist --seeds 5

Loads each cell's trained model and the cached fd classifier of the comparison in OUT,
and recomputes ``fd`` (generated vs test images) with sampling seeds 0..N-1: the spread
is the noise of the metric for a fixed model, the yardstick for calling two fd values
different. (The spread over training seeds, which needs retraining, is not included.)
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import pyro

from pyro_srvae.metrics import frechet
from pyro_srvae.experiments.comparison import CELL_NAMES, ComparisonSettings, comparison_test_images, fd_classifier
from pyro_srvae.sr.loading import load_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the --out directory of a finished comparison")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--data-dir", default=None, help="where the dataset is, if not where the comparison found it")
    args = parser.parse_args(argv)
    out = Path(args.out)
    settings = ComparisonSettings.load(out)
    if args.data_dir is not None:
        settings.data_dir = args.data_dir
    classifier = fd_classifier(settings, out, "cpu", log=print)
    test_images = comparison_test_images(settings)
    results = {}
    for cell in CELL_NAMES:
        checkpoint = out / "cells" / cell / "checkpoint.pt"
        if not checkpoint.exists():
            continue
        pyro.clear_param_store()
        model = load_model(checkpoint, device="cpu", require_super_resolution=False)
        values = [
            frechet.compute_fd(model, test_images, classifier, num_samples=settings.budget.fd_samples, seed=seed)
            for seed in range(args.seeds)
        ]
        results[cell] = {"mean": statistics.mean(values), "std": statistics.stdev(values), "values": values}
        print(f"{cell:24} fd {results[cell]['mean']:8.3f} +- {results[cell]['std']:.3f} over {args.seeds} sampling seeds")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
