"""The srVAE of sections 3-4: u -> y -> z -> x, with the simple guide q(u|y) q(z|x) (ELBO (17)) or the
full guide q(u|y) q(z|x,y,u) and decoder p(x|y,z,u) (eq. (20)-(21)).
"""

import pyro
import pyro.distributions as dist
import torch

from .distributions import bin_centres
from .image_model import (
    DOWNSCALE_FACTORS,
    DOWNSCALE_MODES,
    GUIDES,
    PIXEL_SCALE_LIKELIHOODS,
    PIXEL_SCALE_SOURCES,
    X_GIVEN_Y,
    Z_POSTERIORS,
    ImageModel,
    SRSample,
    SuperResolution,
    check_choice,
    downscale,
    quantized_downscale,
    sample_spread,
)
from .likelihoods import GAUSSIAN_PIXEL_MIN_SCALE
from .networks import GaussianEncoder, SpatialGaussianEncoder, make_image_decoder, make_sr_decoder
from .priors import PRIORS, make_prior


class SRVAE(ImageModel):
    """The two-stage srVAE of sections 3 and 4: u -> y -> z -> x, with y = downscale(x).

    Model (eq. 7 with ``guide="full"``, eq. 8 with ``guide="simple"``):
        u ~ p(u)                                 N(0, I) or a mixture, eq. (22)
        y ~ p(y|u)     = N(mu(u), gamma_y^2 I)    eq. (12), observed: y = downscale(x)
        z ~ p(z|y,u)   = N(mu(y,u), sigma(y,u)^2) the learned conditional prior, eq. (16)
        x ~ p(x|y,z)   = N(mu(y,z), gamma_x^2 I)  eq. (15)            (simple)
            p(x|y,z,u) = N(mu(y,z,u), gamma_x^2 I) section 4.3.1       (full)
    Guide:
        u ~ q(u|y);  z ~ q(z|x) (eq. 10, ELBO 17)  or  z ~ q(z|x,y,u) (eq. 19, ELBO 20-21)

    With ``likelihood="gaussian-pixel"`` (or ``"gaussian-pixel-faithful"``, the same density
    trained by the faithful gradient) or ``"dlogistic-mix"`` (extensions beyond the spec)
    both p(y|u) and p(x|y,z[,u]) use that likelihood; the x decoder's location parameters
    stay a residual over the upsampling of y (``sr_base``).

    ``x_given_y`` (departs from the spec by default, see the module docstring):

    * ``"consistent"`` (default): for the Gaussian likelihoods with area downscaling,
      p(x|y,.) = N(x; mu, S) / N(A x; A mu, A S A^T), the Gaussian restricted to the x whose
      block means are y (:class:`~pyro_srvae.model.distributions.ConsistentGaussian`); then
      log p(y|u) + log p(x|y,.) is a normalized density of x (``x_density == "exact"``), and
      the decoder means and draws have block means exactly y. Where that closed form does not
      apply (bilinear downscaling, ``dlogistic-mix``) it falls back to ``"quantized"``.
    * ``"quantized"``: the srVAE paper's route: y = the downscaled integer image on the 8-bit
      grid (:func:`quantized_downscale`), scored by a pmf (the discretized likelihood), and that
      y is what every network reads; log P(y) + log p(x|y,.) <= log p(x) of a normalized model
      (``x_density == "bound"``).
    * ``"spec"``: eq. (12) and (15) as written: y and x both scored by densities; the joint
      log p(x, y) at y = f(x) is not a density of x (``x_density == "joint"``).

    Args:
        image_shape: (C, H, W) of x; H and W must be divisible by ``factor``.
        guide: "simple" (section 3) or "full" (section 4).
        prior: "gaussian" or "mog" for p(u) (section 5).
        mog_components: number of mixture components when ``prior="mog"``.
        factor: downscaling factor, 2 or 4.
        downscale_mode: "area" (block average, default) or "bilinear" (antialiased).
        u_dim, z_dim: sizes of the latent vectors.
        hidden: width of the convolutional networks (growth rate for ``arch="densenet"``).
        gamma_init: initial gamma_x and gamma_y (``"gaussian"``); initial per-pixel standard
            deviation for the other likelihoods.
        name, validate_inputs: as for :class:`VAE`.
        likelihood: "gaussian" (the spec, eq. 12 and 15), "gaussian-pixel", "gaussian-pixel-faithful"
            or "dlogistic-mix".
        likelihood_components: mixture components K of ``"dlogistic-mix"``.
        arch: "small" (CPU-sized conv nets) or "densenet".
        x_given_y: "consistent" (default), "quantized" or "spec" (:data:`X_GIVEN_Y`).
        sr_base: the upsampling of y under the SR decoder's residual, "bilinear" (default) or
            "bicubic" (:data:`~pyro_srvae.model.networks.SR_BASES`; not the spec's, which leaves it open).
        sr_arch, sr_hidden: the architecture and width of the SR decoder alone (default: ``arch``
            and ``hidden``). The SR decoder is the network that draws the pixels a super-resolution
            is judged on, while the four encoders and p(y|u)'s decoder only summarise small images
            into u and z: ``sr_arch="densenet", sr_hidden=16`` beside small width-32 encoders is
            the photographs' configuration (``benchmarks/photo_sr.py``, docs/results.md).
        z_channels: 0 (default): z is a vector of ``z_dim``; C > 0: z is a map of C channels at the
            low resolution (``z_dim = C * H/f * W/f``), with convolutional p(z|y,u) and q(z|.)
            (:class:`~pyro_srvae.model.networks.SpatialGaussianEncoder`, plain convolutions for either
            ``arch``), as the srVAE paper's latents.
        z_injection: where the SR decoder reads z (and u): its first layer (``"input"``) or every
            layer (``"every"``, :data:`~pyro_srvae.model.networks.Z_INJECTIONS`), a lever against the
            posterior collapse of z (docs/results.md, "What z carries").
        pixel_scale_floor: the least per-pixel sigma of the ``gaussian-pixel`` likelihoods, in p(y|u)
            and p(x|y,z,u) alike (default 1e-3, about one 8-bit bin of dequantization noise).
        pixel_scale_from: where p(x|y,z,u)'s per-pixel sigmas come from: the SR decoder, with the
            locations (``"decoder"``, the default), or a network of y alone (``"y"``).
        z_posterior: the full guide's q(z|x,y,u) with its own location and scale (``"direct"``, the
            default), or ``"residual"``: N(mu_p + sigma_p dmu, sigma_p dsigma) around p(z|y,u) =
            N(mu_p, sigma_p) (NVAE's residual normal), whose KL, (dmu^2 + dsigma^2 - 1)/2 - log dsigma
            per dimension, does not blow up when the prior's scale shrinks (docs/training-faults.md).
        z_scale_floor: added to the scale of p(z|y,u) (0: none beyond the networks' 1e-4). With a
            learned p(z|y,u), z -> c z (the SR decoder taking up 1/c) leaves the ELBO as it is, and
            training drifts along it to c -> 0, where the KL's gradients explode; a floor ends the drift.
        z_prior_rank: 0 (default): p(z|y,u) has a diagonal covariance, as eq. (16). R > 0 (a z map
            only): N(mu, W W^T + diag(sigma^2)) with W of R columns from the same network, so that
            a draw of the map varies together over the image in R directions (a low-rank
            multivariate normal, torch's ``LowRankMultivariateNormal``); q(z|.) stays diagonal and
            eq. (21)'s KL keeps a closed form (:func:`~pyro_srvae.model.priors.kl_diagonal_lowrank`).
    """

    def __init__(
        self,
        image_shape=(1, 28, 28),
        guide="simple",
        prior="gaussian",
        mog_components=10,
        factor=2,
        downscale_mode="area",
        u_dim=16,
        z_dim=32,
        hidden=32,
        gamma_init=0.1,
        name="srvae",
        validate_inputs=True,
        likelihood="gaussian",
        likelihood_components=10,
        arch="small",
        x_given_y="consistent",
        sr_base="bilinear",
        sr_arch=None,
        sr_hidden=None,
        z_injection="input",
        z_channels=0,
        pixel_scale_floor=GAUSSIAN_PIXEL_MIN_SCALE,
        pixel_scale_from="decoder",
        z_posterior="direct",
        z_scale_floor=0.0,
        z_prior_rank=0,
    ):
        super().__init__(image_shape, name, validate_inputs, likelihood, likelihood_components, arch, gamma_init,
                         pixel_scale_floor)
        _check_options(self.image_shape, guide, prior, factor, downscale_mode, likelihood, x_given_y, z_channels,
                       pixel_scale_from, z_posterior, z_scale_floor, z_prior_rank)  # fmt: skip
        channels, height, width = self.image_shape
        self.z_posterior = z_posterior
        self.z_scale_floor = float(z_scale_floor)
        self.guide_name = guide
        self.prior_name = prior
        self.x_given_y = x_given_y
        self.factor = factor
        self.downscale_mode = downscale_mode
        self.lr_shape = (channels, height // factor, width // factor)
        self.z_channels = int(z_channels)
        self.z_prior_rank = int(z_prior_rank)
        if self.z_channels:  # z a map at the low resolution: its l coefficients, laid out in space
            z_dim = self.z_channels * self.lr_shape[1] * self.lr_shape[2]
        self.u_dim, self.z_dim = u_dim, z_dim
        #: Per-channel factors on the likelihood's noise in :meth:`super_resolve` (None: the
        #: model's own spread); set from a calibrated checkpoint (pyro_srvae.sr.calibration).
        self.spread_scale = None
        self.sr_arch = arch if sr_arch is None else sr_arch
        self.sr_hidden = hidden if sr_hidden is None else sr_hidden
        self.pixel_scale_from = pixel_scale_from
        self._build_networks(prior, mog_components, arch, hidden, sr_base, z_injection, gamma_init)

    def _build_networks(self, prior, mog_components, arch, hidden, sr_base, z_injection, gamma_init):
        """The priors, decoders and encoders of eq. (12)-(21), in a fixed order (their initial weights)."""
        channels, height, width = self.image_shape
        lr_hw, hr_hw = self.lr_shape[1:], (height, width)
        full = self.guide_name == "full"
        u_dim, z_dim = self.u_dim, self.z_dim
        params = self.likelihood.params_per_channel
        self.prior_u = make_prior(prior, u_dim, mog_components)
        self.decoder_y = make_image_decoder(arch, u_dim, self.lr_shape, hidden, self.likelihood.out_channels(channels))
        self.prior_z = self._z_network(channels, lr_hw, hidden, u_dim, arch, factor_rank=self.z_prior_rank)
        # pixel_scale_from="y": the sigmas of p(x|y,z,u) come from a network that sees y alone, so that
        # the noise cannot follow what z proposes (a lever against its collapse); the SR decoder
        # then draws the locations only.
        from_y = self.pixel_scale_from == "y"
        self.decoder_x = make_sr_decoder(
            self.sr_arch, self.image_shape, self.factor, z_dim, u_dim if full else 0, self.sr_hidden,
            params_per_channel=1 if from_y else params, base=sr_base, z_injection=z_injection,
            z_channels=self.z_channels,
        )
        self.scale_x = None
        if from_y:
            self.scale_x = make_sr_decoder(self.sr_arch, self.image_shape, self.factor, 0, 0, self.sr_hidden, base=sr_base)
        self.encoder_u = GaussianEncoder(channels, lr_hw, u_dim, hidden, arch=arch)
        # The full guide sees x beside the upsampled y, and u: q(z|x,y,u), eq. (19).
        self.encoder_z = self._z_network(2 * channels if full else channels, hr_hw, hidden, u_dim if full else 0, arch)
        self.log_gamma_x = self._learned_scale(gamma_init)
        self.log_gamma_y = self._learned_scale(gamma_init)
        self._finish_networks()

    def _z_network(self, in_channels, image_hw, hidden, condition_dim, arch, factor_rank=0):
        """A Gaussian over z from an image (and u): a vector, or a map with ``z_channels``."""
        if self.z_channels:
            return SpatialGaussianEncoder(in_channels, image_hw, self.z_channels, self.lr_shape[1:], hidden, condition_dim,
                                          factor_rank=factor_rank)
        return GaussianEncoder(in_channels, image_hw, self.z_dim, hidden, condition_dim=condition_dim, arch=arch)

    @property
    def full(self):
        return self.guide_name == "full"

    @property
    def exact_consistent(self):
        """True when p(x|y,.) is the closed-form Gaussian given the block means (x_density "exact")."""
        closed_form = self.likelihood.has_consistent_form and self.downscale_mode == "area"
        return self.x_given_y == "consistent" and closed_form

    @property
    def quantized_y(self):
        """True when y lives on the 8-bit grid and p(y|u) is a pmf (x_density "bound")."""
        return self.x_given_y != "spec" and not self.exact_consistent

    @property
    def x_density(self):
        """What log p(x, y = f(x)) is as a function of x: "exact", "bound" or "joint" (:data:`X_DENSITIES`)."""
        if self.x_given_y == "spec":
            return "joint"
        return "exact" if self.exact_consistent else "bound"

    @property
    def discretized(self):
        """True with ``dlogistic-mix`` or a y on the 8-bit grid (:attr:`quantized_y`): either grid lives
        in x's units on [0, 1], so a per-band standardization is refused."""
        return super().discretized or self.quantized_y

    @property
    def _scaled_pixels_per_band(self):
        """Pixels per band of what :meth:`model` scores as densities in x's units: x (the density
        of y times that of x given y is one of x), plus y in the spec's joint, which scores y twice."""
        pixels = self.image_shape[1] * self.image_shape[2]
        if self.x_density == "joint":
            pixels += self.lr_shape[1] * self.lr_shape[2]
        return pixels

    @property
    def gamma_x(self):
        """The learned scale of eq. (15); None for likelihoods with predicted scales."""
        return self._scale(self.log_gamma_x)

    @property
    def gamma_y(self):
        """The learned scale of eq. (12); None for likelihoods with predicted scales."""
        return self._scale(self.log_gamma_y)

    def downscale(self, x):
        """y = f(x), deterministic (section 3.1): the low-resolution copy of x (on the 8-bit grid
        when :attr:`quantized_y`)."""
        if self.quantized_y:
            return quantized_downscale(x, self.factor, self.downscale_mode)
        return downscale(x, self.factor, self.downscale_mode)

    def y_distribution(self, u):
        """p(y|u): eq. (12) N(mu_theta(u), gamma_y^2 I), or the chosen likelihood; event (C, H/f, W/f).

        A pmf over the 8-bit bins when :attr:`quantized_y` (the discretized likelihood)."""
        if self.quantized_y:
            return self.likelihood.pmf_distribution(self.decoder_y(u), scale=self.gamma_y)
        return self.likelihood.distribution(self.decoder_y(u), scale=self.gamma_y)

    def decode_y(self, u):
        """The mean of p(y|u), ``(*, C, H/f, W/f)``."""
        return self.likelihood.mean(self.decoder_y(u))

    def _x_parameters(self, y, z, u):
        """The SR decoder's raw output and the offset ``upsample(y)`` its locations are relative to."""
        raw = self.decoder_x.residual(y, z, u if self.full else None)
        if self.scale_x is not None:  # the raw sigmas from y alone, beside the locations
            raw_scale = self.scale_x.residual(y, None)
            raw_scale = raw_scale.expand(raw.shape[:-3] + raw_scale.shape[-3:])
            raw = torch.cat([raw, raw_scale], dim=-3)
        return raw, self.decoder_x.upsample(y)

    def x_distribution(self, y, z, u):
        """p(x|y,z) (eq. 15) or p(x|y,z,u) (sec. 4.3.1): N(upsample(y) + residual, gamma_x^2 I),
        or the chosen likelihood with locations upsample(y) + raw; event (C, H, W).

        With :attr:`exact_consistent`, that Gaussian given its block means A x = y
        (:class:`~pyro_srvae.model.distributions.ConsistentGaussian`)."""
        raw, offset = self._x_parameters(y, z, u)
        if self.exact_consistent:
            return self.likelihood.consistent_distribution(raw, offset, self.gamma_x, y, self.factor)
        return self.likelihood.distribution(raw, offset, scale=self.gamma_x)

    def decode_x(self, y, z, u):
        """Mean of p(x|y,z) (eq. 15) or p(x|y,z,u) (full guide, section 4.3.1).

        With :attr:`exact_consistent`, the conditional mean: its block means are exactly y."""
        if self.exact_consistent:
            return self.x_distribution(y, z, u).mean
        return self.likelihood.mean(*self._x_parameters(y, z, u))

    def z_prior_parameters(self, y, u):
        """loc and scale of p(z|y,u) (eqs. 7, 16), the scale above :attr:`z_scale_floor`; with
        :attr:`z_prior_rank`, also the factor W of its covariance W W^T + diag(scale^2)."""
        loc, scale, *factor = self.prior_z(y, u)
        return (loc, scale + self.z_scale_floor, *factor)  # + 0.0 is exact: no floor, the same bits

    def z_prior(self, y, u):
        """p(z|y,u), eq. (16): N(mu, diag(sigma^2)), or N(mu, W W^T + diag(sigma^2)) with :attr:`z_prior_rank`."""
        loc, scale, *factor = self.z_prior_parameters(y, u)
        if factor:
            return dist.LowRankMultivariateNormal(loc, factor[0], scale.square())
        return dist.Normal(loc, scale).to_event(1)

    def encode_z(self, x, y, u):
        """loc and scale of q(z|x) (eq. 10) or q(z|x,y,u) (eq. 19)."""
        if not self.full:
            return self.encoder_z(x)
        loc, scale = self.encoder_z(torch.cat([x, self.decoder_x.upsample(y)], dim=-3), u)
        if self.z_posterior == "direct":
            return loc, scale
        prior_loc, prior_scale = self.z_prior_parameters(y, u)
        # eq. (19)'s q(z|x,y,u) as a residual normal around p(z|y,u): eq. (21)'s KL depends on (loc, scale) alone
        return prior_loc + prior_scale * loc, prior_scale * scale

    def model(self, x):
        """p(u) p(y|u) p(z|y,u) p(x|y,z[,u]): eq. (8) (simple) or eq. (7) (full).

        With the data scaling, x' and y' = f(x') = (f(x) - offset) / scale (the block mean is
        affine) are observed, and the Jacobian makes the log joint one of x."""
        x = self.to_network_units(self._prepare(x, self.image_shape, "x"))
        y = self.downscale(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            u = pyro.sample("u", self.prior_u())
            pyro.sample("y", self.y_distribution(u), obs=y)
            z = pyro.sample("z", self.z_prior(y, u))  # eq. (16)
            pyro.sample("x", self.x_distribution(y, z, u), obs=x)
            self._observe_data_scaling(x.shape[0], self._scaled_pixels_per_band)

    def guide(self, x):
        """q(u|y) q(z|x) (eq. 10) or q(u|y) q(z|x,y,u) (eq. 19); q(y|x) is the point mass y = f(x)."""
        x = self.to_network_units(self._prepare(x, self.image_shape, "x"))
        y = self.downscale(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            u_loc, u_scale = self.encoder_u(y)
            u = pyro.sample("u", dist.Normal(u_loc, u_scale).to_event(1))
            z_loc, z_scale = self.encode_z(x, y, u)
            pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))

    def lr_model(self, x):
        """p(u) p(y|u) alone, y = f(x): the low-resolution half of :meth:`model`, for log p(y).

        With :meth:`lr_guide` its importance weights estimate log p(y); log p(x, y) - log p(y)
        is then the conditional likelihood of super-resolution, log p(x | y). With the data
        scaling, y's Jacobian (H/f W/f pixels per band) makes it a density of y in x's units.
        """
        x = self.to_network_units(self._prepare(x, self.image_shape, "x"))
        y = self.downscale(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            u = pyro.sample("u", self.prior_u())
            pyro.sample("y", self.y_distribution(u), obs=y)
            self._observe_data_scaling(x.shape[0], self.lr_shape[1] * self.lr_shape[2])

    def lr_guide(self, x):
        """q(u|y), the guide of :meth:`lr_model`."""
        x = self.to_network_units(self._prepare(x, self.image_shape, "x"))
        y = self.downscale(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            u_loc, u_scale = self.encoder_u(y)
            pyro.sample("u", dist.Normal(u_loc, u_scale).to_event(1))

    @torch.no_grad()
    def sample(self, n):
        """Ancestral sampling u ~ p(u), y = mu(u), z ~ p(z|y,u), x = mu(y,z[,u]).

        Returns ``SRSample(x, y)`` of decoder means (means of the likelihood),
        (n, C, H, W) and (n, C, H/f, W/f). With :attr:`quantized_y`, y is snapped to the
        centres of its 8-bit bins (the values the networks were trained on); with
        :attr:`exact_consistent`, x's block means are y. Both in x's units.
        """
        u = self.prior_u().sample((n,))
        y = self.decode_y(u)
        if self.quantized_y:
            y = bin_centres(y)
        z = self.z_prior(y, u).sample()
        return SRSample(x=self.to_data_units(self.decode_x(y, z, u)), y=self.to_data_units(y))

    @torch.no_grad()
    def super_resolve(self, y, num_samples=16, observation_noise=True):
        """The predictive of x given a low-resolution y: u ~ q(u|y), z ~ p(z|y,u), x ~ p(x|y,z[,u]).

        x itself is never seen, so z comes from the conditional prior, not from q(z|.). Each
        of the ``num_samples`` draws is a draw of the likelihood (under the default
        ``x_given_y="consistent"`` on the subspace of x whose block means are y), so
        ``std`` is the whole predictive uncertainty, split into ``std_latent`` (what the
        latents leave open about the missing detail) and ``std_noise`` (the likelihood's own
        variance): see :class:`SuperResolution`. ``observation_noise=False`` returns the
        decoder means as the draws (``std == std_latent``, ``std_noise == 0``): the
        spread of the mean images only, which understates the predictive's.

        With :attr:`spread_scale` set (a checkpoint calibrated by
        :func:`pyro_srvae.sr.calibrate.fit_spread_scale`), the likelihood's noise around each
        decoder mean is multiplied by that factor per channel: the same model with its
        likelihood scale times t, fitted on held-out images (``None``: the model's own).

        ``y`` and every output are in x's units (the data scaling is undone on the way out).
        """
        y = self.to_network_units(self._prepare(y, self.lr_shape, "y"))
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        u_loc, u_scale = self.encoder_u(y)
        u = dist.Normal(u_loc, u_scale).sample((int(num_samples),))
        z = self.z_prior(y, u).sample()
        likelihood = self.x_distribution(y, z, u)
        means = likelihood.mean  # = decode_x(y, z, u), without a second decoder pass
        if not observation_noise:
            samples, noise_variance = means, torch.zeros_like(means)
        else:
            samples = likelihood.sample()
            try:
                noise_variance = likelihood.variance.expand_as(means)
            except NotImplementedError:  # dlogistic-mix: the draws' own squared residuals
                noise_variance = (samples - means).square()
            if self.spread_scale is not None:  # the likelihood's scale times t: pyro_srvae.sr.calibration
                t = torch.as_tensor(self.spread_scale, dtype=means.dtype, device=means.device).view(-1, 1, 1)
                samples = means + t * (samples - means)
                noise_variance = noise_variance * t.square()
        if self.standardized:  # back to x's units: draws and means affinely, variances times scale^2
            means, samples = self.to_data_units(means), self.to_data_units(samples)
            noise_variance = noise_variance * self.data_scale.square()
        return SuperResolution(
            mean=means.mean(dim=0),
            std=sample_spread(samples),
            samples=samples,
            std_latent=sample_spread(means),
            std_noise=noise_variance.mean(dim=0).sqrt(),
            means=means,
        )

    @torch.no_grad()
    def reconstruct(self, x):
        """The decoder mean at the posterior means of q(u|y) and q(z|.), in x's units."""
        x = self.to_network_units(self._prepare(x, self.image_shape, "x"))
        y = self.downscale(x)
        u, _ = self.encoder_u(y)
        z, _ = self.encode_z(x, y, u)
        return self.to_data_units(self.decode_x(y, z, u))


def _check_options(image_shape, guide, prior, factor, downscale_mode, likelihood, x_given_y, z_channels,
                   pixel_scale_from, z_posterior, z_scale_floor, z_prior_rank):  # fmt: skip
    """One clear ValueError for the first option an SRVAE cannot be built with."""
    check_choice("z_posterior", z_posterior, Z_POSTERIORS)
    if z_posterior == "residual" and guide != "full":
        raise ValueError("z_posterior='residual' is relative to p(z|y,u): it needs the full guide q(z|x,y,u)")
    if not z_scale_floor >= 0:
        raise ValueError(f"z_scale_floor must be >= 0, got {z_scale_floor!r}")
    check_choice("pixel_scale_from", pixel_scale_from, PIXEL_SCALE_SOURCES)
    if pixel_scale_from != "decoder" and likelihood not in PIXEL_SCALE_LIKELIHOODS:
        raise ValueError(f"pixel_scale_from={pixel_scale_from!r} needs a per-pixel sigma; the {likelihood} likelihood has none")
    check_choice("guide", guide, GUIDES)
    check_choice("x_given_y", x_given_y, X_GIVEN_Y)
    check_choice("prior", prior, PRIORS)
    check_choice("downscale factor", factor, DOWNSCALE_FACTORS)
    check_choice("downscale mode", downscale_mode, DOWNSCALE_MODES)
    _, height, width = image_shape
    if height % factor or width % factor:
        raise ValueError(
            f"image height and width must be divisible by the downscale factor {factor}, "
            f"got image_shape {image_shape}"
        )
    if int(z_channels) != z_channels or z_channels < 0:
        raise ValueError(f"z_channels must be an integer >= 0, got {z_channels!r}")
    if int(z_prior_rank) != z_prior_rank or z_prior_rank < 0:
        raise ValueError(f"z_prior_rank must be an integer >= 0, got {z_prior_rank!r}")
    if z_prior_rank and not (int(z_channels) and z_posterior == "direct"):
        raise ValueError("z_prior_rank > 0 is a covariance over a z map (z_channels > 0) with z_posterior='direct'")
