"""pyro-srvae: Super-Resolution Variational Auto-Encoders as Pyro model/guide pairs.

The derivation this package implements is ``../shared/seeds/000_73dd18991a948ff9.txt``
("SRVAE math"); ``docs/derivation.md`` maps each of its equations to the code.
"""

from .metrics.evaluate import evaluate_model
from .metrics.latents import kl_per_image, posterior_means
from .metrics.likelihood import bits_per_dim, iw_log_likelihood
from .model.elbo import ELBO_NAMES, FreeBits_ELBO, IWAE_DReG, MixtureKLBound_ELBO, make_elbo, mixture_kl_upper_bound
from .model.image_model import X_GIVEN_Y, SRSample, SuperResolution, check_images, downscale
from .model.priors import MixtureOfGaussiansPrior, StandardNormalPrior
from .model.srvae import SRVAE
from .model.vae import VAE
from .sr.calibrate import calibrate_checkpoint, fit_interval_scale, fit_spread_scale
from .sr.calibration import IntervalCalibration, SpreadCalibration
from .sr.loading import load_model
from .sr.superresolve import superresolve
from .sr.tiling import SuperResolvedImage, SuperResolveError, superresolve_image
from .training.config import ConfigError, TrainConfig
from .training.factory import build_model
from .training.guard import UpdateGuard
from .training.loop import TrainResult, train
from .utils.version import __version__

evaluate = evaluate_model

__all__ = [
    "__version__",
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "bits_per_dim",
    "build_model",
    "evaluate",
    "evaluate_model",
    "iw_log_likelihood",
    "kl_per_image",
    "posterior_means",
    "train",
    "UpdateGuard",
    "SuperResolveError",
    "SuperResolvedImage",
    "load_model",
    "superresolve",
    "superresolve_image",
    "IntervalCalibration",
    "SpreadCalibration",
    "calibrate_checkpoint",
    "fit_interval_scale",
    "fit_spread_scale",
    "ELBO_NAMES",
    "FreeBits_ELBO",
    "IWAE_DReG",
    "MixtureKLBound_ELBO",
    "MixtureOfGaussiansPrior",
    "SRSample",
    "SRVAE",
    "StandardNormalPrior",
    "SuperResolution",
    "VAE",
    "X_GIVEN_Y",
    "check_images",
    "downscale",
    "make_elbo",
    "mixture_kl_upper_bound",
]
