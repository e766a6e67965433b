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

# A floor on predicted standard deviations: keeps the analytic KL finite when an
# encoder is very confident, far below any scale that matters for 8-bit images.
MIN_SCALE = 1e-4


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
        return _split_leading(self.net(flat), batch_shape)


class GaussianEncoder(nn.Module):
    """A diagonal Gaussian over a latent vector from an image and an optional vector.

    ``forward(image, condition=None) -> (loc, scale)``, each ``(*, latent_dim)``.

    The image goes through convolutions once per distinct image; only then are its
    features broadcast against the condition. So p(z|y,u) under P particles runs the
    convolutions on the B images y, not on P*B copies of them.
    """

    def __init__(self, in_channels, image_hw, latent_dim, hidden=32, condition_dim=0):
        super().__init__()
        self.latent_dim = latent_dim
        self.condition_dim = condition_dim
        self.features = ConvFeatures(in_channels, image_hw, hidden)
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
        return loc, F.softplus(raw_scale) + MIN_SCALE


class ImageDecoder(nn.Module):
    """Latent vector to image mean, ``(*, latent_dim) -> (*, C, H, W)``.

    A linear layer to a quarter-resolution feature map, then two resize-and-convolve
    stages. Resizing to exact target sizes (rather than transposed convolutions) makes
    every H, W legal, odd ones included.
    """

    def __init__(self, latent_dim, out_shape, hidden=32):
        super().__init__()
        channels, height, width = out_shape
        self.out_shape = tuple(out_shape)
        self.sizes = [
            (math.ceil(height / 4), math.ceil(width / 4)),
            (math.ceil(height / 2), math.ceil(width / 2)),
            (height, width),
        ]
        self.base_channels = 2 * hidden
        h0, w0 = self.sizes[0]
        self.project = nn.Sequential(nn.Linear(latent_dim, self.base_channels * h0 * w0), nn.SiLU())
        self.stage1 = nn.Sequential(nn.Conv2d(2 * hidden, hidden, 3, padding=1), nn.SiLU())
        self.stage2 = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, channels, 3, padding=1),
        )

    def forward(self, latent):
        flat, batch_shape = _merge_leading(latent, 1)
        h = self.project(flat).view(-1, self.base_channels, *self.sizes[0])
        h = self.stage1(F.interpolate(h, size=self.sizes[1], mode="nearest"))
        h = self.stage2(F.interpolate(h, size=self.sizes[2], mode="nearest"))
        return _split_leading(h, batch_shape)


class SuperResolutionDecoder(nn.Module):
    """Mean of p(x|y,z) (eq. 15) or, with ``u_dim > 0``, of p(x|y,z,u) (sec. 4.3.1).

    ``forward(y, z, u=None) -> (*, C, H, W)``.

    The network predicts a residual on top of the bilinear upsampling of y: the
    low-resolution image already fixes the coarse content of x, so z (and u) only
    have to explain the detail y lacks -- the division of labour of section 3.1.
    Its inputs (y and the latents) carry no information at the high resolution, so
    the convolutions run on the low-resolution grid and a final pixel shuffle
    (Shi et al. 2016) rearranges ``C * factor^2`` channels into the high-resolution
    residual: ``factor^2`` times cheaper than convolving at the size of x.
    """

    def __init__(self, out_shape, factor, z_dim, u_dim=0, hidden=32, latent_channels=8):
        super().__init__()
        channels, height, width = out_shape
        self.out_shape = tuple(out_shape)
        self.lr_hw = (height // factor, width // factor)
        self.latent_channels = latent_channels
        self.project = nn.Sequential(
            nn.Linear(z_dim + u_dim, latent_channels * self.lr_hw[0] * self.lr_hw[1]), nn.SiLU()
        )
        width_lr = 2 * hidden
        self.net = nn.Sequential(
            nn.Conv2d(channels + latent_channels, width_lr, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width_lr, width_lr, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width_lr, width_lr, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width_lr, channels * factor**2, 3, padding=1),
            nn.PixelShuffle(factor),
        )

    def upsample(self, y):
        flat, batch_shape = _merge_leading(y, 3)
        up = F.interpolate(flat, size=self.out_shape[1:], mode="bilinear", align_corners=False)
        return _split_leading(up, batch_shape)

    def forward(self, y, z, u=None):
        latents = z if u is None else _concat_vectors(z, u)
        latent_map = self.project(latents)
        latent_map = latent_map.view(latent_map.shape[:-1] + (self.latent_channels,) + self.lr_hw)
        batch_shape = torch.broadcast_shapes(y.shape[:-3], latent_map.shape[:-3])
        inputs = torch.cat(
            [_expand_leading(y, batch_shape, 3), _expand_leading(latent_map, batch_shape, 3)], dim=-3
        )
        flat, _ = _merge_leading(inputs, 3)
        residual = _split_leading(self.net(flat), batch_shape)
        return self.upsample(y) + residual
