"""pyro-srvae: Super-Resolution Variational Auto-Encoders as Pyro model/guide pairs.

The derivation this package implements is ``../shared/seeds/000_73dd18991a948ff9.txt``
("SRVAE math"); ``docs/derivation.md`` maps each of its equations to the code.
"""

from .elbo import ELBO_NAMES, MixtureKLBound_ELBO, make_elbo, mixture_kl_upper_bound
from .models import SRVAE, VAE, SRSample, SuperResolution, check_images, downscale
from .priors import MixtureOfGaussiansPrior, StandardNormalPrior

__version__ = "0.1.0"

__all__ = [
    "ELBO_NAMES",
    "MixtureKLBound_ELBO",
    "MixtureOfGaussiansPrior",
    "SRSample",
    "SRVAE",
    "StandardNormalPrior",
    "SuperResolution",
    "VAE",
    "check_images",
    "downscale",
    "make_elbo",
    "mixture_kl_upper_bound",
]
