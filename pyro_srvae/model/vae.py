"""The VAE of section 2: p(z) p(x|z) with a Gaussian decoder and learned scale gamma, guide q(z|x) (eq. (1)-(4))."""

import pyro
import pyro.distributions as dist
import torch

from .image_model import ImageModel, check_choice
from .likelihoods import GAUSSIAN_PIXEL_MIN_SCALE
from .networks import GaussianEncoder, make_image_decoder
from .priors import PRIORS, make_prior


class VAE(ImageModel):
    """The VAE of section 2: p(z) p(x|z) with a Gaussian decoder of learned scale gamma.

    eq. (3):  p(x|z) = N(x; mu_theta(z), gamma_x^2 I)
    eq. (4):  -ELBO = ||x - x_hat||^2 / (2 gamma_x^2) + k log gamma_x + (k/2) log 2 pi
                      + KL(q(z|x) || p(z))

    With ``likelihood="gaussian-pixel"`` (or ``"gaussian-pixel-faithful"``) or ``"dlogistic-mix"``
    (extensions beyond the spec) p(x|z) is that likelihood of the decoder's output instead; eq. (4) keeps its
    form with the data term replaced by log p(x|z).

    Args:
        image_shape: (C, H, W) of x.
        prior: "gaussian" (N(0, I)) or "mog" (learned mixture, sec. 5) for p(z).
        mog_components: number of mixture components when ``prior="mog"``.
        z_dim: size of the latent vector z.
        hidden: width of the convolutional networks (growth rate for ``arch="densenet"``).
        gamma_init: initial gamma_x (``"gaussian"``); initial per-pixel standard deviation
            for the other likelihoods.
        name: the name under which ``pyro.module`` registers the networks.
        validate_inputs: check shapes, NaN/inf and range on every call.
        likelihood: "gaussian" (the spec, eq. 3), "gaussian-pixel", "gaussian-pixel-faithful"
            or "dlogistic-mix" (:mod:`pyro_srvae.model.likelihoods`).
        likelihood_components: mixture components K of ``"dlogistic-mix"``.
        arch: "small" (CPU-sized conv nets) or "densenet" (:mod:`pyro_srvae.model.networks`).
        pixel_scale_floor: the least per-pixel sigma of the ``gaussian-pixel`` likelihoods (default 1e-3).
    """

    def __init__(
        self,
        image_shape=(1, 28, 28),
        prior="gaussian",
        mog_components=10,
        z_dim=32,
        hidden=32,
        gamma_init=0.1,
        name="vae",
        validate_inputs=True,
        likelihood="gaussian",
        likelihood_components=10,
        arch="small",
        pixel_scale_floor=GAUSSIAN_PIXEL_MIN_SCALE,
    ):
        super().__init__(image_shape, name, validate_inputs, likelihood, likelihood_components, arch, gamma_init,
                         pixel_scale_floor)
        check_choice("prior", prior, PRIORS)
        channels, height, width = self.image_shape
        self.prior_name = prior
        self.z_dim = z_dim
        self.prior_z = make_prior(prior, z_dim, mog_components)
        self.encoder_z = GaussianEncoder(channels, (height, width), z_dim, hidden, arch=arch)
        out_channels = self.likelihood.out_channels(channels)
        self.decoder_x = make_image_decoder(arch, z_dim, self.image_shape, hidden, out_channels)
        self.log_gamma_x = self._learned_scale(gamma_init)
        self._finish_networks()

    #: p(x|z) is a density of x: the VAE's bits/dim are always a normalized density (or bound).
    x_density = "exact"

    @property
    def gamma_x(self):
        """The learned scale of eq. (3); None for likelihoods with predicted scales."""
        return self._scale(self.log_gamma_x)

    def x_distribution(self, z):
        """p(x|z): eq. (3) N(mu_theta(z), gamma_x^2 I), or the chosen likelihood; event (C, H, W)."""
        return self.likelihood.distribution(self.decoder_x(z), scale=self.gamma_x)

    def decode(self, z):
        """The mean of p(x|z), ``(*, C, H, W)`` (mu_theta(z) for the spec's Gaussian)."""
        return self.likelihood.mean(self.decoder_x(z))

    def model(self, x):
        """p(z) p(x|z), eq. (3); x is observed (as x' with the data scaling, and its Jacobian)."""
        x = self.to_network_units(self._prepare(x, self.image_shape, "x"))
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", self.prior_z())
            pyro.sample("x", self.x_distribution(z), obs=x)
            self._observe_data_scaling(x.shape[0], self.image_shape[1] * self.image_shape[2])

    def guide(self, x):
        """q(z|x) = N(mu_phi(x), diag sigma_phi(x)^2), section 2.2."""
        x = self.to_network_units(self._prepare(x, self.image_shape, "x"))
        with pyro.plate("data", x.shape[0], dim=-1):
            loc, scale = self.encoder_z(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def sample(self, n):
        """n draws z ~ p(z), returned as the decoder means mu_theta(z), shape (n, C, H, W), in x's units."""
        z = self.prior_z().sample((n,))
        return self.to_data_units(self.decode(z))

    @torch.no_grad()
    def reconstruct(self, x):
        """The decoder mean at the posterior mean of q(z|x), in x's units."""
        x = self.to_network_units(self._prepare(x, self.image_shape, "x"))
        loc, _ = self.encoder_z(x)
        return self.to_data_units(self.decode(loc))
