"""``TrainConfig``: every setting of a run, with its help text; the command-line flags are built from it."""

import dataclasses
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

import torch

from ..data.batching import num_batches
from ..data.datasets import DATASET_NAMES, FOLDER
from ..model.elbo import ELBO_NAMES
from ..model.image_model import (
    DOWNSCALE_FACTORS,
    DOWNSCALE_MODES,
    GUIDES,
    PIXEL_SCALE_LIKELIHOODS,
    PIXEL_SCALE_SOURCES,
    X_GIVEN_Y,
    Z_POSTERIORS,
)
from ..model.likelihoods import GAUSSIAN_PIXEL_MIN_SCALE, LIKELIHOODS
from ..model.networks import ARCHS, SR_BASES, Z_INJECTIONS
from ..model.priors import PRIORS
from .tensorboard import tensorboard_missing

MODELS = ("vae", "srvae")

DEVICES = ("auto", "cpu", "cuda")

#: fp32: everything in float32. bf16: the networks run under torch.autocast in bfloat16
#: while samples, log-densities and the loss stay float32 (networks.float32_outputs).
PRECISIONS = ("fp32", "bf16")

#: --standardize: scale each band by the training set's mean and std for the networks (docs/own-images.md);
#: auto = on for a --dataset folder of 16-bit images (where the model allows it), off otherwise (standardizes).
STANDARDIZE = ("auto", "on", "off")

#: Fewer update steps than this, from --epochs alone, and the run says it is too short to learn: the
#: runs of docs/results.md took 624 (the main job) to 2,816 (the photographs); a folder of four
#: 100x100 images trained for 6 steps with 3 epochs and ended 28 dB below bicubic (issue #24).
MIN_STEPS_TO_LEARN = 500

#: --lr-schedule: "constant" keeps --lr for every step; "cosine" decays it from --lr to 0 along half a
#: cosine over the run's steps (Loshchilov & Hutter 2017, without restarts), so that the last updates are
#: small and the weights settle instead of ending on a full-size step's noise.
LR_SCHEDULES = ("constant", "cosine")


class ConfigError(ValueError):
    """A configuration that makes no sense; the message is one line saying why."""


def flag(default, help="", *, choices=None, metavar=None, note=None, flag=None):
    """A TrainConfig field that is also a command-line flag (``--name``; ``cli.build_train_parser``).

    ``note`` replaces the default shown in the help ("" shows none); ``flag`` names a flag that
    turns a true default off (``--no-figures``)."""
    options = {"help": help, "choices": choices, "metavar": metavar, "note": note, "flag": flag}
    return dataclasses.field(default=default, metadata={"flag": {k: v for k, v in options.items() if v is not None}})


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in every checkpoint and in metrics.json."""

    model: str = flag("srvae", "plain VAE (sec. 2) or two-stage srVAE (sec. 3-4)", choices=MODELS)
    guide: str = flag("simple", "srVAE guide: simple q(u|y)q(z|x) or full q(u|y)q(z|x,y,u)", choices=GUIDES)
    prior: str = flag("gaussian", "prior on u (srVAE) or z (VAE)", choices=PRIORS)
    mog_components: int = flag(10, metavar="K")
    elbo: str = flag("meanfield", "Pyro ELBO estimator (pyro_srvae.make_elbo)", choices=ELBO_NAMES)
    num_particles: int = flag(1, metavar="N")
    dataset: str = flag("fashion-mnist-mini", "a named set, or folder: your own PNG/JPEG/TIFF/.npy images under --data-dir "
                        "(8- or 16-bit)", choices=DATASET_NAMES)  # fmt: skip
    data_dir: Optional[str] = flag(None, "root of torchvision-layout data [./data]; for --dataset folder, the folder of "
                                   "images (DIR/train and DIR/test when both exist, else a seeded split by image)",
                                   metavar="DIR", note="")  # fmt: skip
    download: bool = flag(False, "download the dataset if missing (needs internet)")
    # Fields left None take their recipe's value (RECIPES, resolve_defaults): the main job's for the named
    # datasets, the photographs' for --dataset folder; ``recipe`` records which one a run took.
    epochs: Optional[int] = flag(None, "total epochs; a resumed run continues up to it", metavar="N")
    max_steps: Optional[int] = flag(None, "stop after N optimizer steps (smoke runs)", metavar="N")
    batch_size: int = flag(32)
    lr: Optional[float] = flag(None, "Adam's learning rate")
    # How the learning rate moves over the run's steps (LR_SCHEDULES, learning_rate); None: the recipe's.
    lr_schedule: Optional[str] = flag(None, "constant, or cosine: from --lr down to 0 over the run's steps",
                                      choices=LR_SCHEDULES)  # fmt: skip
    kl_warmup: float = flag(0.0, "linear KL warm-up length", metavar="EPOCHS")
    # Free bits on z (nats per dimension, batch-averaged; 0 = the plain ELBO): elbo.FreeBits_ELBO.
    free_bits: float = flag(0.0, "free bits on z: nats per dimension below which its batch-averaged KL costs nothing",
                            metavar="NATS")  # fmt: skip
    clip_norm: Optional[float] = flag(None, "clip the global gradient norm at this fixed value (the update guard skips "
                                      "spikes and --clip-factor clips adaptively)")  # fmt: skip
    # The update guard (UpdateGuard, docs/training-faults.md): skip a step whose gradient norm is not finite
    # or above skip_factor x the median norm of the last steps taken (0: off); stop after max_consecutive_skips.
    skip_factor: Optional[float] = flag(None, "skip an update whose gradient norm is not finite or above F x the median "
                                        "of the last steps taken; 0: off (docs/training-faults.md)", metavar="F")  # fmt: skip
    max_consecutive_skips: int = flag(20, "stop with an error after N updates in a row skipped", metavar="N")
    # ... and scale a step's gradient down to clip_factor x that median where its norm is above it (0: off;
    # None: the recipe's, off in both): an adaptive form of the photographs' early fixed clip (training-faults.md).
    clip_factor: Optional[float] = flag(None, "scale a step's gradient down to F x the median norm of the last steps "
                                        "taken where it is above it (adaptive clipping, no norm to pick; 0: off)",
                                        metavar="F")  # fmt: skip
    device: str = flag("auto", choices=DEVICES)
    seed: int = flag(0)
    eval_samples: int = flag(16, "importance samples per test image", metavar="K")
    sr_samples: int = flag(16, "super-resolution draws per image", metavar="S")
    eval_limit: Optional[int] = flag(None, "evaluate on the first N test images only", metavar="N")
    train_limit: Optional[int] = flag(None, "train on the first N training images only", metavar="N")
    out: Optional[str] = flag(None, "output directory", metavar="DIR", note="[runs/<date>-<model>-<guide>]")
    checkpoint_every: Optional[int] = flag(None, "also checkpoint every STEPS steps", metavar="STEPS")
    factor: int = flag(2, "srVAE downscaling factor", choices=DOWNSCALE_FACTORS)
    downscale_mode: str = flag("area", choices=DOWNSCALE_MODES)
    u_dim: int = flag(16)
    z_dim: int = flag(32)
    hidden: Optional[int] = flag(None, "width of the convolutional networks")
    likelihood: Optional[str] = flag(None, "p(x|.) and p(y|u): the spec's Gaussian with learned scalar gamma, a per-pixel "
                                     "Gaussian, or a discretized mixture of logistics", choices=LIKELIHOODS)  # fmt: skip
    likelihood_components: int = flag(10, "logistic components per pixel for --likelihood dlogistic-mix", metavar="K")
    # gaussian-pixel-faithful: the weight of the sigmas' gradient (its scale_gradient_weight).
    faithful_scale_weight: Optional[float] = flag(None, "--likelihood gaussian-pixel-faithful: the weight of the sigmas' "
                                                  "gradient", metavar="W")  # None: the recipe's where gaussian-pixel-faithful, else 1  # fmt: skip
    # gaussian-pixel*: the floor of the per-pixel sigmas and where p(x|y,z,u)'s come from (SRVAE's
    # pixel_scale_floor, pixel_scale_from): levers tried against the collapse of z.
    pixel_scale_floor: float = flag(GAUSSIAN_PIXEL_MIN_SCALE, "--likelihood gaussian-pixel*: the least per-pixel sigma, in "
                                    "p(y|u) and p(x|y,z,u) (data on [0, 1])", metavar="SIGMA")  # fmt: skip
    pixel_scale_from: str = flag("decoder", "--likelihood gaussian-pixel*: the srVAE's p(x|y,z,u) computes its per-pixel "
                                 "sigmas with its locations (decoder) or from y alone (y)", choices=PIXEL_SCALE_SOURCES)  # fmt: skip
    arch: str = flag("small", "small conv nets (CPU) or the paper's DenseNet blocks (GPU)", choices=ARCHS)
    x_given_y: str = flag("consistent", "srVAE p(x|y,.): consistent (a normalized density of x: the Gaussian given its "
                          "block means, or y on the 8-bit grid where no closed form exists), quantized (the paper's "
                          "8-bit y), or spec (the literal eq. 15: a joint of x and y, not a density of x)",
                          choices=X_GIVEN_Y)  # fmt: skip
    sr_base: Optional[str] = flag(None, "the upsampling of y the srVAE's SR decoder adds its residual to", choices=SR_BASES)
    sr_arch: Optional[str] = flag(None, "the srVAE's SR decoder alone in this architecture", choices=ARCHS)  # None: --arch
    sr_hidden: Optional[int] = flag(None, "width of the SR decoder alone", metavar="WIDTH")  # None: --hidden
    # How the srVAE's z is laid out and read (SRVAE z_channels, z_injection); None: the model's own
    # default, MODEL_DEFAULTS, fixed by validate() so that a checkpoint stores what was trained.
    z_channels: Optional[int] = flag(None, "srVAE: z as a map of C channels at the low resolution (z-dim C*h*w, "
                                     "convolutional p(z|y,u) and q(z|x,y,u), as the srVAE paper's latents); 0: a vector "
                                     "of --z-dim", metavar="C")  # fmt: skip
    z_injection: Optional[str] = flag(None, "where the srVAE's SR decoder reads z and u: its first layer (input) or every "
                                      "layer", choices=Z_INJECTIONS)  # fmt: skip
    # The full guide's q(z|x,y,u): "direct" or "residual" around p(z|y,u) (SRVAE z_posterior); None: the recipe's.
    z_posterior: Optional[str] = flag(None, "the full guide's q(z|x,y,u): its own location and scale (direct), or a "
                                      "residual normal around p(z|y,u) (residual: NVAE's; its KL stays finite when the "
                                      "prior's scale shrinks)", choices=Z_POSTERIORS)  # fmt: skip
    # The least scale of p(z|y,u), added to its network's (SRVAE z_scale_floor); None: the recipe's.
    z_scale_floor: Optional[float] = flag(None, "srVAE: added to the scale of p(z|y,u), which else drifts towards 0 with "
                                          "the SR decoder's weights growing in turn", metavar="S")  # fmt: skip
    # R > 0: p(z|y,u) over a z map with covariance W W^T + diag(sigma^2), W of rank R (SRVAE z_prior_rank).
    z_prior_rank: int = flag(0, "srVAE with a z map: p(z|y,u) with covariance W W^T + diag(sigma^2), W of rank R, so "
                             "that its draws vary together over the image in R directions; 0: diagonal, as eq. (16)",
                             metavar="R")  # fmt: skip
    figures: bool = flag(True, "skip the PNG figures", flag="--no-figures")
    precision: str = flag("fp32", "bf16: the networks train under torch.autocast in bfloat16 (log-densities and loss "
                          "stay float32)", choices=PRECISIONS)  # fmt: skip
    compile: bool = flag(False, "torch.compile the networks (not Pyro's tracing)")
    tensorboard: bool = flag(False, "also write TensorBoard event files under OUT/tensorboard (needs the tensorboard extra)")
    # --dataset folder: patches cut from the user's images (pyro_srvae.data.folder.load_folder).
    patch_size: Optional[int] = flag(None, "folder: train on P x P patches (a multiple of --factor); also superresolve's "
                                     "tile", metavar="P")  # fmt: skip
    patch_stride: Optional[int] = flag(None, "folder: step of the patch grid", metavar="S", note="[P/2]")
    test_fraction: float = flag(0.1, "folder without DIR/train and DIR/test: the share of images (at least one) held "
                                "out for testing", metavar="F")  # fmt: skip
    channels: Optional[int] = flag(None, "folder: convert every image to C channels (grey <-> RGB)", metavar="C",
                                   note="[the images' own count]")  # fmt: skip
    augment: Optional[bool] = flag(None, "random flips and quarter turns of each training image, on the fly")
    cache_dir: Optional[str] = flag(None, "folder: where the patch cache (.npy memmap) is kept", metavar="DIR",
                                    note="[a folder-cache/ beside the run]")  # fmt: skip
    # Per-band standardization for the networks, from the training set (STANDARDIZE, _build).
    standardize: str = flag("auto", "scale each band by the training set's mean and std for the networks (stored in "
                            "the checkpoint; bits/dim and outputs stay in the data's units): auto = on for a --dataset "
                            "folder of 16-bit images, off for 8-bit ones and the named sets", choices=STANDARDIZE)  # fmt: skip
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
        for field in dataclasses.fields(self):
            allowed, value = field.metadata.get("flag", {}).get("choices"), getattr(self, field.name)
            if allowed is not None and value not in allowed and not (value is None and field.name in UNSET_MEANS):
                raise ConfigError(f"--{field.name.replace('_', '-')} must be one of {', '.join(map(str, allowed))}")
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

#: What None means for the fields no recipe fills (the other networks' setting).
UNSET_MEANS = {"sr_arch": "--arch", "sr_hidden": "--hidden"}

#: --elbo estimators whose loss with K >= 2 particles is the importance-weighted bound, not the ELBO.
IMPORTANCE_WEIGHTED = ("renyi", "iwae-dreg")


def default_out_dir(config):
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = "vae" if config.model == "vae" else f"srvae-{config.guide}"
    return Path("runs") / f"{stamp}-{name}"


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
