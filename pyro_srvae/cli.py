"""Command-line front ends.

* :func:`main` -- ``examples/train_srvae.py`` and ``pyro-srvae train``: flags -> :func:`pyro_srvae.train`.
* :func:`console_main` -- the ``pyro-srvae`` console command, with the subcommands
  ``train``, ``evaluate`` (:func:`pyro_srvae.sr.evaluate.evaluate_checkpoint`) and
  ``superresolve`` (:func:`pyro_srvae.sr.superresolve.superresolve`) and ``calibrate``
  (:func:`pyro_srvae.sr.calibrate.calibrate_checkpoint`).

Exit codes: 0 done, 1 a bad input, checkpoint or dataset (one line on stderr, no
traceback), 2 bad flags, 130 / 143 interrupted.
"""

import argparse
import dataclasses
import os
import sys
import typing

from .data.datasets import DATASETS
from .data.folder import FolderDatasetError
from .data.image_dataset import DatasetNotFoundError
from .experiments.comparison import BUDGETS, CELL_NAMES, ComparisonSettings, results_markdown, run_comparison
from .model.image_model import X_GIVEN_Y
from .model.likelihoods import LIKELIHOODS
from .model.networks import ARCHS
from .sr.calibrate import calibrate_checkpoint, read_calibration_images
from .sr.calibration import (
    CALIBRATION_METHODS,
    CALIBRATION_PIXELS,
    DEFAULT_ALPHA,
    DEFAULT_DELTA,
    DEFAULT_LEVEL,
    PIXEL_WORDS,
    CalibrationError,
    IntervalCalibration,
    SpreadCalibration,
)
from .sr.evaluate import evaluate_checkpoint
from .sr.files import DEFAULT_OUT_DIR
from .sr.loading import load_model
from .sr.superresolve import superresolve
from .sr.tiling import DEFAULT_SAMPLES, SuperResolveError
from .training.checkpoint import CheckpointError
from .training.config import (
    DEVICES,
    FOLDER_STEP_BUDGET,
    MODEL_DEFAULTS,
    RECIPES,
    UNSET_MEANS,
    ConfigError,
    TrainConfig,
)
from .training.guard import TrainingDiverged
from .training.loop import TrainingInterrupted, train
from .training.report import evaluation_rows, format_rows, model_label
from .utils.devices import resolve_device
from .utils.version import __version__

EXIT_INTERRUPTED = {2: 130, 15: 143}  # the shell's 128 + signal number

SPREADS = ("calibrated", "model")


def recipe_default(name):
    """A field's default in each recipe (RECIPES, MODEL_DEFAULTS), for the flags' help: ``[X; --dataset folder: Y]``."""
    if name == "epochs":  # a folder's epochs are counted from its patches (resolve_epochs)
        return f"[{RECIPES['named']['all']['epochs']}; --dataset folder: as many as make about {FOLDER_STEP_BUDGET:,} update steps]"
    values = []
    for recipe in RECIPES.values():
        value = recipe["all"].get(name, recipe.get("srvae", {}).get(name, recipe.get(name)))
        value = MODEL_DEFAULTS["srvae"].get(name) if value is None else value
        values.append(UNSET_MEANS.get(name) if value is None else value)
    named, folder = values
    return f"[--dataset folder: {folder}]" if named is None else f"[{named}; --dataset folder: {folder}]"


def _recipe_fields():
    names = {"epochs", *MODEL_DEFAULTS["srvae"]}
    for recipe in RECIPES.values():
        names |= set(recipe["all"]) | set(recipe.get("srvae", {})) | {key for key in recipe if key not in ("all", "srvae")}
    return names


def _flag_arguments(field, annotation, recipe_fields):
    """(flag, options) of ``parser.add_argument`` for a TrainConfig field, from its type and metadata."""
    spec = field.metadata["flag"]
    note = spec.get("note")
    if note is None:
        if field.name in recipe_fields:
            note = recipe_default(field.name)
        elif field.default is not None and annotation is not bool:
            note = f"[{field.default}]"
    name = spec.get("flag", "--" + field.name.replace("_", "-"))
    options = dict(dest=field.name, default=None, help=" ".join(filter(None, (spec.get("help", ""), note))) or None)
    value_type = next((t for t in typing.get_args(annotation) if t is not type(None)), annotation)
    if value_type is bool:
        if "flag" in spec:  # a flag that turns a true default off
            options["action"] = "store_false"
        else:
            options["action"] = argparse.BooleanOptionalAction if field.default is None else "store_true"
    else:
        options.update(type=value_type, choices=spec.get("choices"), metavar=spec.get("metavar"))
    return name, options


def build_train_parser(prog=None):
    """The training flags: one per TrainConfig field with flag metadata, plus --resume and --quiet."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Train and evaluate a VAE or srVAE (Pyro), write metrics, checkpoints and figures."
    )
    annotations, recipe_fields = typing.get_type_hints(TrainConfig), _recipe_fields()
    for field in _flag_fields():
        name, options = _flag_arguments(field, annotations[field.name], recipe_fields)
        parser.add_argument(name, **options)
    parser.add_argument("--resume", default=None, metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _flag_fields():
    return [field for field in dataclasses.fields(TrainConfig) if "flag" in field.metadata]


def config_from_args(parser, args):
    """A validated TrainConfig from the flags given (None with --resume); impossible combinations exit 2."""
    if args.resume is not None:
        return None
    values = {field.name: getattr(args, field.name) for field in _flag_fields() if getattr(args, field.name) is not None}
    try:
        return TrainConfig(**values).validate()
    except ConfigError as error:
        parser.error(str(error))


def resume_overrides(args):
    """The flags given that a resumed run may change (TrainConfig.RESUMABLE)."""
    return {name: getattr(args, name) for name in TrainConfig.RESUMABLE if getattr(args, name) is not None}


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
    try:
        resolve_device(name)
    except ValueError:
        parser.error("--device cuda: no CUDA GPU is available (use --device auto or cpu)")
    return name


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default worth showing."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_superresolve_parser(prog=None):

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
    """The :class:`~pyro_srvae.experiments.comparison.ComparisonSettings` the flags describe."""

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
