"""The super-resolution predictive and its scores: std and its parts, coverage, CRPS, log p(x|y).

Closed forms where they exist: the consistent Gaussian's conditional variance
gamma^2 (1 - 1/f^2), a linear-Gaussian model's log p(x, y) and log p(y), the Gaussian CRPS,
and the coverage of draws from a known Gaussian.
"""

import math

import pytest
import torch

import pyro
import pyro.distributions as dist

from pyro_srvae import SRVAE, SuperResolution, TrainConfig, train
from pyro_srvae.data.batching import dequantize
from pyro_srvae.metrics.evaluate import evaluate_model
from pyro_srvae.metrics.likelihood import iw_conditional_log_likelihood
from pyro_srvae.metrics.sr_scores import (
    COVERAGE_LEVELS,
    baseline_log_likelihood,
    crps_samples,
    expected_interval_coverage,
    fit_baseline_scale,
    coverage_levels,
    interval_coverages,
    make_consistent,
    bicubic_upsample,
    detail_mask,
    edge_mask,
)
from pyro_srvae.model.distributions import block_mean
from pyro_srvae.training.factory import load_split
from conftest import hold_latents_fixed, tiny_images

DTYPE = torch.float64




def test_with_the_latents_held_fixed_std_is_the_consistent_noise_gamma_sqrt_one_minus_one_over_f2():
    model = hold_latents_fixed(SRVAE((1, 8, 8), guide="full", hidden=4))
    gamma = model.gamma_x.item()
    y = model.downscale(tiny_images(3))
    sr = model.super_resolve(y, num_samples=4000)
    expected = gamma * math.sqrt(1 - 1 / 4)
    assert sr.std_latent.abs().max() < 1e-5
    torch.testing.assert_close(sr.std_noise, torch.full_like(sr.std_noise, expected), rtol=1e-5, atol=0)
    # each pixel's std over 4000 draws: relative sampling error ~ 1/sqrt(2 * 4000) = 1.1%
    assert (sr.std / expected - 1).abs().max() < 0.05
    assert abs((sr.std / expected).mean().item() - 1) < 0.01


def test_without_the_noise_each_draw_is_the_decoder_mean_at_its_latents():
    """With the latents held at their means, every noise-free draw is the decoder's mean there,
    m = decode_x(y, mean of p(z|y,u), mean of q(u|y)) from the networks; the full draws spread around it."""
    model = hold_latents_fixed(SRVAE((1, 8, 8), guide="full", hidden=4))
    y = model.downscale(tiny_images(2))
    with torch.no_grad():
        u = model.encoder_u(y)[0]
        m = model.decode_x(y, model.prior_z(y, u)[0], u)
    quiet = model.super_resolve(y, num_samples=50, observation_noise=False)
    torch.testing.assert_close(quiet.samples, m.expand_as(quiet.samples), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(quiet.mean, m, rtol=1e-5, atol=1e-6)
    assert quiet.std.max() < 1e-5 and (quiet.std_noise == 0).all()
    noisy = model.super_resolve(y, num_samples=50)
    assert (noisy.samples - m).std() > 0.5 * model.gamma_x.item()


def test_total_variance_is_latent_plus_noise_on_a_briefly_trained_model(tmp_path):
    result = train(TrainConfig(guide="full", max_steps=20, train_limit=256, eval_limit=8, batch_size=32, hidden=4,
                               eval_samples=2, sr_samples=2, figures=False),
                   out=str(tmp_path), progress=False, log=lambda *_: None)  # fmt: skip
    model = result.model
    with torch.no_grad():  # a model whose latents move the output as much as its noise does
        model.decoder_x.project[0].weight.mul_(30)
    y = model.downscale(tiny_images(4, (1, 28, 28)))
    pyro.set_rng_seed(1)
    sr = model.super_resolve(y, num_samples=2000)
    assert sr.std_latent.mean() > 0.3 * sr.std_noise.mean()  # both parts matter here
    total, parts = sr.std.square(), sr.std_latent.square() + sr.std_noise.square()
    # pooled over pixels: the sampling error of a variance from 2000 draws is ~3% per pixel
    assert abs(total.mean().item() / parts.mean().item() - 1) < 0.02
    assert ((total / parts) - 1).abs().median() < 0.05


# --------------------------------------------------------------------------- #
# coverage and CRPS against known predictives
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("num_samples", [16, 40])
def test_coverage_of_a_calibrated_gaussian_predictive_is_the_expected_one(num_samples):
    g = torch.Generator().manual_seed(0)
    pixels = 40_000
    loc, scale = torch.randn(pixels, generator=g), 0.1 + torch.rand(pixels, generator=g)
    samples = loc + scale * torch.randn(num_samples, pixels, generator=g)
    target = loc + scale * torch.randn(pixels, generator=g)
    observed = interval_coverages(samples, target)
    narrow = interval_coverages(loc + 0.6 * scale * (samples - loc) / scale, target)  # predictive too narrow
    for level in COVERAGE_LEVELS:
        expected = expected_interval_coverage(num_samples, level)
        stderr = math.sqrt(expected * (1 - expected) / pixels)
        assert abs(observed[str(level)] - expected) < 4 * stderr
        assert narrow[str(level)] < expected - 20 * stderr
    # a mask selects the pixels that count
    mask = torch.arange(pixels) % 2 == 0
    half = interval_coverages(samples, target, mask)
    inside = interval_coverages(samples[:, mask], target[mask])
    assert half == inside


def test_crps_sample_estimator_matches_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(0)
    mu, sigma = torch.tensor([0.0, 0.3, -1.0], dtype=DTYPE), torch.tensor([1.0, 0.2, 0.5], dtype=DTYPE)
    target = torch.tensor([0.5, 0.3, 0.4], dtype=DTYPE)
    draws = mu + sigma * torch.randn(20_000, 3, generator=g, dtype=DTYPE)
    z = (target - mu) / sigma
    normal = torch.distributions.Normal(0.0, 1.0)
    closed = sigma * (z * (2 * normal.cdf(z) - 1) + 2 * normal.log_prob(z).exp() - 1 / math.sqrt(math.pi))
    torch.testing.assert_close(crps_samples(draws, target), closed, rtol=0.02, atol=1e-3)
    # a point forecast's CRPS is its absolute error
    torch.testing.assert_close(crps_samples(draws[:1], target), (draws[0] - target).abs())
    # the fair estimator is unbiased even for two draws: its mean over many pairs matches
    pairs = crps_samples(draws[:20_000].reshape(2, 10_000, 3), target.expand(10_000, 3)).mean(0)
    torch.testing.assert_close(pairs, closed, rtol=0.03, atol=2e-3)


def test_consistent_baselines_have_the_block_means_of_y_and_detail_pixels_are_the_non_flat_ones():
    x = tiny_images(3)
    y = block_mean(x, 2)
    up = bicubic_upsample(y, 2)
    torch.testing.assert_close(block_mean(make_consistent(up, y, 2), 2), y)
    flat = torch.full((1, 1, 4, 4), 0.5)
    flat[0, 0, 0, 0] = 0.5 + 2 / 256  # one pixel two grey levels off its block mean
    # its block's mean moves by half a grey level: only the pixel itself is more than one level off
    assert detail_mask(flat, 2).sum() == 1 and detail_mask(flat, 2)[0, 0, 0, 0]
    assert not detail_mask(torch.full((1, 1, 4, 4), 0.5), 2).any()


def test_a_calibrated_predictive_covers_the_edge_pixels_as_its_level_says_but_not_the_truth_selected_ones():
    """x ~ N(bicubic(y), 0.005^2) per pixel (about a grey level), for y flat but for one vertical
    edge, and 16 draws of that same predictive: on the pixels chosen from y alone (edge_mask) and
    on the rest the 90% intervals cover what 16 calibrated draws give (0.882); on the pixels
    chosen by the truth (detail_mask: x over a grey level off its block mean) they cover less,
    though the predictive is exact."""
    generator = torch.Generator().manual_seed(0)
    columns = torch.randint(2, 14, (256, 1, 1, 1), generator=generator)
    y = torch.where(torch.arange(16).reshape(1, 1, 1, 16) < columns, 0.3, 0.7).expand(256, 1, 16, 16)
    centre = bicubic_upsample(y, 2)
    x = centre + 0.005 * torch.randn(centre.shape, generator=generator)
    draws = centre + 0.005 * torch.randn((16, *centre.shape), generator=generator)
    edges, details = edge_mask(y, 2), detail_mask(x, 2)
    assert 0.05 < edges.float().mean() < 0.5 and details.float().mean() > 0.3
    expected = coverage_levels(16)["0.9"]
    assert interval_coverages(draws, x, edges, levels=(0.9,))["0.9"] == pytest.approx(expected, abs=0.01)
    assert interval_coverages(draws, x, ~edges, levels=(0.9,))["0.9"] == pytest.approx(expected, abs=0.005)
    assert interval_coverages(draws, x, details, levels=(0.9,))["0.9"] < expected - 0.03
    flat = torch.full((1, 1, 4, 4), 0.5)
    assert not edge_mask(flat, 2).any()
    flat[0, 0, 0, 0] = 0.6
    assert edge_mask(flat, 2)[0, 0, :2, :2].all()  # the bright pixel's block


def test_the_baseline_scale_is_the_maximum_likelihood_one():
    images = (torch.rand(64, 1, 8, 8) * 256).to(torch.uint8)
    scale = fit_baseline_scale(images, 2, seed=0)
    from pyro_srvae.data.batching import dequantize

    x = dequantize(images, generator=torch.Generator().manual_seed(0)).double()
    fitted = baseline_log_likelihood(x, 2, scale).sum()
    assert fitted > baseline_log_likelihood(x, 2, 1.05 * scale).sum()
    assert fitted > baseline_log_likelihood(x, 2, 0.95 * scale).sum()


# --------------------------------------------------------------------------- #
# log p(x | y) against a linear-Gaussian model
# --------------------------------------------------------------------------- #


class LinearGaussianSR:
    """u ~ N(0, I_2); y | u ~ N(W u + b, s^2 I_3); d | u ~ N(C u + e, t^2 I_4); data = [y, d].

    log p(data) and log p(y) are Gaussian marginals; the guides are the exact posteriors of
    u given (y, d) and given y alone, so importance weights are constant.
    """

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W, self.b = torch.randn(3, 2, generator=g, dtype=DTYPE), torch.randn(3, generator=g, dtype=DTYPE)
        self.C, self.e = torch.randn(4, 2, generator=g, dtype=DTYPE), torch.randn(4, generator=g, dtype=DTYPE)
        self.s, self.t = 0.5, 0.3

    @staticmethod
    def _posterior(H, c, noise, obs):
        """u | obs for obs = H u + c + N(0, diag noise^2), u ~ N(0, I)."""
        precision_h = H / noise.expand(H.shape[0])[:, None] ** 2  # R^-1 H
        cov = torch.linalg.inv(torch.eye(2, dtype=DTYPE) + H.T @ precision_h)
        return (obs - c) @ precision_h @ cov, cov

    def _stack(self):
        H = torch.cat([self.W, self.C])
        noise = torch.cat([torch.full((3,), self.s, dtype=DTYPE), torch.full((4,), self.t, dtype=DTYPE)])
        return H, torch.cat([self.b, self.e]), noise

    def log_joint(self, data):
        H, c, noise = self._stack()
        return dist.MultivariateNormal(c, H @ H.T + torch.diag(noise**2)).log_prob(data)

    def log_y(self, data):
        return dist.MultivariateNormal(self.b, self.W @ self.W.T + self.s**2 * torch.eye(3, dtype=DTYPE)).log_prob(data[:, :3])

    def model(self, data):
        with pyro.plate("data", data.shape[0], dim=-1):
            u = pyro.sample("u", dist.Normal(torch.zeros(2, dtype=DTYPE), 1.0).to_event(1))
            pyro.sample("y", dist.Normal(u @ self.W.T + self.b, self.s).to_event(1), obs=data[:, :3])
            pyro.sample("d", dist.Normal(u @ self.C.T + self.e, self.t).to_event(1), obs=data[:, 3:])

    def guide(self, data):
        H, c, noise = self._stack()
        mean, cov = self._posterior(H, c, noise, data)
        with pyro.plate("data", data.shape[0], dim=-1):
            pyro.sample("u", dist.MultivariateNormal(mean, covariance_matrix=cov))

    def lr_model(self, data):
        with pyro.plate("data", data.shape[0], dim=-1):
            u = pyro.sample("u", dist.Normal(torch.zeros(2, dtype=DTYPE), 1.0).to_event(1))
            pyro.sample("y", dist.Normal(u @ self.W.T + self.b, self.s).to_event(1), obs=data[:, :3])

    def lr_guide(self, data):
        mean, cov = self._posterior(self.W, self.b, torch.tensor(self.s, dtype=DTYPE), data[:, :3])
        with pyro.plate("data", data.shape[0], dim=-1):
            pyro.sample("u", dist.MultivariateNormal(mean, covariance_matrix=cov))


@pytest.mark.parametrize("num_samples", [1, 7, 100])
def test_conditional_log_likelihood_matches_the_linear_gaussian_closed_form(num_samples):
    lg = LinearGaussianSR()
    data = torch.randn(5, 7, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    estimate = iw_conditional_log_likelihood(lg.model, lg.guide, lg.lr_model, lg.lr_guide, data, num_samples)
    torch.testing.assert_close(estimate, lg.log_joint(data) - lg.log_y(data))


def test_sr_bpd_is_reported_beside_its_baseline_by_hand_on_a_trained_model(tmp_path):
    config = TrainConfig(guide="full", max_steps=20, train_limit=256, eval_limit=16, batch_size=32, hidden=4,
                         eval_samples=4, sr_samples=8, figures=False)  # fmt: skip
    result = train(config, out=str(tmp_path), progress=False, log=lambda *_: None)
    test = result.metrics["test"]
    free = 28 * 28 - 14 * 14
    assert test["sr_bpd_dims"] == free and math.isfinite(test["sr_bpd"])  # its value: the closed-form test below
    # the baseline by hand, on the run's test images dequantized as its evaluation did (one batch, the
    # run's seed): N(x; loc, s^2 I) given its block means, loc the consistent bicubic (A loc = y), so
    # log p(x|y) = -|x - loc|^2 / (2 s^2) - (D - D_y)/2 log(2 pi s^2) - D_y log f, a density per detail dimension
    generator = torch.Generator().manual_seed(config.seed)
    x = dequantize(load_split(config, "test").images[:16], generator=generator).double()
    s, y = test["sr_baseline_scale"], block_mean(x, 2)
    squared = (x - make_consistent(bicubic_upsample(y, 2), y, 2)).square().flatten(1).sum(1)
    log_p = -squared / (2 * s**2) - free / 2 * math.log(2 * math.pi * s**2) - 14 * 14 * math.log(2)
    assert test["sr_bpd_baseline"] == pytest.approx(-log_p.mean().item() / (free * math.log(2)) + 8, abs=1e-4)
    assert set(test["sr_coverage"]) >= {"all", "detail", "expected"}
    assert list(test["sr_coverage"]["detail"]) == ["0.5", "0.8", "0.9", "0.95"]
    # the spec's joint has no conditional density of x to score
    spec = train(TrainConfig(guide="full", x_given_y="spec", max_steps=2, train_limit=64, eval_limit=8, batch_size=32,
                             hidden=4, eval_samples=2, sr_samples=2, figures=False),
                 out=str(tmp_path / "spec"), progress=False, log=lambda *_: None)  # fmt: skip
    assert spec.metrics["test"]["sr_bpd"] is None


class ImageLinearGaussianSR(torch.nn.Module):
    """u ~ N(0, I_2), x | u ~ N(W u + b, s^2 I) on 8x8 images; y = A x the 2x2 block means.

    ``model``/``guide`` score x (a density of x, as the consistent srVAE's log p(y|u) + log p(x|y,.) is)
    with the exact posterior of u given x; ``lr_model``/``lr_guide`` score y with the exact posterior
    of u given y: every importance weight is exact, so evaluate_model's -log p(x|y) must be
    log p(y) - log p(x) in closed form. ``super_resolve`` is a stand-in (bicubic plus noise)."""

    factor, lr_shape, x_density = 2, (1, 4, 4), "exact"

    def __init__(self, s=0.2):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.W = 0.2 * torch.randn(64, 2, generator=g, dtype=DTYPE)
        self.b, self.s = torch.full((64,), 0.5, dtype=DTYPE), s
        self.A = block_mean(torch.eye(64, dtype=DTYPE).reshape(64, 1, 8, 8), 2).reshape(64, 16).T  # y = A x
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def log_p_x(self, x):
        return dist.MultivariateNormal(self.b, self.W @ self.W.T + self.s**2 * torch.eye(64, dtype=DTYPE)).log_prob(x)

    def log_p_y(self, y):
        A = self.A
        return dist.MultivariateNormal(A @ self.b, A @ self.W @ self.W.T @ A.T + self.s**2 * A @ A.T).log_prob(y)

    def _score(self, name, H, c, scale, value):
        with pyro.plate("data", value.shape[0], dim=-1):
            u = pyro.sample("u", dist.Normal(torch.zeros(2, dtype=DTYPE), 1.0).to_event(1))
            pyro.sample(name, dist.MultivariateNormal(u @ H.T + c, scale_tril=scale), obs=value)

    def _exact_posterior(self, H, c, scale_tril, value):
        """u | value for value = H u + c + N(0, scale_tril scale_tril^T), u ~ N(0, I)."""
        covariance = scale_tril @ scale_tril.T
        precision = torch.linalg.inv(covariance)
        posterior = torch.linalg.inv(torch.eye(2, dtype=DTYPE) + H.T @ precision @ H)
        mean = (value - c) @ precision @ H @ posterior
        with pyro.plate("data", value.shape[0], dim=-1):
            pyro.sample("u", dist.MultivariateNormal(mean, covariance_matrix=posterior))

    def _x(self, x):
        return self.W, self.b, self.s * torch.eye(64, dtype=DTYPE), x.flatten(1).to(DTYPE)

    def _y(self, x):
        A = self.A
        return A @ self.W, A @ self.b, torch.linalg.cholesky(self.s**2 * A @ A.T), x.flatten(1).to(DTYPE) @ A.T

    def model(self, x):
        self._score("x", *self._x(x))

    def guide(self, x):
        self._exact_posterior(*self._x(x))

    def lr_model(self, x):
        self._score("y", *self._y(x))

    def lr_guide(self, x):
        self._exact_posterior(*self._y(x))

    def downscale(self, x):
        return block_mean(x, 2)

    def super_resolve(self, y, num_samples=16, observation_noise=True):
        base = bicubic_upsample(y, 2).expand(num_samples, *y.shape[:-2], 8, 8)
        samples = base + 0.05 * torch.randn(base.shape)
        return SuperResolution(mean=base[0], std=samples.std(0), samples=samples, std_latent=torch.zeros_like(base[0]),
                               std_noise=torch.full_like(base[0], 0.05), means=base)  # fmt: skip


def test_sr_bpd_is_log_p_y_minus_log_p_x_per_detail_dimension_on_a_linear_gaussian():
    """evaluate_model's sr_bpd = -(log p(x) - log p(y = A x)) / ((D - D_y) ln 2) + 8, exactly, when
    both importance samplers are the exact posteriors (D - D_y = 64 - 16 detail dimensions)."""
    model = ImageLinearGaussianSR()
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    r = evaluate_model(model, images, elbo_samples=3, iw_samples=3, batch_size=6, sr_samples=4, seed=9, latents=False)
    x = dequantize(images, generator=torch.Generator().manual_seed(9)).flatten(1).double()
    conditional = (model.log_p_x(x) - model.log_p_y(x @ model.A.T)).mean().item()
    assert r["iw_log_likelihood"] == pytest.approx(model.log_p_x(x).mean().item(), abs=1e-6)  # the samplers are exact
    assert r["sr_bpd_dims"] == 48
    assert r["sr_bpd"] == pytest.approx(-conditional / (48 * math.log(2)) + 8, abs=1e-6)
