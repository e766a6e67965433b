"""Pixel distributions: discretized Gaussians and logistic mixtures over 8-bit bins, and the
Gaussian of x conditioned on its block means (the consistent p(x|y,z) of docs/derivation.md).
"""

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints

#: Number of 8-bit bins on [0, 1]; bin k is [k/256, (k+1)/256).
NUM_BINS = 256

BIN_WIDTH = 1.0 / NUM_BINS

#: Floor on the logistic scales of ``dlogistic-mix`` (data on [0, 1]; a bin is 3.9e-3 wide).
LOGISTIC_MIN_SCALE = 1e-4


def _log1mexp(d):
    """log(1 - exp(-d)) for d > 0, accurate at both ends (Maechler 2012).

    Each branch is evaluated on inputs clamped to its own domain, so the branch that
    ``torch.where`` discards never produces inf/NaN gradients.
    """
    ln2 = math.log(2.0)
    small = torch.clamp(d, max=ln2)
    large = torch.clamp(d, min=ln2)
    return torch.where(d <= ln2, torch.log(-torch.expm1(-small)), torch.log1p(-torch.exp(-large)))


class DiscretizedLogisticMixture(TorchDistribution):
    """Per-pixel mixture of K logistics discretized to 256 bins on [0, 1] (PixelCNN++).

    Parameters have shape ``batch_shape + (K,)``: ``logits`` (mixture weights, need not be
    normalised), ``locs`` (logistic locations, data scale [0, 1]) and ``scales`` (> 0).
    The event is a single pixel (``event_shape == ()``); use ``.to_event(3)`` for images.

    Bin k covers [k/256, (k+1)/256); the first and last bins are extended to -inf and +inf,
    so the 256 bin probabilities sum to one:

        P(k) = sum_j w_j [F_j((k+1)/256) - F_j(k/256)],  F_j(-inf) = 0, F_j(+inf) = 1.

    ``log_prob(x)`` is the log-density of the piecewise-constant density on [0, 1] that
    spreads each bin's mass uniformly over the bin: ``log P(floor(256 x)) + log 256``;
    with ``pmf=True`` it is the bin's probability ``log P(floor(256 x))`` itself (for a y on
    the 8-bit grid, scored as a discrete variable).
    It is computed without cancellation: for an interior bin with a = (k/256 - mu)/s and
    b = a + 1/(256 s), ``sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - exp(-(b - a)))``,
    so ``log P = logsigmoid(b) + logsigmoid(-a) + log1mexp(b - a)`` is accurate even for
    bins far in the tails (where PixelCNN++ falls back to a density approximation).

    Differences from PixelCNN++ (Salimans et al. 2017): the channels of a pixel are
    independent given the decoder's inputs, each with its own K-component mixture (no
    autoregressive coupling coefficients between R, G, B), and bins are the 8-bit bins of
    dequantization, ``[k/256, (k+1)/256)``, not centres ``k/255``.
    """

    arg_constraints = {
        "logits": constraints.real,
        "locs": constraints.real,
        "scales": constraints.positive,
    }
    support = constraints.unit_interval
    has_rsample = False

    def __init__(self, logits, locs, scales, pmf=False, validate_args=None):
        logits, locs, scales = torch.broadcast_tensors(logits, locs, scales)
        self.pmf = pmf
        if logits.dim() < 1:
            raise ValueError("DiscretizedLogisticMixture parameters need a trailing mixture dimension")
        self.logits = logits
        self.locs = locs
        self.scales = scales
        super().__init__(batch_shape=locs.shape[:-1], event_shape=torch.Size(), validate_args=validate_args)

    @property
    def num_components(self):
        return self.locs.shape[-1]

    @property
    def log_weights(self):
        return F.log_softmax(self.logits, dim=-1)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogisticMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        shape = batch_shape + (self.num_components,)
        new.logits = self.logits.expand(shape)
        new.locs = self.locs.expand(shape)
        new.scales = self.scales.expand(shape)
        new.pmf = self.pmf
        super(DiscretizedLogisticMixture, new).__init__(batch_shape, torch.Size(), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @staticmethod
    def bin_index(value):
        """k = floor(256 x), clamped to 0..255 (x = 1 falls in the last bin)."""
        return torch.clamp(torch.floor(value * NUM_BINS), 0, NUM_BINS - 1)

    def _component_bin_log_mass(self, k):
        """log of the probability of bin k (float tensor) under each component, ``(..., K)``."""
        inv_scale = self.scales.reciprocal()
        lower = (k * BIN_WIDTH - self.locs) * inv_scale
        upper = ((k + 1) * BIN_WIDTH - self.locs) * inv_scale
        zero = torch.zeros((), dtype=lower.dtype, device=lower.device)
        log_cdf_upper = torch.where(k < NUM_BINS - 1, F.logsigmoid(upper), zero)  # log F(upper edge)
        log_sf_lower = torch.where(k > 0, F.logsigmoid(-lower), zero)  # log(1 - F(lower edge))
        interior = (k > 0) & (k < NUM_BINS - 1)
        log_width = torch.where(interior, _log1mexp(BIN_WIDTH * inv_scale), zero)
        return log_cdf_upper + log_sf_lower + log_width

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        k = self.bin_index(value).unsqueeze(-1)
        log_mass = torch.logsumexp(self.log_weights + self._component_bin_log_mass(k), dim=-1)
        return log_mass if self.pmf else log_mass + math.log(NUM_BINS)

    def bin_log_probs(self):
        """log P(k) for all 256 bins, shape ``batch_shape + (256,)``; sums (exp) to one.

        Materialises ``batch x K x 256`` values: for checks and small batches.
        """
        k = torch.arange(NUM_BINS, dtype=self.locs.dtype, device=self.locs.device)
        k = k.reshape((NUM_BINS,) + (1,) * (self.locs.dim()))  # (256, *batch, 1)
        log_mass = torch.logsumexp(self.log_weights + self._component_bin_log_mass(k), dim=-1)  # (256, *batch)
        return log_mass.movedim(0, -1)

    def sample(self, sample_shape=torch.Size()):
        """A draw of the piecewise-constant density: bin k ~ P, then x uniform in the bin."""
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            component = dist.Categorical(logits=self.logits).sample(sample_shape).unsqueeze(-1)
            locs = self.locs.expand(shape + (self.num_components,)).gather(-1, component).squeeze(-1)
            scales = self.scales.expand(shape + (self.num_components,)).gather(-1, component).squeeze(-1)
            tiny = torch.finfo(locs.dtype).tiny
            uniform = torch.rand(shape, dtype=locs.dtype, device=locs.device).clamp(tiny, 1 - 1e-7)
            continuous = locs + scales * (torch.log(uniform) - torch.log1p(-uniform))  # logistic draw
            k = self.bin_index(continuous)
            within = torch.rand(shape, dtype=locs.dtype, device=locs.device)
            # k + within may round up to k + 1 in floating point; stay inside bin k.
            summed = torch.minimum(k + within, torch.nextafter(k + 1, k))
            return summed * BIN_WIDTH

    @property
    def mean(self):
        """E[x] of the piecewise-constant density: sum_j w_j (E_j[k] + 1/2) / 256, exact to ~1e-6.

        E_j[k] = sum_{i=1}^{255} sigmoid((mu_j - i/256) / s_j) (tail-sum formula). For
        s_j > 1/256 the sum is evaluated by Euler-Maclaurin (closed-form integral of the
        logistic survival function plus endpoint and first-derivative corrections; the next
        term is below 4e-4 bins); for s_j <= 1/256 only the terms within 24 bins of mu_j are
        not saturated, and those are summed exactly. Cost: ~50 sigmoids per pixel and
        component at most, instead of 255.
        """
        expected_bin = _discretized_logistic_expected_bin(self.locs, self.scales)
        component_means = (expected_bin + 0.5) * BIN_WIDTH
        return (F.softmax(self.logits, dim=-1) * component_means).sum(-1)


_WINDOW = 24  # half-width, in bins, of the exact sum for narrow logistics


def _discretized_logistic_expected_bin(locs, scales):
    """E[k] for k the 256-bin discretization (edge bins extended) of Logistic(locs, scales)."""
    w = BIN_WIDTH
    result = torch.empty_like(locs)
    narrow = scales <= w
    # Wide logistics: Euler-Maclaurin for sum_{i=1}^{255} g(i w), g(t) = sigmoid((mu - t)/s).
    # float64: the integral is a difference of two softplus values of nearly equal size when s is large.
    mu, s = locs[~narrow].double(), scales[~narrow].double()
    if mu.numel():
        a0, a1 = mu / s, (mu - 1.0) / s
        integral = s * (F.softplus(a0) - F.softplus(a1))  # int_0^1 g(t) dt
        g0, g1 = torch.sigmoid(a0), torch.sigmoid(a1)
        dg0, dg1 = -g0 * (1 - g0) / s, -g1 * (1 - g1) / s  # g'(0), g'(1)
        result[~narrow] = (integral / w - (g0 + g1) / 2 + (w / 12) * (dg1 - dg0)).to(result.dtype)
    # Narrow logistics: terms more than _WINDOW bins from mu are 0 or 1 to float precision.
    mu, s = locs[narrow], scales[narrow]
    if mu.numel():
        centre = torch.clamp(torch.round(mu / w), 0, NUM_BINS)
        offsets = torch.arange(-_WINDOW + 1, _WINDOW, dtype=mu.dtype, device=mu.device)
        edges = centre.unsqueeze(-1) + offsets  # edge indices i
        valid = (edges >= 1) & (edges <= NUM_BINS - 1)
        terms = torch.sigmoid((mu.unsqueeze(-1) - edges * w) / s.unsqueeze(-1))
        saturated_below = torch.clamp(centre - _WINDOW, min=0, max=NUM_BINS - 1)  # edges 1..centre-WINDOW
        result[narrow] = saturated_below + (terms * valid).sum(-1)
    return result


def block_mean(images, factor):
    """A x: the mean of each ``factor x factor`` block of ``(*, C, H, W)`` images."""
    blocks = images.unflatten(-1, (images.shape[-1] // factor, factor))
    blocks = blocks.unflatten(-3, (images.shape[-2] // factor, factor))  # (*, C, h, f, w, f)
    return blocks.mean(dim=(-3, -1))


def nearest_upsample(images, factor):
    """Each pixel of ``(*, C, h, w)`` repeated over a ``factor x factor`` block (A^T up to f^2)."""
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def bin_centres(values):
    """Continuous values in [0, 1] snapped to the centres (k + 1/2) / 256 of their 8-bit bins."""
    return (torch.clamp(torch.floor(values * NUM_BINS), 0, NUM_BINS - 1) + 0.5) * BIN_WIDTH


class ConsistentGaussian(TorchDistribution):
    """x ~ N(loc, diag scale^2) conditioned on its block means: the x consistent with y = A x.

    A is the ``factor x factor`` block average (the srVAE's area downscaling). Writing
    x in coordinates (A x, details), ``N(x; loc, S) = N(A x; A loc, A S A^T) N(details | A x) J``
    with a constant Jacobian J, so

        log p(x | y) = log N(x; loc, S) - log N(A x; A loc, A S A^T),
        A S A^T = diag(sum_block scale^2 / f^4)   (gamma^2 / f^2 for a scalar gamma),

    is the conditional density of the details given the block means, and multiplied by any
    density of y = A x it gives a density of x that integrates to one over R^D. The literal
    ``N(x; loc, S)`` of eq. (15) scores the block means a second time (docs/derivation.md,
    "A density of x").

    The conditional Gaussian's mean and draws have block means exactly ``y``:

        mean  = loc + w * up(y - A loc),      w = scale^2 / up(block mean of scale^2)
        draw  = x0 + w * up(y - A x0),        x0 ~ N(loc, S)
        var   = scale^2 (1 - scale^2 / up(sum_block scale^2))   (gamma^2 (1 - 1/f^2) for a scalar)

    with ``up`` the nearest upsampling (w = 1 for a scalar gamma: ``mean = loc + up(y - A loc)``).
    Event shape ``(C, H, W)``; batch shape the broadcast of ``loc``'s and ``y``'s leading dims.

    The support is the affine subspace ``A x = y``: :meth:`log_prob` is ``-inf`` for an x
    with a block mean further than :attr:`SUPPORT_TOLERANCE` ``* max(1, mean |x| of the
    block)`` from y's, and the density above elsewhere.
    """

    #: How far (relative to the block's size ``max(1, mean |x|)``) x's block means may be from
    #: y for x to lie on the support. The model's own x (training and evaluation: y =
    #: ``downscale(x)``, :func:`block_mean` of a draw, the conditional mean) has block means
    #: equal to y up to float rounding: two float32 means of ``f^2`` values differ by at most
    #: about ``2 (f^2 - 1) 2^-24`` of the block's mean |x| (1e-6 for f = 2, 8e-6 for f = 8),
    #: far below 1e-4; an x whose block means differ from y by more is another image.
    SUPPORT_TOLERANCE = 1e-4

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive, "y": constraints.real}
    support = constraints.independent(constraints.real, 3)
    has_rsample = True

    def __init__(self, loc, scale, y, factor, validate_args=None):
        batch_shape = torch.broadcast_shapes(loc.shape[:-3], y.shape[:-3])
        event_shape = loc.shape[-3:]
        self.factor = int(factor)
        self.loc = loc.expand(batch_shape + event_shape)
        self.scale = torch.as_tensor(scale, dtype=loc.dtype, device=loc.device).expand(batch_shape + event_shape)
        self.y = y.expand(batch_shape + y.shape[-3:])
        super().__init__(batch_shape=batch_shape, event_shape=event_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ConsistentGaussian, _instance)
        batch_shape = torch.Size(batch_shape)
        new.factor = self.factor
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.scale = self.scale.expand(batch_shape + self.event_shape)
        new.y = self.y.expand(batch_shape + self.y.shape[-3:])
        super(ConsistentGaussian, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def _block_variance(self):
        """The diagonal of A S A^T, ``(*, C, h, w)``: sum_block scale^2 / f^4."""
        return block_mean(self.scale.square(), self.factor) / self.factor**2

    @property
    def _weights(self):
        """w = S A^T (A S A^T)^-1 per pixel, in units of ``up``: 1 for a uniform scale."""
        variance = self.scale.square()
        return variance / nearest_upsample(block_mean(variance, self.factor), self.factor)

    def _condition(self, x0):
        """x0 moved along S A^T onto the affine subspace A x = y."""
        return x0 + self._weights * nearest_upsample(self.y - block_mean(x0, self.factor), self.factor)

    @property
    def mean(self):
        return self._condition(self.loc)

    @property
    def variance(self):
        return self.scale.square() * (1.0 - self._weights / self.factor**2)

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        x0 = self.loc + self.scale * torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self._condition(x0)

    def log_prob(self, value):
        means = block_mean(value, self.factor)
        full = dist.Normal(self.loc, self.scale).log_prob(value).sum((-3, -2, -1))
        blocks = dist.Normal(block_mean(self.loc, self.factor), self._block_variance.sqrt())
        log_p = full - blocks.log_prob(means).sum((-3, -2, -1))
        # Outside the support A x = y the density is zero (y would otherwise be ignored).
        return torch.where(self.on_support(value, means), log_p, torch.full_like(log_p, -math.inf))

    def on_support(self, value, means=None):
        """Whether each x of ``value`` has block means y (:attr:`SUPPORT_TOLERANCE`); batch-shaped."""
        means = block_mean(value, self.factor) if means is None else means
        size = block_mean(value.abs(), self.factor).clamp(min=1.0)
        off = (means - self.y).abs() > self.SUPPORT_TOLERANCE * size
        return ~off.flatten(-3).any(-1)


def _log_difference_of_normal_cdfs(lower, upper):
    """log(Phi(upper) - Phi(lower)) for lower < upper, accurate in both tails.

    Above the mean the difference of survival functions is used instead, so neither side
    subtracts two numbers close to one.
    """
    above = (lower + upper) > 0
    first = torch.where(above, torch.special.log_ndtr(-lower), torch.special.log_ndtr(upper))
    second = torch.where(above, torch.special.log_ndtr(-upper), torch.special.log_ndtr(lower))
    gap = torch.clamp(first - second, min=torch.finfo(first.dtype).tiny)
    return first + _log1mexp(gap)


class DiscretizedGaussian(TorchDistribution):
    """N(loc, scale^2) discretized to the 256 8-bit bins [k/256, (k+1)/256): a pmf.

    The first and last bins extend to -inf and +inf, so the 256 probabilities sum to one.
    ``log_prob(v)`` is ``log P(k = floor(256 v))``, a log-*probability* (no ``log 256``): the
    srVAE's y on the 8-bit grid is a discrete variable (the paper's route), and
    ``log P(y) + log p(x | y) <= log p(x)`` for a normalized model. Draws are bin centres.
    Event shape ``()``; use ``.to_event(3)`` for images.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(self, loc, scale, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(loc, torch.as_tensor(scale, dtype=loc.dtype, device=loc.device))
        super().__init__(batch_shape=self.loc.shape, event_shape=torch.Size(), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedGaussian, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(DiscretizedGaussian, new).__init__(batch_shape, torch.Size(), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _bin_log_mass(self, k):
        lower = (k * BIN_WIDTH - self.loc) / self.scale
        upper = lower + BIN_WIDTH / self.scale
        interior = _log_difference_of_normal_cdfs(lower, upper)
        return torch.where(
            k <= 0, torch.special.log_ndtr(upper), torch.where(k >= NUM_BINS - 1, torch.special.log_ndtr(-lower), interior)
        )

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return self._bin_log_mass(DiscretizedLogisticMixture.bin_index(value))

    def bin_log_probs(self):
        """log P(k) for all 256 bins, shape ``batch_shape + (256,)``."""
        k = torch.arange(NUM_BINS, dtype=self.loc.dtype, device=self.loc.device)
        k = k.reshape((NUM_BINS,) + (1,) * self.loc.dim())
        return self._bin_log_mass(k).movedim(0, -1)

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            draw = self.loc + self.scale * torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
            return bin_centres(draw)

    @property
    def mean(self):
        """E[(k + 1/2) / 256] = (1/2 + sum_{i=1}^{255} Phi((loc - i/256) / scale)) / 256 (tail sum)."""
        edges = torch.arange(1, NUM_BINS, dtype=self.loc.dtype, device=self.loc.device) * BIN_WIDTH
        tail = torch.special.ndtr((self.loc.unsqueeze(-1) - edges) / self.scale.unsqueeze(-1)).sum(-1)
        return (tail + 0.5) * BIN_WIDTH
