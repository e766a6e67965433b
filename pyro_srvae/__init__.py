"""pyro-srvae: Super-Resolution Variational Auto-Encoders as Pyro model/guide pairs.

The derivation this package implements is ``../shared/seeds/000_73dd18991a948ff9.txt``
("SRVAE math"); ``docs/derivation.md`` maps each of its equations to the code.
"""

from .elbo import ELBO_NAMES, FreeBits_ELBO, IWAE_DReG, MixtureKLBound_ELBO, make_elbo, mixture_kl_upper_bound
from .models import SRVAE, VAE, X_GIVEN_Y, SRSample, SuperResolution, check_images, downscale
from .priors import MixtureOfGaussiansPrior, StandardNormalPrior
from .evaluation import bits_per_dim, evaluate_model, iw_log_likelihood
from .latents import kl_per_image, posterior_means
from .training import ConfigError, TrainConfig, TrainResult, UpdateGuard, build_model, train
from .superresolve import SuperResolvedImage, SuperResolveError, load_model, superresolve, superresolve_image
from .calibration import IntervalCalibration, SpreadCalibration, calibrate_checkpoint, fit_interval_scale, fit_spread_scale

evaluate = evaluate_model

__version__ = "0.1.0"

__all__ = [
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
