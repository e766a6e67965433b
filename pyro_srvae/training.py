"""Training: one function, :func:`train`, behind ``examples/train_srvae.py``.

Pyro builds the objective: each step asks a Pyro ELBO (:func:`pyro_srvae.make_elbo`)
for the loss of ``model.model`` against ``model.guide`` and its gradients -- what
``pyro.infer.SVI.step`` does inside. The step then goes to a plain ``torch.optim.Adam``
over the module's parameters, which gives global-norm clipping and an optimizer
state that checkpoints and resumes exactly. Before it, :class:`UpdateGuard` skips an update
whose gradient norm is not finite or far above its recent history (docs/training-faults.md).

A run writes into its output directory: ``checkpoint.pt`` (atomic), ``metrics.json``,
``metrics.csv``, PNG figures (:mod:`pyro_srvae.plots`) and, with ``tensorboard=True``,
TensorBoard event files under ``tensorboard/`` (:mod:`pyro_srvae.tensorboard`).

Under ``torchrun`` the same loop runs data-parallel, one process per GPU or CPU worker
(:mod:`pyro_srvae.distributed`): ``--batch-size`` is per process, gradients are summed
over the global batch (:class:`DataParallelElbo`), evaluation is sharded, and rank 0
alone writes files. Each rank draws its own noise; checkpoints hold every rank's RNG
state, so a resumed data-parallel run continues exactly as well.
"""

import csv
import dataclasses
import io
import json
import math
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

import torch

import pyro
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from . import distributed, plots
from .checkpoint import (
    CheckpointError,
    atomic_write_text,
    derive_seed,
    get_rng_state,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    set_rng_state,
)
from .data import (
    DATASET_NAMES, FOLDER, DeviceImages, augment_dihedral, band_statistics, dequantize, iterate_batches, load_dataset,
    num_batches,
)  # fmt: skip
from .elbo import ELBO_NAMES, make_elbo
from .evaluation import bicubic_upsample, bits_per_dim, evaluate_model, evaluation_batch_size, fit_baseline_scale
from .likelihoods import GAUSSIAN_PIXEL_MIN_SCALE, LIKELIHOODS
from .models import (
    DOWNSCALE_FACTORS, DOWNSCALE_MODES, GUIDES, PIXEL_SCALE_LIKELIHOODS, PIXEL_SCALE_SOURCES, SRVAE, VAE, X_GIVEN_Y,
    Z_POSTERIORS,
)
from .networks import ARCHS, SR_BASES, Z_INJECTIONS
from .priors import PRIORS
from .tensorboard import LOG_DIR as BOARD_DIR
from .tensorboard import open_board, tensorboard_missing

MODELS = ("vae", "srvae")
DEVICES = ("auto", "cpu", "cuda")
#: fp32: everything in float32. bf16: the networks run under torch.autocast in bfloat16
#: while samples, log-densities and the loss stay float32 (networks.float32_outputs).
PRECISIONS = ("fp32", "bf16")
#: --standardize: scale each band by the training set's mean and std for the networks (docs/own-images.md);
#: auto = on for a --dataset folder of 16-bit images (where the model allows it), off otherwise (standardizes).
STANDARDIZE = ("auto", "on", "off")
# Steps between host syncs (divergence check, progress bar, and in a data-parallel run the
# moment all ranks agree to stop on a signal): rare enough not to stall a GPU queue.
SYNC_EVERY = 10
#: Fewer update steps than this, from --epochs alone, and the run says it is too short to learn: the
#: runs of docs/results.md took 624 (the main job) to 2,816 (the photographs); a folder of four
#: 100x100 images trained for 6 steps with 3 epochs and ended 28 dB below bicubic (issue #24).
MIN_STEPS_TO_LEARN = 500
# What a run writes into its output directory: the checkpoint, the metrics, _draw_figures's PNGs.
OUTPUT_FILES = ("checkpoint.pt", "metrics.json", "metrics.csv")
FIGURE_FILES = (
    "loss_curves.png", "reconstructions.png", "samples.png", "super_resolution.png", "calibration.png",
    "mog_components.png",
)  # fmt: skip


class ConfigError(ValueError):
    """A configuration that makes no sense; the message is one line saying why."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; a checkpoint was written before stopping."""

    def __init__(self, message, signal_number):
        super().__init__(message)
        self.signal_number = signal_number


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in every checkpoint and in metrics.json."""

    model: str = "srvae"
    guide: str = "simple"
    prior: str = "gaussian"
    mog_components: int = 10
    elbo: str = "meanfield"
    num_particles: int = 1
    dataset: str = "fashion-mnist-mini"
    data_dir: Optional[str] = None
    download: bool = False
    # Fields left None take their recipe's value (RECIPES, resolve_defaults): the main job's for the named
    # datasets, the photographs' for --dataset folder; ``recipe`` records which one a run took.
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    batch_size: int = 32
    lr: Optional[float] = None
    # How the learning rate moves over the run's steps (LR_SCHEDULES, learning_rate); None: the recipe's.
    lr_schedule: Optional[str] = None
    kl_warmup: float = 0.0
    # Free bits on z (nats per dimension, batch-averaged; 0 = the plain ELBO): elbo.FreeBits_ELBO.
    free_bits: float = 0.0
    clip_norm: Optional[float] = None
    # The update guard (UpdateGuard, docs/training-faults.md): skip a step whose gradient norm is not finite
    # or above skip_factor x the median norm of the last steps taken (0: off); stop after max_consecutive_skips.
    skip_factor: Optional[float] = None
    max_consecutive_skips: int = 20
    # ... and scale a step's gradient down to clip_factor x that median where its norm is above it (0: off;
    # None: the recipe's, off in both): an adaptive form of the photographs' early fixed clip (training-faults.md).
    clip_factor: Optional[float] = None
    device: str = "auto"
    seed: int = 0
    eval_samples: int = 16
    sr_samples: int = 16
    eval_limit: Optional[int] = None
    train_limit: Optional[int] = None
    out: Optional[str] = None
    checkpoint_every: Optional[int] = None
    factor: int = 2
    downscale_mode: str = "area"
    u_dim: int = 16
    z_dim: int = 32
    hidden: Optional[int] = None
    likelihood: Optional[str] = None
    likelihood_components: int = 10
    # gaussian-pixel-faithful: the weight of the sigmas' gradient (its scale_gradient_weight).
    faithful_scale_weight: Optional[float] = None  # None: the recipe's where gaussian-pixel-faithful, else 1
    # gaussian-pixel*: the floor of the per-pixel sigmas and where p(x|y,z,u)'s come from (SRVAE's
    # pixel_scale_floor, pixel_scale_from): levers tried against the collapse of z.
    pixel_scale_floor: float = GAUSSIAN_PIXEL_MIN_SCALE
    pixel_scale_from: str = "decoder"
    arch: str = "small"
    x_given_y: str = "consistent"
    sr_base: Optional[str] = None
    sr_arch: Optional[str] = None  # None: the SR decoder is --arch, like the other networks
    sr_hidden: Optional[int] = None  # None: --hidden
    # How the srVAE's z is laid out and read (SRVAE z_channels, z_injection); None: the model's own
    # default, MODEL_DEFAULTS, fixed by validate() so that a checkpoint stores what was trained.
    z_channels: Optional[int] = None
    z_injection: Optional[str] = None
    # The full guide's q(z|x,y,u): "direct" or "residual" around p(z|y,u) (SRVAE z_posterior); None: the recipe's.
    z_posterior: Optional[str] = None
    # The least scale of p(z|y,u), added to its network's (SRVAE z_scale_floor); None: the recipe's.
    z_scale_floor: Optional[float] = None
    # R > 0: p(z|y,u) over a z map with covariance W W^T + diag(sigma^2), W of rank R (SRVAE z_prior_rank).
    z_prior_rank: int = 0
    figures: bool = True
    precision: str = "fp32"
    compile: bool = False
    tensorboard: bool = False
    # --dataset folder: patches cut from the user's images (pyro_srvae.folder.load_folder).
    patch_size: Optional[int] = None
    patch_stride: Optional[int] = None
    test_fraction: float = 0.1
    channels: Optional[int] = None
    augment: Optional[bool] = None
    cache_dir: Optional[str] = None
    # Per-band standardization for the networks, from the training set (STANDARDIZE, _build).
    standardize: str = "auto"
    # Which RECIPES entry filled the fields left None ("named" or "folder"); None until resolve_defaults.
    recipe: Optional[str] = None

    # Fields that may change when a run is resumed; every other field is the run's identity.
    RESUMABLE = (
        "epochs", "max_steps", "device", "out", "checkpoint_every", "eval_samples", "eval_limit", "figures",
        "precision", "compile", "tensorboard", "cache_dir", "skip_factor", "max_consecutive_skips",
    )  # fmt: skip
    FOLDER_OPTIONS = ("patch_size", "patch_stride", "channels", "cache_dir")

    def resolve_defaults(self):
        """Fill the fields left ``None`` from the data's recipe (:data:`RECIPES`, once: ``recipe`` records
        it) and the model's defaults (:data:`MODEL_DEFAULTS`). A folder's ``epochs`` stays None until its
        patches are counted (:func:`resolve_epochs`)."""
        if self.recipe is None:
            self.recipe = FOLDER if self.dataset == FOLDER else "named"
            recipe = RECIPES[self.recipe]
            for name, value in {**recipe["all"], **recipe.get(self.model, {})}.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
            if self.faithful_scale_weight is None:  # the recipe's damping belongs to the faithful likelihood
                self.faithful_scale_weight = recipe["faithful_scale_weight"] if self.likelihood == "gaussian-pixel-faithful" else 1.0
            if self.z_posterior is None:  # the residual q(z|x,y,u) belongs to the srVAE's full guide
                full_guide = self.model == "srvae" and self.guide == "full"
                self.z_posterior = recipe["z_posterior"] if full_guide else "direct"
            if self.z_scale_floor is None:
                self.z_scale_floor = recipe["z_scale_floor"] if self.model == "srvae" else 0.0
        for name, value in MODEL_DEFAULTS.get(self.model, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        return self

    def validate(self):
        """Raise :class:`ConfigError` with one line for an impossible combination."""
        if self.model == "vae" and self.z_channels:
            raise ConfigError("--z-channels lays out the srVAE's z as a low-resolution map; the VAE's z is a vector (--z-dim)")
        if self.model == "vae" and self.z_injection not in (None, "input"):
            raise ConfigError("--z-injection shapes the srVAE's SR decoder p(x|y,z[,u]); the VAE has none")
        self.resolve_defaults()
        choices = {
            "model": MODELS,
            "guide": GUIDES,
            "prior": PRIORS,
            "elbo": ELBO_NAMES,
            "dataset": DATASET_NAMES,
            "device": DEVICES,
            "factor": DOWNSCALE_FACTORS,
            "downscale_mode": DOWNSCALE_MODES,
            "likelihood": LIKELIHOODS,
            "arch": ARCHS,
            "precision": PRECISIONS,
            "x_given_y": X_GIVEN_Y,
            "lr_schedule": LR_SCHEDULES,
            "sr_base": SR_BASES,
            "z_injection": Z_INJECTIONS,
            "pixel_scale_from": PIXEL_SCALE_SOURCES,
            "z_posterior": Z_POSTERIORS,
            "standardize": STANDARDIZE,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(map(str, allowed))}")
        if self.model == "vae" and self.guide != "simple":
            raise ConfigError("--guide full is an srVAE guide (section 4); the VAE has only q(z|x)")
        if self.z_scale_floor < 0 or (self.model == "vae" and self.z_scale_floor):
            raise ConfigError("--z-scale-floor is the least scale of the srVAE's p(z|y,u): a number >= 0, and 0 for the VAE")
        if self.z_posterior == "residual" and not (self.model == "srvae" and self.guide == "full"):
            raise ConfigError("--z-posterior residual is relative to p(z|y,u): it needs --model srvae --guide full")
        self._validate_z_prior_rank()
        if self.model == "vae" and self.x_given_y != "consistent":
            raise ConfigError("--x-given-y is the srVAE's p(x|y,.); the VAE has no y (its p(x|z) is a density of x)")
        if self.elbo == "meanfield-mog-bound" and self.prior != "mog":
            raise ConfigError("--elbo meanfield-mog-bound bounds a mixture KL (eq. 23): it needs --prior mog")
        if self.elbo in ("renyi", "iwae-dreg") and self.num_particles < 2:
            raise ConfigError(f"--elbo {self.elbo} (the IWAE bound) needs --num-particles >= 2")
        positive = ["mog_components", "num_particles", "epochs", "batch_size", "eval_samples", "sr_samples"]
        positive += ["u_dim", "z_dim", "hidden", "likelihood_components"]
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:  # a folder's epochs: None until counted
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.sr_arch is not None and self.sr_arch not in ARCHS:
            raise ConfigError(f"--sr-arch must be one of {', '.join(ARCHS)}")
        if self.z_channels < 0:
            raise ConfigError(f"--z-channels must be >= 0, got {self.z_channels}")
        if self.model == "vae" and (self.sr_arch is not None or self.sr_hidden is not None):
            raise ConfigError("--sr-arch and --sr-hidden shape the srVAE's SR decoder p(x|y,z[,u]); the VAE has none")
        for name in ("max_steps", "checkpoint_every", "eval_limit", "train_limit", "sr_hidden"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if not (self.faithful_scale_weight > 0 and math.isfinite(self.faithful_scale_weight)):
            raise ConfigError(f"--faithful-scale-weight must be a positive number, got {self.faithful_scale_weight}")
        if self.faithful_scale_weight != 1.0 and self.likelihood != "gaussian-pixel-faithful":
            raise ConfigError("--faithful-scale-weight weighs the gaussian-pixel-faithful likelihood's sigmas; "
                              f"--likelihood {self.likelihood} has none")
        self._validate_pixel_scale()
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.kl_warmup < 0:
            raise ConfigError(f"--kl-warmup must be >= 0 epochs, got {self.kl_warmup}")
        if not (self.free_bits >= 0 and math.isfinite(self.free_bits)):
            raise ConfigError(f"--free-bits must be a number of nats >= 0, got {self.free_bits}")
        if self.free_bits and self.elbo != "meanfield":
            raise ConfigError(f"--free-bits is a mean-field objective: it needs --elbo meanfield, not {self.elbo}")
        if self.free_bits and self.model == "vae" and self.prior != "gaussian":
            raise ConfigError("--free-bits needs a diagonal Gaussian p(z): the VAE's --prior mog has none")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"--clip-norm must be positive, got {self.clip_norm}")
        self._validate_update_guard()
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA GPU is available (use --device auto or cpu)")
        self._validate_folder_options()
        if self.tensorboard:
            missing = tensorboard_missing()
            if missing is not None:
                raise ConfigError(missing)
        return self

    def _validate_pixel_scale(self):
        per_pixel = self.likelihood in PIXEL_SCALE_LIKELIHOODS
        if self.pixel_scale_floor != GAUSSIAN_PIXEL_MIN_SCALE and not per_pixel:
            raise ConfigError(f"--pixel-scale-floor is the floor of a per-pixel sigma; --likelihood {self.likelihood} has none")
        if not 0 < self.pixel_scale_floor < 0.1:  # the sigmas start at 0.1 (gamma_init), above the floor
            raise ConfigError(f"--pixel-scale-floor must be in (0, 0.1), got {self.pixel_scale_floor}")
        if self.pixel_scale_from != "decoder" and not (per_pixel and self.model == "srvae"):
            raise ConfigError("--pixel-scale-from y is where the srVAE's per-pixel sigmas come from; "
                              f"--model {self.model} --likelihood {self.likelihood} has none")

    def _validate_z_prior_rank(self):
        if not (isinstance(self.z_prior_rank, int) and self.z_prior_rank >= 0):
            raise ConfigError(f"--z-prior-rank must be an integer >= 0, got {self.z_prior_rank!r}")
        if self.z_prior_rank and not (self.model == "srvae" and self.z_channels and self.z_posterior == "direct"):
            raise ConfigError("--z-prior-rank is a covariance over the srVAE's z map: it needs --model srvae, "
                              "--z-channels >= 1 and --z-posterior direct")
        if self.z_prior_rank and self.free_bits:
            raise ConfigError("--free-bits counts the KL per dimension of a diagonal p(z|y,u); --z-prior-rank has none")

    def _validate_update_guard(self):
        # At or below 1 the threshold would sit at or under the median: half the ordinary steps skipped.
        if not (self.skip_factor == 0 or (self.skip_factor > 1 and math.isfinite(self.skip_factor))):
            raise ConfigError(f"--skip-factor must be 0 (no update guard) or a number above 1, got {self.skip_factor}")
        if not (self.clip_factor == 0 or (self.clip_factor > 1 and math.isfinite(self.clip_factor))):
            raise ConfigError(f"--clip-factor must be 0 (no adaptive clipping) or a number above 1, got {self.clip_factor}")
        if self.clip_factor and self.clip_norm is not None:
            raise ConfigError("--clip-factor and --clip-norm both clip the gradient: give one (--clip-factor 0 turns it off)")
        if not (isinstance(self.max_consecutive_skips, int) and self.max_consecutive_skips >= 1):
            raise ConfigError(f"--max-consecutive-skips must be a positive integer, got {self.max_consecutive_skips}")

    def _validate_folder_options(self):
        if self.dataset != FOLDER:
            given = [name for name in self.FOLDER_OPTIONS if getattr(self, name) is not None]
            if given:
                raise ConfigError(f"--{given[0].replace('_', '-')} applies to --dataset folder (your own images) only")
            return
        if self.data_dir is None:
            raise ConfigError("--dataset folder needs --data-dir DIR: the folder holding your images")
        if self.download:
            raise ConfigError("--download fetches the named datasets; --dataset folder reads your own images")
        for name in ("patch_size", "patch_stride", "channels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.patch_size is not None and self.patch_size % self.factor:
            raise ConfigError(f"--patch-size {self.patch_size} is not a multiple of --factor {self.factor}")
        if self.patch_stride is not None and self.patch_size is None:
            raise ConfigError("--patch-stride needs --patch-size")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"--test-fraction must lie in (0, 1), got {self.test_fraction}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        values = dict(values)
        # srVAE runs stored before x_given_y existed trained the spec's literal joint (eq. 12, 15).
        values.setdefault("x_given_y", "consistent" if values.get("model") == "vae" else "spec")
        # ... and those stored before z_channels and z_injection existed, a vector z read by the first layer.
        values.setdefault("z_channels", 0)
        values.setdefault("z_injection", "input")
        # ... and those stored before standardize existed saw x itself (their state dict has no statistics).
        values.setdefault("standardize", "off")
        # ... and those stored before the recipes existed were complete, or meant by None what they mean now
        # (sr_arch/sr_hidden: --arch/--hidden; patch_size: whole images): no recipe may fill them.
        values.setdefault("recipe", "stored")
        values.setdefault("clip_factor", 0.0)  # ... and those stored before the adaptive clip did not clip
        values.setdefault("skip_factor", 10.0)  # ... and those from before the update guard resume with it on
        values.setdefault("z_posterior", "direct")  # ... and those from before the residual q(z|x,y,u) had the direct one
        values.setdefault("z_scale_floor", 0.0)  # ... and no floor on p(z|y,u)'s scale
        if values.get("lr_schedule") is None and values["recipe"] is not None:
            values["lr_schedule"] = "constant"  # ... and those from before the schedules kept lr fixed
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        return cls(**values)


#: What a run's unset fields become (:meth:`TrainConfig.resolve_defaults`), for all models and per model.
#: "named": the main job's, chosen with the layout of z on a validation split (docs/results.md, "What z
#: carries"; their time in docs/performance.md). "folder": the photographs' recipe, chosen on the five
#: validation photographs (docs/results.md, "Your own images"): a DenseNet SR decoder over bicubic
#: upsampling beside small encoders, per-pixel scales fitted faithfully with their gradient damped 100x,
#: 32x32 patches with flips and turns, and a budget of FOLDER_STEP_BUDGET update steps (resolve_epochs).
RECIPES = {
    "named": {
        "all": dict(epochs=2, lr=4e-3, lr_schedule="constant", hidden=16, likelihood="gaussian", augment=False, skip_factor=10.0, clip_factor=0.0,
                    sr_base="bilinear"),  # the VAE has no SR decoder; its configuration carries the field all the same
        "faithful_scale_weight": 1.0,
        "z_posterior": "direct",
        "z_scale_floor": 0.0,
    },
    FOLDER: {
        "all": dict(lr=2e-3, lr_schedule="constant", hidden=32, likelihood="gaussian-pixel-faithful", augment=True, patch_size=32,
                    skip_factor=10.0, clip_factor=0.0, sr_base="bicubic"),  # the fourteenth run's guard (training-faults.md)
        "srvae": dict(sr_arch="densenet", sr_hidden=16, z_channels=0, z_injection="input"),
        "faithful_scale_weight": 0.01,
        # q(z|x,y,u) as a residual around p(z|y,u): the direct one diverged on photographs when a step
        # shrank the prior's scale 40x (docs/training-faults.md)
        "z_posterior": "residual",
        "z_scale_floor": 0.01,
    },
}
#: A folder run without --epochs trains for as many epochs as make about this many update steps: the
#: photographs' validated 4 epochs of 704 steps (docs/results.md), whatever the folder's size.
FOLDER_STEP_BUDGET = 2800

#: Defaults that differ between the models, filled in by :meth:`TrainConfig.validate` where a field
#: is None. The srVAE's z is a map read by every layer of the SR decoder: the layout a validation
#: split chose because it makes z carry the super-resolution's ambiguity (docs/results.md, "What z carries").
MODEL_DEFAULTS = {
    "srvae": dict(z_channels=1, z_injection="every"),
    "vae": dict(z_channels=0, z_injection="input"),
}


@dataclass
class TrainResult:
    model: torch.nn.Module
    metrics: dict
    out_dir: Path
    checkpoint: Path
    figures: list = field(default_factory=list)


def build_model(config, image_shape):
    """The VAE or SRVAE a configuration describes, for images of ``image_shape``."""
    config = dataclasses.replace(config).resolve_defaults()
    common = dict(
        prior=config.prior,
        mog_components=config.mog_components,
        hidden=config.hidden,
        likelihood=config.likelihood,
        likelihood_components=config.likelihood_components,
        arch=config.arch,
        pixel_scale_floor=config.pixel_scale_floor,
    )
    if config.model == "vae":
        return _weigh_faithful_scales(VAE(image_shape, z_dim=config.z_dim, **common), config)
    _, height, width = image_shape
    if height % config.factor or width % config.factor:
        raise ConfigError(
            f"--factor {config.factor} does not divide the {height}x{width} images of {config.dataset}"
        )
    model = SRVAE(
        image_shape,
        guide=config.guide,
        factor=config.factor,
        downscale_mode=config.downscale_mode,
        u_dim=config.u_dim,
        z_dim=config.z_dim,
        x_given_y=config.x_given_y,
        sr_base=config.sr_base,
        sr_arch=config.sr_arch,
        sr_hidden=config.sr_hidden,
        z_injection=config.z_injection,
        z_channels=config.z_channels,
        pixel_scale_from=config.pixel_scale_from,
        z_posterior=config.z_posterior,
        z_scale_floor=config.z_scale_floor,
        z_prior_rank=config.z_prior_rank,
        **common,
    )
    return _weigh_faithful_scales(model, config)


def _weigh_faithful_scales(model, config):
    # An instance attribute over the class's 1.0: it changes the gradient only, never a density.
    if config.likelihood == "gaussian-pixel-faithful":
        model.likelihood.scale_gradient_weight = float(getattr(config, "faithful_scale_weight", 1.0))
    return model


def resolve_device(name) -> Optional[torch.device]:
    """The package's one device resolver: ``"auto"`` is a GPU if there is one, else the CPU;
    ``None`` stays ``None`` (the caller's default). Raises ``ValueError`` (one line) for
    ``cuda`` where no GPU is available."""
    if name is None:
        return None
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA GPU is available (use auto or cpu)")
    return device


class _LatentScaleMessenger(Messenger):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = self.scale * msg["scale"]


def scale_latents(fn, scale):
    """``poutine.scale`` restricted to latent sites: multiplies log p and log q of u and z.

    Used on both model and guide for KL warm-up: every KL term of eq. (4)/(17)/(21)/(23)
    is multiplied by ``scale`` while the data terms keep weight one. Returns a plain
    function (Pyro treats Messenger-instance guides specially).
    """
    if scale == 1.0:
        return fn

    def scaled(*args, **kwargs):
        with _LatentScaleMessenger(scale):
            return fn(*args, **kwargs)

    return scaled


@contextmanager
def training_mode(model, elbo):
    """The settings of the training loop, restored on exit.

    The data were validated once when loaded, so the model's per-call input checks and the
    distributions' argument checks are off: they cost time every step, and would turn a
    diverged network into a ValueError deep in torch instead of the NaN loss the loop
    reports. Where the ELBO has ``differentiable_loss`` (gradients reach the parameters
    through autograd, not through Pyro's param sites) the networks are registered with
    ``pyro.module`` once instead of on every model and guide call.
    """
    saved = model.validate_inputs, model.pyro_registration
    model.validate_inputs = False
    model.pyro_registration = not hasattr(elbo, "differentiable_loss")
    try:
        with pyro.validation_enabled(False):
            yield model
    finally:
        model.validate_inputs, model.pyro_registration = saved


#: --lr-schedule: "constant" keeps --lr for every step; "cosine" decays it from --lr to 0 along half a
#: cosine over the run's steps (Loshchilov & Hutter 2017, without restarts), so that the last updates are
#: small and the weights settle instead of ending on a full-size step's noise.
LR_SCHEDULES = ("constant", "cosine")


def total_steps(config, batches_per_epoch):
    """The update steps a run's schedule spans: ``--epochs`` of batches. ``--max-steps`` stops a run
    early, as a signal does, without moving the schedule's end, so that a run stopped and resumed takes
    the updates of one that was not; a run resumed with more epochs stretches its schedule to the new end."""
    return config.epochs * batches_per_epoch


def learning_rate(config, step, planned_steps):
    """The learning rate of the update after ``step`` steps taken, of ``planned_steps`` (:data:`LR_SCHEDULES`)."""
    if config.lr_schedule == "constant" or planned_steps <= 0:
        return config.lr
    progress = min(step, planned_steps) / planned_steps
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def kl_scale(config, epoch, batch, batches_per_epoch):
    """Linear KL warm-up over ``config.kl_warmup`` epochs (fractional epochs count)."""
    if config.kl_warmup <= 0:
        return 1.0
    return min(1.0, (epoch + batch / batches_per_epoch) / config.kl_warmup)


#: --elbo estimators whose loss with K >= 2 particles is the importance-weighted bound, not the ELBO.
IMPORTANCE_WEIGHTED = ("renyi", "iwae-dreg")


def objective_name(config, kl_start=1.0, kl_end=1.0):
    """What the training loss of ``config`` is, by name (an epoch record's ``train_objective``).

    The loss is the negative ELBO only for a plain ELBO estimator at full KL: ``renyi`` (alpha 0)
    and ``iwae-dreg`` with K >= 2 train on the IWAE bound, ``meanfield-mog-bound`` on the looser
    bound of eq. (23), ``--free-bits`` on an objective that is no bound, and a KL warm-up scale
    below 1 (from ``kl_start`` to ``kl_end`` over the span the loss covers) weighs the latent terms
    down (:func:`scale_latents`). E.g. ``"ELBO (meanfield) with KL x 0 to 0.5 (warm-up)"``.
    """
    importance_weighted = config.elbo in IMPORTANCE_WEIGHTED and config.num_particles > 1
    if config.free_bits:
        name = f"free-bits objective ({config.free_bits:g} nats per dim of z; not a bound)"
    elif importance_weighted:
        name = f"IWAE bound K={config.num_particles} ({config.elbo})"
    elif config.elbo == "meanfield-mog-bound":
        name = "eq. (23) bound on the ELBO (meanfield-mog-bound)"
    else:
        name = f"ELBO ({config.elbo})"
    if min(kl_start, kl_end) >= 1.0:
        return name
    scaled = "latent log-densities" if importance_weighted else "KL"  # scale_latents scales log p and log q of z
    span = f"{kl_start:.2g}" if kl_start == kl_end else f"{kl_start:.2g} to {kl_end:.2g}"
    return f"{name} with {scaled} x {span} (warm-up)"


def upgrade_epoch_record(record, config):
    """An epoch record of a checkpoint from before ``train_objective_bpd``: its ``train_elbo_bpd``
    (the same running objective, misnamed) under the new key, and the objective's name.
    The warm-up span runs from the scale at the epoch's start to the record's ``kl_scale``."""
    if "train_elbo_bpd" not in record:
        return record
    start = kl_scale(config, record["epoch"] - 1, 0, 1)
    name = objective_name(config, start, record.get("kl_scale", 1.0))
    upgraded = {}
    for key, value in record.items():  # the key order of a new record
        if key == "train_elbo_bpd":
            upgraded.update(train_objective_bpd=value, train_objective=name)
        else:
            upgraded[key] = value
    return upgraded


def network_precision(device, precision):
    """The context of the networks' forward passes: ``torch.autocast`` to bf16, or nothing.

    Only training uses it; evaluation always computes in float32.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}")
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def make_optimizer(model, lr):
    """Adam, fused (``fused=True``): one kernel per step over all parameters instead of
    several per tensor -- on a GPU, one launch instead of hundreds; on the CPU (torch >= 2.4)
    3.4x faster than the per-tensor loop on the srVAE's 56 tensors (0.63 vs 2.15 ms,
    ``docs/performance.md``). Where torch has no fused Adam for the device, the default one."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr)


class ElboObjective(torch.nn.Module):
    """The training loss as a module: ``forward(x, kl_scale)`` is Pyro's differentiable ELBO loss.

    DistributedDataParallel synchronises the gradients of what its own ``forward`` computed,
    and Pyro's ``model``/``guide`` call the networks' submodules directly, so wrapping the
    VAE itself would bypass DDP. This module owns the VAE as a submodule (its parameters
    are DDP's) and runs the whole ELBO, KL warm-up included, inside ``forward``; inside,
    ``pyro.module`` still registers the original VAE, the same parameter objects.
    """

    def __init__(self, vae, elbo, precision="fp32"):
        super().__init__()
        self.vae = vae
        self.elbo = elbo
        self.precision = precision

    def forward(self, x, kl_scale=1.0):
        model_fn = scale_latents(self.vae.model, kl_scale)
        guide_fn = scale_latents(self.vae.guide, kl_scale)
        with network_precision(x.device, self.precision):
            return self.elbo.differentiable_loss(model_fn, guide_fn, x)


class DataParallelElbo:
    """Pyro's loss and gradients of one step, summed over the global batch of all ranks.

    :meth:`loss_and_backward` leaves in every parameter's ``.grad`` the gradient of the
    negative ELBO summed over the images of all ranks -- the gradient one process would get
    on the whole global batch -- identical on every rank. Two ways, named by ``sync``:

    * ``"ddp"``: ELBOs with ``differentiable_loss`` (trace, meanfield, meanfield-mog-bound)
      run as :class:`ElboObjective` under DistributedDataParallel, whose bucketed
      all-reduce overlaps the backward pass. DDP *averages* over ranks while the loss is
      a *sum* over images, so each rank back-propagates ``world_size * loss``.
    * ``"all-reduce"``: ELBOs that only offer ``loss_and_grads`` (renyi, graph) do their
      own backward on the plain VAE; the gradients are then summed over ranks
      (:meth:`DistributedContext.all_reduce_gradients`).

    In a single process (``sync`` is ``None``) this is exactly the plain Pyro call.
    """

    def __init__(self, vae, elbo, context, precision="fp32"):
        self.vae = vae
        self.elbo = elbo
        self.context = context
        self.precision = precision
        self.objective = None
        if hasattr(elbo, "differentiable_loss"):
            self.objective = context.data_parallel(ElboObjective(vae, elbo, precision))
        self.sync = None if not context.enabled else "ddp" if self.objective is not None else "all-reduce"

    def loss_and_backward(self, x, kl_scale=1.0):
        """This rank's loss (summed over its images, detached, no host sync where Pyro allows)."""
        if self.objective is not None:
            loss = self.objective(x, kl_scale)
            (loss * self.context.world_size).backward()  # x1 in a single process: exact
            return loss.detach()
        model_fn, guide_fn = scale_latents(self.vae.model, kl_scale), scale_latents(self.vae.guide, kl_scale)
        with network_precision(x.device, self.precision):
            loss = torch.tensor(self.elbo.loss_and_grads(model_fn, guide_fn, x))
        self.context.all_reduce_gradients(self.vae.parameters())
        return loss


#: The update guard's memory (docs/training-faults.md): the gradient norms of the last 64 steps taken,
#: whose median sets the threshold once 8 of them are in. A fresh run's first norms fall (2.4e5 to 6e4
#: in 10 steps on the default recipe), so an early median errs high, which skips less, never more.
GUARD_WINDOW = 64
GUARD_WARMUP = 8
#: After this many skips in a row, a finite step above the threshold is taken, clipped to the threshold:
#: a skipped step moves nothing, so large gradients that belong to the parameters rather than to a batch
#: are left only by steps taken (docs/training-faults.md, "Skips that froze a transient").
GUARD_RESCUE_AFTER = 3


class UpdateGuard:
    """Skips an optimizer update whose global gradient norm is not finite or far above its recent history.

    VDVAE (Child 2021, ``train.py``'s ``skip_threshold``) skips above a fixed norm, to be picked
    per dataset and model; here the threshold adapts: ``factor`` times the median norm of the last
    ``window`` updates taken. A median ignores the rare large norms a mean would follow, and a
    skipped norm never enters the window, so a burst of spikes cannot raise the bar. Until
    ``warmup`` norms are in, only non-finite gradients are skipped. After ``rescue_after`` skips in
    a row, a finite step above the threshold is taken, scaled down to the threshold: a skipped step
    moves nothing, so large gradients that belong to the parameters, not to a batch, would
    otherwise be frozen in place (docs/training-faults.md).

    The decision stays on the device: :meth:`decide` returns a boolean tensor that masks the
    optimizer step (:func:`step_unless_skipped`); the counts reach the host only at the loop's
    host syncs (:meth:`counts`). The state is plain numbers in the checkpoint (:meth:`state_dict`),
    kept even with ``factor == 0`` (off), so that a run resumed without the guard keeps its counts.
    """

    def __init__(self, factor, max_consecutive, device="cpu", window=GUARD_WINDOW, warmup=GUARD_WARMUP, clip_factor=0.0,
                 rescue_after=GUARD_RESCUE_AFTER):
        self.factor, self.max_consecutive, self.window, self.warmup = factor, max_consecutive, window, warmup
        self.rescue_after = rescue_after
        self.clip_factor = clip_factor
        self.device = torch.device(device)
        self.load_state_dict({})

    @property
    def enabled(self):
        return self.factor > 0 or self.clip_factor > 0

    def decide(self, norm, step):
        """Whether to take step ``step``'s update, whose gradient norm is ``norm``: a device boolean, no host sync."""
        norm = norm.detach().float().reshape(1).to(self.device)
        median = torch.nanmedian(self.norms)  # NaN marks an empty place of the window
        trusted = (torch.isfinite(self.norms).sum() >= self.warmup) & (median > 0)
        threshold = torch.where(trusted & (self.factor > 0), self.factor * median, math.inf)
        finite = torch.isfinite(norm)
        within = norm <= threshold
        # After rescue_after skips in a row, the step is taken clipped to the threshold: a bad batch is skipped,
        # a bad state is left in bounded steps. Its raw norm enters the window, as a clipped one's does.
        rescued = finite & ~within & (self.consecutive >= self.rescue_after)
        taken = finite & (within | rescued)
        scale = torch.where(rescued, threshold / norm, 1.0)
        if self.clip_factor > 0:
            # A taken step above clip_factor x the median is scaled down to it (adaptive clipping, as AutoClip:
            # Seetharaman et al. 2020); its raw norm enters the window, so that a lasting change of scale moves the median.
            clip = torch.where(trusted, self.clip_factor * median, math.inf)
            clipped = taken & (norm > clip)
            scale = torch.minimum(scale, torch.where(clipped, clip / norm, 1.0))
            self.clipped = self.clipped + clipped
        self.clip_scale = scale.reshape(())
        self.rescued = self.rescued + rescued
        self.norms = torch.where(taken, torch.cat([self.norms[1:], norm]), self.norms)  # slides by a taken norm only
        self.skipped = self.skipped + ~taken
        self.nonfinite = self.nonfinite + ~finite
        self.consecutive = (self.consecutive + 1) * ~taken
        # Where the skips in a row first reached the limit: the loop stops at its next host sync.
        first = (self.consecutive >= self.max_consecutive) & (self.stuck[:1] == 0)
        where = torch.cat([torch.full_like(norm, step), norm, threshold.reshape(1)])
        self.stuck = torch.where(first, where, self.stuck)
        self.taken = taken.reshape(())
        return self.taken

    def counts(self):
        """The counts on the host (one sync): skipped (non-finite included), nonfinite, consecutive, the
        median norm of the window, and ``stuck`` = (step, norm, threshold) where the skips in a row reached
        the limit, or None."""
        median = torch.nanmedian(self.norms).reshape(1)
        values = torch.cat([self.skipped.double(), self.nonfinite.double(), self.consecutive.double(),
                            self.clipped.double(), self.rescued.double(), median.double(), self.stuck.double()]).tolist()  # fmt: skip
        skipped, nonfinite, consecutive, clipped, rescued, median, step, norm, threshold = values
        return {
            "skipped": int(skipped), "nonfinite": int(nonfinite), "consecutive": int(consecutive), "clipped": int(clipped),
            "rescued": int(rescued),
            "median": median if math.isfinite(median) else None,
            "stuck": (int(step), norm, threshold) if step else None,
        }  # fmt: skip

    def stop_if_stuck(self, counts, checkpoint_path):
        """Raise :class:`TrainingDiverged`, one line, once ``max_consecutive`` updates in a row were skipped."""
        if counts["stuck"] is None:
            return
        step, norm, threshold = counts["stuck"]
        bar = (f"threshold {threshold:.3g} = {self.factor:g} x the median norm of up to {self.window} last steps taken"
               if math.isfinite(threshold) else f"no threshold before {self.warmup} steps are taken")  # fmt: skip
        kept = (f"the last good checkpoint is {checkpoint_path}" if Path(checkpoint_path).exists()
                else "no checkpoint was written yet")  # fmt: skip
        raise TrainingDiverged(
            f"{self.max_consecutive} updates in a row skipped by step {step} (gradient norm {norm:.3g}, {bar}; "
            f"{counts['skipped']} skipped in all, {counts['nonfinite']} non-finite); stopped without saving, {kept} "
            f"(lower --lr, or raise --skip-factor or --max-consecutive-skips)"
        )

    def state_dict(self):
        """Plain numbers (a checkpoint loads with ``weights_only=True``): the window and the counts."""
        counts = self.counts()
        norms = [value for value in self.norms.tolist() if math.isfinite(value)]
        return {"norms": norms, **{key: counts[key] for key in ("skipped", "nonfinite", "consecutive", "clipped", "rescued")}}

    def load_state_dict(self, state):
        """The state :meth:`state_dict` gave; ``{}``: a fresh guard (an empty window, no skips)."""
        norms = list(state.get("norms", []))[-self.window :]
        self.norms = torch.full((self.window,), math.nan, device=self.device)
        if norms:  # newest last, as decide() slides them in
            self.norms[self.window - len(norms) :] = torch.tensor(norms, dtype=torch.float32, device=self.device)
        integer = dict(dtype=torch.int64, device=self.device)
        self.skipped = torch.tensor([state.get("skipped", 0)], **integer)
        self.nonfinite = torch.tensor([state.get("nonfinite", 0)], **integer)
        self.consecutive = torch.tensor([state.get("consecutive", 0)], **integer)
        self.clipped = torch.tensor([state.get("clipped", 0)], **integer)
        self.rescued = torch.tensor([state.get("rescued", 0)], **integer)
        self.clip_scale = torch.ones((), device=self.device)
        self.stuck = torch.zeros(3, device=self.device)
        self.taken = torch.ones((), dtype=torch.bool, device=self.device)


def step_unless_skipped(optimizer, taken):
    """``optimizer.step()`` where ``taken`` (a device boolean) says so, leaving its state untouched otherwise."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        # torch.amp.GradScaler's contract: given found_inf = 1, a fused optimizer (make_optimizer's Adam)
        # leaves the parameters, exp_avg, exp_avg_sq and the step count as they were, decided on the device.
        optimizer.found_inf = (~taken).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif taken.item():  # any other optimizer: the decision comes to the host, one sync per step
        optimizer.step()


def training_step(model, optimizer, objective, x, kl_scale=1.0, clip_norm=None, guard=None, step=0):
    """One optimizer step, as :func:`train` takes it: Pyro's loss and gradients, optional
    global-norm clipping, then ``optimizer.step()`` -- unless ``guard``, an :class:`UpdateGuard`,
    skips it (``step`` is this step's number, for its report).

    ``objective`` is a Pyro ELBO (one process) or the :class:`DataParallelElbo` that
    :func:`train` builds once per run (it holds the DDP wrapper). Returns this rank's loss,
    detached, without a host sync where Pyro allows.
    """
    if not isinstance(objective, DataParallelElbo):
        objective = DataParallelElbo(model, objective, distributed.DistributedContext())
    optimizer.zero_grad(set_to_none=True)
    loss = objective.loss_and_backward(x, kl_scale)
    if guard is None:
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        return loss
    # One fused norm of all gradients, taken before the clipping it also does when asked (by 1.0
    # otherwise: exact). In a data-parallel run the gradients here are already summed over the
    # ranks (DDP's all-reduce ends inside backward(); all_reduce_gradients is synchronous): the
    # same bits on every rank, so every rank computes the same norm and takes the same decision.
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf if clip_norm is None else clip_norm)
    taken = guard.decide(norm, step)
    if guard.factor > 0 or guard.clip_factor > 0:  # by exactly 1.0 unless clipped: a device scalar, no host sync
        torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], guard.clip_scale)
    step_unless_skipped(optimizer, taken)
    return loss


def _synchronise(context, loss_sum, epoch_images, signal_state):
    """The host sync every few steps: the epoch's loss and image count so far over all
    ranks, and the signal any rank received (SIGTERM before SIGINT; ``None`` if none).

    One all-reduce carries all three, so every rank reaches the same decision to stop.
    """
    local_signal = signal_state.get("signal")
    counts = [epoch_images, local_signal == signal.SIGINT, local_signal == signal.SIGTERM]
    packed = torch.cat([loss_sum.detach().double().reshape(1), torch.tensor(counts, dtype=torch.float64, device=loss_sum.device)])
    total_loss, images, sigints, sigterms = context.all_reduce_sum(packed).tolist()
    stop_signal = int(signal.SIGTERM) if sigterms else int(signal.SIGINT) if sigints else None
    return total_loss, int(images), stop_signal


@contextmanager
def _stop_on_signals(state):
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (main thread only)."""

    def handler(signal_number, frame):
        state["signal"] = signal_number

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def default_out_dir(config):
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = "vae" if config.model == "vae" else f"srvae-{config.guide}"
    return Path("runs") / f"{stamp}-{name}"


def _config_from_checkpoint(payload, overrides):
    try:
        config = TrainConfig.from_dict(dict(payload["config"]))
    except (TypeError, ConfigError) as error:
        raise CheckpointError(f"checkpoint has an unusable configuration: {error}") from None
    for name, value in overrides.items():
        if name in TrainConfig.RESUMABLE and value is not None:
            setattr(config, name, value)
    # A step limit stops one invocation (a smoke run, a time slice); it is not part of
    # the run's identity, so a resumed run has only the limit it is given now.
    config.max_steps = overrides.get("max_steps")
    return config


def train(config=None, *, resume=None, progress=True, log=print, **overrides):
    """Train (or resume), evaluate and draw figures; returns a :class:`TrainResult`.

    ``config`` is a :class:`TrainConfig` (or ``None`` for the defaults) and keyword
    ``overrides`` replace its fields. With ``resume=CHECKPOINT`` the configuration comes
    from the checkpoint and only the fields in ``TrainConfig.RESUMABLE`` (``epochs``,
    ``max_steps``, ``device``, ...) may be overridden; training continues from the
    exact step, with the optimizer, the RNGs and the data order restored.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this with the same
    arguments and trains data-parallel (:mod:`pyro_srvae.distributed`): each rank takes
    ``batch_size`` images of every global batch of ``batch_size * world_size``, gradients
    are summed over ranks (:class:`DataParallelElbo`), evaluation is sharded and reduced,
    and only rank 0 writes the checkpoint, the metrics and the figures, and logs.

    Raises :class:`ConfigError`, :class:`CheckpointError`, :class:`TrainingDiverged`
    or :class:`TrainingInterrupted` (after writing a checkpoint), and in a data-parallel
    run :class:`pyro_srvae.distributed.ProcessGroupLost` when a peer is lost.
    """
    started = time.time()
    payload = None
    if resume is not None:
        payload = load_checkpoint(resume)
        config = _config_from_checkpoint(payload, overrides)
        if config.out is None:
            config.out = str(Path(resume).parent)
    else:
        config = dataclasses.replace(config or TrainConfig(), **overrides)
    config.validate()
    try:
        context = distributed.connect(resolve_device(config.device))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        with context.lost_contact_on_failure():
            return _train(
                config, payload, resume, context, started,
                progress=progress and context.is_main, log=log if context.is_main else _silent,
            )  # fmt: skip
    finally:
        context.close()


def _silent(*args, **kwargs):
    """The log of ranks other than 0: one copy of every message is enough."""


def _train(config, payload, resume, context, started, progress, log):
    """The body of :func:`train` once the configuration and the process group are settled."""
    # The default directory name holds the time: every rank takes rank 0's.
    out_dir = Path(context.broadcast_object(config.out or str(default_out_dir(config))))
    config.out = str(out_dir)
    context.resume_hint = f"Resume from the last checkpoint with --resume {out_dir / 'checkpoint.pt'}"

    train_set, test_set = _load_data(config, context, progress)
    _log_data(train_set, test_set, log)
    global_batch = config.batch_size * context.world_size
    if len(train_set) < global_batch:
        per_rank = f" x {context.world_size} processes = {global_batch}" if context.enabled else ""
        raise ConfigError(f"--batch-size {config.batch_size}{per_rank} exceeds the {len(train_set)} training images")

    if config.epochs is None:
        log(resolve_epochs(config, len(train_set), context.world_size))
    run = _Run(config, context, out_dir, started, *_build(config, train_set, context, log, fresh=payload is None))
    check_bit_depth(run.model, train_set.bits)
    run.model.bits = train_set.bits
    run.data = data_summary(train_set)
    if payload is not None:
        _restore(run, payload, resume)
        log(f"resuming {resume} at epoch {run.epoch + 1}, step {run.step}")
    if context.is_main:  # what writers killed in an earlier session of this run left behind
        remove_stale_temporaries(out_dir, OUTPUT_FILES + FIGURE_FILES)
    run.board = _open_board(config, out_dir, context, run.step)
    try:
        _fit(run, train_set, test_set, progress, log)
        test = _evaluate(run, train_set, test_set, progress, log)
        return _finish(run, test, test_set, log)
    finally:
        run.board.close()


def dataset_options(config, progress=False):
    """The keyword arguments of :func:`pyro_srvae.data.load_dataset` for the run's data."""
    if config.dataset != FOLDER:
        return {}
    return dict(
        patch_size=config.patch_size, patch_stride=config.patch_stride, test_fraction=config.test_fraction,
        seed=config.seed, factor=config.factor, channels=config.channels, cache_dir=config.cache_dir,
        progress=progress,
    )  # fmt: skip


def load_split(config, split, progress=False):
    """One split of the run's data, as training reads it (``pyro-srvae evaluate`` reads it so too)."""
    return load_dataset(config.dataset, split, config.data_dir, config.download, **dataset_options(config, progress))


def _load_data(config, context, progress=False):
    """The training and test sets of the run, cut to ``--train-limit`` / ``--eval-limit``."""
    if config.dataset == FOLDER and config.cache_dir is None:
        # Next to the run, shared by the runs beside it: a second run reads the patches
        # from the cache instead of decoding the images again.
        config.cache_dir = str(Path(config.out).parent / "folder-cache")
    # With --download, rank 0 fetches the files before the other ranks read them; rank 0
    # also builds a folder's patch cache first, which the others then open.
    with context.main_first(config.download or config.dataset == FOLDER):
        train_set = load_split(config, "train", progress and context.is_main)
        test_set = load_split(config, "test", progress and context.is_main)
    return _first(train_set, config.train_limit), _first(test_set, config.eval_limit)


def _log_data(train_set, test_set, log):
    """For a folder: where the patches came from, what was converted, what was too small."""
    for dataset in (train_set, test_set):
        source = dataset.source
        if source is None:
            continue
        cached = " (from the cache)" if source.from_cache else ""
        log(
            f"{dataset.split}: {len(dataset)} patches of {dataset.image_shape[1]}x{dataset.image_shape[2]} "
            f"from {len(source.files)} images, {source.bits}-bit, {source.channels} channel(s){cached}"
        )
        for note in source.notes:
            log(f"  note: {note}")
        if source.skipped:
            log(f"  {len(source.skipped)} image(s) smaller than one patch left out, e.g. {source.skipped[0]}")


def check_bit_depth(model, bits):
    """16-bit data need a continuous density on the 16-bit grid: the 256-bin likelihoods and
    a y on the 8-bit grid (the ``bound`` route of --x-given-y, the model's ``quantized_y``)
    would not describe them."""
    if bits == 8:
        return
    if model.likelihood_name == "dlogistic-mix":
        raise ConfigError(
            f"{bits}-bit data: --likelihood dlogistic-mix has 256 bins (8 bits); use gaussian, gaussian-pixel or gaussian-pixel-faithful"
        )
    if getattr(model, "quantized_y", False):
        raise ConfigError(
            f"{bits}-bit data: this srVAE puts y on the 8-bit grid (--x-given-y {model.x_given_y}, "
            f"--downscale-mode {model.downscale_mode}); use --downscale-mode area with --x-given-y consistent"
        )


def data_summary(dataset):
    """What a checkpoint and metrics.json record of the training data: shape, bit depth, and
    for a folder the files and patches (so that superresolve knows its tile and its units)."""
    summary = {"image_shape": list(dataset.image_shape), "bits": dataset.bits, "num_images": len(dataset)}
    source = dataset.source
    if source is not None:
        summary.update(
            root=str(source.root), layout=source.layout, files=len(source.files), patch_size=source.patch_size,
            patch_stride=source.patch_stride, channels=source.channels, cache_file=str(source.cache_file or ""),
        )  # fmt: skip
    return summary


def _build(config, train_set, context, log=None, fresh=True):
    """The seeded model (the same initial weights on every rank) and its optimizer.

    A fresh run that standardizes (:func:`standardizes`) sets the training set's per-band
    statistics; a resumed one gets them from its checkpoint's state dict (:func:`_restore`)."""
    pyro.clear_param_store()
    torch.manual_seed(config.seed)
    pyro.set_rng_seed(config.seed)
    model = build_model(config, train_set.image_shape).to(context.device)
    if fresh and standardizes(config, model, train_set.bits):
        _standardize(model, train_set, log or _silent)
    if config.compile:
        model.compile_networks()
    if context.rank > 0:
        # Same initial weights on every rank (seeded above; DDP broadcasts rank 0's anyway),
        # but each rank draws its own latent and dequantization noise from here on.
        pyro.set_rng_seed(derive_seed(config.seed, "rank", context.rank))
    return model, make_optimizer(model, config.lr)


def standardizes(config, model, bits=8):
    """Whether the run standardizes its data per band (``--standardize``).

    ``auto``: for a ``--dataset folder`` of 16-bit images (bands that may fill a few thousand of
    65,536 levels), unless the model scores x on the 256-bin grid (``model.discretized``); not
    for 8-bit folders, whose pixels fill [0, 1] already and where a standardized run of the
    photographs' recipe diverged (docs/results.md, the fifteenth run); never for the named
    datasets, whose runs stay as they were. ``on`` with a discretized model is an error."""
    if config.standardize == "on" and model.discretized:
        raise ConfigError(
            "--standardize on: this model scores x on the 256-bin grid of [0, 1] (--likelihood dlogistic-mix, "
            "or y on the 8-bit grid: --x-given-y quantized, --downscale-mode bilinear); use --standardize off"
        )
    if config.standardize == "auto":
        return config.dataset == FOLDER and bits > 8 and not model.discretized
    return config.standardize == "on"


def _standardize(model, train_set, log):
    """Set the training set's per-band mean and std (of the dequantized x) as the model's scaling."""
    mean, std = band_statistics(train_set.images)
    model.set_data_scaling(mean, std)
    listed = ", ".join(f"{m:.4g} +- {s:.4g}" for m, s in zip(mean.tolist(), std.tolist()))
    log(f"standardized per band for the networks: mean +- std of x on [0, 1] = {listed} ({len(train_set)} training images)")


def _open_board(config, out_dir, context, step):
    """Rank 0's TensorBoard writer with ``--tensorboard``, else one that writes nothing.

    It purges from ``step`` on: whatever an interrupted session logged at or after the
    checkpoint this run resumes from, or a finished run's events when a fresh run reuses
    ``--out``. :func:`_replay_to_board` logs that step's own values again."""
    try:
        return open_board(
            config.tensorboard and context.is_main, out_dir / BOARD_DIR, purge_step=step, seed=config.seed,
            sr_samples=min(config.sr_samples, 8),
        )  # fmt: skip
    except ImportError as error:
        raise ConfigError(str(error)) from None


class _Run:
    """One session of a run, shared by the steps of :func:`_train`: the model and optimizer,
    where the run stands (epoch, batch in it, step), its history, and the checkpoint."""

    def __init__(self, config, context, out_dir, started, model, optimizer):
        self.config, self.context, self.out_dir, self.started = config, context, out_dir, started
        self.model, self.optimizer = model, optimizer
        self.checkpoint_path = out_dir / "checkpoint.pt"
        self.history = {"epochs": [], "steps": [], "wall_seconds": 0.0}
        self.epoch, self.batch_start, self.step = 0, 0, 0
        # The run's loss so far (all ranks) of an epoch cut by a checkpoint.
        self.partial_epoch = {"loss_sum": 0.0, "images": 0}
        self.prior_wall = 0.0  # the wall time of the earlier sessions of this run
        self.board = None
        self.data = {}  # data_summary of the training set
        self.guard = UpdateGuard(config.skip_factor, config.max_consecutive_skips, context.device, clip_factor=config.clip_factor)

    def reached_max_steps(self):
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    def checkpoint(self, epoch_index, batch_index, loss_sum=0.0, images=0, rng_states=None):
        # Every rank calls this, so that its RNG state goes into the file; rank 0 writes it.
        context = self.context
        rng_states = rng_states or context.all_gather_object(get_rng_state())
        if not context.is_main:
            return
        self.history["wall_seconds"] = self.prior_wall + time.time() - self.started
        state = {
            "config": self.config.to_dict(),
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "param_store": {k: v.detach().cpu() for k, v in pyro.get_param_store().items()},
            "epoch": epoch_index,
            "batch_in_epoch": batch_index,
            "partial_epoch": {"loss_sum": float(loss_sum), "images": images},
            "step": self.step,
            "rng": rng_states[0],
            "world_size": context.world_size,
            "history": self.history,
            "data": self.data,
            "update_guard": self.guard.state_dict(),
        }
        if context.enabled:
            state["rng_by_rank"] = rng_states
        save_checkpoint(self.checkpoint_path, state)

    def interrupted(self, signal_number):
        self.context.barrier()  # every rank leaves after rank 0 has written the checkpoint
        return TrainingInterrupted(
            f"interrupted by signal {signal_number} at step {self.step}; resume with --resume {self.checkpoint_path}",
            signal_number,
        )


def _restore(run, payload, resume):
    """The checkpoint's weights, optimizer state, history, position and RNG streams."""
    try:
        run.model.load_state_dict(payload["model_state"])
        run.optimizer.load_state_dict(payload["optimizer_state"])
    except (RuntimeError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{resume} does not match its own configuration: {first_line}") from None
    run.history = payload.get("history", run.history)
    run.history["epochs"] = [upgrade_epoch_record(record, run.config) for record in run.history["epochs"]]
    run.epoch, run.batch_start, run.step = payload["epoch"], payload.get("batch_in_epoch", 0), payload["step"]
    run.partial_epoch = payload.get("partial_epoch", run.partial_epoch)
    run.guard.load_state_dict(payload.get("update_guard", {}))  # none in checkpoints from before the guard
    saved_world_size = payload.get("world_size", 1)
    if saved_world_size != run.context.world_size and run.batch_start:
        raise CheckpointError(
            f"{resume} was saved in the middle of an epoch by {saved_world_size} process(es) and the "
            f"position in an epoch depends on the global batch: resume it with {saved_world_size} "
            f"process(es) (or change the process count at an epoch-end checkpoint)"
        )
    _restore_rng_state(payload, run.context, run.config.seed, run.step)
    run.prior_wall = run.history.get("wall_seconds", 0.0)


def _fit(run, train_set, test_set, progress, log):
    """The training loop: epochs of steps from where the run stands, each ending with its
    record and a checkpoint, until ``--epochs``, ``--max-steps`` or a signal."""
    config, context, model = run.config, run.context, run.model
    # Pixels are uint8 on the device, validated once here; each batch is dequantized
    # on the device, so the per-call checks inside the model can be skipped.
    train_images = DeviceImages(train_set.images, context.device)
    elbo = make_elbo(config.elbo, num_particles=config.num_particles, vectorize_particles=config.num_particles > 1,
                     free_bits=config.free_bits)
    if config.elbo == "meanfield-mog-bound":
        log(MIXTURE_BOUND_WARNING)
    objective = DataParallelElbo(model, elbo, context, config.precision)
    batches_per_epoch = num_batches(len(train_set), config.batch_size, drop_last=True, world_size=context.world_size)
    num_dims = train_set.images[0].numel()
    if context.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
    if context.enabled:
        log(
            f"data-parallel on {context.world_size} processes ({context.backend}, gradients by {objective.sync}): "
            f"{config.batch_size} images per rank, global batch {config.batch_size * context.world_size}"
        )

    signal_state = {}
    total, done = config.epochs * batches_per_epoch, run.epoch * batches_per_epoch + run.batch_start
    if too_short(config, total):
        log(f"warning: {short_run_note(config, total, len(train_set))}")
    bar = _progress_bar(progress, total=total, initial=done)
    try:
        with _stop_on_signals(signal_state), training_mode(model, elbo):
            _replay_to_board(run, test_set.images)
            while run.epoch < config.epochs and not run.reached_max_steps():
                batch, run_loss, run_images, stop_signal = _run_epoch(
                    run, train_images, objective, batches_per_epoch, num_dims, signal_state, bar
                )
                _end_epoch(run, batch, run_loss, run_images, test_set.images, batches_per_epoch, num_dims)
                if not context.enabled:
                    stop_signal = stop_signal or signal_state.get("signal")
                if stop_signal:
                    raise run.interrupted(stop_signal)
    finally:
        bar.close()


def _run_epoch(run, train_images, objective, batches_per_epoch, num_dims, signal_state, bar):
    """The steps of one epoch from ``run.batch_start``, to its end, ``--max-steps`` or a signal.

    Returns ``(batch, run_loss, run_images, stop_signal)``: the position reached in the
    epoch, the epoch's loss and image count over all ranks at the last host sync, and the
    signal the ranks agreed to stop on (``None`` if none).
    """
    config, context, model = run.config, run.context, run.model
    model.train()
    # Rank 0 carries the sums of an epoch resumed part-way; the others add their shares.
    carried = run.partial_epoch if context.is_main else {"loss_sum": 0.0, "images": 0}
    tally = _EpochTally(carried["loss_sum"], carried["images"], context.device)
    guard = run.guard if run.guard.enabled else None
    run_loss, run_images = run.partial_epoch["loss_sum"], run.partial_epoch["images"]  # all ranks, last sync
    stop_signal = None
    unchecked = 0
    epoch, batch = run.epoch, run.batch_start
    for indices in iterate_batches(
        len(train_images), config.batch_size, config.seed, epoch, start_batch=run.batch_start, drop_last=True,
        rank=context.rank, world_size=context.world_size,
    ):  # fmt: skip
        x = dequantize(train_images.batch(indices))
        if config.augment:
            x = augment_dihedral(x)
        beta = kl_scale(config, epoch, batch, batches_per_epoch)
        set_learning_rate(run.optimizer, learning_rate(config, run.step, total_steps(config, batches_per_epoch)))
        loss = training_step(model, run.optimizer, objective, x, beta, config.clip_norm, guard, run.step + 1)
        tally.add(loss, x.shape[0], guard.taken if guard is not None else None)
        unchecked += 1
        run.step += 1
        batch += 1
        bar.update(1)
        limit_reached = run.reached_max_steps()
        checkpoint_due = config.checkpoint_every and run.step % config.checkpoint_every == 0
        epoch_done = batch == batches_per_epoch
        # A single process answers a signal at once. The ranks of a data-parallel run
        # must stop at the same step, so they share their signals only at these
        # sync points, which every rank reaches at the same steps.
        signalled_alone = bool(signal_state) and not context.enabled
        if unchecked >= SYNC_EVERY or limit_reached or checkpoint_due or epoch_done or signalled_alone:
            run_loss, run_images, stop_signal = _sync_point(run, tally, signal_state, epoch, num_dims, bar)
            unchecked = 0
        if epoch_done:
            break  # the epoch record and checkpoint are written by _end_epoch
        if checkpoint_due or stop_signal:
            run.checkpoint(epoch, batch, run_loss, run_images)
        if stop_signal:
            raise run.interrupted(stop_signal)
        if limit_reached:
            break
    return batch, run_loss, run_images, stop_signal


class _EpochTally:
    """This rank's loss and image count over an epoch's steps, summed on the device.

    A step whose update the guard skipped counts neither (its loss may be NaN): the running
    loss is that of the steps taken. The guard's decisions stay on the device until a host sync.
    """

    def __init__(self, loss_sum, images, device):
        self.loss_sum = torch.tensor(loss_sum, device=device)
        self.images = images  # on the host: the steps counted without a guard
        self.guarded_images = None  # on the device: the steps counted by the guard's decisions

    def add(self, loss, images, taken=None):
        if taken is None:
            self.loss_sum = self.loss_sum + loss
            self.images += images
            return
        self.loss_sum = self.loss_sum + torch.where(taken, loss.to(taken.device), 0.0)
        counted = taken.long() * images
        self.guarded_images = counted if self.guarded_images is None else self.guarded_images + counted

    def host_images(self):
        return self.images + (0 if self.guarded_images is None else int(self.guarded_images))


def _sync_point(run, tally, signal_state, epoch, num_dims, bar):
    """The loop's host sync every few steps: the guard's counts (stop after too many skips in a
    row), the epoch's loss so far over all ranks (stop on divergence), the bar and the board.

    Returns ``(run_loss, run_images, stop_signal)`` as :func:`_synchronise` does."""
    run_loss, run_images, stop_signal = _synchronise(run.context, tally.loss_sum, tally.host_images(), signal_state)
    note = ""
    if run.guard.enabled:
        counts = run.guard.counts()
        run.guard.stop_if_stuck(counts, run.checkpoint_path)
        run.board.skipped_updates(run.step, counts["skipped"], counts["nonfinite"])
        note = f", {counts['skipped']} skipped" if counts["skipped"] else ""
    if not run_images:  # every step of the epoch so far was skipped: no loss to report
        return run_loss, run_images, stop_signal
    mean_bpd = bits_per_dim(-run_loss / run_images, num_dims, run.model.bits)
    if not math.isfinite(mean_bpd):
        raise TrainingDiverged(
            f"the loss became {mean_bpd} at step {run.step} (epoch {epoch + 1}); "
            f"stopped without saving, the last good checkpoint is {run.checkpoint_path}"
        )
    run.history["steps"].append([run.step, mean_bpd])
    run.board.running_loss(run.step, mean_bpd)
    bar.set_postfix_str(f"epoch {epoch + 1} loss {mean_bpd:.3f} bpd{note}")
    return run_loss, run_images, stop_signal


def _end_epoch(run, batch, run_loss, run_images, test_images, batches_per_epoch, num_dims):
    """The record of the epoch (or of its part done), the position after it, the checkpoint."""
    config, history, epoch = run.config, run.history, run.epoch
    complete = batch == batches_per_epoch
    end_scale = kl_scale(config, epoch, batch, batches_per_epoch)
    record = {
        "epoch": epoch + 1,
        # The running training loss (not the ELBO under warm-up, a bound or free bits: train_objective
        # says which); None when the update guard skipped every step of the epoch: no loss was kept.
        "train_objective_bpd": bits_per_dim(-run_loss / run_images, num_dims, run.model.bits) if run_images else None,
        "train_objective": objective_name(config, kl_scale(config, epoch, 0, batches_per_epoch), end_scale),
        "test_elbo_bpd": _test_elbo_bpd(run.model, test_images, config, run.context),
        "step": run.step,
        "kl_scale": end_scale,
        "complete": complete,
    }
    if history["epochs"] and history["epochs"][-1]["epoch"] == epoch + 1:
        history["epochs"][-1] = record  # a partial epoch, now extended
    else:
        history["epochs"].append(record)
    _board_epoch(run, record, test_images)
    if complete:
        run.epoch, run.batch_start = epoch + 1, 0
        run.partial_epoch = {"loss_sum": 0.0, "images": 0}
    else:
        run.batch_start = batch
        run.partial_epoch = {"loss_sum": run_loss, "images": run_images}
    run.checkpoint(run.epoch, run.batch_start, **run.partial_epoch)


def _board_epoch(run, record, test_images):
    if not run.board.enabled:
        return
    model = run.model
    gammas = {"x": _scalar(model.gamma_x), "y": _scalar(getattr(model, "gamma_y", None))}
    run.board.epoch(record, model, test_images, gammas, mixture_summary(top_prior(model)))


def _replay_to_board(run, test_images):
    """What the board purged at the step this session starts from, logged again.

    The checkpoint holds that step's loss and epoch record, and the restored weights
    give its terms and images; nothing before it is logged twice. A fresh run has none."""
    for step, bpd in run.history["steps"]:
        if step >= run.step:
            run.board.running_loss(step, bpd)
    if run.step and run.guard.enabled:  # the update guard's counts, logged at that step's host sync
        counts = run.guard.counts()
        run.board.skipped_updates(run.step, counts["skipped"], counts["nonfinite"])
    epochs = run.history["epochs"]
    if epochs and epochs[-1]["step"] >= run.step:
        _board_epoch(run, epochs[-1], test_images)


def _evaluate(run, train_set, test_set, progress, log):
    """The final test metrics, sharded over the ranks."""
    config, context = run.config, run.context
    log(f"training done: {run.step} steps; evaluating on {len(test_set)} test images")
    return evaluate_images(
        run.model, config, train_set.images, test_set.images, context.device,
        progress=progress, rank=context.rank, world_size=context.world_size,
    )  # fmt: skip


def evaluate_images(model, config, train_images, images, device, progress=False, rank=0, world_size=1):
    """The end-of-training evaluation of ``model`` on the uint8 (or uint16) ``images``, with the
    run's settings: K = ``eval_samples``, ``sr_samples`` draws, the run's seed, the batches of
    :func:`~pyro_srvae.evaluation.evaluation_batch_size` (as ``pyro-srvae evaluate``'s, so it
    reproduces these numbers), and for the srVAE the consistent-bicubic baseline of -log p(x|y)
    fitted on ``train_images``."""
    baseline_scale = fit_baseline_scale(train_images, config.factor, config.seed) if isinstance(model, SRVAE) else None
    return evaluate_model(
        model,
        images,
        elbo_samples=config.eval_samples,
        iw_samples=config.eval_samples,
        sr_samples=config.sr_samples,
        batch_size=evaluation_batch_size(config.eval_samples, device),
        device=device,
        seed=config.seed,
        progress=progress,
        rank=rank,
        world_size=world_size,
        baseline_scale=baseline_scale,
    )


def _finish(run, test, test_set, log):
    """The metrics; on rank 0 their files, the figures, the board's hparams, the last checkpoint."""
    config, context, model, out_dir = run.config, run.context, run.model, run.out_dir
    # Gathered while every rank is here; rank 0 alone goes on to write files.
    gathered = context.all_gather_object(
        (get_rng_state(), distributed.state_digest(model.state_dict()) if context.enabled else None)
    )
    rng_states = [rng for rng, _ in gathered]
    run.history["wall_seconds"] = run.prior_wall + time.time() - run.started
    metrics = _metrics(config, model, run.history, test, context, [digest for _, digest in gathered], run.guard)
    metrics["data"] = run.data
    if metrics.get("distributed") and not metrics["distributed"]["ranks_identical"]:
        log("warning: the ranks' weights differ after training (see state_digests in metrics.json)")
    if not context.is_main:
        return TrainResult(model=model, metrics=metrics, out_dir=out_dir, checkpoint=run.checkpoint_path)
    _write_metrics(out_dir, metrics)
    figures = []
    if config.figures:
        figures = _draw_figures(model, test_set.images, run.history, out_dir, config, metrics["test"])
    run.board.final(run.step, metrics["config"], metrics["test"])
    metrics["wall_seconds"] = run.prior_wall + time.time() - run.started
    _write_metrics(out_dir, metrics)
    # The final wall time and history, same weights.
    run.checkpoint(run.epoch, run.batch_start, **run.partial_epoch, rng_states=rng_states)
    log(summary_table(metrics))
    return TrainResult(model=model, metrics=metrics, out_dir=out_dir, checkpoint=run.checkpoint_path, figures=figures)


def _restore_rng_state(payload, context, seed, step):
    """Each rank continues its own RNG streams from the checkpoint: exact when the number
    of processes is unchanged. Otherwise rank 0 continues its stream and the others
    start fresh ones seeded by (seed, rank, step)."""
    states = payload.get("rng_by_rank") or ([payload["rng"]] if "rng" in payload else [])
    if len(states) == context.world_size:
        set_rng_state(states[context.rank])
    elif context.rank == 0 and states:
        set_rng_state(states[0])
    elif context.rank > 0:
        pyro.set_rng_seed(derive_seed(seed, "rank", context.rank, "step", step))


def _first(dataset, limit):
    if limit is None:
        return dataset
    return dataclasses.replace(dataset, images=dataset.images[:limit], labels=dataset.labels[:limit])


def _progress_bar(enabled, total, initial):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, file=sys.stderr)


def _test_elbo_bpd(model, images, config, context):
    """A one-sample ELBO on the test set each epoch: cheap, unbiased, no RNG side effects;
    sharded over the ranks of a data-parallel run."""
    result = evaluate_model(
        model, images, elbo_samples=1, iw_samples=1, batch_size=256, seed=config.seed, super_resolution=False,
        latents=False, rank=context.rank, world_size=context.world_size,
    )  # fmt: skip
    return result["elbo_bpd"]


TEST_KEYS = [
    "elbo_bpd", "iw_bpd", "iw_samples", "x_density",
    "sr_psnr", "bicubic_psnr", "bilinear_psnr", "consistent_bicubic_psnr", "consistent_bilinear_psnr",
    "sr_ssim", "bicubic_ssim", "bilinear_ssim", "consistent_bicubic_ssim", "consistent_bilinear_ssim",
    "sr_coverage", "sr_coverage90", "sr_coverage90_expected", "sr_crps", "bicubic_mae",
    "sr_std_rms", "sr_std_latent_rms", "sr_std_noise_rms",
    "sr_bpd", "sr_bpd_dims", "sr_bpd_baseline", "sr_baseline_scale", "num_images", "bits",
    "kl_z_bits", "kl_u_bits", "active_z", "active_u", "z_dim", "u_dim",
    "sr_latent_share", "sr_latent_share_detail", "sr_best_of_psnr", "sr_best_of_gain", "sr_draw_psnr",
]  # fmt: skip

#: What each ``x_density`` means, printed next to every bits/dim.
X_DENSITY_NOTES = {
    "exact": "a normalized density of x",
    "bound": "a lower bound on a normalized density of x (y on the 8-bit grid)",
    "joint": "the spec's joint p(x, y=f(x)): not a density of x, not comparable with a VAE",
}


MIXTURE_BOUND_WARNING = (
    "warning: --elbo meanfield-mog-bound minimises the eq. (23) bound, which is linear in the mixture "
    "weights: training on it concentrates them on one component (see mixture.effective_components in "
    "metrics.json and docs/derivation.md)"
)


def mixture_summary(prior):
    """The weights of a mixture prior and their effective number of components, exp(entropy).

    Training on the eq. (23) bound concentrates the weights (docs/derivation.md): an effective
    number near 1 says the "mixture" has become one Gaussian. None for a non-mixture prior.
    """
    weights = getattr(prior, "weights", None)
    if weights is None:
        return None
    weights = weights.detach().double().cpu()
    entropy = -(weights * torch.log(weights.clamp_min(1e-300))).sum().item()
    return {"weights": weights.tolist(), "effective_components": math.exp(entropy)}


def top_prior(model):
    """p(u) of an srVAE, p(z) of a VAE."""
    return model.prior_u if isinstance(model, SRVAE) else model.prior_z


def _metrics(config, model, history, test, context, state_digests, guard=None):
    test = dict(test, x_density=getattr(model, "x_density", None))
    metrics = {
        "config": config.to_dict(),
        "epochs": history["epochs"],
        "test": {key: test.get(key) for key in TEST_KEYS},
        "mixture": mixture_summary(top_prior(model)),
        "gamma_x": _scalar(model.gamma_x),
        "gamma_y": _scalar(getattr(model, "gamma_y", None)),
        # Per band, x' = (x - offset) / scale for the networks (docs/own-images.md); None: x itself.
        "data_scaling": _data_scaling(model),
        "world_size": context.world_size,
        "wall_seconds": history["wall_seconds"],
        "steps": history["steps"],
    }
    if guard is not None:
        metrics.update(update_guard_summary(guard))
    if context.enabled:
        metrics["distributed"] = {
            "backend": context.backend,
            "world_size": context.world_size,
            "global_batch_size": config.batch_size * context.world_size,
            # SHA-256 of each rank's state dict at the end (distributed.state_digest).
            "state_digests": state_digests,
            "ranks_identical": len(set(state_digests)) == 1,
        }
    return metrics


def update_guard_summary(guard):
    """What metrics.json records of the :class:`UpdateGuard`: the updates skipped (the non-finite ones
    included) and, of them, those whose gradient was not finite; the median gradient norm of the last
    steps taken (the scale its threshold multiplies; None before any step was taken)."""
    counts = guard.counts()
    return {
        "skipped_updates": counts["skipped"],
        "skipped_nonfinite_updates": counts["nonfinite"],
        "clipped_updates": counts["clipped"],
        "rescued_updates": counts["rescued"],
        "gradient_norm_median": counts["median"],
    }


def resolve_epochs(config, num_train, world_size=1):
    """Set a folder run's ``epochs`` (left None by its recipe) to the number whose update steps come
    nearest :data:`FOLDER_STEP_BUDGET` (at least one), so that a folder of any size trains for about
    the validated budget (whole epochs, not a step limit: a resumed run then ends where this one would
    have). Returns the line that says so."""
    per_epoch = num_batches(num_train, config.batch_size, drop_last=True, world_size=world_size)
    config.epochs = max(1, round(FOLDER_STEP_BUDGET / per_epoch))
    return (f"budget: {config.epochs} epochs of {per_epoch} steps = {config.epochs * per_epoch} update steps "
            f"(a folder's default, about {FOLDER_STEP_BUDGET:,}; --epochs N to choose)")


def too_short(config, steps):
    """Whether ``steps`` update steps, set by ``--epochs`` alone (not by ``--max-steps``), are too few to learn."""
    return config.max_steps is None and steps < MIN_STEPS_TO_LEARN


def short_run_note(config, steps, images):
    return (f"{config.epochs} epochs of {images} training images at batch {config.batch_size} are only {steps} "
            f"update steps, too few to learn (the runs of docs/results.md took 624 to 2,816); "
            f"raise --epochs, or set --max-steps")


def skipped_updates_row(metrics):
    """The summary's row of the skipped updates; None for metrics from before the update guard."""
    if "skipped_updates" not in metrics:
        return None
    skipped, nonfinite = metrics["skipped_updates"], metrics["skipped_nonfinite_updates"]
    steps = metrics["epochs"][-1]["step"] if metrics["epochs"] else 0
    factor, clip = metrics["config"].get("skip_factor") or 0, metrics["config"].get("clip_factor") or 0
    if not factor and not clip:
        return ("skipped updates", f"{skipped} of {steps} steps; the update guard is off (--skip-factor 0)")
    median = metrics["gradient_norm_median"]
    median = "none yet" if median is None else f"{median:.3g} at the end"
    finite = (f"{skipped - nonfinite} with a gradient norm above {factor:g} x the median of the last {GUARD_WINDOW} "
              f"steps taken" if factor else f"no finite one (--skip-factor 0); the median of the last {GUARD_WINDOW} steps taken")
    clipped = f"; {metrics.get('clipped_updates', 0)} clipped to {clip:g} x that median" if clip else ""
    rescued = metrics.get("rescued_updates", 0)
    rescued = f"; {rescued} taken clipped to the threshold after {GUARD_RESCUE_AFTER} skips in a row" if rescued else ""
    return ("skipped updates", f"{skipped} of {steps} steps: {nonfinite} with a non-finite gradient, {finite} "
            f"(median {median}){clipped}{rescued}")  # fmt: skip


def _write_metrics(out_dir, metrics):
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    buffer = io.StringIO()
    fields = ["epoch", "train_objective_bpd", "train_objective", "test_elbo_bpd", "step", "kl_scale"]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for record in metrics["epochs"]:
        writer.writerow({key: record.get(key) for key in writer.fieldnames})
    atomic_write_text(out_dir / "metrics.csv", buffer.getvalue())


def _draw_figures(model, test_images, history, out_dir, config, test_metrics, num_images=8):
    """The run's PNGs, drawn under a private RNG so they are reproducible."""
    device = model.device
    paths = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(config.seed)
        model.eval()
        x = dequantize(test_images[:num_images].to(device))
        paths.append(plots.plot_loss_curves(history["epochs"], out_dir / "loss_curves.png", steps=history["steps"]))
        paths.append(plots.plot_reconstructions(x, model.reconstruct(x), out_dir / "reconstructions.png"))
        if isinstance(model, SRVAE):
            generated = model.sample(16)
            paths.append(plots.plot_samples(generated.x, out_dir / "samples.png", y=generated.y))
            y = model.downscale(x)
            sr = model.super_resolve(y, num_samples=config.sr_samples)
            paths.append(
                plots.plot_super_resolution(
                    y, bicubic_upsample(y, model.factor), sr.mean, sr.samples, sr.std, x, out_dir / "super_resolution.png",
                    sr_means=sr.means,
                )
            )
            coverage = test_metrics.get("sr_coverage")
            if coverage:
                paths.append(plots.plot_calibration(coverage, coverage["num_samples"], out_dir / "calibration.png"))
            decode, prior = model.decode_y, model.prior_u
        else:
            paths.append(plots.plot_samples(model.sample(16), out_dir / "samples.png"))
            decode, prior = model.decode, model.prior_z
        if config.prior == "mog":
            paths.append(plots.plot_mog_components(model.to_data_units(decode(prior.means)), prior.weights, out_dir / "mog_components.png"))
    return paths


def model_label(config):
    """'vae' or 'srvae (full guide)', for summaries."""
    return "vae" if config["model"] == "vae" else f"srvae ({config['guide']} guide)"


#: The SR coverage rows of a run's summary: pixel set, label, and what the set means for calibration.
COVERAGE_ROWS = (
    ("all", "all pixels", ""),
    ("detail", "detail pixels", " (chosen by the truth x: below the level even when calibrated)"),
    ("edges", "edge pixels", " (chosen from y: a calibration test)"),
)


def bits_note(test):
    """' (exact density of x)' and the like: what a bits/dim of this run is."""
    density = test.get("x_density")
    parts = [X_DENSITY_NOTES[density]] if density in X_DENSITY_NOTES else []
    if test.get("bits", 8) != 8:  # 16-bit data: + 16, not + 8 (evaluation.bits_per_dim)
        parts.append(f"of {test['bits']}-bit data")
    return f" ({', '.join(parts)})" if parts else ""


def evaluation_rows(test):
    """(label, value) rows of the test metrics, shared by the training and evaluation summaries."""
    note = bits_note(test)
    rows = [
        ("test ELBO", f"{test['elbo_bpd']:.4f} bits/dim{note}"),
        (f"test IW (K={test['iw_samples']})", f"{test['iw_bpd']:.4f} bits/dim{note}"),
    ]
    if test.get("sr_psnr") is not None:
        rows += [
            ("SR PSNR", f"{test['sr_psnr']:.2f} dB (bicubic {test['bicubic_psnr']:.2f}, consistent bicubic "
                        f"{test['consistent_bicubic_psnr']:.2f}, bilinear {test['bilinear_psnr']:.2f} dB)"),
            ("SR SSIM", f"{test['sr_ssim']:.4f} (bicubic {test['bicubic_ssim']:.4f}, consistent bicubic "
                        f"{test['consistent_bicubic_ssim']:.4f})"),
            ("SR CRPS", f"{test['sr_crps']:.5f} (bicubic's absolute error {test['bicubic_mae']:.5f})"),
        ]  # fmt: skip
        coverage = test.get("sr_coverage")
        if coverage:
            for subset, label, note in COVERAGE_ROWS:
                if subset in coverage:  # runs before the edge pixels have no "edges"
                    observed = ", ".join(f"{float(level):.0%} {coverage[subset][level]:.3f}" for level in coverage[subset])
                    rows.append((f"SR coverage ({label})", observed + note))
            expected = ", ".join(f"{float(level):.0%} {value:.3f}" for level, value in coverage["expected"].items())
            rows.append(("  expected", f"{expected} (from {coverage['num_samples']} draws)"))
        if test.get("sr_bpd") is not None:
            baseline = test.get("sr_bpd_baseline")
            # The convention and the kind of number (evaluation.conditional_bits_per_dim), said in the row.
            rows.append(("SR -log p(x|y)", f"{test['sr_bpd']:.4f} bits/dim of the {test['sr_bpd_dims']} dims not fixed by y"
                         + (f" (consistent-bicubic Gaussian {baseline:.4f})" if baseline is not None else "")
                         + "; y = block means; an estimate (IW log p(x,y) - IW log p(y)), not a bound"))  # fmt: skip
    return rows + latent_rows(test)


def latent_rows(test):
    """(label, value) rows of what the latents carry (:mod:`pyro_srvae.latents`); none for older metrics."""
    sites = [key[3:-5] for key in sorted(test) if key.startswith("kl_") and key.endswith("_bits") and test[key] is not None]
    sites.sort(key=lambda site: site != "z")  # z first: the latent of the high resolution
    rows = []
    if sites:
        kls = ", ".join(f"{site} {test[f'kl_{site}_bits']:.1f}" for site in sites)
        active = ", ".join(f"{site} {test[f'active_{site}']}/{test[f'{site}_dim']}" for site in sites)
        rows += [("KL(q || p)", f"{kls} bits/image"), ("active units", f"{active} (Cov > 0.01)")]
    if test.get("sr_latent_share") is not None:
        samples = test["sr_coverage"]["num_samples"]
        rows += [
            ("SR latent share", f"{test['sr_latent_share']:.3f} of the predictive variance "
                                f"({test['sr_latent_share_detail']:.3f} on detail pixels); the rest is the likelihood's noise"),
            (f"SR best of {samples}", f"{test['sr_best_of_psnr']:.2f} dB ({test['sr_best_of_gain']:+.2f} dB over the mean): "
                                      f"the closest decoder mean of {samples} latent draws"),
            ("SR full draws", f"{test['sr_draw_psnr']:.2f} dB PSNR on average (noise included)"),
        ]  # fmt: skip
    return rows


def format_rows(rows):
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label.ljust(width)}  {value}" for label, value in rows)


def train_objective_row(metrics):
    """The summary's row of the last epoch's running training loss, named for what it is (not the test ELBO)."""
    if not metrics["epochs"]:
        return None
    last = upgrade_epoch_record(metrics["epochs"][-1], TrainConfig.from_dict(metrics["config"]))
    if last["train_objective_bpd"] is None:
        return ("train objective", "none kept: the update guard skipped every step of the last epoch")
    return ("train objective", f"{last['train_objective_bpd']:.4f} bits/dim: minus the {last['train_objective']}, "
            "mean over the last epoch's steps")  # fmt: skip


def summary_table(metrics):
    """A short plain-text table of the final test metrics."""
    config = metrics["config"]
    rows = [
        ("model", f"{model_label(config)}, {config['prior']} prior, {config['elbo']} ELBO"),
        ("epochs / steps", f"{len(metrics['epochs'])} / {metrics['epochs'][-1]['step'] if metrics['epochs'] else 0}"),
    ]
    steps = metrics["epochs"][-1]["step"] if metrics["epochs"] else 0
    if config.get("max_steps") is None and steps < MIN_STEPS_TO_LEARN:
        rows.append(("too short", f"only {steps} update steps, too few to learn: raise --epochs or set --max-steps"))
    rows += [row for row in [train_objective_row(metrics), skipped_updates_row(metrics)] if row is not None]
    rows += evaluation_rows(metrics["test"])
    mixture = metrics.get("mixture")
    if mixture is not None:
        rows.append(("mixture weights", f"effective number of components {mixture['effective_components']:.2f} "
                     f"of {len(mixture['weights'])}"))  # fmt: skip
    if metrics["gamma_x"] is not None:  # the learned scalar scale of the spec's Gaussian likelihood
        units = " (of x / band std)" if metrics.get("data_scaling") else ""
        rows.append(("gamma_x" + (" / gamma_y" if metrics["gamma_y"] is not None else "") + units, _gammas(metrics)))
    rows.append(("wall time", f"{metrics['wall_seconds']:.0f} s"))
    return format_rows(rows)


def _data_scaling(model):
    if not model.standardized:
        return None
    return {"offset": model.data_offset.flatten().tolist(), "scale": model.data_scale.flatten().tolist()}


def _scalar(tensor):
    return None if tensor is None else tensor.item()


def _gammas(metrics):
    if metrics["gamma_y"] is None:
        return f"{metrics['gamma_x']:.4f}"
    return f"{metrics['gamma_x']:.4f} / {metrics['gamma_y']:.4f}"
