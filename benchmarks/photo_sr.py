"""Super-resolution of held-out photographs by an srVAE trained with the README's own-images command.

The photographs are the real ones that ship inside scikit-image's wheel
(``skimage/data``; ``pip install -e ".[photos]"``, nothing is downloaded), in four sets that
never share a photograph (docs/results.md, "Your own images", says which set chose what):

* ``train``: ten colour and grey photographs, converted to grey and cut into patches;
* ``validation``: camera, coins, moon, page, text (172 to 512 pixels a side), on which every
  recipe choice was made (they were the "held-out" set of the first fifteen runs); they are also
  the run's own test split, so its metrics.json describes them;
* ``test``: chelsea, coffee, rocket, ordinary photographs that no choice has seen (they trained
  the runs before the protocol, which made no choice on them): scored once per recipe;
* calibration: scikit-image's clock_motion and microaneurysms and matplotlib's grace_hopper, on
  which ``pyro-srvae calibrate`` fits the SR spread before scoring.

The model is trained by the README's command, word for word (:data:`README_COMMAND`: the folder's
recipe, ``pyro_srvae.training.config.RECIPES``), plus the benchmark's bookkeeping (``--out``, ``--seed``,
no figures, and its own evaluation cut to 1,024 patches); extra training flags after ``--`` try
another recipe. Each scored photograph is downscaled 2x by block averaging (y = A x) and
super-resolved whole (tiled, :func:`pyro_srvae.superresolve_image`; moon's file is a 256x256
photograph stored 2x nearest-upsampled, so it is scored at 256x256: :func:`scored_photograph`).
The SR mean is scored against the photograph beside bicubic upsampling and bicubic made
consistent with y (``bicubic + nearest_upsample(y - A bicubic)``), and the central 90% intervals
of the SR draws are checked on the detail pixels (those differing from their block mean by more
than one grey level: chosen by the truth, which lowers even a calibrated predictive's coverage),
on the edge pixels (where the bicubic upsampling of y is more than a grey level off y's own
pixel: chosen from y alone, a calibration test) and on all pixels. ``*_model`` coverages are the
model's own spread's, from the same draws.

    python benchmarks/photo_sr.py --out runs/photo-sr                  # trains, scores validation
    python benchmarks/photo_sr.py --out runs/photo-sr --score validation test   # and the test set
    python benchmarks/photo_sr.py --out runs/photo-sr --skip-training  # scores the checkpoint again
    python benchmarks/photo_sr.py --out runs/photo-sr -- --epochs 6    # another recipe

Prints one row per photograph and writes ``OUT/photo_sr.json``.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pyro_srvae.sr.calibrate import calibrate_checkpoint
from pyro_srvae.sr.calibration import CALIBRATION_PIXELS, model_spread
from pyro_srvae.utils.io import atomic_write_text
from pyro_srvae.utils.seeds import derive_seed
from pyro_srvae.metrics.sr_scores import (
    bicubic_upsample,
    detail_mask,
    edge_mask,
    interval_coverages,
    make_consistent,
    psnr,
)
from pyro_srvae.data.channels import match_channels
from pyro_srvae.data.images import read_image
from pyro_srvae.model.distributions import block_mean, nearest_upsample
from pyro_srvae.model.image_model import downscale
from pyro_srvae.metrics.latents import latent_share
from pyro_srvae.sr.loading import load_model
from pyro_srvae.sr.tiling import default_views, superresolve_image
from pyro_srvae.training.loop import train

from common import package_photographs, readme_training_config

TRAIN_PHOTOS = (
    "astronaut.png", "brick.png", "cell.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "motorcycle_left.png", "motorcycle_right.png", "retina.jpg",
)  # fmt: skip
VALIDATION_PHOTOS = ("camera.png", "coins.png", "moon.png", "page.png", "text.png")
TEST_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")
SCORED_SETS = {"validation": VALIDATION_PHOTOS, "test": TEST_PHOTOS}
#: Photographs in neither folder that calibrate the SR spread (pyro_srvae.sr.calibration): the
#: package files (scikit-image's and matplotlib's wheels) they come from.
CALIBRATION_PHOTOS = (("skimage", "clock_motion.png"), ("skimage", "microaneurysms.png"), ("matplotlib", "grace_hopper.jpg"))
FACTOR = 2


def photo_folders():
    """The wheels' photograph folders, once every photograph the benchmark uses is there."""
    names = TRAIN_PHOTOS + VALIDATION_PHOTOS + TEST_PHOTOS
    return package_photographs("photo_sr", [("skimage", name) for name in names] + list(CALIBRATION_PHOTOS))


def calibration_paths(folders):
    """The :data:`CALIBRATION_PHOTOS` as paths."""
    return [folders[package] / name for package, name in CALIBRATION_PHOTOS]


def stage_seeds(seed):
    """(calibration seed, scoring seed), derived apart from ``--seed`` (which trains the model):
    the draws the spread is fitted to and the draws it is judged by must be independent, and
    one seed would give both stages the same noise."""
    return derive_seed(seed, "photo_sr", "calibrate"), derive_seed(seed, "photo_sr", "score")


def calibrate(run, paths, pixels, num_samples, seed):
    """Fit the spread on the calibration photographs (as scored: grey, cut to the factor) into the checkpoint."""
    images = [scored_photograph(path)[0][0] for path in paths]
    return calibrate_checkpoint(run / "checkpoint.pt", images, names=[path.name for path in paths], pixels=pixels,
                                num_samples=num_samples, seed=seed)  # fmt: skip


def build_folder(source, root):
    """root/train (the training photographs), root/test (the validation ones: the run's own test split)
    and root/scored-test (the test photographs, outside the folder the run reads), as copies."""
    for split, names in (("train", TRAIN_PHOTOS), ("test", VALIDATION_PHOTOS), ("scored-test", TEST_PHOTOS)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for name in names:
            if not (root / split / name).exists():
                shutil.copyfile(source / name, root / split / name)
    return root


def scored_paths(folder, scored_set):
    return [folder / ("test" if scored_set == "validation" else "scored-test") / name for name in SCORED_SETS[scored_set]]


#: The README's own-images training command, word for word (README.md, "Train on your own images").
README_COMMAND = ("--guide", "full", "--dataset", "folder", "--data-dir", "{folder}", "--channels", "1")


def scored_photograph(path):
    """The grey photograph at ``path`` as the ``(1, 1, H, W)`` image x that is scored, with H and W
    cut to multiples of FACTOR, and whether the file stores it FACTOR x nearest-upsampled.

    Such a file (skimage's moon: every 2x2 block is constant) is a smaller photograph: y = A x
    would be the photograph itself and the right answer its blocks, so it is scored at its own
    resolution (its block means) instead.
    """
    pixels, _ = match_channels(read_image(path), 1)
    height, width = (pixels.shape[1] // FACTOR) * FACTOR, (pixels.shape[2] // FACTOR) * FACTOR
    x = torch.from_numpy(np.ascontiguousarray(pixels[:, :height, :width]))[None]
    stored_upsampled = bool(torch.equal(x, nearest_upsample(block_mean(x, FACTOR), FACTOR)))
    if stored_upsampled:
        x = block_mean(x, FACTOR)
        height, width = (x.shape[-2] // FACTOR) * FACTOR, (x.shape[-1] // FACTOR) * FACTOR
        x = x[..., :height, :width]
    return x, stored_upsampled


def score(model, path, num_samples, seed):
    """PSNRs of the SR mean and the baselines on one photograph, and the 90% coverages.

    The coverages are those of the draws ``superresolve`` writes (the calibrated spread, when
    the checkpoint holds one); ``*_model`` are those of the model's own predictive, from the
    same draws before the noise is scaled.
    """
    x, stored_upsampled = scored_photograph(path)
    height, width = x.shape[-2:]
    y = downscale(x, FACTOR, "area")
    with model_spread(model):
        sr = superresolve_image(model, y[0], num_samples, seed=seed)
    scale = torch.ones(1) if model.spread_scale is None else torch.tensor(model.spread_scale)
    draws = {"": sr.means + scale.view(-1, 1, 1) * (sr.samples - sr.means), "_model": sr.samples}
    bicubic = bicubic_upsample(y, FACTOR)
    mask, edges = detail_mask(x, FACTOR), edge_mask(y, FACTOR)
    coverages = {}
    for suffix, samples in draws.items():
        for name, pixels in (("detail", mask), ("edges", edges), ("all", None)):
            coverages[f"coverage90_{name}{suffix}"] = float(interval_coverages(samples[:, None], x, pixels, levels=(0.9,))["0.9"])
    # What z carries (pyro_srvae.metrics.latents): the latents' share of the model's own predictive variance,
    # and the best of the draws' decoder means against the mean.
    latent, noise = sr.std_latent.square(), sr.std_noise.square()
    best_of = max(float(psnr(m.clamp(0, 1)[None], x)) for m in sr.means)
    sr_psnr = float(psnr(sr.mean.clamp(0, 1)[None], x))
    return {
        "photo": path.name,
        "size": f"{height}x{width}",
        "stored_nearest_upsampled": stored_upsampled,
        "sr_psnr": sr_psnr,
        "latent_share": latent_share(float(latent.sum()), float(noise.sum())),
        "latent_share_detail": latent_share(float(latent[mask[0]].sum()), float(noise[mask[0]].sum())),
        "best_of_gain": best_of - sr_psnr,
        "bicubic_psnr": float(psnr(bicubic, x)),
        "consistent_bicubic_psnr": float(psnr(make_consistent(bicubic, y, FACTOR), x)),
        **coverages,
        "detail_fraction": float(mask.float().mean()),
        "detail_pixels": int(mask.sum()),
        "edge_pixels": int(edges.sum()),
        "pixels": int(x.numel()),
    }


def print_rows(scored_set, rows, sr_samples):
    print(f"\n{scored_set} photographs")
    print(f"{'':<12} {'':>9} {'':>8} {'':>8} {'':>8} {'':>6} {'90% coverage, as drawn':>23} {'model own':>10}")
    print(f"{'photo':<12} {'size':>9} {'SR mean':>8} {'bicubic':>8} {'consist.':>8} {'gain':>6} {'detail':>7} {'edges':>7} {'all':>7} {'detail':>10}")
    for row in rows:
        gain = row["sr_psnr"] - row["bicubic_psnr"]
        size = row["size"] + ("*" if row["stored_nearest_upsampled"] else "")
        print(
            f"{row['photo']:<12} {size:>9} {row['sr_psnr']:8.2f} {row['bicubic_psnr']:8.2f} "
            f"{row['consistent_bicubic_psnr']:8.2f} {gain:+6.2f} {row['coverage90_detail']:7.3f} "
            f"{row['coverage90_edges']:7.3f} {row['coverage90_all']:7.3f} {row['coverage90_detail_model']:10.3f}"
        )
    if any(row["stored_nearest_upsampled"] for row in rows):
        print(f"* stored {FACTOR}x nearest-upsampled (every block constant): scored at its own resolution, its block means")
    summary = summarize(rows)
    mean = summary["mean"]
    print(f"{'mean':<12} {'':>9} {mean['sr_psnr']:8.2f} {mean['bicubic_psnr']:8.2f} {mean['consistent_bicubic_psnr']:8.2f} "
          f"{summary['gain_over_bicubic_db']:+6.2f}")
    # Each draw comes from its own flipped or turned view (superresolve --views), so the spread of the draws'
    # decoder means holds the views' disagreement beside what the latents carry; the run's metrics.json has
    # the latents' share alone, on its held-out patches (one view).
    print(f"the decoder means' share {summary['latent_share']:.3f} of the predictive variance "
          f"({summary['latent_share_detail']:.3f} on detail pixels: the latents and the views' disagreement), "
          f"best of {sr_samples} decoder means {summary['best_of_gain']:+.2f} dB over the mean (averages over the photographs)")
    print(f"gain over bicubic {summary['gain_over_bicubic_db']:+.2f} dB; beats consistent bicubic on every photo: "
          f"{summary['beats_consistent_bicubic_on_every_photo']}")
    print(f"90% coverage (pooled), as drawn: {summary['coverage90_detail_pooled']:.3f} of the detail pixels, "
          f"{summary['coverage90_edges_pooled']:.3f} of the edge pixels (chosen from y), {summary['coverage90_all_pooled']:.3f} of all; "
          f"the model's own: {summary['coverage90_detail_model_pooled']:.3f} / {summary['coverage90_edges_model_pooled']:.3f} / "
          f"{summary['coverage90_all_model_pooled']:.3f}")
    return summary


def summarize(rows):
    """Means over one set's photographs, and the coverages pooled over its pixels (each photograph weighs its count)."""
    mean = {key: float(np.mean([row[key] for row in rows])) for key in ("sr_psnr", "bicubic_psnr", "consistent_bicubic_psnr")}
    counts = {"detail": "detail_pixels", "edges": "edge_pixels", "all": "pixels"}
    pooled = {
        f"coverage90_{name}{suffix}_pooled": sum(r[f"coverage90_{name}{suffix}"] * r[count] for r in rows) / max(sum(r[count] for r in rows), 1)
        for name, count in counts.items() for suffix in ("", "_model")
    }  # fmt: skip
    return {
        "photos": rows,
        "mean": mean,
        "gain_over_bicubic_db": mean["sr_psnr"] - mean["bicubic_psnr"],
        **{key: float(np.mean([row[key] for row in rows])) for key in ("latent_share", "latent_share_detail", "best_of_gain")},
        "beats_consistent_bicubic_on_every_photo": all(r["sr_psnr"] > r["consistent_bicubic_psnr"] for r in rows),
        **pooled,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/photo-sr", help="folder for the photographs, the run and the scores")
    parser.add_argument("--score", nargs="+", choices=tuple(SCORED_SETS), default=["validation"],
                        help="the sets of photographs scored; the test set once per recipe (docs/results.md)")
    parser.add_argument("--sr-samples", type=int, default=16, help="SR draws per photograph (for the intervals)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-training", action="store_true", help="score the checkpoint already in OUT/run")
    parser.add_argument("--calibrate-on", choices=CALIBRATION_PIXELS + ("none",), default="detail",
                        help="fit the SR spread on the three calibration photographs' pixels of this set "
                        "(pyro-srvae calibrate --pixels); none: score the model's own spread")
    parser.add_argument("train_flags", nargs="*", metavar="-- FLAG",
                        help="training flags after --, added to the README's command (another recipe)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    out = Path(args.out)
    folders = photo_folders()
    folder = build_folder(folders["skimage"], out / "photos")
    run = out / "run"
    started = time.perf_counter()
    if not args.skip_training:
        train(readme_training_config(README_COMMAND, folder, run, args.seed, args.train_flags), progress=True)
    train_seconds = time.perf_counter() - started
    calibration = None
    calibration_seed, scoring_seed = stage_seeds(args.seed)
    if args.calibrate_on != "none":
        calibration = calibrate(run, calibration_paths(folders), args.calibrate_on, args.sr_samples, calibration_seed)
        print(f"spread {calibration.describe()}")
    model = load_model(run / "checkpoint.pt", device="cpu")
    if calibration is None:
        model.spread_scale = None
    print(f"{args.sr_samples} SR draws per photograph from {default_views(model)} flipped and turned views (superresolve --views)")
    sets = {}
    for scored_set in args.score:
        rows = [score(model, path, args.sr_samples, scoring_seed) for path in scored_paths(folder, scored_set)]
        sets[scored_set] = print_rows(scored_set, rows, args.sr_samples)
    report = {
        "sets": sets,
        "readme_command": list(README_COMMAND),
        "train_flags": args.train_flags,
        "config": json.loads((run / "metrics.json").read_text())["config"],
        "sr_samples": args.sr_samples,
        "calibration_seed": calibration_seed,
        "scoring_seed": scoring_seed,
        "views": default_views(model),
        "spread_calibration": None if calibration is None else calibration.to_dict(),
        "train_seconds": None if args.skip_training else train_seconds,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "args": vars(args),
    }
    atomic_write_text(out / "photo_sr.json", json.dumps(report, indent=2) + "\n")
    if not args.skip_training:
        print(f"training and evaluation of the run: {train_seconds:.0f} s")


if __name__ == "__main__":
    main()
