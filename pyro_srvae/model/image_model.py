"""The model/guide pairs of the spec, as Pyro programs.

* :class:`VAE` -- section 2: p(z) p(x|z), guide q(z|x); -ELBO of eq. (4).
* :class:`SRVAE` -- sections 3-4: p(u) p(y|u) p(z|y,u) p(x|y,z[,u]), y = downscale(x);
  guide q(u|y) q(z|x) ("simple", ELBO (17)) or q(u|y) q(z|x,y,u) ("full", eq. (20)-(21)).

Sample sites carry the spec's names (``u``, ``y``, ``z``, ``x``) and all live inside
``pyro.plate("data", B, dim=-1)``, so any Pyro ELBO, vectorized particles included,
and :func:`pyro_srvae.metrics.likelihood.iw_log_likelihood` apply unchanged.

Unlike the spec, which drops constants "par proportionnalité", Pyro's ``Normal``
keeps the ``-(k/2) log 2 pi`` term of eq. (3)/(13): the losses are true negative
ELBOs, so they convert to honest bits per dimension.

What the srVAE's bits/dim are depends on ``x_given_y`` (:data:`X_GIVEN_Y`, docs/derivation.md,
"A density of x"). The literal eq. (15) ``N(x; mu, gamma^2 I)`` is a density over all of x,
block means included, which y = f(x) already fixed: ``log p(y|u) + log p(x|y,z)`` scores y twice
and is not a density of x. The default ``"consistent"`` restricts p(x|y,.) to the x whose block
means are y (:class:`~pyro_srvae.model.distributions.ConsistentGaussian`), an exact normalized density of
x; where no closed form exists it takes the paper's route, y on the 8-bit grid scored by a pmf (a
lower bound on one). ``"spec"`` keeps the literal joint, for the derivation's checks.

Beyond the spec, both models take ``likelihood=`` (:data:`~pyro_srvae.model.likelihoods.LIKELIHOODS`:
the spec's ``"gaussian"``, the default, or ``"gaussian-pixel"`` / ``"gaussian-pixel-faithful"`` /
``"dlogistic-mix"``, used for every observed image site, x and y) and ``arch=`` (:data:`~pyro_srvae.model.networks.ARCHS`:
``"small"``, the default, or ``"densenet"``). The defaults build exactly the spec's model.

Both models can standardize the data per band for the networks (``set_data_scaling``; beyond the
spec, docs/own-images.md): the networks and likelihoods -- so ``decode*``, ``x_distribution`` and
``y_distribution`` -- work on x' = (x - offset) / scale, while the log joint stays a density of x
(the Jacobian is a ``pyro.factor`` site named ``"data_scaling"``) and ``sample``, ``reconstruct``
and ``super_resolve`` return x's units. The default statistics are the identity.
"""

import math
from typing import NamedTuple

import pyro
import torch
import torch.nn.functional as F
from torch import nn

from ..utils.devices import model_device
from .distributions import NUM_BINS
from .likelihoods import GAUSSIAN_PIXEL_MIN_SCALE, LIKELIHOODS, make_likelihood
from .networks import ARCHS, NETWORK_TYPES, float32_outputs

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


def sample_spread(draws):
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
            " (convert 8-bit images with pyro_srvae.data.batching.dequantize)"
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


def check_choice(what, value, choices):
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


class ImageModel(nn.Module):
    """What the VAE and the srVAE share: input checks, device following, learned scales."""

    #: Bit depth of the integer pixels the model was trained on (8 or 16): the model itself
    #: works in [0, 1] units; this says which grid ``(k + U) / 2**bits`` its data came from,
    #: for bits/dim and for writing outputs in the data's own units. Training sets it from
    #: the data; a checkpoint stores it.
    bits = 8

    def __init__(self, image_shape, name, validate_inputs, likelihood="gaussian", likelihood_components=10,
                 arch="small", gamma_init=0.1, pixel_scale_floor=GAUSSIAN_PIXEL_MIN_SCALE):
        super().__init__()
        check_choice("likelihood", likelihood, LIKELIHOODS)
        check_choice("arch", arch, ARCHS)
        self.image_shape = _check_image_shape(image_shape)
        self.name = name
        self.validate_inputs = validate_inputs
        self.likelihood_name = likelihood
        self.arch = arch
        if pixel_scale_floor != GAUSSIAN_PIXEL_MIN_SCALE and likelihood not in PIXEL_SCALE_LIKELIHOODS:
            raise ValueError(f"pixel_scale_floor is the floor of a per-pixel sigma; the {likelihood} likelihood has none")
        self.likelihood = make_likelihood(likelihood, likelihood_components, gamma_init, pixel_scale_floor)
        # pyro.module on every call is what lets pyro.infer.SVI find the parameters. A loop
        # that steps its own torch optimizer (pyro_srvae.train) registers once and
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
        (:func:`pyro_srvae.data.batching.band_statistics`). The density of x is that of x' times the
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
        return model_device(self)

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
