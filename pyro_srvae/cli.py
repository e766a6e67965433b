"""Command-line front ends.

* :func:`main` -- ``examples/train_srvae.py`` and ``pyro-srvae train``: flags -> :func:`pyro_srvae.train`.
* :func:`console_main` -- the ``pyro-srvae`` console command, with the subcommands
  ``train``, ``evaluate`` (:func:`pyro_srvae.superresolve.evaluate_checkpoint`) and
  ``superresolve`` (:func:`pyro_srvae.superresolve.superresolve`) and ``calibrate``
  (:func:`pyro_srvae.calibration.calibrate_checkpoint`).

Exit codes: 0 done, 1 a bad input, checkpoint or dataset (one line on stderr, no
traceback), 2 bad flags, 130 / 143 interrupted.
"""

import argparse
import os
import sys

from .calibration import SpreadCalibration
from .checkpoint import CheckpointError
from .data import DATASET_NAMES, DATASETS, DatasetNotFoundError
from .folder import FolderDatasetError
from .elbo import ELBO_NAMES
from .likelihoods import LIKELIHOODS
from .models import DOWNSCALE_FACTORS, DOWNSCALE_MODES, GUIDES, PIXEL_SCALE_SOURCES, X_GIVEN_Y, Z_POSTERIORS
from .networks import ARCHS, SR_BASES, Z_INJECTIONS
from .priors import PRIORS
from .training import (
    DEVICES,
    FOLDER_STEP_BUDGET,
    LR_SCHEDULES,
    MODEL_DEFAULTS,
    MODELS,
    RECIPES,
    PRECISIONS,
    STANDARDIZE,
    ConfigError,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    evaluation_rows,
    format_rows,
    model_label,
    train,
)

EXIT_INTERRUPTED = {2: 130, 15: 143}  # the shell's 128 + signal number
SPREADS = ("calibrated", "model")


def recipe_default(name):
    """A field's default in each recipe (training.RECIPES), for the flags' help: ``[X; folder: Y]``."""
    unset = {"sr_arch": "--arch", "sr_hidden": "--hidden"}  # what None means for these two
    values = []
    for recipe in RECIPES.values():
        value = recipe["all"].get(name, recipe.get("srvae", {}).get(name, recipe.get(name)))
        values.append(unset.get(name) if value is None else value)
    named, folder = values
    return f"[{named}; --dataset folder: {folder}]"


def build_train_parser(prog=None):
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train and evaluate a VAE or srVAE (Pyro), write metrics, checkpoints and figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--model", choices=MODELS, default=defaults.model, help="plain VAE (sec. 2) or two-stage srVAE (sec. 3-4)")
    add("--guide", choices=GUIDES, default=None, help="srVAE guide: simple q(u|y)q(z|x) or full q(u|y)q(z|x,y,u) [simple]")
    add("--prior", choices=PRIORS, default=defaults.prior, help="prior on u (srVAE) or z (VAE)")
    add("--mog-components", type=int, default=defaults.mog_components, metavar="K")
    add("--elbo", choices=ELBO_NAMES, default=defaults.elbo, help="Pyro ELBO estimator (pyro_srvae.make_elbo)")
    add("--num-particles", type=int, default=defaults.num_particles, metavar="N")
    add("--dataset", choices=DATASET_NAMES, default=defaults.dataset,
        help="a named set, or folder: your own PNG/JPEG/TIFF/.npy images under --data-dir (8- or 16-bit)")
    add("--data-dir", default=defaults.data_dir, metavar="DIR",
        help="root of torchvision-layout data [./data]; for --dataset folder, the folder of images "
        "(DIR/train and DIR/test when both exist, else a seeded split by image)")
    add("--patch-size", type=int, default=None, metavar="P",
        help=f"folder: train on P x P patches (a multiple of --factor); also superresolve's tile [{RECIPES['folder']['all']['patch_size']}]")
    add("--patch-stride", type=int, default=None, metavar="S", help="folder: step of the patch grid [P/2]")
    add("--test-fraction", type=float, default=defaults.test_fraction, metavar="F",
        help="folder without DIR/train and DIR/test: the share of images (at least one) held out for testing")
    add("--channels", type=int, default=None, metavar="C",
        help="folder: convert every image to C channels (grey <-> RGB) [the images' own count]")
    add("--augment", action=argparse.BooleanOptionalAction, default=None,
        help=f"random flips and quarter turns of each training image, on the fly {recipe_default('augment')}")
    add("--cache-dir", default=None, metavar="DIR",
        help="folder: where the patch cache (.npy memmap) is kept [a folder-cache/ beside the run]")
    add("--standardize", choices=STANDARDIZE, default=defaults.standardize,
        help="scale each band by the training set's mean and std for the networks (stored in the checkpoint; "
        "bits/dim and outputs stay in the data's units): auto = on for a --dataset folder of 16-bit images, off for 8-bit ones and the named sets")
    add("--download", action="store_true", help="download the dataset if missing (needs internet)")
    add("--epochs", type=int, default=None, metavar="N",
        help=f"total epochs; a resumed run continues up to it [{RECIPES['named']['all']['epochs']}; --dataset folder: "
        f"as many as make about {FOLDER_STEP_BUDGET:,} update steps]")
    add("--max-steps", type=int, default=None, metavar="N", help="stop after N optimizer steps (smoke runs)")
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--lr", type=float, default=None, help=f"Adam's learning rate {recipe_default('lr')}")
    add("--lr-schedule", choices=LR_SCHEDULES, default=None,
        help=f"constant, or cosine: from --lr down to 0 over the run's steps {recipe_default('lr_schedule')}")
    add("--kl-warmup", type=float, default=defaults.kl_warmup, metavar="EPOCHS", help="linear KL warm-up length")
    add("--free-bits", type=float, default=defaults.free_bits, metavar="NATS",
        help=f"free bits on z: nats per dimension below which its batch-averaged KL costs nothing [{defaults.free_bits}]")
    add("--clip-norm", type=float, default=defaults.clip_norm,
        help="clip the global gradient norm at this fixed value (the update guard skips spikes and --clip-factor clips adaptively)")
    add("--skip-factor", type=float, default=None, metavar="F",
        help="skip an update whose gradient norm is not finite or above F x the median of the last steps taken; "
        f"0: off (docs/training-faults.md) {recipe_default('skip_factor')}")
    add("--clip-factor", type=float, default=None, metavar="F",
        help="scale a step's gradient down to F x the median norm of the last steps taken where it is above it "
        f"(adaptive clipping, no norm to pick; 0: off) {recipe_default('clip_factor')}")
    add("--max-consecutive-skips", type=int, default=None, metavar="N",
        help=f"stop with an error after N updates in a row skipped [{defaults.max_consecutive_skips}]")
    add("--device", choices=DEVICES, default=None, help="[auto]")
    add("--seed", type=int, default=defaults.seed)
    add("--eval-samples", type=int, default=None, metavar="K", help=f"importance samples per test image [{defaults.eval_samples}]")
    add("--eval-limit", type=int, default=None, metavar="N", help="evaluate on the first N test images only")
    add("--train-limit", type=int, default=None, metavar="N", help="train on the first N training images only")
    add("--sr-samples", type=int, default=defaults.sr_samples, metavar="S", help="super-resolution draws per image")
    add("--out", default=None, metavar="DIR", help="output directory [runs/<date>-<model>-<guide>]")
    add("--resume", default=None, metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT")
    add("--checkpoint-every", type=int, default=None, metavar="STEPS", help="also checkpoint every STEPS steps")
    add("--factor", type=int, choices=DOWNSCALE_FACTORS, default=defaults.factor, help="srVAE downscaling factor")
    add("--downscale-mode", choices=DOWNSCALE_MODES, default=defaults.downscale_mode)
    add("--u-dim", type=int, default=defaults.u_dim)
    add("--z-dim", type=int, default=defaults.z_dim)
    add("--hidden", type=int, default=None, help=f"width of the convolutional networks {recipe_default('hidden')}")
    add("--arch", choices=ARCHS, default=defaults.arch, help="small conv nets (CPU) or the paper's DenseNet blocks (GPU)")
    add("--likelihood", choices=LIKELIHOODS, default=None,
        help="p(x|.) and p(y|u): the spec's Gaussian with learned scalar gamma, a per-pixel Gaussian, "
        f"or a discretized mixture of logistics {recipe_default('likelihood')}")
    add("--likelihood-components", type=int, default=defaults.likelihood_components, metavar="K",
        help="logistic components per pixel for --likelihood dlogistic-mix")
    add("--faithful-scale-weight", type=float, default=None, metavar="W",
        help="--likelihood gaussian-pixel-faithful: the weight of the sigmas' gradient "
        f"{recipe_default('faithful_scale_weight')}")
    add("--pixel-scale-floor", type=float, default=defaults.pixel_scale_floor, metavar="SIGMA",
        help="--likelihood gaussian-pixel*: the least per-pixel sigma, in p(y|u) and p(x|y,z,u) (data on [0, 1])")
    add("--pixel-scale-from", choices=PIXEL_SCALE_SOURCES, default=defaults.pixel_scale_from,
        help="--likelihood gaussian-pixel*: the srVAE's p(x|y,z,u) computes its per-pixel sigmas with its "
        "locations (decoder) or from y alone (y)")
    add("--x-given-y", choices=X_GIVEN_Y, default=defaults.x_given_y,
        help="srVAE p(x|y,.): consistent (a normalized density of x: the Gaussian given its block means, "
        "or y on the 8-bit grid where no closed form exists), quantized (the paper's 8-bit y), "
        "or spec (the literal eq. 15: a joint of x and y, not a density of x)")
    add("--sr-base", choices=SR_BASES, default=None,
        help=f"the upsampling of y the srVAE's SR decoder adds its residual to {recipe_default('sr_base')}")
    add("--sr-arch", choices=ARCHS, default=None,
        help=f"the srVAE's SR decoder alone in this architecture {recipe_default('sr_arch')}")
    add("--sr-hidden", type=int, default=None, metavar="WIDTH", help=f"width of the SR decoder alone {recipe_default('sr_hidden')}")
    srvae = MODEL_DEFAULTS["srvae"]
    add("--z-channels", type=int, default=None, metavar="C",
        help="srVAE: z as a map of C channels at the low resolution (z-dim C*h*w, convolutional p(z|y,u) "
        f"and q(z|x,y,u), as the srVAE paper's latents); 0: a vector of --z-dim [{srvae['z_channels']}; "
        f"--dataset folder: {RECIPES['folder']['srvae']['z_channels']}]")
    add("--z-injection", choices=Z_INJECTIONS, default=None,
        help=f"where the srVAE's SR decoder reads z and u: its first layer (input) or every layer [{srvae['z_injection']}; "
        f"--dataset folder: {RECIPES['folder']['srvae']['z_injection']}]")
    add("--z-posterior", choices=Z_POSTERIORS, default=None,
        help="the full guide's q(z|x,y,u): its own location and scale (direct), or a residual normal around "
        f"p(z|y,u) (residual: NVAE's; its KL stays finite when the prior's scale shrinks) {recipe_default('z_posterior')}")
    add("--z-scale-floor", type=float, default=None, metavar="S",
        help="srVAE: added to the scale of p(z|y,u), which else drifts towards 0 with the SR decoder's weights "
        f"growing in turn {recipe_default('z_scale_floor')}")
    add("--z-prior-rank", type=int, default=defaults.z_prior_rank, metavar="R",
        help="srVAE with a z map: p(z|y,u) with covariance W W^T + diag(sigma^2), W of rank R, so that its draws "
        "vary together over the image in R directions; 0: diagonal, as eq. (16)")
    add("--precision", choices=PRECISIONS, default=defaults.precision,
        help="bf16: the networks train under torch.autocast in bfloat16 (log-densities and loss stay float32)")
    add("--compile", action="store_true", help="torch.compile the networks (not Pyro's tracing)")
    add("--no-figures", action="store_true", help="skip the PNG figures")
    add("--tensorboard", action="store_true",
        help="also write TensorBoard event files under OUT/tensorboard (needs the tensorboard extra)")
    add("--quiet", action="store_true", help="no progress bar")
    return parser


def config_from_args(parser, args):
    """A validated TrainConfig (or the resume overrides); impossible combinations exit 2."""
    if args.resume is not None:
        return None
    values = {
        name: getattr(args, name)
        for name in (
            "model", "prior", "mog_components", "elbo", "num_particles", "dataset", "data_dir", "download",
            "max_steps", "batch_size", "lr", "lr_schedule", "kl_warmup", "free_bits", "clip_norm", "clip_factor", "seed", "sr_samples", "eval_limit", "train_limit", "out",
            "checkpoint_every", "factor", "downscale_mode", "u_dim", "z_dim", "hidden",
            "arch", "likelihood", "likelihood_components", "faithful_scale_weight", "pixel_scale_floor", "pixel_scale_from", "x_given_y", "sr_base", "sr_arch", "sr_hidden", "z_injection", "z_channels", "z_posterior", "z_scale_floor", "z_prior_rank", "precision", "compile",
            "patch_size", "patch_stride", "test_fraction", "channels", "augment", "cache_dir", "tensorboard",
            "standardize",
        )
    }
    values["guide"] = args.guide or "simple"
    for name in ("epochs", "device", "eval_samples", "skip_factor", "max_consecutive_skips"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    values["figures"] = not args.no_figures
    try:
        return TrainConfig(**values).validate()
    except ConfigError as error:
        parser.error(str(error))


def resume_overrides(args):
    overrides = {
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "device": args.device,
        "out": args.out,
        "checkpoint_every": args.checkpoint_every,
        "eval_samples": args.eval_samples,
        "eval_limit": args.eval_limit,
        "skip_factor": args.skip_factor,
        "max_consecutive_skips": args.max_consecutive_skips,
        # Where a folder run's patch cache lives is no part of the run's identity (TrainConfig.RESUMABLE).
        "cache_dir": args.cache_dir,
    }
    if args.no_figures:
        overrides["figures"] = False
    if args.compile:
        overrides["compile"] = True
    if args.tensorboard:
        overrides["tensorboard"] = True
    if args.precision != TrainConfig.precision:
        overrides["precision"] = args.precision
    return overrides


def main(argv=None, prog=None):
    parser = build_train_parser(prog)
    args = parser.parse_args(argv)
    config = config_from_args(parser, args)
    try:
        if config is None:
            result = train(resume=args.resume, progress=not args.quiet, **resume_overrides(args))
        else:
            result = train(config, progress=not args.quiet)
    except ConfigError as error:
        parser.error(str(error))
    except (CheckpointError, DatasetNotFoundError, FolderDatasetError, TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as error:
        print(str(error), file=sys.stderr)
        return EXIT_INTERRUPTED.get(error.signal_number, 1)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone wrote the outputs
        print(f"outputs in {result.out_dir}")
    return 0


# --------------------------------------------------------------------------- #
# pyro-srvae: the console command
# --------------------------------------------------------------------------- #
COMMANDS = {
    "train": "train and evaluate a VAE or srVAE (the flags of examples/train_srvae.py)",
    "evaluate": "re-run the test-set evaluation of a checkpoint, write evaluation.json",
    "superresolve": "super-resolve your own images with a trained srVAE, with per-pixel uncertainty",
    "compare": "the paper's comparison: VAE vs srVAE (simple, full) x (Gaussian, MoG) under one budget",
    "calibrate": "calibrate the SR predictive on calibration images (a spread factor, or an RCPS interval), store it in the checkpoint",
}


def _error(message):
    print(f"error: {message}", file=sys.stderr)
    return 1


def _int_at_least(minimum, description, maximum=None):
    """An argparse type: an integer >= ``minimum`` (and <= ``maximum``), refused with ``expected DESCRIPTION``."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {description}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_views = _int_at_least(1, "an integer from 1 to 8", maximum=8)
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _limit(text):
    return text if text == "all" else _positive_int(text)


def _check_device(parser, name):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available (use --device auto or cpu)")
    return name


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default worth showing."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_superresolve_parser(prog=None):
    from .superresolve import DEFAULT_OUT_DIR, DEFAULT_SAMPLES

    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Super-resolve low-resolution images with a trained srVAE, in overlapping tiles of the "
            "training size, and write for each INPUT NAME.EXT into DIR: NAME_sr_mean.png/.npy (predictive "
            "mean: 8-bit preview, float32 in [0, 1]), NAME_sr_mean.tif (the mean in the input's own units "
            "and bands: uint16 for 16-bit input), NAME_sr_std.npy (total per-pixel predictive std), NAME_sr_std_latent.npy and "
            "NAME_sr_std_noise.npy (its parts: latents and likelihood noise), NAME_uncertainty.png (the three "
            "maps, one colour bar), NAME_sr_samples.npy/.png (the samples); with a checkpoint calibrated by "
            "'pyro-srvae calibrate --method rcps', NAME_sr_lower.npy and NAME_sr_upper.npy (the certified interval "
            "mean -+ lambda x std) and NAME_sr_interval.json (its calibration and guarantee), written when these "
            "draws are those it was certified for: a printed line says which. The output is factor x the input size."
        ),
        formatter_class=_DefaultsFormatter,
    )
    add = parser.add_argument
    add("inputs", nargs="+", metavar="INPUT", help="PNG/JPEG/TIFF images or .npy arrays (H, W) or (C, H, W), of the model's bit depth (8 or 16) or floats in [0, 1]")
    add("--checkpoint", required=True, metavar="CKPT", help="checkpoint.pt of a trained srVAE")
    add("--samples", type=_positive_int, default=DEFAULT_SAMPLES, metavar="N", help="SR samples per image")
    add("--out", default=DEFAULT_OUT_DIR, metavar="DIR", help="output folder")
    add("--overlap", type=_non_negative_int, default=None, metavar="PIXELS",
        help="tile overlap in low-resolution pixels; 0 for plain tiles [half a tile]")
    add("--tile-batch", type=_positive_int, default=None, metavar="N", help="tiles per network call [256 // samples on a CPU, 8192 // samples on a GPU]")
    add("--seed", type=int, default=0, help="seed of the latent draws")
    add("--device", choices=DEVICES, default="auto", help="where to compute (auto: a GPU if there is one)")
    add("--views", type=_views, default=None, metavar="V",
        help="mix the predictives of V flipped and turned copies of each input (the mean: a self-ensemble) "
        "[8 for a model trained with --augment, else 1]")
    add("--spread", choices=SPREADS, default="calibrated",
        help="calibrated: the likelihood noise scaled as fitted by 'pyro-srvae calibrate' (when the checkpoint "
        "holds a calibration); model: the model's own predictive")
    add("--quiet", action="store_true", help="no progress bar, no per-image lines")
    return parser


def _spread_note(model):
    calibration = getattr(model, "spread_calibration", None)
    if model.spread_scale is None:
        return "spread: the model's own predictive" + (" (calibration ignored: --spread model)" if calibration else
                                                       " (not calibrated: see pyro-srvae calibrate)")
    return "spread: " + calibration.describe()


def superresolve_main(argv=None, prog=None):
    """``pyro-srvae superresolve``: returns the exit code."""
    from .superresolve import SuperResolveError, load_model, superresolve

    parser = build_superresolve_parser(prog)
    args = parser.parse_args(argv)
    _check_device(parser, args.device)
    try:
        model = load_model(args.checkpoint, device=args.device)
        tile_h, tile_w = model.lr_shape[1:]
        if args.overlap is not None and args.overlap >= min(tile_h, tile_w):
            parser.error(f"--overlap must be smaller than the model's {tile_h}x{tile_w} tiles, got {args.overlap}")
        if args.spread == "model":
            model.spread_scale = None
        if not args.quiet:
            print(_spread_note(model))
        results = superresolve(
            model,
            args.inputs,
            args.samples,
            out_dir=args.out,
            overlap=args.overlap,
            seed=args.seed,
            device=args.device,
            tile_batch=args.tile_batch,
            views=args.views,
            progress=not args.quiet and len(args.inputs) > 1,
            log=(lambda *_: None) if args.quiet else print,
            return_arrays=False,
        )
    except CheckpointError as error:
        return _error(error)
    except SuperResolveError as error:
        for message in error.messages:
            _error(message)
        return 1
    except MemoryError:
        return _error("out of memory; use fewer --samples or a smaller --tile-batch")
    except KeyboardInterrupt:
        print("interrupted; the outputs of the image in progress were not written", file=sys.stderr)
        return 130
    except RuntimeError as error:
        if "out of memory" not in str(error):
            raise
        return _error("out of memory; use fewer --samples or a smaller --tile-batch")
    if not args.quiet:
        print(f"{len(results)} image(s) super-resolved into {args.out}")
    return 0


def build_evaluate_parser(prog=None):
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Evaluate a checkpoint on its dataset's test split as at the end of training (ELBO and IW "
            "bits/dim; for an srVAE SR PSNR/SSIM and the 90% interval coverage sr_coverage90), print a "
            "summary and write evaluation.json. Settings default to the checkpoint's run."
        ),
        formatter_class=_DefaultsFormatter,
    )
    add = parser.add_argument
    add("--checkpoint", required=True, metavar="CKPT", help="checkpoint.pt of a run")
    add("--eval-samples", type=_positive_int, default=None, metavar="K", help="importance samples per test image [the run's]")
    add("--sr-samples", type=_positive_int, default=None, metavar="S", help="SR draws per image [the run's]")
    add("--eval-limit", type=_limit, default=None, metavar="N", help="first N test images, or 'all' [the run's]")
    add("--data-dir", default=None, metavar="DIR", help="dataset folder [the run's]")
    add("--seed", type=int, default=None, help="[the run's]")
    add("--device", choices=DEVICES, default="auto", help="where to compute (auto: a GPU if there is one)")
    add("--out", default=None, metavar="DIR", help="where to write evaluation.json [the checkpoint's folder]")
    add("--x-given-y", choices=X_GIVEN_Y, default=None,
        help="srVAE: re-score the same weights with this p(x|y,.) [the run's; runs older than the option: spec]")
    add("--quiet", action="store_true", help="no progress bar")
    return parser


def evaluation_summary(report):
    """A few lines: the model, the data and the test metrics of :func:`evaluate_checkpoint`."""
    config, test, settings = report["config"], report["test"], report["evaluation"]
    rows = [
        ("model", f"{model_label(config)}, {config['prior']} prior, step {report['step']}"),
        ("test images", f"{settings['num_images']} of {settings['dataset']}"),
    ]
    if config["model"] == "srvae":
        calibration = report.get("spread_calibration")
        rows.append(("SR spread", "the model's own" if calibration is None else
                     SpreadCalibration.from_dict(dict(calibration)).describe()))
    return format_rows(rows + evaluation_rows(test))


def evaluate_main(argv=None, prog=None):
    """``pyro-srvae evaluate``: returns the exit code."""
    from .superresolve import evaluate_checkpoint

    parser = build_evaluate_parser(prog)
    args = parser.parse_args(argv)
    _check_device(parser, args.device)
    try:
        report = evaluate_checkpoint(
            args.checkpoint,
            eval_samples=args.eval_samples,
            sr_samples=args.sr_samples,
            eval_limit=args.eval_limit,
            data_dir=args.data_dir,
            device=args.device,
            seed=args.seed,
            out_dir=args.out,
            progress=not args.quiet,
            x_given_y=args.x_given_y,
        )
    except (CheckpointError, DatasetNotFoundError, FolderDatasetError) as error:
        return _error(error)
    except OSError as error:
        return _error(f"cannot write evaluation.json: {error.strerror or error}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(evaluation_summary(report))
    print(f"wrote {report['path']}")
    return 0


# --------------------------------------------------------------------------- #
# compare: examples/compare.py and pyro-srvae compare
# --------------------------------------------------------------------------- #
def build_compare_parser(prog=None):
    from .comparison import BUDGETS, CELL_NAMES

    default, quick = BUDGETS["default"], BUDGETS["quick"]
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train and evaluate the grid {vae, srvae-simple, srvae-full} x {gaussian, mog} under one "
        "budget and one seed; write OUT/results.json, OUT/results.md and OUT/samples.png. "
        "Re-running with the same --out skips the cells already done.",
        formatter_class=_DefaultsFormatter,
    )
    add = parser.add_argument
    add("--quick", action="store_true",
        help=f"tiny budget ({quick.epochs} epochs, width {quick.hidden}, K={quick.iw_samples} on "
        f"{quick.eval_limit} test images): the whole grid in minutes")
    add("--out", default=None, metavar="DIR", help="output directory [runs/compare, runs/compare-quick with --quick]")
    add("--dataset", choices=DATASETS, default="fashion-mnist-mini")
    add("--data-dir", default=None, metavar="DIR", help="root of the dataset's files")
    add("--download", action="store_true", help="download the dataset if missing (needs internet)")
    add("--seed", type=int, default=0, help="one seed for every cell")
    add("--likelihood", choices=LIKELIHOODS, default="gaussian")
    add("--likelihood-components", type=_positive_int, default=10, metavar="K")
    add("--arch", choices=ARCHS, default="small")
    add("--x-given-y", choices=X_GIVEN_Y, default="consistent", help="the srVAE cells' p(x|y,.) (see train --help)")
    add("--cells", default=None, metavar="A,B", help=f"run only these cells of {', '.join(CELL_NAMES)}")
    add("--jobs", type=_positive_int, default=1, metavar="N", help="cells trained at once (CPU)")
    add("--device", choices=DEVICES, default="auto")
    add("--inception-weights", default=None, metavar="FILE",
        help="local Inception weights for the optional Inception FID (torch-fidelity); never downloaded")
    budget = parser.add_argument_group("budget overrides", f"defaults: the real experiment ({default})")
    budget.add_argument("--epochs", type=_positive_int, default=None, metavar="N")
    budget.add_argument("--hidden", type=_positive_int, default=None, metavar="W", help="network width")
    budget.add_argument("--iw-samples", type=_positive_int, default=None, metavar="K")
    budget.add_argument("--batch-size", type=_positive_int, default=None, metavar="B")
    budget.add_argument("--train-limit", type=_limit, default=None, metavar="N|all")
    budget.add_argument("--eval-limit", type=_limit, default=None, metavar="N|all")
    budget.add_argument("--fd-samples", type=_int_at_least(2, "an integer >= 2"), default=None, metavar="N",
                        help="generated images for fd [as many as test images]")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def compare_settings_from_args(args):
    """The :class:`~pyro_srvae.comparison.ComparisonSettings` the flags describe."""
    import dataclasses

    from .comparison import BUDGETS, ComparisonSettings

    budget = BUDGETS["quick" if args.quick else "default"]
    overrides = {
        name: getattr(args, name)
        for name in ("epochs", "hidden", "iw_samples", "batch_size", "train_limit", "eval_limit", "fd_samples")
        if getattr(args, name) is not None
    }
    for name in ("train_limit", "eval_limit"):
        if overrides.get(name) == "all":
            overrides[name] = None
    return ComparisonSettings(
        budget=dataclasses.replace(budget, **overrides), dataset=args.dataset, data_dir=args.data_dir,
        download=args.download, seed=args.seed, likelihood=args.likelihood,
        likelihood_components=args.likelihood_components, arch=args.arch, x_given_y=args.x_given_y,
    )  # fmt: skip


def compare_main(argv=None, prog=None):
    from .comparison import results_markdown, run_comparison

    parser = build_compare_parser(prog)
    args = parser.parse_args(argv)
    _check_device(parser, args.device)
    settings = compare_settings_from_args(args)
    out = args.out or ("runs/compare-quick" if args.quick else "runs/compare")
    cells = None if args.cells is None else [cell.strip() for cell in args.cells.split(",") if cell.strip()]
    try:
        rows = run_comparison(
            settings, out, cells=cells, jobs=args.jobs, device=args.device,
            inception_weights=args.inception_weights, progress=not args.quiet,
        )  # fmt: skip
    except ConfigError as error:
        parser.error(str(error))
    except (CheckpointError, DatasetNotFoundError, TrainingDiverged) as error:
        return _error(str(error))
    except TrainingInterrupted as error:
        print(f"{error}; run the same command again to go on", file=sys.stderr)
        return EXIT_INTERRUPTED.get(error.signal_number, 1)
    print(results_markdown(rows, settings))
    print(f"outputs in {out}: results.json, results.md, samples.png")
    return 0


# --------------------------------------------------------------------------- #
# calibrate: the SR predictive's spread on held-out images
# --------------------------------------------------------------------------- #
def build_calibrate_parser(prog=None):
    from .calibration import CALIBRATION_METHODS, CALIBRATION_PIXELS, DEFAULT_ALPHA, DEFAULT_DELTA, DEFAULT_LEVEL, DEFAULT_SAMPLES

    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Calibrate the SR predictive on calibration images: high-resolution images the model was not "
            "trained on (this command cannot check that). --method spread (sigma scaling): one factor per "
            "channel on the likelihood noise so that the central --level interval of --samples draws covers "
            "the truth as often as an exact predictive would; superresolve and evaluate draw from it "
            "(superresolve --spread model ignores it). --method rcps (risk-controlling prediction sets): the "
            "interval mean +- lambda x std with, if the calibration and test images are drawn independently "
            "from one distribution, probability >= 1 - delta that a new image's expected fraction of --pixels "
            "outside it is <= alpha; superresolve writes it as NAME_sr_lower/upper.npy. Stored in the checkpoint; the "
            "densities (bits/dim) stay the trained model's. See docs/calibration.md."
        ),
        formatter_class=_DefaultsFormatter,
    )
    add = parser.add_argument
    add("inputs", nargs="+", metavar="INPUT",
        help="calibration images (PNG/JPEG/TIFF/.npy) or folders of them, at full resolution: each is downscaled as in training")
    add("--checkpoint", required=True, metavar="CKPT", help="checkpoint.pt of a trained srVAE")
    add("--out", default=None, metavar="FILE", help="write the calibrated checkpoint here [over CKPT, atomically]")
    add("--method", choices=CALIBRATION_METHODS, default="spread",
        help="spread: sigma scaling (works from a few images); rcps: an interval with a distribution-free "
        "guarantee (needs more images: 22 at alpha = delta = 0.1)")
    add("--pixels", choices=CALIBRATION_PIXELS, default="detail",
        help="the pixels whose coverage is fitted (spread) or whose fraction outside is controlled (rcps): detail "
        "(differing from their block mean by more than a grey level), all, or edges (chosen from y)")
    add("--level", type=float, default=None, help=f"spread: the central interval's level [{DEFAULT_LEVEL}]")
    add("--alpha", type=_unit_fraction, default=None,
        help=f"rcps: the expected fraction of pixels outside the interval allowed [{DEFAULT_ALPHA}]")
    add("--delta", type=_unit_fraction, default=None,
        help=f"rcps: the probability, over the calibration images, that the guarantee fails [{DEFAULT_DELTA}]")
    add("--samples", type=_int_at_least(2, "an integer >= 2"), default=DEFAULT_SAMPLES, metavar="N",
        help="SR draws per image in the fit (rcps: superresolve must draw as many for its interval)")
    add("--seed", type=int, default=0, help="seed of the draws")
    add("--views", type=_views, default=None, metavar="V",
        help="as superresolve --views: calibrate the predictive superresolve will draw from [the model's default]")
    add("--device", choices=DEVICES, default="auto", help="where to compute (auto: a GPU if there is one)")
    return parser


def _unit_fraction(text):
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {value:g}")
    return value


def _calibration_options(parser, args):
    """The fit's method-specific options; a flag of the other method exits 2."""
    from .calibration import DEFAULT_ALPHA, DEFAULT_DELTA, DEFAULT_LEVEL

    if args.method == "rcps":
        if args.level is not None:
            parser.error("--level is for --method spread; the RCPS interval is set by --alpha and --delta")
        alpha = DEFAULT_ALPHA if args.alpha is None else args.alpha
        return dict(alpha=alpha, delta=DEFAULT_DELTA if args.delta is None else args.delta)
    if args.alpha is not None or args.delta is not None:
        parser.error("--alpha and --delta are for --method rcps")
    level = DEFAULT_LEVEL if args.level is None else args.level
    if not 0 < level < 1:
        parser.error(f"--level must lie strictly between 0 and 1, got {level}")
    return dict(level=level)


def _calibration_report(calibration, had_interval):
    """The lines calibrate prints: each number named for what it is."""
    from .calibration import PIXEL_WORDS, IntervalCalibration

    if not isinstance(calibration, IntervalCalibration):
        lines = [calibration.describe(), *calibration.coverage_lines()]
        if had_interval:
            lines.append("note: the checkpoint's RCPS interval was fitted on draws of the previous spread; superresolve "
                         "writes it only for draws of that spread: run 'pyro-srvae calibrate --method rcps' again")
        return lines
    pixels = PIXEL_WORDS[calibration.pixels]
    empty = f" ({calibration.empty_images} without {pixels}: loss 0)" if calibration.empty_images else ""
    return [
        calibration.describe(),
        f"alpha {calibration.alpha:g} (the expected fraction of pixels outside allowed), delta {calibration.delta:g} "
        f"(the chance that this calibration fails), n = {calibration.num_images} calibration images{empty}",
        f"guarantee: {calibration.guarantee}",
        f"in-sample, on the calibration images: on average {calibration.risk:.4f} of their {pixels} outside; "
        f"its Hoeffding-Bentkus upper confidence bound at level {1 - calibration.delta:.4g}: {calibration.risk_bound:.4f} (< alpha)",
    ]


def calibrate_main(argv=None, prog=None):
    """``pyro-srvae calibrate``: returns the exit code."""
    from .calibration import CalibrationError, calibrate_checkpoint, read_calibration_images
    from .superresolve import load_model

    parser = build_calibrate_parser(prog)
    args = parser.parse_args(argv)
    _check_device(parser, args.device)
    options = _calibration_options(parser, args)
    try:
        model = load_model(args.checkpoint, device=args.device)
        had_interval = getattr(model, "interval_calibration", None) is not None
        images, names = read_calibration_images(model, args.inputs)
        calibration = calibrate_checkpoint(
            args.checkpoint, images, names=names, out=args.out, model=model, method=args.method,
            pixels=args.pixels, num_samples=args.samples, seed=args.seed, views=args.views, **options,
        )  # fmt: skip
    except (CheckpointError, CalibrationError) as error:
        return _error(error)
    except OSError as error:
        return _error(f"cannot write the checkpoint: {error.strerror or error}")
    except KeyboardInterrupt:
        print("interrupted; the checkpoint was not changed", file=sys.stderr)
        return 130
    for line in _calibration_report(calibration, had_interval):
        print(line)
    print(f"wrote {args.out or args.checkpoint}")
    return 0


def build_console_parser():
    parser = argparse.ArgumentParser(
        prog="pyro-srvae",
        description="Super-Resolution VAEs in Pyro: train, evaluate, super-resolve.",
        epilog="'pyro-srvae COMMAND --help' lists the flags of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, text in COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def _version():
    from . import __version__

    return __version__


def console_main(argv=None):
    """The ``pyro-srvae`` console command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_console_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help, --version, or an unknown command: argparse answers and exits
        parser.print_usage(sys.stderr)
        print("pyro-srvae: error: a command is required", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    prog = f"pyro-srvae {command}"
    if command == "train":
        return main(rest, prog=prog)
    if command == "evaluate":
        return evaluate_main(rest, prog=prog)
    if command == "compare":
        return compare_main(rest, prog=prog)
    if command == "calibrate":
        return calibrate_main(rest, prog=prog)
    return superresolve_main(rest, prog=prog)


if __name__ == "__main__":
    sys.exit(console_main())
