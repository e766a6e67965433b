"""The model/guide pairs of the spec, as Pyro programs.

* :class:`VAE` -- section 2: p(z) p(x|z), guide q(z|x); -ELBO of eq. (4).
* :class:`SRVAE` -- sections 3-4: p(u) p(y|u) p(z|y,u) p(x|y,z[,u]), y = downscale(x);
  guide q(u|y) q(z|x) ("simple", ELBO (17)) or q(u|y) q(z|x,y,u) ("full", eq. (20)-(21)).

Sample sites carry the spec's names (``u``, ``y``, ``z``, ``x``) and all live inside
``pyro.plate("data", B, dim=-1)``, so any Pyro ELBO, vectorized particles included,
and :func:`pyro_srvae.evaluation.iw_log_likelihood` apply unchanged.

Unlike the spec, which drops constants "par proportionnalité", Pyro's ``Normal``
keeps the ``-(k/2) log 2 pi`` term of eq. (3)/(13): the losses are true negative
ELBOs, so they convert to honest bits per dimension.

What the srVAE's bits/dim are depends on ``x_given_y`` (:data:`X_GIVEN_Y`, docs/derivation.md,
"A density of x"). The literal eq. (15) ``N(x; mu, gamma^2 I)`` is a density over all of x,
block means included, which y = f(x) already fixed: ``log p(y|u) + log p(x|y,z)`` scores y twice
and is not a density of x. The default ``"consistent"`` restricts p(x|y,.) to the x whose block
means are y (:class:`~pyro_srvae.likelihoods.ConsistentGaussian`), an exact normalized density of
x; where no closed form exists it takes the paper's route, y on the 8-bit grid scored by a pmf (a
lower bound on one). ``"spec"`` keeps the literal joint, for the derivation's checks.

Beyond the spec, both models take ``likelihood=`` (:data:`~pyro_srvae.likelihoods.LIKELIHOODS`:
the spec's ``"gaussian"``, the default, or ``"gaussian-pixel"`` / ``"gaussian-pixel-faithful"`` /
``"dlogistic-mix"``, used for every observed image site, x and y) and ``arch=`` (:data:`~pyro_srvae.networks.ARCHS`:
``"small"``, the default, or ``"densenet"``). The defaults build exactly the spec's model.

Both models can standardize the data per band for the networks (``set_data_scaling``; beyond the
spec, docs/own-images.md): the networks and likelihoods -- so ``decode*``, ``x_distribution`` and
``y_distribution`` -- work on x' = (x - offset) / scale, while the log joint stays a density of x
(the Jacobian is a ``pyro.factor`` site named ``"data_scaling"``) and ``sample``, ``reconstruct``
and ``super_resolve`` return x's units. The default statistics are the identity.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import pyro
import pyro.distributions as dist

from .likelihoods import GAUSSIAN_PIXEL_MIN_SCALE, LIKELIHOODS, NUM_BINS, bin_centres, make_likelihood
from .networks import (
    ARCHS, NETWORK_TYPES, GaussianEncoder, SpatialGaussianEncoder, float32_outputs, make_image_decoder, make_sr_decoder,
)
from .priors import PRIORS, make_prior

GUIDES = ("simple", "full")
DOWNSCALE_MODES = ("area", "bilinear")
DOWNSCALE_FACTORS = (2, 4)
#: How the srVAE scores x given y = f(x); see :class:`SRVAE`.
X_GIVEN_Y = ("consistent", "quantized", "spec")
#: The likelihoods with a per-pixel sigma, and where the srVAE's p(x|y,z,u) computes it: with its
#: locations, from y, z and u (``"decoder"``), or by a network of y alone (``"y"``; beyond the spec).
PIXEL_SCALE_LIKELIHOODS = ("gaussian-pixel", "gaussian-pixel-faithful")
PIXEL_SCALE_SOURCES = ("decoder", "y")
#: How the full guide's q(z|x,y,u) is parametrized: its own location and scale ("direct"), or relative
#: to the conditional prior p(z|y,u) ("residual", NVAE's residual normal, Vahdat & Kautz 2020, sec. 3.2).
Z_POSTERIORS = ("direct", "residual")
#: What a model's log-likelihood of x is: a normalized density of x, a lower bound on one,
#: or the spec's literal joint (not a density of x, not comparable with a VAE's).
X_DENSITIES = ("exact", "bound", "joint")


class SRSample(NamedTuple):
    """An unconditional draw of the srVAE: the high-resolution x and its low-resolution y."""

    x: torch.Tensor
    y: torch.Tensor


class SuperResolution(NamedTuple):
    """x given y: the predictive q(u|y) p(z|y,u) p(x|y,z[,u]), summarised per pixel.

    * ``samples`` ``(S, B, C, H, W)``: the draws, the likelihood's noise included (decoder
      means only with ``observation_noise=False``);
    * ``mean``: the predictive mean, estimated by the average of the draws' decoder means
      (the same expectation as the samples' average, without the likelihood's noise in the
      estimate);
    * ``std``: the total predictive standard deviation, the unbiased spread of ``samples``;
    * ``std_latent``: the unbiased spread of the decoder means over the latent draws (u, z);
    * ``std_noise``: the root mean of the likelihood's per-pixel variance over the draws;
      ``std^2 = std_latent^2 + std_noise^2`` up to sampling error (the law of total variance);
    * ``means`` ``(S, B, C, H, W)``: each draw's decoder mean.
    """

    mean: torch.Tensor
    std: torch.Tensor
    samples: torch.Tensor
    std_latent: torch.Tensor
    std_noise: torch.Tensor
    means: torch.Tensor


def _spread(draws):
    """Unbiased per-pixel standard deviation over the first dim (zeros for a single draw)."""
    return draws.std(dim=0, correction=1) if draws.shape[0] > 1 else torch.zeros_like(draws[0])


def downscale(x, factor=2, mode="area"):
    """The deterministic y = f(x) of sections 3.1-3.2.

    ``"area"``: the mean of each ``factor x factor`` block. ``"bilinear"``: antialiased
    bilinear resampling, as in the srVAE paper. Works on ``(*, C, H, W)``.
    """
    batch_shape = x.shape[:-3]
    flat = x.reshape((-1,) + x.shape[-3:])
    if mode == "area":
        y = F.avg_pool2d(flat, factor)
    elif mode == "bilinear":
        y = F.interpolate(flat, scale_factor=1 / factor, mode="bilinear", antialias=True, align_corners=False)
    else:
        raise ValueError(f"unknown downscale mode {mode!r}; expected one of {', '.join(DOWNSCALE_MODES)}")
    return y.reshape(batch_shape + y.shape[1:])


def quantized_downscale(x, factor=2, mode="area"):
    """y on the 8-bit grid, from the integer pixels of x: the srVAE paper's y (a PIL resize).

    ``k = floor(256 x)`` are the 8-bit pixels behind the dequantized ``x = (k + U) / 256``;
    ``y = (round(f(k)) + 1/2) / 256``, the centre of the bin of the downscaled integer image,
    so that y is a discrete variable that a pmf scores.
    """
    pixels = torch.clamp(torch.floor(x * NUM_BINS), 0, NUM_BINS - 1)
    levels = torch.clamp(torch.round(downscale(pixels, factor, mode)), 0, NUM_BINS - 1)
    return (levels + 0.5) / NUM_BINS


def check_images(images, expected_shape, name="x"):
    """Raise a ``ValueError`` naming what was expected and what came, for bad image batches.

    Checks the type, the shape ``(B, *expected_shape)``, NaN/inf and the range [0, 1]
    before any network sees the data, so the user reads one sentence instead of a
    stack trace from inside a convolution.
    """
    expected = "(B, " + ", ".join(str(d) for d in expected_shape) + ")"
    if not torch.is_tensor(images):
        raise ValueError(f"{name} must be a torch.Tensor of shape {expected}, got {type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(
            f"{name} must be a float tensor with values in [0, 1], got dtype {images.dtype}"
            " (convert 8-bit images with pyro_srvae.data.dequantize)"
        )
    if images.dim() != 4:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(images.shape)}")
    if images.shape[1] != expected_shape[0]:
        raise ValueError(
            f"{name} must have {expected_shape[0]} channel(s), shape {expected}, "
            f"got {images.shape[1]} channel(s), shape {tuple(images.shape)}"
        )
    if tuple(images.shape[2:]) != tuple(expected_shape[1:]):
        raise ValueError(f"{name} must have shape {expected}, got {tuple(images.shape)}")
    if images.numel() == 0:
        raise ValueError(f"{name} is an empty batch of shape {tuple(images.shape)}")
    low, high = (v.item() for v in torch.aminmax(images.detach()))
    if math.isnan(low) or math.isnan(high):
        raise ValueError(f"{name} contains NaN pixel values")
    if math.isinf(low) or math.isinf(high):
        raise ValueError(f"{name} contains infinite pixel values")
    if low < 0.0 or high > 1.0:
        raise ValueError(f"{name} must have values in [0, 1], got values in [{low:.4g}, {high:.4g}]")
    return images


def _check_image_shape(image_shape):
    if len(image_shape) != 3 or any(int(d) != d or d < 1 for d in image_shape):
        raise ValueError(f"image_shape must be (C, H, W) with positive integers, got {image_shape!r}")
    return tuple(int(d) for d in image_shape)


def _check_choice(what, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(map(str, choices))}")


class DataScalingError(ValueError):
    """Per-band standardization asked of a model that scores x on the 256-bin grid of [0, 1]."""


def _identity_scaling_if_missing(module, state_dict, prefix, *args):
    """Load-state-dict pre-hook: a state dict from before the data scaling existed holds neither
    buffer, and was trained on x itself: it loads as the identity."""
    names = (prefix + "data_offset", prefix + "data_scale")
    if not any(name in state_dict for name in names):
        state_dict[names[0]] = torch.zeros_like(module.data_offset)
        state_dict[names[1]] = torch.ones_like(module.data_scale)


def _check_loaded_scaling(module, incompatible_keys):
    """Load-state-dict post-hook: the loaded statistics decide :attr:`standardized` (and are checked)."""
    module.set_data_scaling(module.data_offset, module.data_scale)


class _ImageModel(nn.Module):
    """What the VAE and the srVAE share: input checks, device following, learned scales."""

    #: Bit depth of the integer pixels the model was trained on (8 or 16): the model itself
    #: works in [0, 1] units; this says which grid ``(k + U) / 2**bits`` its data came from,
    #: for bits/dim and for writing outputs in the data's own units. Training sets it from
    #: the data; a checkpoint stores it.
    bits = 8

    def __init__(self, image_shape, name, validate_inputs, likelihood="gaussian", likelihood_components=10,
                 arch="small", gamma_init=0.1, pixel_scale_floor=GAUSSIAN_PIXEL_MIN_SCALE):
        super().__init__()
        _check_choice("likelihood", likelihood, LIKELIHOODS)
        _check_choice("arch", arch, ARCHS)
        self.image_shape = _check_image_shape(image_shape)
        self.name = name
        self.validate_inputs = validate_inputs
        self.likelihood_name = likelihood
        self.arch = arch
        if pixel_scale_floor != GAUSSIAN_PIXEL_MIN_SCALE and likelihood not in PIXEL_SCALE_LIKELIHOODS:
            raise ValueError(f"pixel_scale_floor is the floor of a per-pixel sigma; the {likelihood} likelihood has none")
        self.likelihood = make_likelihood(likelihood, likelihood_components, gamma_init, pixel_scale_floor)
        # pyro.module on every call is what lets pyro.infer.SVI find the parameters. A loop
        # that steps its own torch optimizer (pyro_srvae.training) registers once and
        # turns this off: re-registering ~50 parameters costs ~1 ms per model/guide call.
        self.pyro_registration = True
        self._registration_checked = False
        self._init_data_scaling()

    def _learned_scale(self, initial):
        """A learned scalar gamma = exp(log gamma) for the spec's Gaussian; None otherwise.

        (exp: positive, and Adam steps act on its order of magnitude.) Other likelihoods
        predict their scales with the decoder, so the parameter would be unused.
        """
        if not self.likelihood.uses_global_scale:
            return None
        return nn.Parameter(torch.tensor(math.log(initial)))

    @staticmethod
    def _scale(log_gamma):
        return None if log_gamma is None else log_gamma.exp()

    # Per-band standardization (docs/own-images.md, "Bit depths, bands and standardization"):
    # the networks and likelihoods see x' = (x - data_offset) / data_scale; densities, bits/dim
    # and every image returned stay in x's own units.

    def _init_data_scaling(self):
        """Identity statistics as buffers: saved in the state dict, moved by ``.to(device)``.

        A state dict written before they existed loads as the identity (the pre-hook); every
        load re-derives :attr:`standardized` and re-checks that it is allowed (the post-hook).
        """
        channels = self.image_shape[0]
        self.register_buffer("data_offset", torch.zeros(channels, 1, 1))
        self.register_buffer("data_scale", torch.ones(channels, 1, 1))
        #: Whether the statistics differ from the identity. A Python flag, kept by
        #: :meth:`set_data_scaling` and ``load_state_dict``, so that no call reads the buffers back.
        self.standardized = False
        self.register_load_state_dict_pre_hook(_identity_scaling_if_missing)
        self.register_load_state_dict_post_hook(_check_loaded_scaling)

    @property
    def discretized(self):
        """True when the model scores data on the 256-bin grid of [0, 1] (``dlogistic-mix``): bins
        in x's units, which a per-band standardization would move, so it is refused."""
        return self.likelihood_name == "dlogistic-mix"

    def set_data_scaling(self, offset, scale):
        """Standardize the data per band for the networks: they see x' = (x - offset) / scale.

        ``offset`` and ``scale`` hold one value per band (scale > 0), in x's units on [0, 1];
        training sets the training set's per-band mean and standard deviation
        (:func:`pyro_srvae.data.band_statistics`). The density of x is that of x' times the
        Jacobian |dx'/dx| = prod_c scale_c^(-H W), which :meth:`model` adds to the log joint, and
        every image returned (:meth:`sample`, :meth:`reconstruct`, ``super_resolve``) is mapped
        back to x's units. ``offset=0, scale=1`` is the identity (the default). Raises
        :class:`DataScalingError` for a :attr:`discretized` model (the identity excepted).
        """
        offset, scale, identity = self._checked_scaling(offset, scale)
        with torch.no_grad():
            self.data_offset.copy_(offset)
            self.data_scale.copy_(scale)
        self.standardized = not identity
        return self

    def _checked_scaling(self, offset, scale):
        """(offset, scale) as ``(C, 1, 1)`` tensors and whether they are the identity; ValueError if unusable."""
        channels = self.image_shape[0]
        offset = torch.as_tensor(offset, dtype=torch.float64).detach().cpu().reshape(-1)
        scale = torch.as_tensor(scale, dtype=torch.float64).detach().cpu().reshape(-1)
        if offset.numel() != channels or scale.numel() != channels:
            raise ValueError(
                f"the data scaling needs one offset and one scale per band ({channels}), "
                f"got {offset.numel()} and {scale.numel()}"
            )
        if not (torch.isfinite(offset).all() and torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(
                f"the data scaling needs finite offsets and positive scales, got {offset.tolist()} and {scale.tolist()}"
            )
        identity = bool((offset == 0).all() and (scale == 1).all())
        if not identity and self.discretized:
            raise DataScalingError(
                "data standardized per band (--standardize) leave the 256-bin grid of [0, 1] that this model "
                "scores x on (--likelihood dlogistic-mix, or the srVAE's y on the 8-bit grid: --x-given-y "
                "quantized or --downscale-mode bilinear)"
            )
        return offset.view(-1, 1, 1), scale.view(-1, 1, 1), identity

    def to_network_units(self, images):
        """x' = (x - offset) / scale, what the networks and likelihoods see; ``(*, C, H, W)``."""
        if not self.standardized:
            return images
        return (images - self.data_offset) / self.data_scale

    def to_data_units(self, images):
        """x = offset + scale x', the inverse of :meth:`to_network_units`: images as returned."""
        if not self.standardized:
            return images
        return images * self.data_scale + self.data_offset

    def data_scaling_log_jacobian(self, pixels_per_band):
        """log |dx'/dx| of ``pixels_per_band`` pixels in every band: -pixels sum_c log scale_c (nats)."""
        return -pixels_per_band * self.data_scale.log().sum()

    def _observe_data_scaling(self, batch_size, pixels_per_band):
        """The change of variables x -> x' in the log joint, per image (inside the data plate).

        The likelihoods score x'; the density of x is ``p(x') |dx'/dx|``, so every estimator
        built from the trace (ELBOs, importance weights, log p(x|y) = log p(x, y) - log p(y))
        gets log p(x) = log p(x') - pixels sum_c log scale_c, exactly.
        """
        if self.standardized:
            log_jacobian = self.data_scaling_log_jacobian(pixels_per_band)
            pyro.factor("data_scaling", log_jacobian.expand(batch_size))

    @property
    def device(self):
        return next(self.parameters()).device

    def _prepare(self, images, expected_shape, name):
        """Check the input, move the networks to its device, register them with Pyro."""
        if self.validate_inputs:
            check_images(images, expected_shape, name)
        if images.device != self.device:
            self.to(images.device)
        if self.pyro_registration or not self._registration_checked:
            pyro.module(self.name, self)
        if not self._registration_checked:
            self._check_registration()
        return images

    def networks(self):
        """The model's neural networks: its encoders and decoders (none holds another)."""
        return [module for module in self.modules() if isinstance(module, NETWORK_TYPES)]

    def _finish_networks(self):
        # Called at the end of the subclasses' constructors, once every network exists.
        for network in self.networks():
            network.register_forward_hook(float32_outputs)

    def compile_networks(self, **options):
        """``torch.compile`` each network in place (``nn.Module.compile``), not Pyro's tracing.

        Pyro's model and guide stay eager Python -- tracing them would break the graph at
        every sample site -- while the convolutions, the bulk of a step, are compiled.
        Parameter names, state dicts and the Pyro registration are unchanged.
        """
        for network in self.networks():
            network.compile(**options)
        return self

    def _check_registration(self):
        # pyro.module keeps the first module registered under a name: a second model
        # built under the same name would train the first one's parameters silently.
        store = pyro.get_param_store()
        for param_name, param in self.named_parameters():
            full_name = pyro.params.param_with_module_name(self.name, param_name)
            if store[full_name] is not param:
                raise ValueError(
                    f"Pyro's param store already holds another module's parameters under the name "
                    f"{self.name!r}; call pyro.clear_param_store() or build this model with name=..."
                )
        self._registration_checked = True


class VAE(_ImageModel):
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
            or "dlogistic-mix" (:mod:`pyro_srvae.likelihoods`).
        likelihood_components: mixture components K of ``"dlogistic-mix"``.
        arch: "small" (CPU-sized conv nets) or "densenet" (:mod:`pyro_srvae.networks`).
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
        _check_choice("prior", prior, PRIORS)
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


class SRVAE(_ImageModel):
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
      block means are y (:class:`~pyro_srvae.likelihoods.ConsistentGaussian`); then
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
            "bicubic" (:data:`~pyro_srvae.networks.SR_BASES`; not the spec's, which leaves it open).
        sr_arch, sr_hidden: the architecture and width of the SR decoder alone (default: ``arch``
            and ``hidden``). The SR decoder is the network that draws the pixels a super-resolution
            is judged on, while the four encoders and p(y|u)'s decoder only summarise small images
            into u and z: ``sr_arch="densenet", sr_hidden=16`` beside small width-32 encoders is
            the photographs' configuration (``benchmarks/photo_sr.py``, docs/results.md).
        z_channels: 0 (default): z is a vector of ``z_dim``; C > 0: z is a map of C channels at the
            low resolution (``z_dim = C * H/f * W/f``), with convolutional p(z|y,u) and q(z|.)
            (:class:`~pyro_srvae.networks.SpatialGaussianEncoder`, plain convolutions for either
            ``arch``), as the srVAE paper's latents.
        z_injection: where the SR decoder reads z (and u): its first layer (``"input"``) or every
            layer (``"every"``, :data:`~pyro_srvae.networks.Z_INJECTIONS`), a lever against the
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
            eq. (21)'s KL keeps a closed form (:func:`~pyro_srvae.priors.kl_diagonal_lowrank`).
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
        _check_choice("z_posterior", z_posterior, Z_POSTERIORS)
        if z_posterior == "residual" and guide != "full":
            raise ValueError("z_posterior='residual' is relative to p(z|y,u): it needs the full guide q(z|x,y,u)")
        self.z_posterior = z_posterior
        if not z_scale_floor >= 0:
            raise ValueError(f"z_scale_floor must be >= 0, got {z_scale_floor!r}")
        self.z_scale_floor = float(z_scale_floor)
        _check_choice("pixel_scale_from", pixel_scale_from, PIXEL_SCALE_SOURCES)
        if pixel_scale_from != "decoder" and likelihood not in PIXEL_SCALE_LIKELIHOODS:
            raise ValueError(f"pixel_scale_from={pixel_scale_from!r} needs a per-pixel sigma; the {likelihood} likelihood has none")
        _check_choice("guide", guide, GUIDES)
        _check_choice("x_given_y", x_given_y, X_GIVEN_Y)
        _check_choice("prior", prior, PRIORS)
        _check_choice("downscale factor", factor, DOWNSCALE_FACTORS)
        _check_choice("downscale mode", downscale_mode, DOWNSCALE_MODES)
        channels, height, width = self.image_shape
        if height % factor or width % factor:
            raise ValueError(
                f"image height and width must be divisible by the downscale factor {factor}, "
                f"got image_shape {self.image_shape}"
            )
        self.guide_name = guide
        self.prior_name = prior
        self.x_given_y = x_given_y
        self.factor = factor
        self.downscale_mode = downscale_mode
        self.lr_shape = (channels, height // factor, width // factor)
        if int(z_channels) != z_channels or z_channels < 0:
            raise ValueError(f"z_channels must be an integer >= 0, got {z_channels!r}")
        self.z_channels = int(z_channels)
        if int(z_prior_rank) != z_prior_rank or z_prior_rank < 0:
            raise ValueError(f"z_prior_rank must be an integer >= 0, got {z_prior_rank!r}")
        if z_prior_rank and not (self.z_channels and z_posterior == "direct"):
            raise ValueError("z_prior_rank > 0 is a covariance over a z map (z_channels > 0) with z_posterior='direct'")
        self.z_prior_rank = int(z_prior_rank)
        if self.z_channels:  # z a map at the low resolution: its l coefficients, laid out in space
            z_dim = self.z_channels * self.lr_shape[1] * self.lr_shape[2]
        self.u_dim, self.z_dim = u_dim, z_dim
        #: Per-channel factors on the likelihood's noise in :meth:`super_resolve` (None: the
        #: model's own spread); set from a calibrated checkpoint (pyro_srvae.calibration).
        self.spread_scale = None
        lr_hw, hr_hw = self.lr_shape[1:], (height, width)
        full = guide == "full"

        params = self.likelihood.params_per_channel
        self.prior_u = make_prior(prior, u_dim, mog_components)
        self.decoder_y = make_image_decoder(arch, u_dim, self.lr_shape, hidden, self.likelihood.out_channels(channels))
        self.prior_z = self._z_network(channels, lr_hw, hidden, u_dim, arch, factor_rank=self.z_prior_rank)
        self.sr_arch = arch if sr_arch is None else sr_arch
        self.sr_hidden = hidden if sr_hidden is None else sr_hidden
        self.pixel_scale_from = pixel_scale_from
        # pixel_scale_from="y": the sigmas of p(x|y,z,u) come from a network that sees y alone, so that
        # the noise cannot follow what z proposes (a lever against its collapse); the SR decoder
        # then draws the locations only.
        self.decoder_x = make_sr_decoder(
            self.sr_arch, self.image_shape, factor, z_dim, u_dim if full else 0, self.sr_hidden,
            params_per_channel=1 if pixel_scale_from == "y" else params, base=sr_base, z_injection=z_injection,
            z_channels=self.z_channels,
        )
        self.scale_x = None
        if pixel_scale_from == "y":
            self.scale_x = make_sr_decoder(self.sr_arch, self.image_shape, factor, 0, 0, self.sr_hidden, base=sr_base)
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
        (:class:`~pyro_srvae.likelihoods.ConsistentGaussian`)."""
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
        :func:`pyro_srvae.calibration.fit_spread_scale`), the likelihood's noise around each
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
            if self.spread_scale is not None:  # the likelihood's scale times t: pyro_srvae.calibration
                t = torch.as_tensor(self.spread_scale, dtype=means.dtype, device=means.device).view(-1, 1, 1)
                samples = means + t * (samples - means)
                noise_variance = noise_variance * t.square()
        if self.standardized:  # back to x's units: draws and means affinely, variances times scale^2
            means, samples = self.to_data_units(means), self.to_data_units(samples)
            noise_variance = noise_variance * self.data_scale.square()
        return SuperResolution(
            mean=means.mean(dim=0),
            std=_spread(samples),
            samples=samples,
            std_latent=_spread(means),
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
