"""What the latents carry (pyro_srvae.metrics.latents, the SR metrics' latent share and best of S), against
closed forms; free bits; and a toy whose y -> x is two-to-one, which z must carry."""

import math

import pytest
import torch

import pyro
import pyro.distributions as dist

from pyro_srvae import SRVAE, make_elbo
from pyro_srvae.cli import main
from pyro_srvae.model.elbo import FreeBits_ELBO
from pyro_srvae.metrics.evaluate import evaluate_model
from pyro_srvae.metrics.sr_scores import psnr, super_resolution_metrics
from pyro_srvae.metrics.latents import ACTIVE_UNIT_THRESHOLD, kl_per_image, latent_metrics_from_sums, latent_sums
from pyro_srvae.model.distributions import block_mean, nearest_upsample
from pyro_srvae.model.image_model import SuperResolution
from pyro_srvae.training.config import MODEL_DEFAULTS, ConfigError, TrainConfig
from pyro_srvae.training.factory import build_model
from conftest import tiny_images


class GaussianPair:
    """p(z|c) = N(a c, s_p^2), q(z|x) = N(m(x), s_q^2) with known parameters, over images x.

    ``c`` is the image mean: a conditional prior whose mean moves with the data, as p(z|y,u) does.
    """

    def __init__(self, posterior_loc, prior_shift=0.0, q_scale=0.5, p_scale=2.0):
        self.posterior_loc, self.prior_shift = posterior_loc, prior_shift
        self.q_scale, self.p_scale = q_scale, p_scale
        self.z_dim = None

    def _prior_loc(self, x):
        return self.prior_shift * x.mean((1, 2, 3))[:, None].expand(-1, 3)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self._prior_loc(x), self.p_scale).to_event(1))

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.posterior_loc(x), self.q_scale).to_event(1))


def _gaussian_kl(m1, s1, m2, s2):
    return (math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5).sum(-1)


def test_kl_per_image_is_the_closed_form_and_its_bits_divide_by_log_2():
    x = tiny_images(6)
    pair = GaussianPair(lambda x: torch.stack([x.mean((1, 2, 3)), -x.std((1, 2, 3)), torch.ones(len(x))], -1))
    kl = kl_per_image(pair, x)["z"]
    expected = _gaussian_kl(pair.posterior_loc(x), 0.5, torch.zeros(6, 3), 2.0)
    torch.testing.assert_close(kl, expected)
    metrics = latent_metrics_from_sums(latent_sums(pair, x), num_images=6)
    assert metrics["kl_z_bits"] == pytest.approx(expected.mean().item() / math.log(2), rel=1e-6)
    assert metrics["z_dim"] == 3


def test_active_units_count_the_dimensions_whose_posterior_mean_varies():
    x = torch.rand(200, 1, 4, 4)
    # Dimension 0 varies with x by far more than the threshold, dimension 1 by far less, 2 not at all.
    pair = GaussianPair(lambda x: torch.stack([10 * x.mean((1, 2, 3)), 0.01 * x.mean((1, 2, 3)), torch.ones(len(x))], -1),
                        p_scale=1.0)
    metrics = latent_metrics_from_sums(latent_sums(pair, x), num_images=200)
    assert metrics["active_z"] == 1
    assert (10 * x.mean((1, 2, 3))).var().item() > 10 * ACTIVE_UNIT_THRESHOLD


def test_a_posterior_that_only_follows_its_conditional_prior_has_no_active_unit():
    # q(z|x) moves with x exactly as p(z|c) does: z learns nothing from x beyond c, however much
    # its posterior mean varies across images. Measured against the prior, no unit is active.
    x = torch.rand(200, 1, 4, 4) * 4
    pair = GaussianPair(lambda x: 3 * x.mean((1, 2, 3))[:, None].expand(-1, 3), prior_shift=3.0, p_scale=1.0)
    assert 3 * x.mean((1, 2, 3)).var().item() > 10 * ACTIVE_UNIT_THRESHOLD
    metrics = latent_metrics_from_sums(latent_sums(pair, x), num_images=200)
    assert metrics["active_z"] == 0


class FixedPredictive:
    """A stand-in SR model whose predictive is given: decoder means ``means`` (S, B, C, H, W), noise std."""

    factor = 2

    def __init__(self, means, noise_std):
        self.means, self.noise_std = means, noise_std

    def downscale(self, x):
        return block_mean(x, 2)

    def super_resolve(self, y, num_samples):
        noise = self.noise_std * torch.randn(self.means.shape, generator=torch.Generator().manual_seed(0))
        samples = self.means + noise
        return SuperResolution(
            mean=self.means.mean(0), std=samples.std(0), samples=samples, std_latent=self.means.std(0),
            std_noise=torch.full_like(self.means[0], self.noise_std), means=self.means,
        )


def test_the_latent_share_is_the_latent_part_of_the_variance():
    x = tiny_images(3)
    offsets = torch.tensor([-0.2, 0.2, -0.2, 0.2]).view(4, 1, 1, 1, 1)
    means = x + offsets  # the latents move every pixel by +-0.2: latent variance 0.04 * 4/3 (unbiased)
    latent_var = offsets.flatten().var().item()
    for noise_std in (0.0, 0.1, 0.4):
        metrics = super_resolution_metrics(FixedPredictive(means, noise_std), x, num_samples=4)
        assert metrics["sr_latent_share"] == pytest.approx(latent_var / (latent_var + noise_std**2), rel=1e-5)
    collapsed = super_resolution_metrics(FixedPredictive((x + 0.05).expand(4, *x.shape), 0.1), x, num_samples=4)
    assert collapsed["sr_latent_share"] == 0.0 and collapsed["sr_best_of_gain"] == pytest.approx(0.0, abs=1e-5)


def test_best_of_s_is_the_psnr_of_the_closest_decoder_mean():
    x = tiny_images(2) * 0.5 + 0.25
    means = torch.stack([x + 0.1, x - 0.05, x + 0.2])  # the second is closest: PSNR 10 log10(1 / 0.05^2)
    metrics = super_resolution_metrics(FixedPredictive(means, 0.0), x, num_samples=3)
    assert metrics["sr_best_of_psnr"] == pytest.approx(10 * math.log10(1 / 0.05**2), rel=1e-5)
    mean_psnr = psnr(means.mean(0), x).mean().item()  # the mean is x + 0.0833
    assert metrics["sr_best_of_gain"] == pytest.approx(10 * math.log10(1 / 0.05**2) - mean_psnr, rel=1e-4)
    draws = torch.stack([psnr(m, x) for m in means]).mean().item()
    assert metrics["sr_draw_psnr"] == pytest.approx(draws, rel=1e-5)


def test_evaluate_model_reports_what_the_latents_carry():
    model = SRVAE((1, 8, 8), guide="full", u_dim=3, z_dim=5, hidden=4)
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    metrics = evaluate_model(model, images, elbo_samples=2, iw_samples=2, sr_samples=4, batch_size=4)
    assert (metrics["u_dim"], metrics["z_dim"]) == (3, 5)
    assert metrics["kl_u_bits"] > 0 and metrics["kl_z_bits"] > 0
    assert 0 <= metrics["active_z"] <= 5 and 0 < metrics["sr_latent_share"] < 1


# --------------------------------------------------------------------------- free bits


def _site_kl_per_dim(model, x, name):
    guide_trace = pyro.poutine.trace(model.guide).get_trace(x)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    q, p = guide_trace.nodes[name]["fn"].base_dist, model_trace.nodes[name]["fn"].base_dist
    return torch.distributions.kl_divergence(q, p)


@pytest.mark.parametrize("free_bits", [0.0, 0.05, 100.0])
def test_free_bits_raise_each_dimension_of_z_to_the_threshold(free_bits):
    model = SRVAE((1, 8, 8), guide="full", u_dim=3, z_dim=5, hidden=4)
    x = tiny_images(4)
    pyro.set_rng_seed(1)
    plain = make_elbo("meanfield").loss(model.model, model.guide, x)
    pyro.set_rng_seed(1)
    objective = make_elbo("meanfield", free_bits=free_bits)
    assert isinstance(objective, FreeBits_ELBO) == (free_bits > 0)
    loss = objective.loss(model.model, model.guide, x)
    pyro.set_rng_seed(1)
    per_dim_means = _site_kl_per_dim(model, x, "z").mean(0)
    # The same draws: the loss moves by B * sum_d max(0, threshold - mean KL_d), z's dimensions only.
    expected = 4 * (free_bits - per_dim_means).clamp(min=0).sum().item()
    assert loss - plain == pytest.approx(expected, rel=1e-4, abs=1e-3)
    if free_bits == 100.0:
        assert expected > 0


def test_free_bits_need_the_meanfield_objective():
    with pytest.raises(ValueError, match="free bits are a mean-field objective"):
        make_elbo("trace", free_bits=0.5)
    with pytest.raises(ValueError, match="free_bits must be a finite number"):
        FreeBits_ELBO(-1.0)


# --------------------------------------------------------------------------- several x for one y


PATTERN = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(4, 4).view(1, 1, 8, 8)  # zero block means
AMPLITUDE = 0.15


def two_to_one_images(n, generator, per_block=False):
    """x = nearest_upsample(y) + s * 0.15 * PATTERN with s = +-1 at random: y alone cannot tell s.

    One sign per image, or (``per_block``) one per 2x2 block, each its own coin."""
    y = 0.3 + 0.4 * torch.rand(n, 1, 4, 4, generator=generator)
    sign_shape = (n, 1, 4, 4) if per_block else (n, 1, 1, 1)
    signs = torch.randint(0, 2, sign_shape, generator=generator).float() * 2 - 1
    return nearest_upsample(y, 2) + nearest_upsample(signs, 2) * AMPLITUDE * PATTERN if per_block else \
        nearest_upsample(y, 2) + signs * AMPLITUDE * PATTERN


def _train_two_to_one(model, per_block=False, steps=400):
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    elbo = make_elbo("meanfield")
    for _ in range(steps):
        x = two_to_one_images(64, generator, per_block)
        optimizer.zero_grad()
        elbo.differentiable_loss(model.model, model.guide, x).backward()
        optimizer.step()
    return model


def _signs_proposed(model, per_block, num_samples=64):
    """The sign of the pattern in each decoder-mean draw for one y, ``(S,)`` or per block ``(S, 16)``:
    the detail's projection on PATTERN over the image or over each block, in units of the amplitude."""
    y = torch.full((1, 1, 4, 4), 0.5)
    detail = model.super_resolve(y, num_samples).means - nearest_upsample(y, 2)
    products = (detail * PATTERN).squeeze(2).squeeze(1)  # (S, 8, 8)
    if per_block:
        return products.unfold(1, 2, 2).unfold(2, 2, 2).sum((-1, -2)).flatten(1) / 4 / AMPLITUDE
    return products.flatten(1).sum(1) / PATTERN.square().sum() / AMPLITUDE


def assert_z_proposes_both_signs(model, per_block=False):
    coefficients = _signs_proposed(model, per_block)
    positive = (coefficients > 0.5).float().mean(0)
    negative = (coefficients < -0.5).float().mean(0)
    both = (positive > 0.2) & (positive < 0.8) & (negative > 0.2) & (negative < 0.8)
    # One sign per image: the image's. Per block: at least 10 blocks of 16. A trained map may lose
    # a border column: the encoder and the decoder can learn the same one-pixel shift (their 3x3
    # convolutions allow it), and the column it pushes out has no coefficient (seen in one seed of three).
    assert both.float().mean().item() >= (10 / 16 if per_block else 1.0), (positive, negative)


class WithoutZ(SRVAE):
    """The srVAE with z switched off: the SR decoder reads zeros in its place."""

    def _x_parameters(self, y, z, u):
        return super()._x_parameters(y, torch.zeros_like(z), u)


@pytest.mark.parametrize("guide", ["simple", "full"])
def test_a_vector_z_carries_the_sign_that_y_cannot_tell(guide):
    model = _train_two_to_one(SRVAE((1, 8, 8), guide=guide, u_dim=2, z_dim=2, hidden=8, validate_inputs=False))
    assert_z_proposes_both_signs(model)


def test_a_z_map_carries_the_sign_of_each_block():
    model = SRVAE((1, 8, 8), guide="full", u_dim=2, z_channels=1, z_injection="every", hidden=8, validate_inputs=False)
    assert_z_proposes_both_signs(_train_two_to_one(model, per_block=True), per_block=True)


@pytest.mark.parametrize("per_block", [False, True])
def test_the_two_to_one_check_fails_when_z_is_switched_off(per_block):
    layout = dict(z_channels=1, z_injection="every") if per_block else dict(z_dim=2)
    model = _train_two_to_one(WithoutZ((1, 8, 8), guide="full", u_dim=2, hidden=8, validate_inputs=False, **layout), per_block)
    with pytest.raises(AssertionError):
        assert_z_proposes_both_signs(model, per_block)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(free_bits=-0.5), "--free-bits must be a number of nats >= 0"),
        (dict(free_bits=float("nan")), "--free-bits must be a number of nats >= 0"),
        (dict(free_bits=0.5, elbo="trace"), "--free-bits is a mean-field objective"),
        (dict(free_bits=0.5, model="vae", prior="mog"), "--free-bits needs a diagonal Gaussian p"),
        (dict(z_channels=2, model="vae"), "--z-channels lays out the srVAE's z"),
        (dict(z_channels=-1), "--z-channels must be >= 0"),
        (dict(z_injection="every", model="vae"), "--z-injection shapes the srVAE's SR decoder"),
    ],
)
def test_the_latent_levers_refuse_impossible_settings(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options).validate()


def test_the_command_line_refuses_a_negative_free_bits_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--free-bits", "-1", "--out", "unused"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("--free-bits must be a number of nats >= 0, got -1.0")


def test_the_srvae_default_is_a_z_map_read_by_every_layer_and_old_runs_keep_their_vector():
    config = TrainConfig(guide="full").validate()
    assert (config.z_channels, config.z_injection) == (1, "every") == tuple(MODEL_DEFAULTS["srvae"].values())
    model = build_model(config, (1, 28, 28))
    assert model.z_dim == 14 * 14 and model.decoder_x.z_injection == "every"
    assert TrainConfig(model="vae").validate().z_channels == 0
    # a configuration stored before the fields existed is the vector z read by the first layer
    stored = TrainConfig(guide="full").to_dict()
    del stored["z_channels"], stored["z_injection"]
    old = TrainConfig.from_dict(stored)
    assert (old.z_channels, old.z_injection) == (0, "input") and build_model(old, (1, 28, 28)).z_dim == 32
