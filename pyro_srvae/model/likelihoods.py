"""Observation models p(x|.) and p(y|.): how a decoder's raw output becomes a distribution.

===========================  ==========================================  ============================
name                         distribution per pixel                      status
===========================  ==========================================  ============================
``gaussian``                 N(loc, gamma^2), one learned scalar gamma   the spec: eq. (3), (12), (15)
``gaussian-pixel``           N(loc, sigma^2), sigma predicted per pixel  extension beyond the spec
``gaussian-pixel-faithful``  the same density, the means fitted as       extension beyond the spec
                             under one scale (faithful gradient)
``dlogistic-mix``            discretized mixture of K logistics,         extension beyond the spec (as
                             256 bins                                    the srVAE paper / PixelCNN++)
===========================  ==========================================  ============================

A likelihood needs ``params_per_channel`` (P) decoder output channels per image channel.
The decoder returns ``raw`` of shape ``(*, P * C, H, W)``, read as ``(*, P, C, H, W)``
(parameter index major, so for P = 1 the raw output *is* the location). An optional
``offset`` of shape ``(*, C, H, W)`` is added to every location parameter: the
super-resolution decoder predicts a residual over the bilinear upsampling of y,
``locations = offset + raw`` (section 3.1 of the spec, division of labour).

Every likelihood gives

* ``distribution(raw, offset=None, scale=None)``: a Pyro distribution with
  ``event_shape == (C, H, W)`` and ``batch_shape == raw.shape[:-3]`` (``scale`` is the model's
  learned gamma, used by ``gaussian`` only);
* ``mean(raw, offset=None)``: the mean image (what ``sample``/``reconstruct``/``super_resolve``
  return);
* ``sample(raw, offset=None, scale=None)``: one draw of the observation.

All three densities are densities on the *dequantized* data ``x = (k + U) / 256``, so
``bits_per_dim = -log p(x) / (D ln 2) + 8`` stays the right conversion. For
``dlogistic-mix`` the density is the piecewise-constant one that spreads each 8-bit bin's
probability uniformly over the bin, ``log p(x) = log P(k = floor(256 x)) + D log 256``: the
``+ 8`` then cancels the ``D log 256`` exactly and the bits/dim are the exact discrete
``-log2 P(k) / D`` of the 8-bit image, with no dequantization gap (for the srVAE, whose
model also scores y = downscale(x), this holds for the x term; y is a block average of
dequantized pixels and is scored by the same piecewise-constant density, a valid density
for a continuous y).

Two more forms serve the srVAE's factorisation p(y|u) p(x|y, .) with y = f(x)
(:class:`pyro_srvae.SRVAE`, ``x_given_y=``; docs/derivation.md, "A density of x"):

* :class:`ConsistentGaussian`: the Gaussian of x *conditioned on its block means*,
  ``log N(x; mu, Sigma) - log N(A x; A mu, A Sigma A^T)`` for the area downscaling A, so that
  ``log p(y = A x | u) + log p(x | y, .)`` is a normalized density of x (the literal
  ``N(x; mu, Sigma)`` scores the block means a second time);
* :class:`DiscretizedGaussian` and ``DiscretizedLogisticMixture(..., pmf=True)``: a pmf over the
  256 bins for a y on the 8-bit grid (the srVAE paper's route), where no closed form exists.
"""

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution

from .distributions import (
    LOGISTIC_MIN_SCALE,
    ConsistentGaussian,
    DiscretizedGaussian,
    DiscretizedLogisticMixture,
    block_mean,
    nearest_upsample,
)

LIKELIHOODS = ("gaussian", "gaussian-pixel", "gaussian-pixel-faithful", "dlogistic-mix")

#: Floor on the per-pixel scale of ``gaussian-pixel``. A Gaussian fitted to one bin of
#: dequantization noise, U(0, 1/256), has sigma = 1/(256 sqrt 12) ~ 1.1e-3, so a floor a
#: little below it never binds for sensible fits and keeps the density bounded.
GAUSSIAN_PIXEL_MIN_SCALE = 1e-3


def _inverse_softplus(value):
    return value + math.log(-math.expm1(-value))


class Likelihood:
    """Base class: maps a decoder's raw output to an observation distribution."""

    name = None
    params_per_channel = 1
    #: True when the model must pass its learned scalar gamma as ``scale``.
    uses_global_scale = False
    #: True when :meth:`consistent_distribution` exists: the closed form of p(x | y = A x, .).
    has_consistent_form = False

    def out_channels(self, channels):
        """Decoder output channels needed for an image with ``channels`` channels."""
        return self.params_per_channel * channels

    def _split(self, raw):
        """(*, P*C, H, W) -> (*, P, C, H, W)."""
        p = self.params_per_channel
        if raw.shape[-3] % p:
            raise ValueError(f"{self.name} needs a multiple of {p} channels, got raw output {tuple(raw.shape)}")
        return raw.unflatten(-3, (p, raw.shape[-3] // p))

    @staticmethod
    def _locate(loc, offset):
        return loc if offset is None else offset + loc

    def distribution(self, raw, offset=None, scale=None):
        raise NotImplementedError

    def mean(self, raw, offset=None):
        raise NotImplementedError

    def sample(self, raw, offset=None, scale=None):
        return self.distribution(raw, offset, scale).sample()

    def consistent_distribution(self, raw, offset, scale, y, factor):
        """p(x | y = A x, .) for the area downscaling A: a :class:`ConsistentGaussian`."""
        raise NotImplementedError(f"the {self.name} likelihood has no closed form given the block means")

    def pmf_distribution(self, raw, offset=None, scale=None):
        """The likelihood discretized to the 256 8-bit bins: a pmf, event ``(C, H, W)``."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class GaussianLikelihood(Likelihood):
    """The spec's decoder: N(loc, gamma^2 I) with the model's learned scalar gamma.

    eq. (3) p(x|z), eq. (12) p(y|u), eq. (15) p(x|y,z). ``raw`` (C channels) is the mean.
    """

    name = "gaussian"
    params_per_channel = 1
    uses_global_scale = True

    def distribution(self, raw, offset=None, scale=None):
        if scale is None:
            raise ValueError("the gaussian likelihood needs the model's learned scale gamma")
        return dist.Normal(self._locate(raw, offset), scale).to_event(3)

    def mean(self, raw, offset=None):
        return self._locate(raw, offset)

    has_consistent_form = True

    def sample(self, raw, offset=None, scale=None):
        loc = self.mean(raw, offset)
        return loc + scale * torch.randn_like(loc)

    def consistent_distribution(self, raw, offset, scale, y, factor):
        return ConsistentGaussian(self._locate(raw, offset), scale, y, factor)

    def pmf_distribution(self, raw, offset=None, scale=None):
        return DiscretizedGaussian(self._locate(raw, offset), scale).to_event(3)


class GaussianPixelLikelihood(Likelihood):
    """N(loc, sigma^2) with a per-pixel sigma predicted by the decoder (beyond the spec).

    Channels ``[0, C)`` are the locations, ``[C, 2C)`` the raw scales:
    ``sigma = softplus(raw + b) + min_scale`` (a floor, 1e-3 by default), where the constant b
    makes sigma = ``scale_init`` for raw = 0 (the same starting point as the spec's gamma).
    """

    name = "gaussian-pixel"
    params_per_channel = 2

    def __init__(self, scale_init=0.1, min_scale=GAUSSIAN_PIXEL_MIN_SCALE):
        if not scale_init > min_scale:
            raise ValueError(f"scale_init must exceed the scale floor {min_scale}, got {scale_init!r}")
        self.min_scale = min_scale
        self.shift = _inverse_softplus(scale_init - min_scale)

    def loc_and_scale(self, raw, offset=None):
        params = self._split(raw)
        loc = self._locate(params[..., 0, :, :, :], offset)
        scale = F.softplus(params[..., 1, :, :, :] + self.shift) + self.min_scale
        return loc, scale

    def distribution(self, raw, offset=None, scale=None):
        return dist.Normal(*self.loc_and_scale(raw, offset)).to_event(3)

    def mean(self, raw, offset=None):
        return self.loc_and_scale(raw, offset)[0]

    has_consistent_form = True

    def consistent_distribution(self, raw, offset, scale, y, factor):
        return ConsistentGaussian(*self.loc_and_scale(raw, offset), y, factor)

    def pmf_distribution(self, raw, offset=None, scale=None):
        return DiscretizedGaussian(*self.loc_and_scale(raw, offset)).to_event(3)

    def __repr__(self):
        return f"GaussianPixelLikelihood(min_scale={self.min_scale})"


class SurrogateGradient(TorchDistribution):
    """The distribution ``value`` whose ``log_prob`` carries the gradient of other log-densities.

    ``log_prob(x)`` *equals* ``value.log_prob(x)`` (so every ELBO, bits/dim and importance
    weight computed from it is the honest one of ``value``), while its gradient is that of
    ``sum(w * g.log_prob(x) for w, g in zip(weights, gradient_terms))`` (weights default to 1):

        log_prob(x) = stop(value.log_prob(x)) + G(x) - stop(G(x)),   G = sum_g w_g g.log_prob.

    Draws, mean and variance are ``value``'s. Without autograd (evaluation) it is ``value``.
    """

    arg_constraints = {}

    def __init__(self, value, gradient_terms, weights=None, validate_args=None):
        self.value = value
        self.gradient_terms = tuple(gradient_terms)
        self.weights = tuple(weights) if weights is not None else (1.0,) * len(self.gradient_terms)
        super().__init__(value.batch_shape, value.event_shape, validate_args=False)

    @property
    def support(self):
        return self.value.support

    @property
    def has_rsample(self):
        return self.value.has_rsample

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        terms = [g.expand(batch_shape) for g in self.gradient_terms]
        return SurrogateGradient(self.value.expand(batch_shape), terms, self.weights)

    @property
    def mean(self):
        return self.value.mean

    @property
    def variance(self):
        return self.value.variance

    def sample(self, sample_shape=torch.Size()):
        return self.value.sample(sample_shape)

    def rsample(self, sample_shape=torch.Size()):
        return self.value.rsample(sample_shape)

    def log_prob(self, x):
        log_prob = self.value.log_prob(x)
        if not torch.is_grad_enabled():
            return log_prob
        surrogate = sum(w * g.log_prob(x) for w, g in zip(self.weights, self.gradient_terms))
        return log_prob.detach() + (surrogate - surrogate.detach())


class FaithfulGaussianPixelLikelihood(GaussianPixelLikelihood):
    """``gaussian-pixel``'s density, trained by the *faithful* heteroscedastic gradient (beyond the spec).

    The densities are :class:`GaussianPixelLikelihood`'s (the consistent form reparametrized,
    below), and every number printed is their honest value. The gradient differs
    (:class:`SurrogateGradient`):

    * the locations get the gradient of the same density with **one** scale for every pixel,
      the root mean square of the predicted sigmas (held constant), as the spec's scalar gamma
      would give them: a squared-error fit;
    * the sigmas get the gradient of the per-pixel density with the locations held constant,
      whose optimum is still the calibrated sigma^2 = E[(x - loc)^2 | inputs], times
      :attr:`scale_gradient_weight`.

    In the consistent form (x given its block means y) the locations are first moved onto
    A loc = y, so that the predictive mean is the locations and does not move with the sigmas
    (:meth:`consistent_distribution`).

    Why: under the plain per-pixel likelihood the locations' gradient is weighted by 1/sigma^2,
    so a decoder can give up on edges by raising sigma there, and does (the third photograph
    run, docs/results.md: the SR mean stayed at the consistent bicubic). Fitting the mean as
    under one scale and the scales given the mean is the "faithful" heteroscedastic
    regression of Stirn et al. (AISTATS 2023); beta-NLL with beta = 1 (Seitzer et al., ICLR
    2022) gives the locations the same gradient up to the normalisation. The objective whose
    gradient is followed is then no longer the ELBO, though the ELBO is what is reported.

    Measured on photographs (docs/results.md, the tenth run): a much better density and CRPS
    than the spec's scalar gamma (4.99 against 5.76 bits/dim), but a worse SR mean, and
    intervals still too narrow, since the sigmas are fitted to what z drawn from q(z|x,.) leaves
    open, not z drawn from p(z|y,u).
    """

    name = "gaussian-pixel-faithful"

    #: Weight of the sigmas' gradient (1: the faithful fit as published). Another weight moves
    #: neither the sigmas' optimum nor, under Adam (which divides each parameter's step by its
    #: own gradient's size), the steps of parameters only the sigmas use; it changes how much
    #: the sigmas steer the layers they share with the locations. Measured on photographs
    #: (docs/results.md, the ninth run): 0.01 kept the SR mean but left the intervals narrow.
    scale_gradient_weight = 1.0

    def _faithful(self, make, raw, offset, *args, move=None):
        loc, scale = self.loc_and_scale(raw, offset)
        if move is not None:
            loc = move(loc)
        one_scale = scale.detach().square().mean().sqrt().expand_as(scale)
        terms = (make(loc, one_scale, *args), make(loc.detach(), scale, *args))
        return SurrogateGradient(make(loc, scale, *args), terms, weights=(1.0, self.scale_gradient_weight))

    def distribution(self, raw, offset=None, scale=None):
        return self._faithful(lambda loc, s: dist.Normal(loc, s).to_event(3), raw, offset)

    def consistent_distribution(self, raw, offset, scale, y, factor):
        """The :class:`ConsistentGaussian` with its locations first moved onto A loc = y.

        The conditional mean is ``loc + w up(y - A loc)``, with weights w set by the sigmas; for
        ``A loc = y`` it is ``loc`` itself, whatever the sigmas. So the locations' squared-error
        fit is a fit of the predictive mean, and the sigmas' fit does not move it. The family
        of densities is the same: every mean whose block means are y is reached.
        """

        def onto_y(loc):
            return loc + nearest_upsample(y - block_mean(loc, factor), factor)

        return self._faithful(ConsistentGaussian, raw, offset, y, factor, move=onto_y)

    def pmf_distribution(self, raw, offset=None, scale=None):
        return self._faithful(lambda loc, s: DiscretizedGaussian(loc, s).to_event(3), raw, offset)

    def __repr__(self):
        return f"FaithfulGaussianPixelLikelihood(min_scale={self.min_scale})"


class DiscretizedLogisticMixtureLikelihood(Likelihood):
    """Discretized mixture of K logistics per pixel and channel (beyond the spec; srVAE paper).

    ``3K`` parameters per channel: ``[0, K)`` mixture logits, ``[K, 2K)`` locations,
    ``[2K, 3K)`` raw scales, ``s = softplus(raw + b) + 1e-4`` with b chosen so that raw = 0
    gives a logistic of standard deviation ``scale_init`` (s = scale_init sqrt(3) / pi).
    See :class:`DiscretizedLogisticMixture` for the distribution and its exact bits/dim.
    """

    name = "dlogistic-mix"

    def __init__(self, num_components=10, scale_init=0.1, min_scale=LOGISTIC_MIN_SCALE):
        if int(num_components) != num_components or num_components < 1:
            raise ValueError(f"likelihood_components must be a positive integer, got {num_components!r}")
        initial = scale_init * math.sqrt(3.0) / math.pi
        if not initial > min_scale:
            raise ValueError(f"scale_init too small for the logistic scale floor, got {scale_init!r}")
        self.num_components = int(num_components)
        self.params_per_channel = 3 * self.num_components
        self.min_scale = min_scale
        self.shift = _inverse_softplus(initial - min_scale)

    def parameters(self, raw, offset=None):
        """(logits, locs, scales), each ``(*, C, H, W, K)``."""
        k = self.num_components
        params = self._split(raw).unflatten(-4, (3, k)).movedim(-4, -1)  # (*, 3, C, H, W, K)
        logits, locs, raw_scales = params.unbind(-5)
        if offset is not None:
            locs = offset.unsqueeze(-1) + locs
        scales = F.softplus(raw_scales + self.shift) + self.min_scale
        return logits, locs, scales

    def pixel_distribution(self, raw, offset=None):
        """The per-pixel :class:`DiscretizedLogisticMixture` (``event_shape == ()``)."""
        return DiscretizedLogisticMixture(*self.parameters(raw, offset))

    def distribution(self, raw, offset=None, scale=None):
        return self.pixel_distribution(raw, offset).to_event(3)

    def mean(self, raw, offset=None):
        return self.pixel_distribution(raw, offset).mean

    def pmf_distribution(self, raw, offset=None, scale=None):
        return DiscretizedLogisticMixture(*self.parameters(raw, offset), pmf=True).to_event(3)

    def __repr__(self):
        return f"DiscretizedLogisticMixtureLikelihood(num_components={self.num_components})"


def make_likelihood(name, num_components=10, scale_init=0.1, pixel_scale_floor=GAUSSIAN_PIXEL_MIN_SCALE):
    """The likelihood called ``name`` (one of :data:`LIKELIHOODS`).

    ``pixel_scale_floor``: the least per-pixel sigma of the ``gaussian-pixel`` likelihoods (default:
    about one bin of 8-bit dequantization noise). A higher floor was tried as a lever against
    the posterior collapse of z, which a per-pixel sigma invites (docs/results.md, "What z carries").
    """
    if name == "gaussian":
        return GaussianLikelihood()
    if name == "gaussian-pixel":
        return GaussianPixelLikelihood(scale_init, pixel_scale_floor)
    if name == "gaussian-pixel-faithful":
        return FaithfulGaussianPixelLikelihood(scale_init, pixel_scale_floor)
    if name == "dlogistic-mix":
        return DiscretizedLogisticMixtureLikelihood(num_components, scale_init)
    raise ValueError(f"unknown likelihood {name!r}; expected one of {', '.join(LIKELIHOODS)}")
