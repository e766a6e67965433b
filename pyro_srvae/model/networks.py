"""Neural networks of the VAE and the srVAE: plain ``torch.nn`` modules.

Each network realises one conditional distribution of the spec
(``../shared/seeds/000_73dd18991a948ff9.txt``):

==========================  ==========================================  ============
network                     distribution                                equations
==========================  ==========================================  ============
``GaussianEncoder``         q(z|x), q(u|y), q(z|x,y,u), p(z|y,u)         (10), (16), (19)
``ImageDecoder``            mean of p(x|z) (VAE) and of p(y|u)          (3), (12)
``SuperResolutionDecoder``  mean of p(x|y,z) and of p(x|y,z,u)          (15), sec. 4.3.1
==========================  ==========================================  ============

("mean" for the spec's Gaussian likelihood; for the others, the decoders' outputs are the
likelihood's raw parameters, see below.)

Two architectures, chosen per model with ``arch`` (:data:`ARCHS`):

* ``"small"`` (default): the plain convolutional networks below, sized for a CPU.
* ``"densenet"``: the same four roles built from DenseNet blocks (Huang et al. 2017) as in
  the srVAE paper's code -- layers whose outputs are concatenated to their inputs, channel
  attention at the end of each block, no batch normalisation (its batch statistics would
  couple the images, and the particles, of a batch). Meant for GPU work on CIFAR-10
  (32x32 -> 16x16); any image size and channel count works.

The decoders output ``out_channels`` maps, the raw parameters of the chosen likelihood
(:mod:`pyro_srvae.model.likelihoods`): C for the spec's Gaussian, where the output is the mean.

Every network accepts extra *leading* batch dimensions in front of the usual
``(B, C, H, W)`` image or ``(B, D)`` vector, and broadcasts them between its inputs.
That is what ``vectorize_particles=True`` and the importance-weighted estimator need:
Pyro then hands the networks latents of shape ``(P, B, D)`` while the data stays
``(B, C, H, W)``. ``nn.Conv2d`` only takes 4-D input, so image inputs are flattened to
4-D around the convolutions and the leading dimensions restored afterwards.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("small", "densenet")

#: Where the SR decoder reads the latents (``z_injection=``): its first layer only, or every layer.
Z_INJECTIONS = ("input", "every")

#: The upsamplings of y that the SR decoder's residual is added to (``sr_base=``).
SR_BASES = ("bilinear", "bicubic")

# A floor on predicted standard deviations: keeps the analytic KL finite when an
# encoder is very confident, far below any scale that matters for 8-bit images.
MIN_SCALE = 1e-4

# A soft ceiling on them: s / (1 + (s / MAX_SCALE)^8)^(1/8), computed in logs. Below ~3 it
# moves a float32 value by one rounding at most (a relative 1e-12 at 1, 2e-6 at 5), so the scales a model reaches in
# ordinary training, and the checkpoints written before it, are unchanged. Why it is there: once
# a decoder stops reading z, KL(q(z|x,y,u) || p(z|y,u)) does not change when both scales grow by
# one factor, so nothing held them back; on photographs they drifted to ~1,800 (docs/results.md,
# the fourth run), and latents of that size make any later weight change that reads them blow
# the loss up. Twenty prior standard deviations is far beyond any latent an image needs.
MAX_SCALE = 20.0

_CEILING_SHARPNESS = 8.0


def bounded_scale(raw_scale):
    """``softplus(raw) + MIN_SCALE``, softly capped at :data:`MAX_SCALE`: a positive scale."""
    scale = F.softplus(raw_scale) + MIN_SCALE
    excess = F.softplus(_CEILING_SHARPNESS * torch.log(scale / MAX_SCALE)) / _CEILING_SHARPNESS
    # The clamp only removes float rounding above the ceiling (a relative 4e-6 at s = 1e30).
    return (scale * torch.exp(-excess)).clamp(max=MAX_SCALE)


def set_channels_last(enabled):
    """Run the convolutions on channels-last (NHWC) activations (default: on).

    The weights keep torch's default layout: Pyro's param store stores a contiguous
    copy of a parameter that is not (``ParamStoreDict.setdefault``), so channels-last
    *parameters* would be trained as copies. Only the activations entering each
    convolution stack are laid out NHWC; oneDNN on the CPU and cuDNN on the GPU then
    keep that layout through the stack. The values computed are the same up to
    floating-point rounding; ``benchmarks/eval_time.py --compare-layouts`` measures what
    it buys.
    """
    global _CHANNELS_LAST
    _CHANNELS_LAST = bool(enabled)


_CHANNELS_LAST = True


def _conv_input(images):
    """``images`` laid out for the convolutions that follow (see :func:`set_channels_last`)."""
    if _CHANNELS_LAST:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def _merge_leading(tensor, event_dim):
    """Flatten all leading batch dims into one: ``(*batch, *event) -> (N, *event)``."""
    batch_shape = tensor.shape[: tensor.dim() - event_dim]
    return tensor.reshape((-1,) + tensor.shape[tensor.dim() - event_dim :]), batch_shape


def _split_leading(tensor, batch_shape):
    """Undo :func:`_merge_leading`: ``(N, *event) -> (*batch, *event)``."""
    return tensor.reshape(batch_shape + tensor.shape[1:])


def _expand_leading(tensor, batch_shape, event_dim):
    """Broadcast the leading dims of ``tensor`` to ``batch_shape`` (a view, no copy)."""
    return tensor.expand(batch_shape + tensor.shape[tensor.dim() - event_dim :])


def _concat_vectors(a, b):
    """Concatenate two ``(*, D)`` vectors along the last dim, broadcasting the leading dims."""
    batch_shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([_expand_leading(a, batch_shape, 1), _expand_leading(b, batch_shape, 1)], dim=-1)


class ConvFeatures(nn.Module):
    """Convolutional feature extractor ``(*, C, H, W) -> (*, F)``.

    Two stride-2 stages halve the resolution twice (28 -> 14 -> 7); padding keeps any
    size legal, so the same class serves 28x28 images and their 14x14 or 7x7 copies.
    """

    def __init__(self, in_channels, image_hw, hidden=32):
        super().__init__()
        self.in_channels = in_channels
        self.image_hw = tuple(image_hw)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, 2 * hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * hidden, 2 * hidden, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            probe = torch.zeros(1, in_channels, *self.image_hw)
            self.out_features = self.net(probe).shape[-1]

    def forward(self, images):
        flat, batch_shape = _merge_leading(images, 3)
        return _split_leading(self.net(_conv_input(flat)), batch_shape)


class GaussianEncoder(nn.Module):
    """A diagonal Gaussian over a latent vector from an image and an optional vector.

    ``forward(image, condition=None) -> (loc, scale)``, each ``(*, latent_dim)``.

    The image goes through convolutions once per distinct image; only then are its
    features broadcast against the condition. So p(z|y,u) under P particles runs the
    convolutions on the B images y, not on P*B copies of them.
    """

    def __init__(self, in_channels, image_hw, latent_dim, hidden=32, condition_dim=0, arch="small"):
        super().__init__()
        _check_arch(arch)
        self.latent_dim = latent_dim
        self.condition_dim = condition_dim
        features = ConvFeatures if arch == "small" else DenseFeatures
        self.features = features(in_channels, image_hw, hidden)
        self.head = nn.Sequential(
            nn.Linear(self.features.out_features + condition_dim, 8 * hidden),
            nn.SiLU(),
            nn.Linear(8 * hidden, 2 * latent_dim),
        )

    def forward(self, image, condition=None):
        h = self.features(image)
        if self.condition_dim:
            h = _concat_vectors(h, condition)
        loc, raw_scale = self.head(h).chunk(2, dim=-1)
        return loc, bounded_scale(raw_scale)


class SpatialGaussianEncoder(nn.Module):
    """A diagonal Gaussian over a latent *map* of ``out_channels x h x w`` at the low resolution,
    returned flattened: ``forward(image, condition=None) -> (loc, scale)``, each ``(*, out_channels*h*w)``.

    The latent is still the spec's vector of l coefficients with a diagonal covariance
    (l = ``out_channels * h * w``); only its layout is spatial, as the srVAE paper's latents
    are (3-D tensors), so that each coefficient describes its own neighbourhood of the image.
    An image of ``factor`` times the size (x beside the upsampled y, for q(z|x,y,u)) is folded
    to the low resolution by a pixel unshuffle; three 3x3 convolutions at the low resolution,
    none strided. The condition u shifts each output channel's loc and raw scale by a linear
    function of u, the same over the map: p(z|y,u) (eq. 16) and q(z|x,y,u) (eq. 19) with z a map
    (``SRVAE(z_channels=...)``). So the convolutions run once per image, not once per particle
    of u, which importance-weighted evaluation draws K of per image.

    With ``factor_rank`` R > 0 it also returns R factor maps of the same layout, flattened to
    ``(*, out_channels*h*w, R)``: the W of a covariance W W^T + diag(scale^2) (SRVAE's
    ``z_prior_rank``), R directions in which the whole map varies together.
    """

    def __init__(self, in_channels, image_hw, out_channels, lr_hw, hidden=32, condition_dim=0, factor_rank=0):
        super().__init__()
        if int(factor_rank) != factor_rank or factor_rank < 0:
            raise ValueError(f"factor_rank must be an integer >= 0, got {factor_rank!r}")
        self.factor_rank = int(factor_rank)
        self.lr_hw = tuple(lr_hw)
        self.fold = image_hw[0] // self.lr_hw[0]
        if tuple(d * self.fold for d in self.lr_hw) != tuple(image_hw):
            raise ValueError(f"a {image_hw} image does not fold onto the {self.lr_hw} latent map")
        self.condition_dim = condition_dim
        self.latent_dim = out_channels * self.lr_hw[0] * self.lr_hw[1]
        width = 2 * hidden
        self.net = nn.Sequential(
            nn.Conv2d(in_channels * self.fold**2, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, (2 + self.factor_rank) * out_channels, 3, padding=1),
        )
        self.condition = nn.Linear(condition_dim, (2 + self.factor_rank) * out_channels) if condition_dim else None

    def forward(self, image, condition=None):
        flat, batch_shape = _merge_leading(image, 3)
        folded = F.pixel_unshuffle(flat, self.fold) if self.fold > 1 else flat
        maps = _split_leading(self.net(_conv_input(folded)), batch_shape)  # (*, (2 + R) C, h, w)
        if self.condition is not None:
            maps = maps + self.condition(condition)[..., None, None]  # broadcast over particles of u
        loc, raw_scale, *factors = maps.flatten(-3).chunk(2 + self.factor_rank, dim=-1)
        if not factors:
            return loc, bounded_scale(raw_scale)
        return loc, bounded_scale(raw_scale), torch.stack(factors, dim=-1)


def _check_arch(arch):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")


def _decoder_sizes(height, width):
    return [
        (math.ceil(height / 4), math.ceil(width / 4)),
        (math.ceil(height / 2), math.ceil(width / 2)),
        (height, width),
    ]


class ImageDecoder(nn.Module):
    """Latent vector to image parameters, ``(*, latent_dim) -> (*, out_channels, H, W)``.

    A linear layer to a quarter-resolution feature map, then two resize-and-convolve
    stages. Resizing to exact target sizes (rather than transposed convolutions) makes
    every H, W legal, odd ones included. ``out_channels`` defaults to C: the mean of the
    spec's Gaussian p(x|z) (eq. 3) or p(y|u) (eq. 12).
    """

    def __init__(self, latent_dim, out_shape, hidden=32, out_channels=None):
        super().__init__()
        self._build_projection(latent_dim, out_shape, hidden, out_channels, nn.SiLU())
        self.stage0 = nn.Identity()  # the quarter-resolution stage; the dense decoder has one
        self.stage1 = nn.Sequential(nn.Conv2d(2 * hidden, hidden, 3, padding=1), nn.SiLU())
        self.stage2 = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, self.out_channels, 3, padding=1),
        )

    def _build_projection(self, latent_dim, out_shape, hidden, out_channels, activation):
        """The linear layer from the latent to ``2 hidden`` maps at quarter resolution."""
        channels, height, width = out_shape
        self.out_shape = tuple(out_shape)
        self.out_channels = channels if out_channels is None else out_channels
        self.sizes = _decoder_sizes(height, width)
        self.base_channels = 2 * hidden
        h0, w0 = self.sizes[0]
        self.project = nn.Sequential(nn.Linear(latent_dim, self.base_channels * h0 * w0), activation)

    def forward(self, latent):
        flat, batch_shape = _merge_leading(latent, 1)
        h = self.stage0(_conv_input(self.project(flat).view(-1, self.base_channels, *self.sizes[0])))
        h = self.stage1(F.interpolate(h, size=self.sizes[1], mode="nearest"))
        h = self.stage2(F.interpolate(h, size=self.sizes[2], mode="nearest"))
        return _split_leading(h, batch_shape)


class SuperResolutionDecoder(nn.Module):
    """Mean of p(x|y,z) (eq. 15) or, with ``u_dim > 0``, of p(x|y,z,u) (sec. 4.3.1).

    ``forward(y, z, u=None) -> (*, C, H, W)``.

    The network predicts a residual on top of an upsampling of y (``base``: bilinear, the
    default, or bicubic, :data:`SR_BASES`): the low-resolution image already fixes the
    coarse content of x, so z (and u) only have to explain the detail y lacks -- the
    division of labour of section 3.1. The spec does not say what the residual is over.
    Bicubic is the stronger start on photographs: a zero residual made consistent with y
    is then exactly the consistent-bicubic baseline. Bilinear stays the default, so that
    earlier runs and checkpoints keep their meaning.
    Its inputs (y and the latents) carry no information at the high resolution, so
    the convolutions run on the low-resolution grid and a final pixel shuffle
    (Shi et al. 2016) rearranges ``C * factor^2`` channels into the high-resolution
    residual: ``factor^2`` times cheaper than convolving at the size of x.

    With ``params_per_channel = P > 1`` (likelihoods other than the spec's Gaussian)
    :meth:`residual` returns ``P * C`` raw parameter maps and ``forward`` returns them
    unchanged; the model's likelihood then adds ``upsample(y)`` to its location
    parameters. With P = 1, ``forward`` is ``upsample(y) + residual(y, z, u)``.
    """

    def __init__(self, out_shape, factor, z_dim, u_dim=0, hidden=32, latent_channels=8, params_per_channel=1,
                 base="bilinear", z_injection="input", z_channels=0):
        super().__init__()
        if base not in SR_BASES:
            raise ValueError(f"unknown sr_base {base!r}; expected one of {', '.join(SR_BASES)}")
        if z_injection not in Z_INJECTIONS:
            raise ValueError(f"unknown z_injection {z_injection!r}; expected one of {', '.join(Z_INJECTIONS)}")
        self.base = base
        self.z_injection = z_injection
        channels, height, width = out_shape
        self.out_shape = tuple(out_shape)
        self.factor = factor
        self.lr_hw = (height // factor, width // factor)
        self.params_per_channel = params_per_channel
        # A vector z (and u) is projected onto a latent map of latent_channels at the low
        # resolution; a z that is already a map of z_channels (SpatialGaussianEncoder) is read
        # as it is, beside the projection of u alone.
        self.z_channels = z_channels
        projected = u_dim if z_channels else z_dim + u_dim
        self.projected_channels = latent_channels if projected else 0
        self.latent_channels = z_channels + self.projected_channels
        self.project = None
        if projected:
            self.project = nn.Sequential(
                nn.Linear(projected, latent_channels * self.lr_hw[0] * self.lr_hw[1]), nn.SiLU()
            )
        self._build(channels, hidden)

    def _latent_map(self, z, u):
        """The latents as ``(*, latent_channels, h, w)`` maps at the low resolution."""
        maps = []
        if self.z_channels:
            maps.append(z.view(z.shape[:-1] + (self.z_channels,) + self.lr_hw))
        if self.z_channels:
            vector = u
        else:
            vector = z if u is None else _concat_vectors(z, u)
        if self.project is not None and vector is not None:
            projected = self.project(vector)
            maps.append(projected.view(projected.shape[:-1] + (self.projected_channels,) + self.lr_hw))
        if len(maps) <= 1:  # none: a decoder of y alone (SRVAE's pixel_scale_from="y")
            return maps[0] if maps else None
        batch_shape = torch.broadcast_shapes(*(m.shape[:-3] for m in maps))
        return torch.cat([_expand_leading(m, batch_shape, 3) for m in maps], dim=-3)

    def _build(self, channels, hidden):
        width_lr = 2 * hidden
        # With z_injection="every" each later convolution also reads the latent map, so
        # that z reaches the output through one layer, not four (a lever against posterior
        # collapse: docs/results.md, "What z carries").
        extra = self.latent_channels if self.z_injection == "every" else 0
        self.net = nn.Sequential(
            nn.Conv2d(channels + self.latent_channels, width_lr, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width_lr + extra, width_lr, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width_lr + extra, width_lr, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width_lr + extra, channels * self.params_per_channel * self.factor**2, 3, padding=1),
            nn.PixelShuffle(self.factor),
        )

    def _network(self, inputs):
        """``(N, C + latent_channels, h, w)`` low-resolution inputs -> ``(N, P*C, H, W)``."""
        if self.z_injection == "input":
            return self.net(inputs)
        latent_map = inputs[:, -self.latent_channels :]
        h = inputs
        for layer in self.net:
            if isinstance(layer, nn.Conv2d) and h is not inputs:
                h = torch.cat([h, latent_map], dim=1)
            h = layer(h)
        return h

    def upsample(self, y):
        flat, batch_shape = _merge_leading(y, 3)
        up = F.interpolate(flat, size=self.out_shape[1:], mode=self.base, align_corners=False)
        return _split_leading(up, batch_shape)

    def residual(self, y, z, u=None):
        """The raw output ``(*, P * C, H, W)``: the residual over ``upsample(y)`` for P = 1."""
        latent_map = self._latent_map(z, u)
        if latent_map is None:
            inputs, batch_shape = y, y.shape[:-3]
        else:
            batch_shape = torch.broadcast_shapes(y.shape[:-3], latent_map.shape[:-3])
            inputs = torch.cat(
                [_expand_leading(y, batch_shape, 3), _expand_leading(latent_map, batch_shape, 3)], dim=-3
            )
        flat, _ = _merge_leading(inputs, 3)
        return _split_leading(self._network(_conv_input(flat)), batch_shape)

    def forward(self, y, z, u=None):
        residual = self.residual(y, z, u)
        if self.params_per_channel != 1:
            return residual
        return self.upsample(y) + residual


# ---------------------------------------------------------------------------
# DenseNet architecture (arch="densenet")
# ---------------------------------------------------------------------------


class _ExpELU(torch.autograd.Function):
    """ELU(x) = max(x, exp(clamp(x, -30, 0)) - 1), with the backward ELU's own: g * (min(out, 0) + 1).

    The identity holds because exp(x) - 1 >= x everywhere (and is 0 for x >= 0). Below -30,
    exp(x) - 1 rounds to -1 in float32 anyway; the clamp keeps exp away from the subnormal
    results below about -87, which the CPU computes many times slower.

    The forward allocates one tensor, the output, and takes the maximum into it: an evaluation's
    activations (1,024 particles of 64x32x32) are 268 MB each, which the allocator maps afresh
    on every call, so each further new tensor costs its page faults. The backward is aten's own
    ``elu_backward`` from the output, one pass, the same bits as g * (min(out, 0) + 1) for every
    finite output (tests/test_architectures.py).
    """

    @staticmethod
    def forward(ctx, x):
        out = torch.clamp(x, min=-30.0, max=0).exp_().sub_(1)
        torch.maximum(x, out, out=out)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.elu_backward(grad_output, 1.0, 1.0, 1.0, True, out)


class ELU(nn.ELU):
    """``nn.ELU`` (alpha 1) computed from ``exp`` on the CPU: the same function to float rounding.

    Why: torch's CPU ``elu`` goes through ``expm1``, which measured ~6x slower than ``exp`` on
    the 2-core AVX-512 VM of docs/performance.md; there it took 20 of the 38 seconds of 120
    steps of the photograph benchmark's model (cProfile), more than the convolutions.
    ``exp(x) - 1`` differs from ``expm1(x)`` by at most ~6e-8 (float32's rounding of exp near 1),
    far below anything a network's activations resolve. ``benchmarks/elu_time.py`` measures
    the two. On other devices, under ``torch.compile`` and for alpha != 1 it is ``nn.ELU``
    itself. No parameters: checkpoints are the same as with ``nn.ELU``.
    """

    def forward(self, x):
        if x.device.type != "cpu" or self.alpha != 1.0 or self.inplace or torch.compiler.is_compiling():
            return super().forward(x)
        return _ExpELU.apply(x)


#: Dense layers per block; each adds ``growth`` channels.
DENSE_STEPS = 3


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation gate on the channels (the srVAE code's ``CALayer``)."""

    def __init__(self, channels, reduction=8):
        super().__init__()
        inner = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, inner, 1),
            ELU(),
            nn.Conv2d(inner, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, h):
        return h * self.gate(h)


class DenseLayer(nn.Module):
    """ELU, 1x1 conv to ``4 growth`` bottleneck channels, ELU, 3x3 conv to ``growth``; concatenated."""

    def __init__(self, in_channels, growth):
        super().__init__()
        self.net = nn.Sequential(
            ELU(),
            nn.Conv2d(in_channels, 4 * growth, 1),
            ELU(),
            nn.Conv2d(4 * growth, growth, 3, padding=1),
        )

    def forward(self, h):
        return torch.cat([h, self.net(h)], dim=1)


class DenseBlock(nn.Module):
    """``steps`` dense layers and a channel-attention gate: ``in -> in + steps * growth`` channels."""

    def __init__(self, in_channels, growth, steps=DENSE_STEPS):
        super().__init__()
        layers = []
        for _ in range(steps):
            layers.append(DenseLayer(in_channels, growth))
            in_channels += growth
        layers.append(ChannelAttention(in_channels))
        self.net = nn.Sequential(*layers)
        self.out_channels = in_channels

    def forward(self, h):
        return self.net(h)


def _dense_stage(in_channels, out_channels, growth, stride=1):
    """A dense block, then ELU and a 3x3 convolution (stride 1 or 2) to ``out_channels``."""
    block = DenseBlock(in_channels, growth)
    return nn.Sequential(block, ELU(), nn.Conv2d(block.out_channels, out_channels, 3, stride=stride, padding=1))


class DenseFeatures(ConvFeatures):
    """DenseNet feature extractor ``(*, C, H, W) -> (*, F)`` (``arch="densenet"``).

    A 3x3 stem, then dense stages at full, half and quarter resolution (stride-2
    transitions, like :class:`ConvFeatures`), flattened: ``2 * hidden`` maps at
    ``ceil(H/4) x ceil(W/4)``. Growth rate ``hidden``.
    """

    def __init__(self, in_channels, image_hw, hidden=32):
        nn.Module.__init__(self)
        self.in_channels = in_channels
        self.image_hw = tuple(image_hw)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            _dense_stage(hidden, 2 * hidden, hidden, stride=2),
            _dense_stage(2 * hidden, 2 * hidden, hidden, stride=2),
            _dense_stage(2 * hidden, 2 * hidden, hidden),
            ELU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            probe = torch.zeros(1, in_channels, *self.image_hw)
            self.out_features = self.net(probe).shape[-1]


class DenseImageDecoder(ImageDecoder):
    """:class:`ImageDecoder` with dense stages (``arch="densenet"``).

    ``project`` (linear to ``2 hidden`` maps at quarter resolution), then a dense stage
    at each of the quarter, half and full resolutions, with nearest-neighbour resizing in
    between, and a 3x3 convolution to ``out_channels``.
    """

    def __init__(self, latent_dim, out_shape, hidden=32, out_channels=None):
        nn.Module.__init__(self)  # ImageDecoder's own stages are not built, only replaced
        self._build_projection(latent_dim, out_shape, hidden, out_channels, ELU())
        self.stage0 = _dense_stage(2 * hidden, 2 * hidden, hidden)
        self.stage1 = _dense_stage(2 * hidden, hidden, hidden)
        self.stage2 = nn.Sequential(
            _dense_stage(hidden, hidden, hidden),
            ELU(),
            nn.Conv2d(hidden, self.out_channels, 3, padding=1),
        )


class DenseSuperResolutionDecoder(SuperResolutionDecoder):
    """:class:`SuperResolutionDecoder` with dense stages (``arch="densenet"``).

    Low resolution: y and the projected latents, a 3x3 convolution and two dense stages,
    then a pixel shuffle to ``hidden`` high-resolution maps. High resolution (as the srVAE
    paper's p(x|y,z), which works at the size of x): those maps concatenated with the
    bilinear upsampling of y, one dense stage, and a 3x3 convolution to ``P * C`` raw
    parameters -- still a residual over ``upsample(y)``.
    """

    def _build(self, channels, hidden):
        width_lr = 2 * hidden
        self.lr_net = nn.Sequential(
            nn.Conv2d(channels + self.latent_channels, width_lr, 3, padding=1),
            _dense_stage(width_lr, width_lr, hidden),
            _dense_stage(width_lr, hidden * self.factor**2, hidden),
            nn.PixelShuffle(self.factor),
        )
        extra = self.latent_channels if self.z_injection == "every" else 0
        self.hr_net = nn.Sequential(
            _dense_stage(hidden + channels + extra, hidden, hidden),
            ELU(),
            nn.Conv2d(hidden, channels * self.params_per_channel, 3, padding=1),
        )

    def _network(self, inputs):
        channels = self.out_shape[0]
        up = F.interpolate(inputs[:, :channels], size=self.out_shape[1:], mode="bilinear", align_corners=False)
        hr_inputs = [self.lr_net(inputs), up]
        if self.z_injection == "every":  # the latent map again, at the high resolution
            hr_inputs.append(F.interpolate(inputs[:, channels:], size=self.out_shape[1:], mode="nearest"))
        return self.hr_net(torch.cat(hr_inputs, dim=1))


#: The network classes; a model's networks are its submodules of these types.
NETWORK_TYPES = (GaussianEncoder, SpatialGaussianEncoder, ImageDecoder, SuperResolutionDecoder)


def float32_outputs(module, args, output):
    """Forward hook: the network's floating-point outputs in float32.

    Under ``torch.autocast`` (bf16 training) the convolutions and linear layers run in
    bfloat16, but everything the ELBO computes from their outputs -- reparametrised
    samples, log-densities, KL divergences, sums over thousands of pixels -- stays in
    float32: the precision of the loss is not traded for speed, only that of the
    networks' internals. In float32 the hook returns the same tensors (no copy).
    """
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, tuple):
        return tuple(float32_outputs(module, args, item) for item in output)
    return output


def make_image_decoder(arch, latent_dim, out_shape, hidden=32, out_channels=None):
    """The ``arch`` image decoder: :class:`ImageDecoder` or :class:`DenseImageDecoder`."""
    _check_arch(arch)
    cls = ImageDecoder if arch == "small" else DenseImageDecoder
    return cls(latent_dim, out_shape, hidden, out_channels)


def make_sr_decoder(arch, out_shape, factor, z_dim, u_dim=0, hidden=32, params_per_channel=1, base="bilinear",
                    z_injection="input", z_channels=0):
    """The ``arch`` super-resolution decoder (:class:`SuperResolutionDecoder` or the dense one)."""
    _check_arch(arch)
    cls = SuperResolutionDecoder if arch == "small" else DenseSuperResolutionDecoder
    return cls(out_shape, factor, z_dim, u_dim, hidden, params_per_channel=params_per_channel, base=base,
               z_injection=z_injection, z_channels=z_channels)
