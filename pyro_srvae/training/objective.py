"""The training objective and step: the ELBO by name, KL warm-up and latent scaling, the learning rate,
the optimizer, and one update.
"""

import math
from contextlib import contextmanager

import pyro
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from . import distributed
from .config import IMPORTANCE_WEIGHTED, PRECISIONS, ConfigError


class _LatentScaleMessenger(Messenger):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = self.scale * msg["scale"]


def scale_latents(fn, scale):
    """``poutine.scale`` restricted to latent sites: multiplies log p and log q of u and z.

    Used on both model and guide for KL warm-up: every KL term of eq. (4)/(17)/(21)/(23)
    is multiplied by ``scale`` while the data terms keep weight one. Returns a plain
    function (Pyro treats Messenger-instance guides specially).
    """
    if scale == 1.0:
        return fn

    def scaled(*args, **kwargs):
        with _LatentScaleMessenger(scale):
            return fn(*args, **kwargs)

    return scaled


@contextmanager
def training_mode(model, elbo):
    """The settings of the training loop, restored on exit.

    The data were validated once when loaded, so the model's per-call input checks and the
    distributions' argument checks are off: they cost time every step, and would turn a
    diverged network into a ValueError deep in torch instead of the NaN loss the loop
    reports. Where the ELBO has ``differentiable_loss`` (gradients reach the parameters
    through autograd, not through Pyro's param sites) the networks are registered with
    ``pyro.module`` once instead of on every model and guide call.
    """
    saved = model.validate_inputs, model.pyro_registration
    model.validate_inputs = False
    model.pyro_registration = not hasattr(elbo, "differentiable_loss")
    try:
        with pyro.validation_enabled(False):
            yield model
    finally:
        model.validate_inputs, model.pyro_registration = saved


def total_steps(config, batches_per_epoch):
    """The update steps a run's schedule spans: ``--epochs`` of batches. ``--max-steps`` stops a run
    early, as a signal does, without moving the schedule's end, so that a run stopped and resumed takes
    the updates of one that was not; a run resumed with more epochs stretches its schedule to the new end."""
    return config.epochs * batches_per_epoch


def learning_rate(config, step, planned_steps):
    """The learning rate of the update after ``step`` steps taken, of ``planned_steps`` (:data:`LR_SCHEDULES`)."""
    if config.lr_schedule == "constant" or planned_steps <= 0:
        return config.lr
    progress = min(step, planned_steps) / planned_steps
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def kl_scale(config, epoch, batch, batches_per_epoch):
    """Linear KL warm-up over ``config.kl_warmup`` epochs (fractional epochs count)."""
    if config.kl_warmup <= 0:
        return 1.0
    return min(1.0, (epoch + batch / batches_per_epoch) / config.kl_warmup)


def objective_name(config, kl_start=1.0, kl_end=1.0):
    """What the training loss of ``config`` is, by name (an epoch record's ``train_objective``).

    The loss is the negative ELBO only for a plain ELBO estimator at full KL: ``renyi`` (alpha 0)
    and ``iwae-dreg`` with K >= 2 train on the IWAE bound, ``meanfield-mog-bound`` on the looser
    bound of eq. (23), ``--free-bits`` on an objective that is no bound, and a KL warm-up scale
    below 1 (from ``kl_start`` to ``kl_end`` over the span the loss covers) weighs the latent terms
    down (:func:`scale_latents`). E.g. ``"ELBO (meanfield) with KL x 0 to 0.5 (warm-up)"``.
    """
    importance_weighted = config.elbo in IMPORTANCE_WEIGHTED and config.num_particles > 1
    if config.free_bits:
        name = f"free-bits objective ({config.free_bits:g} nats per dim of z; not a bound)"
    elif importance_weighted:
        name = f"IWAE bound K={config.num_particles} ({config.elbo})"
    elif config.elbo == "meanfield-mog-bound":
        name = "eq. (23) bound on the ELBO (meanfield-mog-bound)"
    else:
        name = f"ELBO ({config.elbo})"
    if min(kl_start, kl_end) >= 1.0:
        return name
    scaled = "latent log-densities" if importance_weighted else "KL"  # scale_latents scales log p and log q of z
    span = f"{kl_start:.2g}" if kl_start == kl_end else f"{kl_start:.2g} to {kl_end:.2g}"
    return f"{name} with {scaled} x {span} (warm-up)"


def upgrade_epoch_record(record, config):
    """An epoch record of a checkpoint from before ``train_objective_bpd``: its ``train_elbo_bpd``
    (the same running objective, misnamed) under the new key, and the objective's name.
    The warm-up span runs from the scale at the epoch's start to the record's ``kl_scale``."""
    if "train_elbo_bpd" not in record:
        return record
    start = kl_scale(config, record["epoch"] - 1, 0, 1)
    name = objective_name(config, start, record.get("kl_scale", 1.0))
    upgraded = {}
    for key, value in record.items():  # the key order of a new record
        if key == "train_elbo_bpd":
            upgraded.update(train_objective_bpd=value, train_objective=name)
        else:
            upgraded[key] = value
    return upgraded


def network_precision(device, precision):
    """The context of the networks' forward passes: ``torch.autocast`` to bf16, or nothing.

    Only training uses it; evaluation always computes in float32.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}")
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def make_optimizer(model, lr):
    """Adam, fused (``fused=True``): one kernel per step over all parameters instead of
    several per tensor -- on a GPU, one launch instead of hundreds; on the CPU (torch >= 2.4)
    3.4x faster than the per-tensor loop on the srVAE's 56 tensors (0.63 vs 2.15 ms,
    ``docs/performance.md``). Where torch has no fused Adam for the device, the default one."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr)


class ElboObjective(torch.nn.Module):
    """The training loss as a module: ``forward(x, kl_scale)`` is Pyro's differentiable ELBO loss.

    DistributedDataParallel synchronises the gradients of what its own ``forward`` computed,
    and Pyro's ``model``/``guide`` call the networks' submodules directly, so wrapping the
    VAE itself would bypass DDP. This module owns the VAE as a submodule (its parameters
    are DDP's) and runs the whole ELBO, KL warm-up included, inside ``forward``; inside,
    ``pyro.module`` still registers the original VAE, the same parameter objects.
    """

    def __init__(self, vae, elbo, precision="fp32"):
        super().__init__()
        self.vae = vae
        self.elbo = elbo
        self.precision = precision

    def forward(self, x, kl_scale=1.0):
        model_fn = scale_latents(self.vae.model, kl_scale)
        guide_fn = scale_latents(self.vae.guide, kl_scale)
        with network_precision(x.device, self.precision):
            return self.elbo.differentiable_loss(model_fn, guide_fn, x)


class DataParallelElbo:
    """Pyro's loss and gradients of one step, summed over the global batch of all ranks.

    :meth:`loss_and_backward` leaves in every parameter's ``.grad`` the gradient of the
    negative ELBO summed over the images of all ranks -- the gradient one process would get
    on the whole global batch -- identical on every rank. Two ways, named by ``sync``:

    * ``"ddp"``: ELBOs with ``differentiable_loss`` (trace, meanfield, meanfield-mog-bound)
      run as :class:`ElboObjective` under DistributedDataParallel, whose bucketed
      all-reduce overlaps the backward pass. DDP *averages* over ranks while the loss is
      a *sum* over images, so each rank back-propagates ``world_size * loss``.
    * ``"all-reduce"``: ELBOs that only offer ``loss_and_grads`` (renyi, graph) do their
      own backward on the plain VAE; the gradients are then summed over ranks
      (:meth:`DistributedContext.all_reduce_gradients`).

    In a single process (``sync`` is ``None``) this is exactly the plain Pyro call.
    """

    def __init__(self, vae, elbo, context, precision="fp32"):
        self.vae = vae
        self.elbo = elbo
        self.context = context
        self.precision = precision
        self.objective = None
        if hasattr(elbo, "differentiable_loss"):
            self.objective = context.data_parallel(ElboObjective(vae, elbo, precision))
        self.sync = None if not context.enabled else "ddp" if self.objective is not None else "all-reduce"

    def loss_and_backward(self, x, kl_scale=1.0):
        """This rank's loss (summed over its images, detached, no host sync where Pyro allows)."""
        if self.objective is not None:
            loss = self.objective(x, kl_scale)
            (loss * self.context.world_size).backward()  # x1 in a single process: exact
            return loss.detach()
        model_fn, guide_fn = scale_latents(self.vae.model, kl_scale), scale_latents(self.vae.guide, kl_scale)
        with network_precision(x.device, self.precision):
            loss = torch.tensor(self.elbo.loss_and_grads(model_fn, guide_fn, x))
        self.context.all_reduce_gradients(self.vae.parameters())
        return loss


def step_unless_skipped(optimizer, taken):
    """``optimizer.step()`` where ``taken`` (a device boolean) says so, leaving its state untouched otherwise."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        # torch.amp.GradScaler's contract: given found_inf = 1, a fused optimizer (make_optimizer's Adam)
        # leaves the parameters, exp_avg, exp_avg_sq and the step count as they were, decided on the device.
        optimizer.found_inf = (~taken).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif taken.item():  # any other optimizer: the decision comes to the host, one sync per step
        optimizer.step()


def training_step(model, optimizer, objective, x, kl_scale=1.0, clip_norm=None, guard=None, step=0):
    """One optimizer step, as :func:`train` takes it: Pyro's loss and gradients, optional
    global-norm clipping, then ``optimizer.step()`` -- unless ``guard``, an :class:`UpdateGuard`,
    skips it (``step`` is this step's number, for its report).

    ``objective`` is a Pyro ELBO (one process) or the :class:`DataParallelElbo` that
    :func:`train` builds once per run (it holds the DDP wrapper). Returns this rank's loss,
    detached, without a host sync where Pyro allows.
    """
    if not isinstance(objective, DataParallelElbo):
        objective = DataParallelElbo(model, objective, distributed.DistributedContext())
    optimizer.zero_grad(set_to_none=True)
    loss = objective.loss_and_backward(x, kl_scale)
    if guard is None:
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        return loss
    # One fused norm of all gradients, taken before the clipping it also does when asked (by 1.0
    # otherwise: exact). In a data-parallel run the gradients here are already summed over the
    # ranks (DDP's all-reduce ends inside backward(); all_reduce_gradients is synchronous): the
    # same bits on every rank, so every rank computes the same norm and takes the same decision.
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf if clip_norm is None else clip_norm)
    taken = guard.decide(norm, step)
    if guard.factor > 0 or guard.clip_factor > 0:  # by exactly 1.0 unless clipped: a device scalar, no host sync
        torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], guard.clip_scale)
    step_unless_skipped(optimizer, taken)
    return loss
