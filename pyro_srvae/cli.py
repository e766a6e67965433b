"""Command-line front end shared by ``examples/train_srvae.py``: flags -> :func:`pyro_srvae.train`."""

import argparse
import sys

from .checkpoint import CheckpointError
from .data import DATASETS, DatasetNotFoundError
from .elbo import ELBO_NAMES
from .models import DOWNSCALE_FACTORS, DOWNSCALE_MODES, GUIDES
from .priors import PRIORS
from .training import DEVICES, MODELS, ConfigError, TrainConfig, TrainingDiverged, TrainingInterrupted, train

EXIT_INTERRUPTED = {2: 130, 15: 143}  # the shell's 128 + signal number


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
    add("--dataset", choices=DATASETS, default=defaults.dataset)
    add("--data-dir", default=defaults.data_dir, metavar="DIR", help="root of torchvision-layout data [./data]")
    add("--download", action="store_true", help="download the dataset if missing (needs internet)")
    add("--epochs", type=int, default=None, metavar="N", help=f"total epochs; a resumed run continues up to it [{defaults.epochs}]")
    add("--max-steps", type=int, default=None, metavar="N", help="stop after N optimizer steps (smoke runs)")
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--lr", type=float, default=defaults.lr)
    add("--kl-warmup", type=float, default=defaults.kl_warmup, metavar="EPOCHS", help="linear KL warm-up length")
    add("--clip-norm", type=float, default=defaults.clip_norm, help="global gradient-norm clipping")
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
    add("--hidden", type=int, default=defaults.hidden, help="width of the convolutional networks")
    add("--no-figures", action="store_true", help="skip the PNG figures")
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
            "max_steps", "batch_size", "lr", "kl_warmup", "clip_norm", "seed", "sr_samples", "eval_limit", "train_limit", "out",
            "checkpoint_every", "factor", "downscale_mode", "u_dim", "z_dim", "hidden",
        )
    }
    values["guide"] = args.guide or "simple"
    if args.model == "vae" and args.guide is not None and args.guide != "simple":
        parser.error("--guide full is an srVAE guide (section 4); the VAE has only q(z|x)")
    for name in ("epochs", "device", "eval_samples"):
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
    }
    if args.no_figures:
        overrides["figures"] = False
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
    except (CheckpointError, DatasetNotFoundError, TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as error:
        print(str(error), file=sys.stderr)
        return EXIT_INTERRUPTED.get(error.signal_number, 1)
    print(f"outputs in {result.out_dir}")
    return 0
