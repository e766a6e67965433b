"""The IWAE bound with doubly-reparameterized gradients (``make_elbo("iwae-dreg")``).

Toy model (float64), linear Gaussian with a closed-form marginal and posterior:
z ~ N(0, I_d), x | z ~ N(W z + b, sigma^2 I_D); guide q(z|x) = N(A x + c, L L^T).
"""

import math

import pytest
import torch
from torch import nn

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_srvae import SRVAE, iw_log_likelihood, make_elbo
from pyro_srvae.model.elbo import IWAE_DReG
from pyro_srvae.training.objective import scale_latents

DT = torch.float64


class Toy(nn.Module):
    """The linear-Gaussian model and an MVN guide, registered with ``pyro.module`` in both.

    With ``rows=R`` the per-data-point parameters (b of the model, c and the log-diagonal of
    the guide's scale) get one row per data point: on R copies of one data point their
    gradient rows are R independent draws of the per-data-point gradient estimator.
    """

    def __init__(self, d=2, D=3, sigma=0.5, rows=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        per_row = (rows,) if rows else ()
        self.d, self.D, self.sigma = d, D, sigma
        self.W = nn.Parameter(torch.randn(D, d, generator=g, dtype=DT))
        self.b = nn.Parameter(torch.randn(D, generator=g, dtype=DT).expand(per_row + (D,)).clone())
        # a poor guide by default: wrong mean, unit (too wide) scale, no correlation
        self.A = nn.Parameter(0.3 * torch.randn(d, D, generator=g, dtype=DT))
        self.c = nn.Parameter(torch.zeros(per_row + (d,), dtype=DT))
        self.log_diag = nn.Parameter(torch.zeros(per_row + (d,), dtype=DT))
        self.L_off = nn.Parameter(torch.zeros(d, d, dtype=DT))

    def scale_tril(self):
        return torch.tril(self.L_off, -1) + torch.diag_embed(self.log_diag.exp())

    def model(self, x):
        pyro.module("toy", self)
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.d, dtype=DT), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("toy", self)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.MultivariateNormal(x @ self.A.T + self.c, scale_tril=self.scale_tril()))

    @torch.no_grad()
    def set_exact_posterior(self):
        eye = torch.eye(self.d, dtype=DT)
        cov = torch.linalg.inv(eye + self.W.T @ self.W / self.sigma**2)
        tril = torch.linalg.cholesky(cov)
        A = cov @ self.W.T / self.sigma**2
        self.A.copy_(A)
        self.c.copy_(-(self.b @ A.T))
        self.log_diag.copy_(tril.diagonal().log().expand_as(self.log_diag))
        self.L_off.copy_(tril)
        return self

    @torch.no_grad()
    def log_marginal(self, x):
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.D, dtype=DT)
        return dist.MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    def data(self, n=5, seed=1):
        g = torch.Generator().manual_seed(seed)
        b = self.b.detach().reshape(-1, self.D)[0]
        return b + 2.0 * torch.randn(n, self.D, generator=g, dtype=DT)


def _renyi(K):
    return make_elbo("renyi", num_particles=K, vectorize_particles=True)


def _grads(module, fn):
    module.zero_grad(set_to_none=True)
    fn()
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def _mean_se(samples):
    """Mean and standard error of a list of floats (or of the rows of a tensor)."""
    t = torch.as_tensor(samples, dtype=DT)
    return t.mean(0), t.std(0) / math.sqrt(t.shape[0])


# ---------------------------------------------------------------------------
# the bound
# ---------------------------------------------------------------------------


def _log_weights_by_hand(toy, x, z):
    """log p(z) + log p(x|z) - log q(z|x) of the toy's densities, ``(K, N)`` for draws z ``(K, N, d)``."""
    with torch.no_grad():
        prior = dist.Normal(torch.zeros(toy.d, dtype=DT), 1.0).to_event(1).log_prob(z)
        likelihood = dist.Normal(z @ toy.W.T + toy.b, toy.sigma).to_event(1).log_prob(x)
        guide = dist.MultivariateNormal(x @ toy.A.T + toy.c, scale_tril=toy.scale_tril()).log_prob(z)
    return prior + likelihood - guide


@pytest.mark.parametrize("K", [2, 5, 50])
def test_the_bound_is_each_image_s_logmeanexp_and_exact_under_the_exact_posterior(K):
    """loss = -sum_n [logsumexp_k log w_{k,n} - log K]: each image's own K weights.

    Under the exact posterior every weight of image n is p(x_n), so any reduction gives -log p(x);
    under the poor default guide the weights vary over particles and images, and only the
    per-image form, computed here by hand on the drawn samples, is the bound."""
    exact_toy = Toy().set_exact_posterior()
    x = exact_toy.data()
    exact = -exact_toy.log_marginal(x).sum().item()
    dreg = make_elbo("iwae-dreg", num_particles=K)
    assert abs(dreg.loss(exact_toy.model, exact_toy.guide, x) - exact) < 1e-8
    assert abs(dreg.differentiable_loss(exact_toy.model, exact_toy.guide, x).item() - exact) < 1e-8
    assert abs(_renyi(K).loss(exact_toy.model, exact_toy.guide, x) - exact) < 1e-8

    toy = Toy()
    pyro.set_rng_seed(11)  # the guide is the first to use the RNG: these are the loss's draws
    z = poutine.trace(dreg._vectorized_num_particles(toy.guide)).get_trace(x).nodes["z"]["value"]
    log_w = _log_weights_by_hand(toy, x, z)
    per_image = -(torch.logsumexp(log_w, 0) - math.log(K)).sum().item()
    batch_level = -(torch.logsumexp(log_w.sum(1), 0) - math.log(K)).item()  # one weight per particle
    assert abs(per_image - batch_level) > 1.0, (per_image, batch_level)  # the two reductions differ here
    for value in (lambda: dreg.loss(toy.model, toy.guide, x),
                  lambda: dreg.differentiable_loss(toy.model, toy.guide, x).item()):  # fmt: skip
        pyro.set_rng_seed(11)
        assert abs(value() - per_image) < 1e-8


def test_poor_guide_bound_lies_between_elbo_and_likelihood_and_tightens_with_K():
    toy = Toy()
    x = toy.data()
    neg_log_px = -toy.log_marginal(x).sum().item()
    pyro.set_rng_seed(1)
    trace_elbo = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    neg_elbo = trace_elbo.loss(toy.model, toy.guide, x)
    repeats = 100
    means = {}
    for K in (2, 10, 100):
        values = {"dreg": [], "renyi": [], "iw": []}
        dreg, renyi = make_elbo("iwae-dreg", num_particles=K), _renyi(K)
        for r in range(repeats):
            pyro.set_rng_seed(1000 * K + r)
            values["dreg"].append(dreg.loss(toy.model, toy.guide, x))
            pyro.set_rng_seed(1000 * K + r + 500)
            values["renyi"].append(renyi.loss(toy.model, toy.guide, x))
            values["iw"].append(-iw_log_likelihood(toy.model, toy.guide, x, K).sum().item())
        stats = {name: _mean_se(v) for name, v in values.items()}
        for name in ("renyi", "iw"):  # the same bound in expectation
            diff = abs(stats["dreg"][0] - stats[name][0])
            assert diff < 4 * math.hypot(stats["dreg"][1], stats[name][1]), (K, name, stats)
        mean, se = stats["dreg"]
        assert neg_log_px + 4 * se < mean < neg_elbo - 4 * se, (K, neg_log_px, mean, neg_elbo)
        means[K] = stats["dreg"]
    # tighter (smaller loss) as K grows, beyond the noise
    for small, large in ((2, 10), (10, 100)):
        assert means[large][0] + 4 * math.hypot(means[large][1], means[small][1]) < means[small][0], means


def test_differentiable_loss_and_renyi_agree_with_loss_under_the_same_seed():
    toy = Toy()
    x = toy.data()
    dreg = make_elbo("iwae-dreg", num_particles=7)
    values = []
    for run in (lambda: dreg.loss(toy.model, toy.guide, x),
                lambda: dreg.differentiable_loss(toy.model, toy.guide, x).item(),
                lambda: dreg.loss_and_grads(toy.model, toy.guide, x),
                lambda: _renyi(7).loss(toy.model, toy.guide, x)):
        pyro.set_rng_seed(3)
        values.append(run())
    assert max(values) - min(values) < 1e-10, values
    pyro.set_rng_seed(4)
    assert abs(values[0] - dreg.loss(toy.model, toy.guide, x)) > 1e-6  # a new seed, a new estimate
    # the class's own default, max_plate_nesting=inf, is guessed once (a guide run), then the same
    guessing = IWAE_DReG(num_particles=7)
    guessing.loss(toy.model, toy.guide, x)
    assert guessing.max_plate_nesting == 2
    pyro.set_rng_seed(3)
    assert abs(guessing.differentiable_loss(toy.model, toy.guide, x).item() - values[0]) < 1e-10


def test_latent_scale_of_kl_warmup_is_respected():
    toy = Toy()
    x = toy.data()
    model, guide = scale_latents(toy.model, 0.3), scale_latents(toy.guide, 0.3)
    pyro.set_rng_seed(5)
    got = make_elbo("iwae-dreg", num_particles=6).differentiable_loss(model, guide, x).item()
    pyro.set_rng_seed(5)
    renyi = _renyi(6).loss(model, guide, x)
    pyro.set_rng_seed(5)
    unscaled = _renyi(6).loss(toy.model, toy.guide, x)
    assert abs(got - renyi) < 1e-10 and abs(got - unscaled) > 1e-3


# ---------------------------------------------------------------------------
# the gradient
# ---------------------------------------------------------------------------


def _eps(trace):
    """The standard-normal draws behind the guide's z (MVN: z = loc + L eps)."""
    fn, z = trace.nodes["z"]["fn"], trace.nodes["z"]["value"]
    return torch.linalg.solve_triangular(fn.scale_tril, (z - fn.loc).unsqueeze(-1), upper=False).squeeze(-1).detach()


def _reference_dreg_gradients(toy, x, eps):
    """Tucker et al. eq. (7) written out, no hooks: phi gets sum w~^2 dlog w/dz dz/dphi
    (log q's own phi held fixed), theta gets sum w~ dlog p/dtheta (z held fixed)."""
    params = dict(toy.named_parameters())
    sg = {k: v.detach() for k, v in params.items()}

    def z_of(p):
        loc = x @ p["A"].T + p["c"]
        tril = torch.tril(p["L_off"], -1) + torch.diag_embed(p["log_diag"].exp())
        return loc + (tril @ eps.unsqueeze(-1)).squeeze(-1), loc, tril

    def log_p(z, p):
        prior = dist.Normal(torch.zeros(toy.d, dtype=DT), 1.0).to_event(1).log_prob(z)
        return prior + dist.Normal(z @ p["W"].T + p["b"], toy.sigma).to_event(1).log_prob(x)

    def log_q(z, p):
        _, loc, tril = z_of(p)
        return dist.MultivariateNormal(loc, scale_tril=tril).log_prob(z)

    z = z_of(params)[0]
    log_w = log_p(z, sg) - log_q(z, sg)
    w = torch.softmax(log_w.detach(), 0)
    surrogate = (w**2 * log_w).sum() + (w * log_p(z.detach(), params)).sum()
    grads = torch.autograd.grad(-surrogate, list(params.values()), allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(params[k])) for k, g in zip(params, grads)}


@pytest.mark.parametrize("entry", ["differentiable_loss", "loss_and_grads"])
def test_gradient_is_exactly_the_dreg_estimator_for_the_drawn_samples(entry):
    toy = Toy()
    with torch.no_grad():  # a correlated guide, so every parameter matters
        toy.L_off.fill_(0.4)
        toy.c.fill_(0.2)
    x = toy.data()
    K = 6
    dreg = make_elbo("iwae-dreg", num_particles=K)
    pyro.set_rng_seed(11)
    if entry == "differentiable_loss":
        got = _grads(toy, lambda: dreg.differentiable_loss(toy.model, toy.guide, x).backward())
    else:
        got = _grads(toy, lambda: dreg.loss_and_grads(toy.model, toy.guide, x))
    pyro.set_rng_seed(11)  # the same draws: the guide is the first to use the RNG
    trace = poutine.trace(dreg._vectorized_num_particles(toy.guide)).get_trace(x)
    expected = _reference_dreg_gradients(toy, x, _eps(trace))
    for name in expected:
        assert got[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-10, msg=name)


class HierarchicalToy(nn.Module):
    """u ~ N(0, I), z|u ~ N(C u, I), x|z ~ N(W z + b, sigma^2 I); guide q(u|x) q(z|x,u), whose
    z-scale depends on u: the direct score term of q(z|u) must be taken at sg(u)."""

    def __init__(self, d=2, D=3, sigma=0.5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        r = lambda *s, k=1.0: nn.Parameter(k * torch.randn(*s, generator=g, dtype=DT))  # noqa: E731
        self.d, self.sigma = d, sigma
        self.C, self.W, self.b = r(d, d), r(D, d), r(D)
        self.Au, self.cu, self.lsu = r(d, D, k=0.3), r(d, k=0.3), r(d, k=0.3)
        self.Az, self.M, self.N, self.lsz = r(d, D, k=0.3), r(d, d, k=0.5), r(d, d, k=0.5), r(d, k=0.3)

    def model(self, x):
        pyro.module("htoy", self)
        with pyro.plate("data", x.shape[0], dim=-1):
            u = pyro.sample("u", dist.Normal(torch.zeros(self.d, dtype=DT), 1.0).to_event(1))
            z = pyro.sample("z", dist.Normal(u @ self.C.T, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def q_z(self, x, u, p=None):
        p = p or dict(self.named_parameters())
        return dist.Normal(x @ p["Az"].T + u @ p["M"].T, (u @ p["N"].T + p["lsz"]).exp()).to_event(1)

    def q_u(self, x, p=None):
        p = p or dict(self.named_parameters())
        return dist.Normal(x @ p["Au"].T + p["cu"], p["lsu"].exp()).to_event(1)

    def guide(self, x):
        pyro.module("htoy", self)
        with pyro.plate("data", x.shape[0], dim=-1):
            u = pyro.sample("u", self.q_u(x))
            pyro.sample("z", self.q_z(x, u))


def test_hierarchical_guide_gradient_is_exactly_the_dreg_estimator():
    toy = HierarchicalToy()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, generator=g, dtype=DT)
    K = 5
    dreg = make_elbo("iwae-dreg", num_particles=K)
    pyro.set_rng_seed(12)
    got = _grads(toy, lambda: dreg.differentiable_loss(toy.model, toy.guide, x).backward())
    pyro.set_rng_seed(12)
    trace = poutine.trace(dreg._vectorized_num_particles(toy.guide)).get_trace(x)
    u0, z0 = trace.nodes["u"]["value"].detach(), trace.nodes["z"]["value"].detach()
    qu, qz = trace.nodes["u"]["fn"].base_dist, trace.nodes["z"]["fn"].base_dist
    eps_u, eps_z = ((u0 - qu.loc) / qu.scale).detach(), ((z0 - qz.loc) / qz.scale).detach()

    params = dict(toy.named_parameters())
    sg = {k: v.detach() for k, v in params.items()}
    qu_live = toy.q_u(x, params).base_dist
    u = qu_live.loc + qu_live.scale * eps_u
    qz_live = toy.q_z(x, u, params).base_dist
    z = qz_live.loc + qz_live.scale * eps_z
    torch.testing.assert_close(z.detach(), z0)

    def log_p(u, z, p):
        prior_u = dist.Normal(torch.zeros(toy.d, dtype=DT), 1.0).to_event(1).log_prob(u)
        prior_z = dist.Normal(u @ p["C"].T, 1.0).to_event(1).log_prob(z)
        return prior_u + prior_z + dist.Normal(z @ p["W"].T + p["b"], toy.sigma).to_event(1).log_prob(x)

    # log q with phi stopped but the samples live: q(z|u)'s parameters follow the live u
    log_w = log_p(u, z, sg) - toy.q_u(x, sg).log_prob(u) - toy.q_z(x, u, sg).log_prob(z)
    w = torch.softmax(log_w.detach(), 0)
    surrogate = (w**2 * log_w).sum() + (w * log_p(u.detach(), z.detach(), params)).sum()
    expected = dict(zip(params, torch.autograd.grad(-surrogate, list(params.values()))))
    for name in expected:
        assert got[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-10, msg=name)


def _row_gradients(elbo, K, rows, seed, use_differentiable_loss):
    """R independent draws of the gradient for one data point (see :class:`Toy`)."""
    toy = Toy(rows=rows)
    x = toy.data(1).expand(rows, toy.D)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    if use_differentiable_loss:
        grads = _grads(toy, lambda: elbo.differentiable_loss(toy.model, toy.guide, x).backward())
    else:
        grads = _grads(toy, lambda: elbo.loss_and_grads(toy.model, toy.guide, x))
    return grads


def test_dreg_gradient_is_unbiased_for_the_iwae_gradient():
    K, R = 8, 4000
    dreg = _row_gradients(make_elbo("iwae-dreg", num_particles=K), K, R, seed=21, use_differentiable_loss=True)
    iwae = _row_gradients(_renyi(K), K, R, seed=22, use_differentiable_loss=False)
    for name in ("c", "log_diag", "b"):  # guide, guide, model
        (m1, s1), (m2, s2) = _mean_se(dreg[name]), _mean_se(iwae[name])
        z_scores = (m1 - m2).abs() / torch.hypot(s1, s2)
        assert (z_scores < 4).all(), (name, m1, m2, z_scores)
        assert (m1.abs() > 4 * s1).any(), (name, m1, s1)  # a real signal, not noise vs noise


def test_model_gradient_is_the_iwae_one_draw_by_draw():
    K, R = 8, 50
    dreg = _row_gradients(make_elbo("iwae-dreg", num_particles=K), K, R, seed=23, use_differentiable_loss=True)
    iwae = _row_gradients(_renyi(K), K, R, seed=23, use_differentiable_loss=False)
    for name in ("b", "W"):  # the same formula, sum_k w~_k dlog p/dtheta, on the same draws
        torch.testing.assert_close(dreg[name], iwae[name], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(dreg["c"], iwae["c"])  # the guide's gradients differ


def test_dreg_guide_gradient_has_lower_variance_at_large_K():
    K, R = 64, 1000
    dreg = _row_gradients(make_elbo("iwae-dreg", num_particles=K), K, R, seed=31, use_differentiable_loss=True)
    iwae = _row_gradients(_renyi(K), K, R, seed=32, use_differentiable_loss=False)
    for name in ("c", "log_diag"):
        ratio = iwae[name].var(0) / dreg[name].var(0)
        assert (ratio > 2).all(), (name, ratio)


# ---------------------------------------------------------------------------
# interface
# ---------------------------------------------------------------------------


def test_svi_with_iwae_dreg_decreases_the_loss():
    toy = Toy()
    x = toy.data()
    evaluate = make_elbo("iwae-dreg", num_particles=200)

    def average_loss():
        pyro.set_rng_seed(99)
        return evaluate.loss(toy.model, toy.guide, x)

    before = average_loss()
    svi = SVI(toy.model, toy.guide, Adam({"lr": 0.05}), make_elbo("iwae-dreg", num_particles=8))
    for _ in range(150):
        assert math.isfinite(svi.step(x))
    after = average_loss()
    assert after < before - 1.0, (before, after)


def _maximum_likelihood(toy, x):
    """max over W, b of sum log p(x) for the toy's fixed sigma (probabilistic PCA, Tipping & Bishop
    1999): b the sample mean, W W^T + sigma^2 I the sample covariance with its smallest D - d
    eigenvalues (and any below sigma^2) replaced by sigma^2."""
    mean = x.mean(0)
    covariance = (x - mean).T @ (x - mean) / x.shape[0]
    eigenvalues, vectors = torch.linalg.eigh(covariance)  # ascending
    kept = eigenvalues.clone()
    kept[: toy.D - toy.d] = toy.sigma**2
    kept = kept.clamp(min=toy.sigma**2)
    fitted = vectors @ torch.diag(kept) @ vectors.T
    return dist.MultivariateNormal(mean, covariance_matrix=fitted).log_prob(x).sum().item()


def _bound_gap(toy, x, K, repeats=50):
    """log p(x) - IW bound (K), mean and standard error over ``repeats`` seeded estimates."""
    exact = toy.log_marginal(x).sum().item()
    dreg = make_elbo("iwae-dreg", num_particles=K)
    gaps = []
    for r in range(repeats):
        pyro.set_rng_seed(1000 * K + r)
        gaps.append(exact + dreg.loss(toy.model, toy.guide, x))
    mean, se = _mean_se(gaps)
    return mean.item(), se.item()


def test_training_with_iwae_dreg_reaches_the_maximum_likelihood_and_a_tight_bound():
    """SVI on the IW bound fits the model itself: the exact log p(x) of the trained toy reaches the
    closed-form maximum likelihood, and the bound, loose at the start, is then within noise of it."""
    toy = Toy()
    x = toy.data()
    best = _maximum_likelihood(toy, x)
    start_exact, (start_gap, _) = toy.log_marginal(x).sum().item(), _bound_gap(toy, x, K=10)
    assert start_exact < best - 10 and start_gap > 2.0, (start_exact, best, start_gap)
    svi = SVI(toy.model, toy.guide, Adam({"lr": 0.05}), make_elbo("iwae-dreg", num_particles=8))
    for _ in range(200):
        svi.step(x)
    trained = toy.log_marginal(x).sum().item()
    assert best - 0.2 < trained <= best + 1e-9, (trained, best)
    for K in (10, 100):
        gap, se = _bound_gap(toy, x, K)
        assert -4 * se < gap < 0.05 + 4 * se, (K, gap, se)


def test_loss_and_grads_fills_the_gradients():
    toy = Toy()
    x = toy.data()
    loss = make_elbo("iwae-dreg", num_particles=4).loss_and_grads(toy.model, toy.guide, x)
    assert isinstance(loss, float) and math.isfinite(loss)
    for name, p in toy.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("K", [0, 1])
def test_fewer_than_two_particles_is_an_error(K):
    with pytest.raises(ValueError, match="num_particles >= 2"):
        make_elbo("iwae-dreg", num_particles=K)
    with pytest.raises(ValueError, match="num_particles >= 2"):
        IWAE_DReG(num_particles=K)


def test_non_reparameterized_guide_site_is_an_error_naming_it():
    toy = Toy()
    x = toy.data()

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            # von Mises draws (rejection sampling) have no reparameterized sampler
            pyro.sample("z", dist.VonMises(torch.zeros(x.shape[0], 2, dtype=DT), 1.0).to_event(1))

    with pytest.raises(ValueError, match="'z'"):
        make_elbo("iwae-dreg", num_particles=3).differentiable_loss(toy.model, guide, x)
    with pytest.raises(ValueError, match="'z'"):
        make_elbo("iwae-dreg", num_particles=3).loss(toy.model, guide, x)


def test_guide_site_missing_from_the_model_is_an_error():
    toy = Toy()
    x = toy.data()

    def guide(x):
        pyro.module("toy", toy)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.MultivariateNormal(x @ toy.A.T + toy.c, scale_tril=toy.scale_tril()))
            pyro.sample("extra", dist.Normal(torch.zeros(x.shape[0], dtype=DT), 1.0))

    with pytest.raises(ValueError, match="'extra'"):
        make_elbo("iwae-dreg", num_particles=3).differentiable_loss(toy.model, guide, x)


# ---------------------------------------------------------------------------
# the repo's model
# ---------------------------------------------------------------------------


def test_runs_on_the_srvae_with_finite_gradients_and_the_renyi_value():
    m = SRVAE((1, 8, 8), guide="full", hidden=8)
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 256, (4, 1, 8, 8), generator=g).float() + 0.5) / 256
    pyro.set_rng_seed(7)
    loss = make_elbo("iwae-dreg", num_particles=4).differentiable_loss(m.model, m.guide, x)
    loss.backward()
    assert loss.shape == () and torch.isfinite(loss)
    for network in (m.encoder_u, m.encoder_z, m.decoder_x, m.decoder_y, m.prior_z):
        grads = [p.grad for p in network.parameters()]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
        assert sum(gr.abs().sum() for gr in grads) > 0
    pyro.set_rng_seed(7)
    renyi = _renyi(4).loss(m.model, m.guide, x)
    assert abs(loss.item() - renyi) <= 1e-6 * abs(renyi), (loss.item(), renyi)
