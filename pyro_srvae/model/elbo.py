"""ELBO estimators, swappable by name: Pyro builds every objective.

========================  ===================================================================
name                      estimator
========================  ===================================================================
``trace``                 ``Trace_ELBO``: all terms of eq. (2)/(11)/(20) by sampling
``meanfield``             ``TraceMeanField_ELBO``: the KL terms of eq. (4), (17), (21) in
                          closed form where one is registered (Gaussian-Gaussian), sampled
                          otherwise (the mixture prior of sec. 5)
``meanfield-mog-bound``   :class:`MixtureKLBound_ELBO`: as ``meanfield``, with KL(q || sum_i
                          w_i p_i) replaced by its upper bound sum_i w_i KL(q || p_i), eq. (23)
``renyi``                 ``RenyiELBO`` (option ``alpha``, default 0: the IWAE bound)
``graph``                 ``TraceGraph_ELBO``
``iwae-dreg``             :class:`IWAE_DReG`: the IWAE bound of ``renyi`` (alpha=0) with the
                          doubly-reparameterized gradient (DReG) for the guide (Tucker et
                          al. 2019); K = ``num_particles`` >= 2, always vectorized
========================  ===================================================================

``make_elbo("meanfield", free_bits=...)`` is :class:`FreeBits_ELBO`, a training objective
that keeps z from collapsing (not a bound; evaluation never scores it).
"""

import math
import operator

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.util import check_fully_reparametrized, get_dependent_plate_dims, is_validation_enabled, torch_item
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_model_guide_match, check_site_shape, warn_if_nan
from torch.distributions import kl_divergence

ELBO_NAMES = ("trace", "meanfield", "meanfield-mog-bound", "renyi", "graph", "iwae-dreg")


def mixture_kl_upper_bound(q, p):
    """sum_i w_i KL(q || p_i) >= KL(q || sum_i w_i p_i), eq. (23) (Hershey & Olsen 2007).

    ``q`` is a diagonal Gaussian ``Independent(Normal, 1)``; ``p`` a
    ``MixtureSameFamily`` of diagonal Gaussians over the same event. The inequality
    is the convexity of KL in its second argument; it is an equality for one
    component. Returns a tensor of the broadcast batch shape of ``q`` and ``p``.
    """
    weights = p.mixture_distribution.probs  # (..., K)
    components = p.component_distribution.base_dist  # Normal with (..., K, D) parameters
    q_loc = q.base_dist.loc.unsqueeze(-2)  # (..., 1, D): broadcast against the K components
    q_scale = q.base_dist.scale.unsqueeze(-2)
    kl_per_component = kl_divergence(dist.Normal(q_loc, q_scale), components).sum(-1)  # (..., K)
    return (weights * kl_per_component).sum(-1)


def _is_diagonal_gaussian(d):
    return isinstance(d, dist.Independent) and d.reinterpreted_batch_ndims == 1 and isinstance(d.base_dist, dist.Normal)


def _is_gaussian_mixture(d):
    return isinstance(d, torch.distributions.MixtureSameFamily) and _is_diagonal_gaussian(d.component_distribution)


class _ClosedFormKL_ELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO``'s loop over sites, with each latent site's KL from :meth:`site_kl`.

    The data terms are Pyro's; a latent site's KL(q || p) comes from :meth:`site_kl`
    (closed form where torch has one), or is sampled, log q - log p at the guide's draw,
    where it returns None. Subclasses change :meth:`site_kl` alone.
    """

    def site_kl(self, name, q, p):
        """KL(q || p) of one latent site, in the site's batch shape; None to sample it."""
        try:
            return kl_divergence(q, p)
        except NotImplementedError:
            return None

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo_particle = 0
        for name, model_site in model_trace.nodes.items():
            if model_site["type"] != "sample":
                continue
            if model_site["is_observed"]:
                elbo_particle = elbo_particle + model_site["log_prob_sum"]
                continue
            guide_site = guide_trace.nodes[name]
            if is_validation_enabled():
                check_fully_reparametrized(guide_site)
            kl_qp = self.site_kl(name, guide_site["fn"], model_site["fn"])
            if kl_qp is None:
                entropy_term = guide_site["score_parts"].entropy_term
                elbo_particle = elbo_particle + model_site["log_prob_sum"] - entropy_term.sum()
                continue
            kl_qp = scale_and_mask(kl_qp, scale=guide_site["scale"], mask=guide_site["mask"])
            elbo_particle = elbo_particle - kl_qp.sum()

        for name, guide_site in guide_trace.nodes.items():
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                raise ValueError(
                    f"guide site {name!r} has no counterpart in the model; "
                    f"{type(self).__name__} supports no auxiliary guide sites"
                )

        loss = -(elbo_particle.detach() if torch._C._get_tracing_state() else torch_item(elbo_particle))
        return loss, -elbo_particle


class MixtureKLBound_ELBO(_ClosedFormKL_ELBO):
    """The mean-field ELBO with the mixture KL bounded by eq. (23).

    For every latent site whose prior is a mixture of diagonal Gaussians and whose
    guide is a diagonal Gaussian, the sampled term log q - log p of
    ``TraceMeanField_ELBO`` is replaced by sum_i w_i KL(q || p_i): a deterministic
    (zero-variance) upper bound on the KL, hence a valid, looser lower bound on log p(x).
    Every other site is handled exactly as by ``TraceMeanField_ELBO``.
    """

    def site_kl(self, name, q, p):
        if _is_gaussian_mixture(p) and _is_diagonal_gaussian(q):
            return mixture_kl_upper_bound(q, p)  # eq. (23)
        return super().site_kl(name, q, p)


class FreeBits_ELBO(_ClosedFormKL_ELBO):
    """The mean-field objective with free bits on the latents named in ``sites`` (Kingma et al. 2016).

    A training objective, not a bound: per dimension d of a site's diagonal Gaussian, the
    KL averaged over the batch, m_d = mean_b KL(q(z_d|.) || p(z_d|.)), is replaced by
    max(m_d, ``free_bits``) (in nats). Below the threshold a dimension's KL costs nothing,
    so the optimizer has no reason to close it -- the posterior collapse of z that the
    ELBO of eq. (17)/(21) allows when the decoder can do without it -- and above it the
    loss is the mean-field ELBO's. Every other site is ``TraceMeanField_ELBO``'s. The
    model and its honest bounds are unchanged: evaluation scores the ELBO and the IW
    bound of log p(x), never this objective.
    """

    def __init__(self, free_bits, sites=("z",), **kwargs):
        if not (free_bits >= 0 and math.isfinite(free_bits)):
            raise ValueError(f"free_bits must be a finite number of nats >= 0, got {free_bits!r}")
        super().__init__(**kwargs)
        self.free_bits = float(free_bits)
        self.sites = tuple(sites)

    def site_kl(self, name, q, p):
        if name not in self.sites or self.free_bits == 0:
            return super().site_kl(name, q, p)
        if not (_is_diagonal_gaussian(q) and _is_diagonal_gaussian(p)):
            raise ValueError(f"free bits on site {name!r} need diagonal Gaussians for q and p, got "
                             f"{type(q).__name__} and {type(p).__name__}")
        kl_per_dim = kl_divergence(q.base_dist, p.base_dist)  # (..., B, D): the data plate is dim -2
        above = kl_per_dim.detach().mean(-2, keepdim=True) > self.free_bits
        # Summed over the batch, this is B * sum_d max(m_d, free_bits); no gradient below the threshold.
        return torch.where(above, kl_per_dim, torch.full_like(kl_per_dim, self.free_bits)).sum(-1)


def _is_latent(site):
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


class IWAE_DReG(ELBO):
    r"""The IWAE bound with the doubly-reparameterized gradient estimator (DReG).

    Per data point ``b`` of the independent plates (the models' ``"data"`` plate), with
    K = ``num_particles`` draws z_k ~ q_phi(z | x_b) and log weights
    log w_k = log p_theta(x_b, z_k) - log q_phi(z_k | x_b)::

        loss = -sum_b [ logsumexp_k log w_{k,b} - log K ]

    the same bound as ``RenyiELBO(alpha=0)`` (Burda et al. 2016), whose log weights it
    reproduces exactly (sums over dependent plates, ``site["log_prob"]`` with every
    ``poutine.scale``/mask applied). Only the gradient differs. With the normalized
    weights w~_k = softmax_k(log w_k) (held fixed),

        d/dtheta = sum_k w~_k d log p_theta(x, z_k) / dtheta                (IWAE)
        d/dphi   = sum_k w~_k^2 (d log w_k / d z_k) (d z_k / d phi)          (DReG)

    (Tucker, Lawson, Gu, Maddison 2019, "Doubly Reparameterized Gradient Estimators for
    Monte Carlo Objectives", eq. (7)). The plain reparameterized IWAE gradient of
    ``renyi`` has the same expectation, but it keeps the score term
    -sum_k w~_k d log q_phi(z_k) / dphi, and the signal-to-noise ratio of its guide
    gradient decays like 1/sqrt(K) (Rainforth et al. 2018, "Tighter Variational Bounds
    are Not Necessarily Better"); the DReG one does not.

    A parameter may belong to both model and guide (``pyro.module`` in both, or shared
    layers): each gets the sum of its theta and phi terms, since the estimator is built
    from the autograd graph, not from which trace registered it. The surrogate is

        S = sum_{k,b} [ w~ log p(x, z'_k) + w~^2 (log q(sg z_k) - log q(z_k)) ]

    where the model consumes z'_k, an alias of z_k whose incoming gradient a tensor hook
    multiplies by w~_k (so the path term of log p gets w~^2), and log q(sg z_k) re-runs
    the guide at the detached samples: only phi's direct (score) term, which cancels the
    one of log q(z_k), including that of q(z|u) in a hierarchical guide q(u) q(z|u)
    (its parameters are recomputed from sg(u)). Costs one more guide pass than ``renyi``.

    Particles are always vectorized (one ``"num_particles_vectorized"`` plate); the
    ``vectorize_particles`` argument is accepted for :func:`make_elbo` and ignored. Every
    guide site must be reparameterized and present in the model, and every latent site
    must lie in all the independent plates (no global latents: their weights would not
    factor over data points).
    """

    def __init__(
        self,
        num_particles=2,
        max_plate_nesting=float("inf"),
        vectorize_particles=True,
        strict_enumeration_warning=True,
        retain_graph=None,
    ):
        try:
            num_particles = operator.index(num_particles)
        except TypeError:
            num_particles = None
        if num_particles is None or isinstance(num_particles, bool) or num_particles < 2:
            raise ValueError(f"IWAE_DReG needs num_particles >= 2 (the K of the bound), got {num_particles!r}")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=True,
            strict_enumeration_warning=strict_enumeration_warning,
            retain_graph=retain_graph,
        )

    def _get_trace(self, model, guide, args, kwargs):  # the abstract method; unused
        raise NotImplementedError("IWAE_DReG builds its own vectorized traces")

    def _log_weight_terms(self, trace, sum_dims):
        """sum over the sample sites of ``trace`` of log_prob, dependent plates summed out:
        a tensor of the particle-and-independent-plates shape (keepdim, particle dim first)."""
        total = 0.0
        n = self.max_plate_nesting
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            log_prob = site["log_prob"]
            if log_prob.dim() < n:
                log_prob = log_prob.reshape((1,) * (n - log_prob.dim()) + tuple(log_prob.shape))
            dims = [d for d in sum_dims if -log_prob.dim() <= d]
            if dims:
                log_prob = log_prob.sum(dims, keepdim=True)
            total = total + log_prob
        return total

    def _traces(self, model, guide, args, kwargs, differentiable):
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        model = self._vectorized_num_particles(model)
        guide = self._vectorized_num_particles(guide)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        for name, site in guide_trace.nodes.items():
            if _is_latent(site) and not site["fn"].has_rsample:
                raise ValueError(
                    f"IWAE_DReG needs a reparameterized guide: site {name!r} has a "
                    f"{type(site['fn']).__name__} without rsample"
                )

        aliases = {}
        replay_trace = guide_trace
        if differentiable:
            # The model consumes fresh non-leaf aliases of the guide's samples, so a hook
            # on each sees exactly the gradient that flows from log p into the latents.
            replay_trace = guide_trace.copy()
            for name, site in guide_trace.nodes.items():
                if _is_latent(site):
                    alias = site["value"].view_as(site["value"])
                    replay_trace.nodes[name] = dict(site, value=alias)
                    if alias.requires_grad:
                        aliases[name] = (alias, site["fn"].event_dim)
        model_trace = poutine.trace(poutine.replay(model, trace=replay_trace)).get_trace(*args, **kwargs)

        detached_trace = None
        if differentiable:
            # log q(sg z; phi): the guide re-run at the detached samples (no sampling).
            frozen = guide_trace.copy()
            for name, site in guide_trace.nodes.items():
                if _is_latent(site):
                    frozen.nodes[name] = dict(site, value=site["value"].detach())
            detached_trace = poutine.trace(poutine.replay(guide, trace=frozen)).get_trace(*args, **kwargs)

        for name, site in guide_trace.nodes.items():
            if _is_latent(site) and name not in model_trace.nodes:
                raise ValueError(
                    f"guide site {name!r} has no counterpart in the model; IWAE_DReG supports no auxiliary guide sites"
                )
        for name, site in model_trace.nodes.items():
            if _is_latent(site) and name not in guide_trace.nodes:
                raise ValueError(f"model latent site {name!r} has no counterpart in the guide")
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)

        traces = [prune_subsample_sites(t) for t in (model_trace, guide_trace, detached_trace) if t is not None]
        for trace in traces:
            trace.compute_log_prob()
            if is_validation_enabled():
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        check_site_shape(site, self.max_plate_nesting)
        return traces, aliases

    def _compute(self, model, guide, args, kwargs, differentiable):
        traces, aliases = self._traces(model, guide, args, kwargs, differentiable)
        model_trace, guide_trace = traces[0], traces[1]
        sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
        log_p = self._log_weight_terms(model_trace, sum_dims)
        log_q = self._log_weight_terms(guide_trace, sum_dims)
        log_w = (log_p - log_q).detach()
        particle_dim = -self.max_plate_nesting
        loss = -(torch.logsumexp(log_w, dim=particle_dim) - math.log(self.num_particles)).sum()
        if not differentiable:
            return loss, None, model_trace, guide_trace
        log_q_frozen = self._log_weight_terms(traces[2], sum_dims)
        weights = torch.softmax(log_w, dim=particle_dim)  # w~, detached

        for name, (alias, event_dim) in aliases.items():
            hook_weight = weights.reshape(tuple(weights.shape) + (1,) * event_dim)
            if torch.broadcast_shapes(alias.shape, hook_weight.shape) != alias.shape:
                raise ValueError(
                    f"latent site {name!r} of shape {tuple(alias.shape)} is not in every independent "
                    f"plate of the weights {tuple(weights.shape)}; IWAE_DReG needs per-data-point latents"
                )
            alias.register_hook(lambda grad, w=hook_weight: grad * w.to(grad.dtype))

        surrogate = (weights * log_p + weights.pow(2) * (log_q_frozen - log_q)).sum()
        surrogate_loss = -surrogate
        if not torch.is_tensor(surrogate_loss) or not surrogate_loss.requires_grad:
            return loss, loss, model_trace, guide_trace
        return loss, surrogate_loss - surrogate_loss.detach() + loss, model_trace, guide_trace

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs):
        """The IWAE loss -sum_b [logsumexp_k log w_{k,b} - log K] (a float, no gradient)."""
        loss = torch_item(self._compute(model, guide, args, kwargs, differentiable=False)[0])
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """The IWAE loss as a tensor whose gradient is the DReG estimator (see the class)."""
        loss = self._compute(model, guide, args, kwargs, differentiable=True)[1]
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """Back-propagates the DReG gradient into the parameters; returns the float loss."""
        loss, surrogate_loss, model_trace, guide_trace = self._compute(model, guide, args, kwargs, differentiable=True)
        trainable_params = any(
            site["type"] == "param" for trace in (model_trace, guide_trace) for site in trace.nodes.values()
        )
        if trainable_params and getattr(surrogate_loss, "requires_grad", False):
            surrogate_loss.backward(retain_graph=self.retain_graph)
        loss = torch_item(loss)
        warn_if_nan(loss, "loss")
        return loss


def make_elbo(name, num_particles=1, vectorize_particles=False, free_bits=0.0, **options):
    """The Pyro ELBO called ``name``; see the module docstring for the names.

    ``options`` go to the Pyro class (``alpha`` for ``renyi``, ``max_plate_nesting``,
    ...). ``max_plate_nesting`` defaults to 1 -- the models' single ``"data"`` plate --
    which spares Pyro a guessing run of the model when particles are vectorized.
    ``iwae-dreg`` always vectorizes its K >= 2 particles, whatever ``vectorize_particles``.
    ``free_bits > 0`` (nats per dimension of z, ``meanfield`` only) trains with
    :class:`FreeBits_ELBO` instead.
    """
    options.setdefault("max_plate_nesting", 1)
    common = dict(num_particles=num_particles, vectorize_particles=vectorize_particles, **options)
    if free_bits:
        if name != "meanfield":
            raise ValueError(f"free bits are a mean-field objective (--elbo meanfield), not {name!r}")
        return FreeBits_ELBO(free_bits, **common)
    if name == "trace":
        return Trace_ELBO(**common)
    if name == "meanfield":
        return TraceMeanField_ELBO(**common)
    if name == "meanfield-mog-bound":
        return MixtureKLBound_ELBO(**common)
    if name == "renyi":
        common.setdefault("alpha", 0.0)
        return RenyiELBO(**common)
    if name == "graph":
        return TraceGraph_ELBO(**common)
    if name == "iwae-dreg":
        return IWAE_DReG(**common)
    raise ValueError(f"unknown ELBO {name!r}; expected one of {', '.join(ELBO_NAMES)}")
