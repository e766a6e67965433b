"""Tests for pyro_srvae.metrics.

The likelihood tests use a linear-Gaussian latent variable model, the one
model whose marginal likelihood and posterior are available in closed form:

    z ~ N(0, I_d),   x | z ~ N(W z + b, sigma^2 I_D)
    =>  x ~ N(b, W W^T + sigma^2 I),
        z | x ~ N(S W^T (x - b) / sigma^2, S),  S = (I + W^T W / sigma^2)^-1.

With the exact posterior as guide every importance weight equals p(x), so
the estimators must reproduce log p(x) to float precision for any K; with a
wrong guide, the IW estimate must approach it as K grows.
"""

import math

import pytest
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import Trace_ELBO
from conftest import hold_latents_fixed, tiny_images

from pyro_srvae.metrics.evaluate import evaluate_model
from pyro_srvae.metrics.likelihood import (
    DEFAULT_PARTICLE_BUDGET,
    LikelihoodEstimates,
    bits_per_dim,
    iw_and_elbo,
    iw_log_likelihood,
    log_importance_weights,
)
from pyro_srvae.metrics.sr_scores import (
    bicubic_upsample,
    detail_mask,
    edge_mask,
    interval_coverages,
    expected_interval_coverage,
    interval_coverage,
    psnr,
    ssim,
    ssim_kernel_size,
    super_resolution_metrics,
)

DTYPE = torch.float64


class LinearGaussian:
    """z ~ N(0, I_d), x | z ~ N(W z + b, sigma^2 I_D), with several guides."""

    def __init__(self, d=2, D=3, sigma=0.5, w_scale=1.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.d, self.D, self.sigma = d, D, sigma
        self.W = w_scale * torch.randn(D, d, generator=g, dtype=DTYPE)
        self.b = torch.randn(D, generator=g, dtype=DTYPE)
        self.post_cov = torch.linalg.inv(torch.eye(d, dtype=DTYPE) + self.W.T @ self.W / sigma**2)
        self.post_tril = torch.linalg.cholesky(self.post_cov)

    def log_marginal(self, x):
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.D, dtype=DTYPE)
        return dist.MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    def post_mean(self, x):
        return (x - self.b) @ self.W @ self.post_cov / self.sigma**2

    def model(self, x, obs_mask=None):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.d, dtype=DTYPE), 1.0).to_event(1))
            with poutine.mask(mask=obs_mask if obs_mask is not None else True):
                pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def exact_guide(self, x):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.MultivariateNormal(self.post_mean(x), scale_tril=self.post_tril))

    def prior_guide(self, x):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(torch.zeros(self.d, dtype=DTYPE), 1.0).to_event(1))

    def shifted_guide(self, x):
        """Right family, wrong place and width: mean off by one posterior std, std x 1.5."""
        shift = self.post_tril @ torch.ones(self.d, dtype=DTYPE)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.MultivariateNormal(self.post_mean(x) + shift, scale_tril=1.5 * self.post_tril))


def _batch(lg, n=5, seed=1, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    return lg.b + spread * torch.randn(n, lg.D, generator=g, dtype=DTYPE)


# ---------------------------------------------------------------------------
# importance weights and likelihood estimates
# ---------------------------------------------------------------------------


def test_exact_posterior_gives_exact_log_likelihood_for_every_weight():
    lg = LinearGaussian()
    x = _batch(lg)
    exact = lg.log_marginal(x)
    pyro.set_rng_seed(0)
    log_w = log_importance_weights(lg.model, lg.exact_guide, x, 50)
    assert log_w.shape == (50, 5)
    # zero-variance importance sampling: each weight is p(x) itself
    torch.testing.assert_close(log_w, exact.expand(50, 5), atol=1e-8, rtol=0)
    for k in (1, 10):
        torch.testing.assert_close(iw_log_likelihood(lg.model, lg.exact_guide, x, k), exact, atol=1e-4, rtol=0)


def test_wrong_guide_iw_converges_and_beats_elbo():
    lg = LinearGaussian()
    x = _batch(lg)
    exact = lg.log_marginal(x)
    for guide in (lg.shifted_guide, lg.prior_guide):
        pyro.set_rng_seed(0)
        est = iw_and_elbo(lg.model, guide, x, 1000)
        assert isinstance(est, LikelihoodEstimates)
        pyro.set_rng_seed(1)
        elbo_k1 = iw_log_likelihood(lg.model, guide, x, 1)  # K = 1: a single-sample ELBO
        iw_err = (est.iw - exact).abs()
        assert iw_err.mean() < 0.3, (guide.__name__, iw_err)
        assert iw_err.mean() < (elbo_k1 - exact).abs().mean() / 3, guide.__name__
        # the ELBO (mean of 1000 log-weights) is a lower bound, by a clear margin
        # here (~1.4 nats for the shifted guide, ~20 for the prior), and IW beats it
        assert (est.elbo < exact - 0.5).all(), guide.__name__
        assert (iw_err < exact - est.elbo).all(), guide.__name__
        assert (est.elbo <= est.iw).all()
    # the shifted guide is a decent proposal: IW with K=1000 is very close
    pyro.set_rng_seed(0)
    iw = iw_log_likelihood(lg.model, lg.shifted_guide, x, 1000)
    torch.testing.assert_close(iw, exact, atol=0.15, rtol=0)


def test_estimates_are_per_image_not_batch_averaged():
    lg = LinearGaussian()
    x = _batch(lg, n=6, spread=3.0)
    exact = lg.log_marginal(x)
    assert exact.max() - exact.min() > 5.0  # the images really differ
    pyro.set_rng_seed(0)
    est = iw_log_likelihood(lg.model, lg.exact_guide, x, 20)
    torch.testing.assert_close(est, exact, atol=1e-4, rtol=0)
    pyro.set_rng_seed(0)
    log_w = log_importance_weights(lg.model, lg.shifted_guide, x, 1000)
    per_image = torch.logsumexp(log_w, 0) - math.log(1000)
    torch.testing.assert_close(per_image, exact, atol=0.15, rtol=0)
    # the srVAE repo's reduction (mean over the batch, then logsumexp over K)
    # is a different number and is no estimate of the mean log-likelihood
    batch_first = torch.logsumexp(log_w.mean(1), 0) - math.log(1000)
    assert abs(batch_first - exact.mean()) > 0.2
    # each image is estimated from its own weights: a batch of one agrees
    pyro.set_rng_seed(0)
    single = iw_log_likelihood(lg.model, lg.exact_guide, x[2:3], 5)
    torch.testing.assert_close(single, exact[2:3], atol=1e-4, rtol=0)


def test_chunk_size_does_not_change_result_and_bounds_batch():
    lg = LinearGaussian()
    x = _batch(lg, n=4)
    results = []
    for chunk in (1, 7, 64, None):
        pyro.set_rng_seed(0)
        results.append(iw_and_elbo(lg.model, lg.exact_guide, x, 64, chunk_size=chunk))
    for r in results[1:]:
        torch.testing.assert_close(r.iw, results[0].iw, atol=1e-10, rtol=0)
        torch.testing.assert_close(r.elbo, results[0].elbo, atol=1e-10, rtol=0)

    # chunking really happens: record the particle dims of each vectorized guide call
    shapes = []

    def recording_guide(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(lg.d, dtype=DTYPE), 1.0).to_event(1))
        shapes.append(tuple(z.shape))

    log_w = log_importance_weights(lg.model, recording_guide, x, 10, chunk_size=4)
    assert log_w.shape == (10, 4)
    assert shapes == [(4, 4, 2), (4, 4, 2), (2, 4, 2)]
    shapes.clear()
    log_importance_weights(lg.model, recording_guide, x, 1000)  # default chunk size
    expected_chunk = DEFAULT_PARTICLE_BUDGET // 4
    assert shapes[0] == (expected_chunk, 4, 2)
    assert len(shapes) == math.ceil(1000 / expected_chunk)


def test_a_gpu_pushes_more_particles_per_pass():
    from pyro_srvae.metrics.likelihood import GPU_PARTICLE_BUDGET, particle_budget

    assert particle_budget("cpu") == DEFAULT_PARTICLE_BUDGET
    assert particle_budget("cuda") == particle_budget(torch.device("cuda", 0)) == GPU_PARTICLE_BUDGET
    assert GPU_PARTICLE_BUDGET > DEFAULT_PARTICLE_BUDGET


def test_weights_match_pyro_trace_elbo():
    lg = LinearGaussian()
    x = _batch(lg)
    pyro.set_rng_seed(3)
    loss = Trace_ELBO(num_particles=9, vectorize_particles=True, max_plate_nesting=1).loss(
        lg.model, lg.shifted_guide, x
    )
    pyro.set_rng_seed(3)
    est = iw_and_elbo(lg.model, lg.shifted_guide, x, 9, chunk_size=9)
    assert est.elbo.sum().item() == pytest.approx(-loss, abs=1e-6)


def test_scale_is_ignored_and_mask_is_respected():
    lg = LinearGaussian()
    x = _batch(lg, n=3)
    exact = lg.log_marginal(x)
    # KL annealing / minibatch scaling must not leak into the evaluation
    scaled_model = poutine.scale(lg.model, scale=0.01)
    scaled_guide = poutine.scale(lg.exact_guide, scale=0.01)
    pyro.set_rng_seed(0)
    est = iw_log_likelihood(scaled_model, scaled_guide, x, 4)
    torch.testing.assert_close(est, exact, atol=1e-4, rtol=0)
    # masking the observation of image 1 removes log p(x_1 | z) from its weight
    mask = torch.tensor([True, False, True])
    pyro.set_rng_seed(0)
    tr = poutine.trace(lg.exact_guide).get_trace(x)
    pyro.set_rng_seed(0)
    log_w = log_importance_weights(lambda x: lg.model(x, obs_mask=mask), lg.exact_guide, x, 1)
    z = tr.nodes["z"]["value"][1]
    prior = dist.Normal(torch.zeros(lg.d, dtype=DTYPE), 1.0).to_event(1).log_prob(z)
    q = dist.MultivariateNormal(lg.post_mean(x[1]), scale_tril=lg.post_tril).log_prob(z)
    assert log_w[0, 1].item() == pytest.approx((prior - q).item(), abs=1e-8)
    torch.testing.assert_close(log_w[0, [0, 2]], exact[[0, 2]], atol=1e-8, rtol=0)


def test_guide_only_sites_are_rejected_unless_auxiliary():
    lg = LinearGaussian()
    x = _batch(lg, n=3)

    def guide_with_extra(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.MultivariateNormal(lg.post_mean(x), scale_tril=lg.post_tril))
            pyro.sample("extra", dist.Normal(torch.zeros((), dtype=DTYPE), 1.0))

    with pytest.raises(ValueError, match="extra"):
        log_importance_weights(lg.model, guide_with_extra, x, 2)

    def auxiliary_guide(x):
        # bijective auxiliary (as in AutoContinuous): z = aux through a Delta
        with pyro.plate("data", x.shape[0], dim=-1):
            aux = pyro.sample(
                "aux",
                dist.MultivariateNormal(lg.post_mean(x), scale_tril=lg.post_tril),
                infer={"is_auxiliary": True},
            )
            pyro.sample("z", dist.Delta(aux, event_dim=1))

    pyro.set_rng_seed(0)
    est = iw_log_likelihood(lg.model, auxiliary_guide, x, 3)
    torch.testing.assert_close(est, lg.log_marginal(x), atol=1e-4, rtol=0)


def test_sites_outside_data_plate_are_rejected():
    lg = LinearGaussian()
    x = _batch(lg, n=3)

    def model_with_global(x):
        pyro.sample("scale", dist.LogNormal(torch.zeros((), dtype=DTYPE), 1.0))
        lg.model(x)

    def guide_with_global(x):
        pyro.sample("scale", dist.LogNormal(torch.zeros((), dtype=DTYPE), 1.0))
        lg.exact_guide(x)

    with pytest.raises(ValueError, match="data"):
        log_importance_weights(model_with_global, guide_with_global, x, 2)


# ---------------------------------------------------------------------------
# bits per dimension
# ---------------------------------------------------------------------------


def test_bits_per_dim_closed_form():
    # log p = 0 is the uniform density on [0, 1]^D: 8 bits per 8-bit pixel
    assert bits_per_dim(0.0, 784) == pytest.approx(8.0)
    # one extra nat-equivalent bit per dimension
    assert bits_per_dim(-784 * math.log(2.0), 784) == pytest.approx(9.0)
    # a density of 2^D on [0, 1]^D saves one bit per dimension
    assert bits_per_dim(3072 * math.log(2.0), 3072) == pytest.approx(7.0)
    assert isinstance(bits_per_dim(-100.0, 10), float)
    t = bits_per_dim(torch.tensor([0.0, -10 * math.log(2.0)]), 10)
    torch.testing.assert_close(t, torch.tensor([8.0, 9.0]))
    # numerically: an N(0.5, 0.1^2) density in 4 dims at its mean
    lp = dist.Normal(0.5, 0.1).log_prob(torch.tensor(0.5)) * 4
    assert bits_per_dim(lp, 4).item() == pytest.approx(8 - math.log2(1 / (0.1 * math.sqrt(2 * math.pi))), abs=1e-5)


# ---------------------------------------------------------------------------
# image metrics
# ---------------------------------------------------------------------------


def test_psnr_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 1, 8, 8, generator=g)
    pred = (target + 0.05 * torch.randn(3, 1, 8, 8, generator=g)).clamp(0, 1)
    values = psnr(pred, target)
    assert values.shape == (3,)
    for i in range(3):
        mse = ((pred[i] - target[i]) ** 2).mean().item()
        assert values[i].item() == pytest.approx(10 * math.log10(1.0 / mse), rel=1e-5)
    # data_range enters as data_range^2
    assert psnr(pred * 255, target * 255, data_range=255.0)[0].item() == pytest.approx(values[0].item(), rel=1e-4)
    # a constant error of 0.1 gives exactly 20 dB
    assert psnr(torch.full((1, 1, 4, 4), 0.6), torch.full((1, 1, 4, 4), 0.5))[0].item() == pytest.approx(20.0, rel=1e-5)
    # identical images: +inf (documented), the others stay finite
    same = psnr(torch.cat([target[:1], pred[1:]]), target)
    assert math.isinf(same[0].item()) and same[0] > 0
    assert torch.isfinite(same[1:]).all()


def test_ssim_identical_noisy_and_kernel_size():
    from torchmetrics.functional.image import structural_similarity_index_measure

    g = torch.Generator().manual_seed(0)
    assert ssim_kernel_size(28, 28) == 11
    assert ssim_kernel_size(14, 14) == 7
    assert ssim_kernel_size(8, 8) == 3
    for size in (28, 14, 8):
        target = torch.rand(4, 1, size, size, generator=g)
        noisy = (target + 0.2 * torch.randn(4, 1, size, size, generator=g)).clamp(0, 1)
        same = ssim(target, target)
        assert same.shape == (4,)
        torch.testing.assert_close(same, torch.ones(4), atol=1e-5, rtol=0)
        worse = ssim(noisy, target)
        assert (worse < 0.95).all(), (size, worse)
        # more noise, lower similarity
        noisier = (target + 0.5 * torch.randn(4, 1, size, size, generator=g)).clamp(0, 1)
        assert (ssim(noisier, target) < worse).all()
    # for 28x28 this is exactly torchmetrics' standard 11x11, sigma=1.5 SSIM
    target = torch.rand(2, 1, 28, 28, generator=g)
    pred = (target + 0.1 * torch.randn(2, 1, 28, 28, generator=g)).clamp(0, 1)
    ref = structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")
    torch.testing.assert_close(ssim(pred, target), ref)
    # the data range is fixed, not inferred from the images: a dim, low-contrast
    # pair is judged on the [0, 1] scale (torchmetrics' data_range=None differs)
    dim_t, dim_p = 0.45 + 0.1 * target, 0.45 + 0.1 * pred
    fixed = structural_similarity_index_measure(dim_p, dim_t, data_range=1.0, reduction="none")
    inferred = structural_similarity_index_measure(dim_p, dim_t, reduction="none")
    assert (fixed - inferred).abs().min() > 0.01
    torch.testing.assert_close(ssim(dim_p, dim_t), fixed)


@pytest.mark.parametrize("shape", [(3, 1, 28, 28), (5, 3, 14, 14), (2, 4, 8, 8), (2, 1, 32, 20)])
def test_ssim_is_torchmetrics_ssim_with_the_window_of_the_image(shape):
    """The separable SSIM equals torchmetrics' 2-D one with sigma = 1.5 k / 11 for every window size the
    images get (11, 7, 3, 9), any channel count and a non-square image, at data ranges 1 and 255."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    g = torch.Generator().manual_seed(1)
    target = torch.rand(shape, generator=g)
    pred = (target + 0.15 * torch.randn(shape, generator=g)).clamp(0, 1)
    k = ssim_kernel_size(shape[-2], shape[-1])
    for scale in (1.0, 255.0):
        ref = structural_similarity_index_measure(pred * scale, target * scale, gaussian_kernel=True, sigma=1.5 * k / 11,
                                                  kernel_size=k, data_range=scale, reduction="none")  # fmt: skip
        torch.testing.assert_close(ssim(pred * scale, target * scale, data_range=scale), ref, atol=1e-6, rtol=0)


def test_bicubic_upsample_shape_range_and_constants():
    y = torch.rand(2, 3, 7, 7)
    up = bicubic_upsample(y, 2)
    assert up.shape == (2, 3, 14, 14)
    assert up.min() >= 0 and up.max() <= 1
    # a checkerboard makes bicubic overshoot; the clamp catches it
    board = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
    raw = torch.nn.functional.interpolate(board.float()[None, None], scale_factor=4, mode="bicubic")
    assert raw.max() > 1 or raw.min() < 0
    assert bicubic_upsample(board.float()[None, None], 4).max() <= 1
    torch.testing.assert_close(bicubic_upsample(torch.full((1, 1, 4, 4), 0.3), 4), torch.full((1, 1, 16, 16), 0.3))


def test_interval_coverage_calibrated_and_far():
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(2000, 2, 1, 16, 16, generator=g)
    target = torch.randn(2, 1, 16, 16, generator=g)
    cov = interval_coverage(samples, target, 0.9)
    assert cov.shape == (2,)
    assert cov.mean().item() == pytest.approx(0.9, abs=0.04)
    assert expected_interval_coverage(2000) == pytest.approx(0.9, abs=1e-3)
    # far outside the predictive distribution: nothing is covered
    assert (interval_coverage(samples, target + 10.0) == 0).all()
    # few samples: the exact finite-S expectation, for a non-Gaussian law too
    few = torch.rand(16, 1, 1, 200, 200, generator=g) ** 3
    target = torch.rand(1, 1, 200, 200, generator=g) ** 3
    assert expected_interval_coverage(16) == pytest.approx(15 / 17)
    assert interval_coverage(few, target).item() == pytest.approx(15 / 17, abs=0.01)
    # an overconfident predictive (half the spread) undercovers
    narrow = 0.5 * torch.randn(200, 1, 1, 50, 50, generator=g)
    assert interval_coverage(narrow, torch.randn(1, 1, 50, 50, generator=g)).item() < 0.7


# ---------------------------------------------------------------------------
# super-resolution metrics and full evaluation on stand-in models
# ---------------------------------------------------------------------------


class StubSR:
    """An 'SRVAE' whose predictive is bicubic plus Gaussian pixel noise of std ``noise``."""

    factor = 2

    def __init__(self, noise=0.3):
        self.noise = noise
        self.calls = []

    def downscale(self, x):
        return torch.nn.functional.avg_pool2d(x, 2)

    def super_resolve(self, y, num_samples=16, observation_noise=True):
        from pyro_srvae import SuperResolution

        self.calls.append(observation_noise)
        base = bicubic_upsample(y, 2)
        means = base.expand(num_samples, *base.shape)
        samples = means + self.noise * torch.randn(num_samples, *base.shape)
        return SuperResolution(mean=base, std=samples.std(0), samples=samples, std_latent=torch.zeros_like(base),
                               std_noise=torch.full_like(base, self.noise), means=means)  # fmt: skip


def test_super_resolution_metrics_with_stub():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 8, 8)
    stub = StubSR()
    m = super_resolution_metrics(stub, x, num_samples=8)
    assert stub.calls == [True]  # one call: the mean and the coverage come from the draws a user gets
    assert m["num_images"] == 3
    assert m["sr_psnr"] == pytest.approx(m["bicubic_psnr"])
    assert m["sr_ssim"] == pytest.approx(m["bicubic_ssim"])
    expected_psnr = psnr(bicubic_upsample(stub.downscale(x), 2), x).mean().item()
    assert m["bicubic_psnr"] == pytest.approx(expected_psnr)
    assert 0.3 < m["sr_coverage90"] <= 1.0
    assert m["sr_coverage90_expected"] == pytest.approx(expected_interval_coverage(8))
    assert m["sr_coverage"]["expected"]["0.9"] == m["sr_coverage90_expected"]
    assert m["sr_std_noise_rms"] == pytest.approx(0.3) and m["sr_std_latent_rms"] == 0
    assert m["bicubic_mae"] == pytest.approx((bicubic_upsample(stub.downscale(x), 2) - x).abs().mean().item())
    # draws that coincide cover (almost) nothing
    m2 = super_resolution_metrics(StubSR(noise=0.0), x, num_samples=8)
    assert m2["sr_coverage90"] < 0.05


def test_super_resolution_metrics_report_the_coverage_of_the_edge_pixels_chosen_from_y():
    columns = torch.arange(32).reshape(1, 1, 1, 32)
    x = torch.where(columns < 13, 0.2, 0.8).expand(4, 1, 16, 32)  # one edge, inside a block
    stub = StubSR(noise=0.05)
    torch.manual_seed(0)
    m = super_resolution_metrics(stub, x, num_samples=8)
    torch.manual_seed(0)
    y = stub.downscale(x)
    samples = stub.super_resolve(y, num_samples=8).samples
    edges = edge_mask(y, 2)
    assert edges.float().mean() == 0.25 and detail_mask(x, 2).float().mean() == 0.0625
    assert m["sr_coverage"]["edge_fraction"] == pytest.approx(edges.float().mean().item())
    assert m["sr_coverage"]["edges"] == pytest.approx(interval_coverages(samples, x, edges))
    assert m["sr_coverage"]["detail"] == pytest.approx(interval_coverages(samples, x, detail_mask(x, 2)))
    assert m["sr_coverage"]["edges"]["0.9"] != pytest.approx(m["sr_coverage"]["detail"]["0.9"], abs=0.01)


class ImageLinearGaussian(torch.nn.Module):
    """Linear-Gaussian model on flattened C x H x W images, the exact posterior (or the shifted one) as guide."""

    def __init__(self, image_shape=(1, 2, 2), d=2, sigma=0.2, guide="exact"):
        super().__init__()
        D = math.prod(image_shape)
        self.lg = LinearGaussian(d=d, D=D, sigma=sigma, w_scale=0.2, seed=0)
        self.lg.b = torch.full((D,), 0.5, dtype=DTYPE)
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # makes it a module with a device
        self.modes = []
        self.guide_fn = {"exact": self.lg.exact_guide, "shifted": self.lg.shifted_guide}[guide]

    def model(self, x):
        self.modes.append(self.training)
        self.lg.model(x.flatten(1).to(DTYPE))

    def guide(self, x):
        self.guide_fn(x.flatten(1).to(DTYPE))


def test_evaluate_model_exact_and_deterministic():
    from pyro_srvae.data.batching import dequantize

    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (7, 1, 2, 2), dtype=torch.uint8, generator=g)
    model = ImageLinearGaussian()
    model.train()
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    r = evaluate_model(model, images, elbo_samples=3, iw_samples=5, batch_size=3, seed=11)
    assert torch.equal(torch.get_rng_state(), rng_before)  # caller's RNG untouched
    assert model.training and model.modes and not any(model.modes)  # eval() during, restored after
    assert set(r) >= {"elbo_bpd", "iw_bpd", "iw_samples"}
    assert r["iw_samples"] == 5 and r["num_images"] == 7
    assert not any(k.startswith("sr_") for k in r)
    # expected value: exact log-density of the same dequantized images
    gen = torch.Generator().manual_seed(11)
    x = torch.cat([dequantize(images[i : i + 3], generator=gen) for i in range(0, 7, 3)])
    exact = model.lg.log_marginal(x.flatten(1).to(DTYPE)).mean().item()
    assert r["iw_bpd"] == pytest.approx(bits_per_dim(exact, 4), abs=1e-6)
    assert r["elbo_bpd"] == pytest.approx(bits_per_dim(exact, 4), abs=1e-6)
    # deterministic given the seed, different noise for another seed
    assert evaluate_model(model, images, elbo_samples=3, iw_samples=5, batch_size=3, seed=11) == r
    other = evaluate_model(model, images, elbo_samples=3, iw_samples=5, batch_size=3, seed=12)
    assert other["iw_bpd"] != r["iw_bpd"]
    with pytest.raises(TypeError):
        evaluate_model(model, images.float(), elbo_samples=1, iw_samples=1)


def test_evaluate_model_meets_the_closed_forms_when_the_weights_vary():
    """With the shifted guide (mean one posterior std off, std x 1.5) the weights vary over the
    particles and the images. E[log w] = log p(x) - KL(q || p(z|x)), where the KL of the shift is
    d/2 (2.25 - log 2.25) = 1.439 nats for d = 2 whatever the image; the IW estimate of K = 500 lies
    within a few hundredths of a nat of log p(x) when each image is weighed with its own K weights.
    One logsumexp over a batch of 32 images' summed weights (a bound on their joint log-likelihood,
    divided by 32) lies about 0.5 nats per image below: the product's KL exceeds log K."""
    from pyro_srvae.data.batching import dequantize

    images = torch.randint(0, 256, (64, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    model = ImageLinearGaussian(guide="shifted")
    r = evaluate_model(model, images, elbo_samples=1000, iw_samples=500, batch_size=32, seed=11)
    gen = torch.Generator().manual_seed(11)  # the same dequantized images
    x = torch.cat([dequantize(images[i : i + 32], generator=gen) for i in (0, 32)])
    exact = model.lg.log_marginal(x.flatten(1).to(DTYPE)).mean().item()
    kl = model.lg.d / 2 * (2.25 - math.log(2.25))
    # over seeds both land within 0.03 nats: 0.08 leaves room and still tells the reductions apart
    assert r["elbo"] == pytest.approx(exact - kl, abs=0.08)
    assert r["iw_log_likelihood"] == pytest.approx(exact, abs=0.08)
    assert r["iw_bpd"] == pytest.approx(bits_per_dim(exact, 4), abs=0.08 / (4 * math.log(2)))


# ---------------------------------------------------------------------------
# the package's models (skipped while pyro_srvae.model is not importable)
# ---------------------------------------------------------------------------


def test_evaluate_model_on_untrained_package_models():
    models = pytest.importorskip("pyro_srvae")
    pyro.clear_param_store()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    small = dict(hidden=8, z_dim=4)
    candidates = [
        models.VAE((1, 8, 8), name="eval_test_vae", **small),
        models.SRVAE((1, 8, 8), guide="simple", name="eval_test_srvae_s", u_dim=4, **small),
        models.SRVAE((1, 8, 8), guide="full", prior="mog", name="eval_test_srvae_f", u_dim=4, **small),
    ]
    for model in candidates:
        is_sr = hasattr(model, "super_resolve")
        r = evaluate_model(model, images, elbo_samples=8, iw_samples=8, batch_size=5, sr_samples=6, seed=0)
        keys = {"elbo_bpd", "iw_bpd", "iw_samples"}
        if is_sr:
            keys |= {"sr_psnr", "bicubic_psnr", "sr_ssim", "bicubic_ssim", "sr_coverage90"}
        assert keys <= set(r), (type(model).__name__, set(r))
        for key in keys:  # what the numbers are: the closed-form tests above and below
            assert math.isfinite(r[key]), (key, r[key])

        # the weights agree with Pyro's own vectorized Trace_ELBO on the same draws
        x = torch.rand(3, 1, 8, 8)
        model.eval()
        pyro.set_rng_seed(1)
        loss = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1).loss(
            model.model, model.guide, x
        )
        pyro.set_rng_seed(1)
        elbo = iw_and_elbo(model.model, model.guide, x, 4, chunk_size=4).elbo
        assert elbo.sum().item() == pytest.approx(-loss, rel=1e-5)




#: (j - i) / (S + 1) for S = 16 draws and the order statistics i, j that enclose each central
#: interval (rounded outwards): 9/17, 13/17, 15/17, 15/17.
EXCHANGEABLE_COVERAGE_16 = {"0.5": 9 / 17, "0.8": 13 / 17, "0.9": 15 / 17, "0.95": 15 / 17}


@pytest.mark.parametrize("guide", ["simple", "full"])
def test_sr_metrics_of_a_package_srvae_on_truths_drawn_from_its_own_predictive(guide):
    """Truths drawn from the srVAE's own predictive, its latents held at their means (so the draws
    differ by the consistent likelihood's noise alone, and the predictive mean is the decoder mean m
    at those means): the intervals of 16 draws cover them as often as exchangeable draws are covered,
    within a binomial margin, and the SR PSNR and SSIM are those of m (clamped) against the truths,
    by hand and by torchmetrics' standard 11x11 SSIM."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    from pyro_srvae import SRVAE

    model = hold_latents_fixed(SRVAE((1, 28, 28), guide=guide, hidden=4))
    y = model.downscale(tiny_images(64, (1, 28, 28)))
    with torch.no_grad():
        u = model.encoder_u(y)[0]
        m = model.decode_x(y, model.prior_z(y, u)[0], u).clamp(0, 1)
        truth = model.super_resolve(y, num_samples=1).samples[0]
    metrics = super_resolution_metrics(model, truth, num_samples=16)
    pixels = truth.numel()
    for level, expected in EXCHANGEABLE_COVERAGE_16.items():
        margin = 4 * math.sqrt(expected * (1 - expected) / pixels)  # over seeds the spread is the binomial one
        assert metrics["sr_coverage"]["all"][level] == pytest.approx(expected, abs=margin), level
        assert metrics["sr_coverage"]["expected"][level] == pytest.approx(expected)
    mse = (m - truth).square().flatten(1).mean(1)
    assert metrics["sr_psnr"] == pytest.approx((10 * torch.log10(1 / mse)).mean().item(), rel=1e-5)
    reference = structural_similarity_index_measure(m, truth, data_range=1.0, reduction="none")
    assert metrics["sr_ssim"] == pytest.approx(reference.mean().item(), rel=1e-5)
    assert -1 <= metrics["sr_ssim"] <= 1 and 0 <= metrics["sr_coverage90"] <= 1


def test_elbo_terms_name_every_site_and_sum_to_the_elbo():
    from pyro_srvae import SRVAE
    from pyro_srvae.metrics.likelihood import elbo_terms

    pyro.clear_param_store()
    torch.manual_seed(0)
    model = SRVAE((1, 8, 8), guide="full", hidden=4, u_dim=3, z_dim=4)
    x = torch.rand(5, 1, 8, 8)
    pyro.set_rng_seed(4)
    terms = elbo_terms(model.model, model.guide, x, num_samples=6)
    pyro.set_rng_seed(4)
    elbo = iw_and_elbo(model.model, model.guide, x, 6, chunk_size=6).elbo
    assert list(terms) == ["log p(u)", "log p(y)", "log p(z)", "log p(x)", "-log q(u)", "-log q(z)"]
    assert all(value.shape == (5,) for value in terms.values())
    torch.testing.assert_close(sum(terms.values()), elbo, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        elbo_terms(model.model, model.guide, x, num_samples=0)
