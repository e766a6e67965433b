"""A 4-band, 16-bit folder whose values fill a few thousand levels, built from real photographs, trained
by the README's own-images command (the folder's recipe) and scored by the run's own evaluation.

How the scenes are built (:func:`scene`), from the colour photographs in scikit-image's and
matplotlib's wheels (``pip install -e ".[photos]"``, nothing is downloaded):

* each photograph is block-averaged 2x2 (the 8-bit values become quarter levels: 1,021 values
  instead of 256) and its red, green and blue channels become bands 1-3; band 4, a near-infrared
  stand-in, is ``0.7 R + 0.3 G`` (vegetation and skin are bright in both);
* each band is mapped linearly into a reflectance-like range of 16-bit levels, from ``600 + 150 b``
  to ``2,600 + 200 b`` for band b (0-3): 2,000 to 2,450 levels of 65,536, x between 0.009 and 0.049;
* Gaussian sensor noise of 3 levels is added and the result rounded to uint16, so that the values
  are not a comb of 1,021 levels (a density could score the comb instead of the images).

``train``: seven photographs; ``test``: three others (:data:`TRAIN_SCENES`, :data:`TEST_SCENES`), cut
into 32x32 patches by the run. The numbers are the run's own test metrics (``metrics.json``): the SR
mean's PSNR against consistent bicubic, and -log p(x|y) (``sr_bpd``) against the consistent-bicubic
Gaussian's (``sr_bpd_baseline``), in the data's own units.

    python benchmarks/bands16_sr.py --out runs/bands16             # builds, trains, scores
    python benchmarks/bands16_sr.py --out runs/bands16 -- --standardize off   # another recipe

Prints the comparison and writes ``OUT/bands16_sr.json``.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from pyro_srvae.utils.io import atomic_write_text
from pyro_srvae.training.loop import train

from common import package_photographs, readme_training_config

TRAIN_SCENES = (("skimage", "coffee.png"), ("skimage", "chelsea.png"), ("skimage", "motorcycle_left.png"),
                ("skimage", "retina.jpg"), ("skimage", "hubble_deep_field.jpg"), ("skimage", "ihc.png"),
                ("skimage", "rocket.jpg"))  # fmt: skip
TEST_SCENES = (("skimage", "astronaut.png"), ("skimage", "motorcycle_right.png"), ("matplotlib", "grace_hopper.jpg"))
#: The README's 16-bit command (README.md, "Train on your own images"), with the folder in braces.
README_COMMAND = ("--guide", "full", "--dataset", "folder", "--data-dir", "{folder}")
LOW, HIGH, NOISE = (600, 750, 900, 1050), (2600, 2800, 3000, 3200), 3.0


def scene(path, rng):
    """The (4, H/2, W/2) uint16 scene made from the colour photograph at ``path`` (module docstring)."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).transpose(2, 0, 1)
    height, width = rgb.shape[1] // 2 * 2, rgb.shape[2] // 2 * 2
    rgb = rgb[:, :height, :width].reshape(3, height // 2, 2, width // 2, 2).mean(axis=(2, 4))
    bands = np.concatenate([rgb, 0.7 * rgb[:1] + 0.3 * rgb[1:2]]) / 255.0
    low, high = np.array(LOW)[:, None, None], np.array(HIGH)[:, None, None]
    levels = low + (high - low) * bands + rng.normal(0.0, NOISE, bands.shape)
    return np.clip(np.rint(levels), 0, 65535).astype(np.uint16)


def build_folder(root, seed=0):
    rng = np.random.default_rng(seed)
    folders = package_photographs("bands16_sr", TRAIN_SCENES + TEST_SCENES)
    for split, names in (("train", TRAIN_SCENES), ("test", TEST_SCENES)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for package, name in names:
            target = root / split / (Path(name).stem + ".tif")
            if not target.exists():
                tifffile.imwrite(target, scene(folders[package] / name, rng))
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bands16", help="folder for the scenes, the run and the scores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("train_flags", nargs="*", metavar="-- FLAG", help="training flags after --, added to the README's command")
    args = parser.parse_args(argv)
    out = Path(args.out)
    folder = build_folder(out / "scenes")
    started = time.perf_counter()
    result = train(readme_training_config(README_COMMAND, folder, out / "run", args.seed, args.train_flags), progress=True)
    test = result.metrics["test"]
    report = {
        "sr_psnr": test["sr_psnr"], "consistent_bicubic_psnr": test["consistent_bicubic_psnr"],
        "bicubic_psnr": test["bicubic_psnr"],
        "sr_bpd": test["sr_bpd"], "consistent_bicubic_gaussian_bpd": test["sr_bpd_baseline"],
        "sr_coverage": test.get("sr_coverage"),  # PSNRs above: data range 1, the 16-bit range (x in [0, 1])
        "no_worse_than_consistent_bicubic": test["sr_psnr"] >= test["consistent_bicubic_psnr"],
        "density_below_the_consistent_bicubic_gaussian": test["sr_bpd"] < test["sr_bpd_baseline"],
        "standardized": result.metrics.get("data_scaling") is not None,
        "skipped_updates": result.metrics.get("skipped_updates"),
        "train_and_evaluation_seconds": time.perf_counter() - started,
        "readme_command": list(README_COMMAND), "train_flags": args.train_flags, "seed": args.seed,
        "scenes": {"train": [n for _, n in TRAIN_SCENES], "test": [n for _, n in TEST_SCENES]},
        "build": {"low": LOW, "high": HIGH, "noise_levels": NOISE, "block_average": 2, "band4": "0.7 R + 0.3 G"},
    }  # fmt: skip
    print(f"SR mean {report['sr_psnr']:.2f} dB, consistent bicubic {report['consistent_bicubic_psnr']:.2f} dB, "
          f"bicubic {report['bicubic_psnr']:.2f} dB; -log p(x|y) {report['sr_bpd']:.3f} bits/dim against the "
          f"consistent-bicubic Gaussian's {report['consistent_bicubic_gaussian_bpd']:.3f}")  # fmt: skip
    atomic_write_text(out / "bands16_sr.json", json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
