"""Network architectures: the default "small" nets are unchanged, "densenet" works end to end."""

import math

import pytest
import torch

import pyro
from pyro.infer import SVI
from pyro.optim import Adam

from pyro_srvae import SRVAE, VAE, make_elbo
from pyro_srvae.model.image_model import downscale
from pyro_srvae.model import networks
from pyro_srvae.model.networks import (
    ARCHS,
    DenseFeatures,
    DenseImageDecoder,
    DenseSuperResolutionDecoder,
    GaussianEncoder,
    ImageDecoder,
    SuperResolutionDecoder,
)
from conftest import tiny_images

# The state_dict of the default models, as before likelihood= and arch= existed: checkpoints
# written by earlier versions must keep loading.
VAE_DEFAULT_STATE = {
    "log_gamma_x": (), "prior_z.loc": (32,), "prior_z.scale": (32,),
    "encoder_z.features.net.0.weight": (32, 1, 3, 3), "encoder_z.features.net.0.bias": (32,),
    "encoder_z.features.net.2.weight": (32, 32, 3, 3), "encoder_z.features.net.2.bias": (32,),
    "encoder_z.features.net.4.weight": (64, 32, 3, 3), "encoder_z.features.net.4.bias": (64,),
    "encoder_z.features.net.6.weight": (64, 64, 3, 3), "encoder_z.features.net.6.bias": (64,),
    "encoder_z.head.0.weight": (256, 3136), "encoder_z.head.0.bias": (256,),
    "encoder_z.head.2.weight": (64, 256), "encoder_z.head.2.bias": (64,),
    "decoder_x.project.0.weight": (3136, 32), "decoder_x.project.0.bias": (3136,),
    "decoder_x.stage1.0.weight": (32, 64, 3, 3), "decoder_x.stage1.0.bias": (32,),
    "decoder_x.stage2.0.weight": (32, 32, 3, 3), "decoder_x.stage2.0.bias": (32,),
    "decoder_x.stage2.2.weight": (1, 32, 3, 3), "decoder_x.stage2.2.bias": (1,),
}
SRVAE_FULL_MOG_DECODERS = {
    "log_gamma_x": (), "log_gamma_y": (),
    "prior_u.logits": (10,), "prior_u.means": (10, 16), "prior_u.raw_scales": (10, 16),
    "decoder_y.project.0.weight": (1024, 16), "decoder_y.stage2.2.weight": (1, 32, 3, 3),
    "decoder_x.project.0.weight": (1568, 48), "decoder_x.project.0.bias": (1568,),
    "decoder_x.net.0.weight": (64, 9, 3, 3), "decoder_x.net.2.weight": (64, 64, 3, 3),
    "decoder_x.net.4.weight": (64, 64, 3, 3), "decoder_x.net.6.weight": (4, 64, 3, 3), "decoder_x.net.6.bias": (4,),
    "prior_z.head.0.weight": (256, 1040), "encoder_u.head.2.weight": (32, 256),
    "encoder_z.features.net.0.weight": (32, 2, 3, 3), "encoder_z.head.0.weight": (256, 3152),
}


def _shapes(model):
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


#: The per-band standardization's buffers (identity by default), added after these checkpoints.
DATA_SCALING_STATE = {"data_offset": (1, 1, 1), "data_scale": (1, 1, 1)}


def test_default_state_dicts_are_unchanged():
    assert _shapes(VAE()) == {**VAE_DEFAULT_STATE, **DATA_SCALING_STATE}
    explicit = VAE(likelihood="gaussian", arch="small")
    assert _shapes(explicit) == {**VAE_DEFAULT_STATE, **DATA_SCALING_STATE}
    full = _shapes(SRVAE(guide="full", prior="mog"))
    assert len(full) == 61 and sum(math.prod(s) for s in full.values()) == 1776433 + 2
    assert {name: full[name] for name in SRVAE_FULL_MOG_DECODERS} == SRVAE_FULL_MOG_DECODERS
    simple = SRVAE()
    assert len(simple.state_dict()) == 60
    # A state dict written before the buffers existed still loads, strictly, as the identity.
    old = {name: value for name, value in simple.state_dict().items() if name not in DATA_SCALING_STATE}
    SRVAE().load_state_dict(old)
    assert type(simple.decoder_x) is SuperResolutionDecoder and type(simple.decoder_y) is ImageDecoder
    assert isinstance(simple.gamma_x, torch.Tensor) and isinstance(simple.gamma_y, torch.Tensor)


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch 'resnet'; expected one of small, densenet"):
        SRVAE((1, 8, 8), arch="resnet")
    with pytest.raises(ValueError, match="unknown arch"):
        VAE((1, 8, 8), arch="resnet")


def test_densenet_modules_are_used_and_keep_the_model_attributes():
    model = SRVAE((3, 16, 16), guide="full", arch="densenet", hidden=4)
    assert isinstance(model.decoder_x, DenseSuperResolutionDecoder)
    assert isinstance(model.decoder_y, DenseImageDecoder)
    for encoder in (model.encoder_u, model.encoder_z, model.prior_z):
        assert isinstance(encoder, GaussianEncoder) and isinstance(encoder.features, DenseFeatures)
    assert hasattr(model.decoder_x, "project")
    assert model.decoder_x.upsample(torch.rand(2, 3, 8, 8)).shape == (2, 3, 16, 16)
    assert model.arch == "densenet" and set(ARCHS) == {"small", "densenet"}


@pytest.mark.parametrize("arch", ARCHS)
def test_networks_accept_leading_particle_dimensions(arch):
    torch.manual_seed(0)
    model = SRVAE((3, 12, 12), guide="full", arch=arch, likelihood="dlogistic-mix", likelihood_components=2, hidden=4)
    y = torch.rand(5, 3, 6, 6)
    u = torch.randn(7, 5, model.u_dim)  # (P, B, D) latents against (B, ...) images
    z = torch.randn(7, 5, model.z_dim)
    raw = model.decoder_x.residual(y, z, u)
    assert raw.shape == (7, 5, 3 * 6, 12, 12)
    # the particle dimension is a pure batch dimension: particle 3 equals a direct call
    assert torch.allclose(raw[3], model.decoder_x.residual(y, z[3], u[3]), atol=1e-5)
    assert model.decoder_y(u).shape == (7, 5, 3 * 6, 6, 6)
    loc, scale = model.prior_z(y, u)
    assert loc.shape == scale.shape == (7, 5, model.z_dim)


def test_cifar_shaped_densenet_srvae_trains_with_vectorized_particles():
    """(3, 32, 32) -> (3, 16, 16), full guide, DenseNet nets: forward, backward, the loss falls."""
    torch.manual_seed(0)
    x = tiny_images(4, (3, 32, 32))
    model = SRVAE((3, 32, 32), guide="full", arch="densenet", hidden=4, z_dim=8, u_dim=4)
    elbo = make_elbo("meanfield", num_particles=2, vectorize_particles=True)
    loss = elbo.differentiable_loss(model.model, model.guide, x)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    def average_loss():
        pyro.set_rng_seed(7)
        return make_elbo("meanfield", num_particles=8, vectorize_particles=True).loss(model.model, model.guide, x)

    before = average_loss()
    svi = SVI(model.model, model.guide, Adam({"lr": 3e-3}), elbo)
    for _ in range(20):
        assert math.isfinite(svi.step(x))
    after = average_loss()
    assert after < before - 0.1 * abs(before)
    sr = model.super_resolve(model.downscale(x), num_samples=3)
    assert sr.samples.shape == (3, 4, 3, 32, 32)
    assert model.sample(2).x.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("likelihood", ["gaussian", "dlogistic-mix"])
def test_densenet_vae_odd_sizes_and_one_channel(likelihood):
    model = VAE((1, 13, 11), arch="densenet", likelihood=likelihood, likelihood_components=2, hidden=4)
    x = tiny_images(3, (1, 13, 11))
    elbo = make_elbo("trace", num_particles=2, vectorize_particles=True)
    loss = elbo.differentiable_loss(model.model, model.guide, x)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.sample(2).shape == (2, 1, 13, 11) and model.reconstruct(x).shape == x.shape


def test_densenet_default_size_is_gpu_scale():
    """The default width builds a model of a few million parameters for CIFAR-10, not a toy."""
    model = SRVAE((3, 32, 32), guide="full", arch="densenet", likelihood="dlogistic-mix")
    count = sum(p.numel() for p in model.parameters())
    assert 1e6 < count < 5e7


def test_sr_arch_and_sr_hidden_change_the_sr_decoder_alone():
    """``sr_arch``/``sr_hidden`` default to ``arch``/``hidden``; given, only p(x|y,z,u)'s network changes."""
    torch.manual_seed(0)
    plain = SRVAE((1, 12, 12), guide="full", arch="small", hidden=4)
    assert type(plain.decoder_x) is SuperResolutionDecoder and (plain.sr_arch, plain.sr_hidden) == ("small", 4)
    dense = SRVAE((1, 12, 12), guide="full", arch="densenet", hidden=4)
    assert type(dense.decoder_x) is DenseSuperResolutionDecoder
    mixed = SRVAE((1, 12, 12), guide="full", arch="small", hidden=4, sr_arch="densenet", sr_hidden=6)
    assert type(mixed.decoder_x) is DenseSuperResolutionDecoder and mixed.decoder_x.lr_net[0].out_channels == 12
    for name in ("encoder_u", "encoder_z", "prior_z", "decoder_y"):
        plain_shapes = [p.shape for p in getattr(plain, name).parameters()]
        mixed_shapes = [p.shape for p in getattr(mixed, name).parameters()]
        assert plain_shapes == mixed_shapes, name  # every other network is the small width-4 one
    x = torch.rand(3, 1, 12, 12)
    loss = pyro.infer.TraceMeanField_ELBO().differentiable_loss(mixed.model, mixed.guide, x)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in mixed.decoder_x.parameters())
    assert mixed.super_resolve(downscale(x), num_samples=2).mean.shape == (3, 1, 12, 12)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_zero_residual_over_the_bicubic_base_is_the_consistent_bicubic_baseline(arch):
    """``sr_base="bicubic"``: the SR decoder's base is the bicubic upsampling of y, so with its
    last layer zeroed the consistent model's SR mean is ``bicubic + nearest_up(y - A bicubic)``."""
    from pyro_srvae.metrics.sr_scores import bicubic_upsample, bilinear_upsample, make_consistent

    torch.manual_seed(0)
    model = SRVAE((1, 12, 12), guide="full", arch=arch, hidden=4, sr_base="bicubic")
    last = model.decoder_x.net[-2] if arch == "small" else model.decoder_x.hr_net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    y = 0.25 + 0.5 * torch.rand(3, 1, 6, 6)  # bicubic stays inside [0, 1], where the baseline's clamp is idle
    mean = model.super_resolve(y, num_samples=4).mean
    assert torch.allclose(mean, make_consistent(bicubic_upsample(y, 2), y, 2), atol=1e-6)
    assert not torch.allclose(mean, make_consistent(bilinear_upsample(y, 2), y, 2), atol=1e-3)
    default = SRVAE((1, 12, 12), guide="full", arch=arch, hidden=4)
    assert default.decoder_x.base == "bilinear"
    assert torch.allclose(default.decoder_x.upsample(y), bilinear_upsample(y, 2), atol=1e-6)
    with pytest.raises(ValueError, match="unknown sr_base 'nearest'; expected one of bilinear, bicubic"):
        SRVAE((1, 12, 12), sr_base="nearest")


def test_the_package_elu_is_torch_elu_to_float_rounding():
    """networks.ELU (exp-based on the CPU) computes nn.ELU's values and gradients, far negative included."""
    points = torch.cat([torch.linspace(-120.0, 120.0, 24001), 1e-3 * torch.randn(10000, generator=torch.Generator().manual_seed(0))])
    ours, reference = points.clone().requires_grad_(), points.clone().requires_grad_()
    out, expected = networks.ELU()(ours), torch.nn.ELU()(reference)
    assert (out - expected).abs().max() <= 1.2e-7
    weights = torch.linspace(-1.0, 1.0, points.numel())
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    assert (ours.grad - reference.grad).abs().max() <= 1.2e-7
    x = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(networks.ELU(), (x,))


def test_the_package_elu_keeps_its_bits_from_one_allocation_and_aten_s_backward():
    """The forward taken into one tensor and aten's elu_backward give the bits of the plain formulas
    max(x, exp(clamp(x, -30, 0)) - 1) and g * (min(out, 0) + 1), on channels-last activations too:
    every stored number of the photograph recipes was trained with those."""
    generator = torch.Generator().manual_seed(2)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, -1e-10, 1e-10, -2.98e-8, -30.0, -31.0, -104.0, -1e30, 1e30,
                            float("inf"), float("-inf")])  # fmt: skip
    scales = 10.0 ** torch.randint(-9, 3, (8 * 16 * 8 * 8 - special.numel(),), generator=generator)
    points = torch.cat([special, torch.randn(scales.shape, generator=generator) * scales])
    for x in (points, points.reshape(8, 16, 8, 8).contiguous(memory_format=torch.channels_last)):
        grad = torch.empty_like(x).normal_(generator=generator)
        ours = x.clone().requires_grad_()
        out = networks.ELU()(ours)
        out.backward(grad)
        expected = torch.maximum(x, torch.clamp(x, min=-30.0, max=0).exp_().sub_(1))
        assert torch.equal(out, expected) and out.stride() == x.stride()
        assert torch.equal(ours.grad, grad * torch.clamp(expected, max=0).add_(1))


def test_the_densenet_networks_use_the_package_elu():
    model = SRVAE((1, 8, 8), arch="densenet", hidden=4)
    activations = [m for m in model.modules() if isinstance(m, torch.nn.ELU)]
    assert activations and all(isinstance(m, networks.ELU) for m in activations)


def test_latent_scales_are_the_softplus_below_three_and_capped_at_max_scale():
    """bounded_scale leaves the scales of ordinary training as before (bit for bit below 2.9, within one
    float32 rounding below 3: where the rounding falls depends on the CPU's exp) and stops the runaway."""
    raw = torch.linspace(-30.0, 2.8, 5001)  # scales up to 2.86
    assert torch.equal(networks.bounded_scale(raw), torch.nn.functional.softplus(raw) + networks.MIN_SCALE)
    raw = torch.linspace(2.8, 2.95, 5001)  # scales 2.86 to 3.0
    torch.testing.assert_close(networks.bounded_scale(raw), torch.nn.functional.softplus(raw) + networks.MIN_SCALE,
                               rtol=1.2e-7, atol=0.0)  # fmt: skip
    raw = torch.cat([torch.linspace(-30.0, 60.0, 9001), torch.tensor([1e3, 1e6, 1e30])]).requires_grad_()
    scale = networks.bounded_scale(raw)
    assert (scale > 0).all() and (scale <= networks.MAX_SCALE).all()
    assert (scale[1:9001] >= scale[:9000] - 1e-5).all()  # monotone, to float rounding near the ceiling
    assert scale[-1].item() == pytest.approx(networks.MAX_SCALE)
    scale.sum().backward()
    assert torch.isfinite(raw.grad).all() and (raw.grad >= 0).all()
    encoder = GaussianEncoder(1, (8, 8), latent_dim=3, hidden=4)
    with torch.no_grad():
        encoder.head[-1].bias[3:] = 1e4  # the raw scales' biases
    _, encoder_scale = encoder(torch.rand(2, 1, 8, 8))
    assert encoder_scale.max() <= networks.MAX_SCALE and encoder_scale.min() > networks.MAX_SCALE - 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("guide", ["simple", "full"])
def test_a_spatial_z_is_a_low_resolution_map_read_where_it_lies(arch, guide):
    torch.manual_seed(0)
    model = SRVAE((1, 16, 16), guide=guide, arch=arch, z_channels=2, u_dim=3, hidden=4)
    assert model.z_dim == 2 * 8 * 8 and model.z_channels == 2
    x = torch.rand(2, 1, 16, 16)
    y, u = model.downscale(x), torch.randn(2, 3)
    # q(z|x,.) of an image changed in its top-left corner: the coefficients far from it do not move.
    changed = x.clone()
    changed[:, :, :2, :2] = 1 - changed[:, :, :2, :2]
    loc, _ = model.encode_z(x, y, u)
    loc_changed, _ = model.encode_z(changed, model.downscale(changed), u)
    far = (loc - loc_changed).view(2, 2, 8, 8)[:, :, 5:, 5:]  # 3 convolutions see 3 pixels away, no further
    assert torch.equal(far, torch.zeros_like(far)) and not torch.equal(loc, loc_changed)
    # a z coefficient moves the SR decoder's output near its own pixel only (the small decoder's
    # four low-resolution convolutions see 4 pixels away; the dense one's stages see further)
    z = torch.randn(2, model.z_dim)
    z_changed = z.view(2, 2, 8, 8).clone()
    z_changed[:, :, 0, 0] += 3.0
    moved = (model.decode_x(y, z_changed.flatten(1), u) - model.decode_x(y, z, u)).abs()
    assert moved[..., :2, :2].amax() > 0
    if arch == "small":
        assert moved[..., 10:, 10:].amax() == 0  # beyond 2 * (4 + 1) HR pixels: nothing


def test_a_spatial_z_takes_leading_particle_dimensions():
    torch.manual_seed(0)
    model = SRVAE((3, 12, 12), guide="full", z_channels=1, hidden=4)
    x = torch.rand(5, 3, 12, 12)
    y = model.downscale(x)
    u = torch.randn(7, 5, model.u_dim)
    loc, scale = model.prior_z(y, u)
    assert loc.shape == scale.shape == (7, 5, 36)
    assert torch.allclose(loc[3], model.prior_z(y, u[3])[0], atol=1e-6)
    q_loc, _ = model.encode_z(x, y, u)
    assert torch.allclose(q_loc[2], model.encode_z(x, y, u[2])[0], atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_z_injection_every_reaches_the_output_past_the_first_layer(arch):
    torch.manual_seed(0)
    y, u = torch.rand(2, 1, 8, 8), torch.randn(2, 3)
    z1, z2 = torch.randn(2, 5), torch.randn(2, 5)
    for injection in ("input", "every"):
        model = SRVAE((1, 16, 16), guide="full", arch=arch, u_dim=3, z_dim=5, hidden=4, z_injection=injection)
        first = model.decoder_x.net[0] if arch == "small" else model.decoder_x.lr_net[0]
        with torch.no_grad():
            first.weight[:, 1:] = 0  # the first layer no longer reads the latent map
        reads_z = not torch.equal(model.decode_x(y, z1, u), model.decode_x(y, z2, u))
        assert reads_z == (injection == "every"), injection
    with pytest.raises(ValueError, match="unknown z_injection 'middle'"):
        SRVAE((1, 16, 16), z_injection="middle")
