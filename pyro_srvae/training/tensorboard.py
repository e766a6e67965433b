"""TensorBoard logging of a training run (``--tensorboard``): :class:`TrainingBoard`.

:func:`pyro_srvae.train` with ``TrainConfig(tensorboard=True)`` writes event files under
``OUT/tensorboard/`` (rank 0 only), keyed by the global optimizer step:

* ``train/loss_bpd``: the running training loss (minus the training objective, bits/dim: the
  ELBO, or under KL warm-up, a bound or free bits the objective the epoch records name) at each
  host sync of the loop, the entries of ``metrics.json``'s ``steps``;
* ``train/skipped_updates`` and ``train/skipped_nonfinite_updates``: the updates the update guard
  skipped so far (:class:`pyro_srvae.training.guard.UpdateGuard`), at the same host syncs;
* at each epoch's last step: ``train/objective_bpd`` (the record's ``train_objective_bpd``, named
  by its ``train_objective``), ``test/elbo_bpd`` and ``train/kl_scale`` of the epoch record;
  ``elbo_terms_bits_per_dim/<term>`` (each term of :func:`pyro_srvae.metrics.likelihood.elbo_terms`
  on a fixed batch of test images, divided by ``D ln 2``: they sum to ``8 - test ELBO bits/dim``);
  ``latents/kl_<site>_bits_per_image`` (the KL of each latent on the same batch,
  :func:`pyro_srvae.metrics.latents.kl_per_image`); ``gamma/x``, ``gamma/y``; for a mixture prior
  ``mixture/weight_<k>`` and ``mixture/effective_components``; the images ``images/samples``
  (and ``images/samples_y`` for the srVAE) and, for the srVAE, ``images/super_resolution``
  (rows of test images: y upsampled | SR mean | two z draws, the decoder means of two latent
  draws | truth);
* at the end, in the sub-run ``hparams/``: the configuration as hparams, with the final test
  metrics as ``final/<key>`` (the floats of ``metrics.json``'s ``test``, and the active units).

The ``tensorboard`` package is an optional extra, imported only when a run asks for it.
"""

import math
import re
import time
from pathlib import Path

import torch

from ..data.batching import dequantize
from ..metrics.latents import kl_per_image
from ..metrics.likelihood import elbo_terms
from ..model.srvae import SRVAE

#: The folder of the event files, inside the run's output directory.
LOG_DIR = "tensorboard"

#: The sub-run of ``LOG_DIR`` holding the hparams session: the configuration and the final metrics.
HPARAMS_RUN = "hparams"

INSTALL_HINT = '--tensorboard needs the tensorboard package: pip install -e ".[tensorboard]"'


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``; ImportError with :data:`INSTALL_HINT` without tensorboard."""
    try:
        # torch.utils.tensorboard may already be imported (and cached) while tensorboard itself
        # is gone or blocked, so ask for the package first.
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return SummaryWriter


def tensorboard_missing():
    """None when TensorBoard logging works here, else the one line saying what to install."""
    try:
        summary_writer_class()
    except ImportError as error:
        return str(error)
    return None


def term_tag(name):
    """A TensorBoard-safe tag for an ``elbo_terms`` key: ``"-log q(u)"`` -> ``"minus_log_q_u"``."""
    return re.sub(r"\W+", "_", name.replace("-log", "minus_log")).strip("_")


class NullBoard:
    """What a run without ``--tensorboard`` (or a rank other than 0) logs to: nothing."""

    enabled = False

    def running_loss(self, step, bpd):
        pass

    def skipped_updates(self, step, skipped, nonfinite):
        pass

    def epoch(self, record, model, test_images, gammas, mixture):
        pass

    def final(self, step, config, test):
        pass

    def close(self):
        pass


class TrainingBoard(NullBoard):
    """A run's event files, written with ``SummaryWriter``.

    ``purge_step`` is the step the run (re)starts at: TensorBoard then discards every event
    at that step or later that earlier sessions wrote into ``log_dir`` (an interrupted
    session's steps after its last checkpoint, or a finished run's when a fresh run reuses
    the folder), so a resumed run appends without duplicating a step as long as it logs
    nothing before ``purge_step``.

    What needs the model (terms, images) is computed under a private RNG seeded by ``seed``:
    the same fixed draws every epoch, and the training streams are left untouched.
    """

    enabled = True

    def __init__(self, log_dir, purge_step=0, seed=0, num_images=4, num_samples=8, sr_samples=8, term_images=32):
        wait_for_a_later_second(log_dir)
        self.writer = summary_writer_class()(log_dir=str(log_dir), purge_step=purge_step)
        self.seed = seed
        self.num_images, self.num_samples, self.sr_samples = num_images, num_samples, sr_samples
        self.term_images = term_images

    def running_loss(self, step, bpd):
        self.writer.add_scalar("train/loss_bpd", bpd, step)

    def skipped_updates(self, step, skipped, nonfinite):
        """The counts so far of the updates skipped, all of them and those with a non-finite gradient."""
        self.writer.add_scalar("train/skipped_updates", skipped, step)
        self.writer.add_scalar("train/skipped_nonfinite_updates", nonfinite, step)

    def epoch(self, record, model, test_images, gammas, mixture):
        """The epoch ``record`` of ``metrics.json`` and the model's state, at the record's step.

        ``gammas``: ``{"x": gamma_x, "y": gamma_y}`` (None where the likelihood predicts its
        scales); ``mixture``: :func:`pyro_srvae.training.report.mixture_summary` of the top prior.
        """
        step, add = record["step"], self.writer.add_scalar
        if record["train_objective_bpd"] is not None:  # None: the update guard skipped every step of the epoch
            add("train/objective_bpd", record["train_objective_bpd"], step)
        add("test/elbo_bpd", record["test_elbo_bpd"], step)
        add("train/kl_scale", record["kl_scale"], step)
        for name, value in gammas.items():
            if value is not None:
                add(f"gamma/{name}", value, step)
        if mixture is not None:
            width = len(str(len(mixture["weights"]) - 1))
            for k, weight in enumerate(mixture["weights"]):
                add(f"mixture/weight_{k:0{width}d}", weight, step)
            add("mixture/effective_components", mixture["effective_components"], step)
        device = model.device
        was_training = model.training
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(self.seed)
            model.eval()
            try:
                x = dequantize(test_images[: self.term_images].to(device))
                self._terms(model, x, step)
                self._images(model, x[: self.num_images], step)
            finally:
                model.train(was_training)
        self.writer.flush()  # an epoch's worth, visible now rather than at the writer's next timed flush

    def _terms(self, model, x, step):
        scale = x[0].numel() * math.log(2)  # nats per image -> bits per dimension of x
        for name, value in elbo_terms(model.model, model.guide, x).items():
            self.writer.add_scalar(f"elbo_terms_bits_per_dim/{term_tag(name)}", value.mean().item() / scale, step)
        # What the latents carry (pyro_srvae.metrics.latents): a KL near 0 bits is a collapsed latent.
        for name, kl in kl_per_image(model, x).items():
            self.writer.add_scalar(f"latents/kl_{name}_bits_per_image", kl.mean().item() / math.log(2), step)

    def _images(self, model, x, step):
        generated = model.sample(self.num_samples)
        if isinstance(model, SRVAE):
            self.writer.add_images("images/samples", _displayable(generated.x), step)
            self.writer.add_images("images/samples_y", _displayable(generated.y), step)
            self.writer.add_image("images/super_resolution", _super_resolution_grid(model, x, self.sr_samples), step)
        else:
            self.writer.add_images("images/samples", _displayable(generated), step)

    def final(self, step, config, test):
        """The configuration (scalars and strings) as hparams, with the test metrics as
        ``final/<key>``, in the sub-run ``hparams/`` at the last step.

        One hparams session per run: TensorBoard keeps the first hparams summary of a folder
        (purging removes no summary metadata), so the folder's earlier files, an earlier
        session's configuration and metrics, are removed before this session's are written.
        """
        from torch.utils.tensorboard.summary import hparams

        values = {key: value for key, value in config.items() if isinstance(value, (bool, int, float, str))}
        values.update({key: value for key, value in test.items() if isinstance(value, str)})  # x_density
        metrics = {f"final/{key}": value for key, value in test.items() if isinstance(value, float)}
        metrics.update({f"final/{key}": float(value) for key, value in test.items() if key.startswith("active_") and value is not None})
        log_dir = Path(self.writer.get_logdir()) / HPARAMS_RUN
        for old in log_dir.glob("events.out.tfevents.*"):
            old.unlink()
        with summary_writer_class()(log_dir=str(log_dir)) as writer:
            for summary in hparams(values, metrics):
                writer.file_writer.add_summary(summary, step)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step)

    def close(self):
        self.writer.close()


#: The longest :func:`wait_for_a_later_second` waits; a folder whose files are dated later
#: than that was written under another clock, and no wait would order it.
MAX_ORDERING_WAIT_S = 2.0


def wait_for_a_later_second(log_dir, clock=time.time, sleep=time.sleep):
    """Wait until the current second is later than that of every event file in ``log_dir``.

    TensorBoard reads a folder's event files in the order of their names,
    ``events.out.tfevents.<second>.<host>.<pid>.<counter>``, as strings. Within one second
    (a quick resume, or two sessions in one process) that order is the pid's and the counter's
    as strings, where ``10`` comes before ``9``: the earlier session's file would then be read
    last, and its steps, older than the resumed session's, would purge the resumed
    session's events. A file in a later second sorts after all of them.
    """
    seconds = [
        int(match.group(1))
        for path in Path(log_dir).glob("events.out.tfevents.*")
        if (match := re.match(r"events\.out\.tfevents\.(\d+)\.", path.name))
    ]
    if not seconds:
        return
    wait = max(seconds) + 1 - clock()
    if 0 < wait <= MAX_ORDERING_WAIT_S:
        sleep(wait)


def open_board(enabled, log_dir, purge_step, seed=0, sr_samples=8):
    """A :class:`TrainingBoard` when ``enabled``, else a :class:`NullBoard`."""
    if not enabled:
        return NullBoard()
    return TrainingBoard(log_dir, purge_step=purge_step, seed=seed, sr_samples=sr_samples)


def _displayable(images):
    return images.detach().float().clamp(0, 1).cpu()


def _super_resolution_grid(model, x, num_samples):
    """One row per test image: y upsampled (nearest) | SR mean | two z draws (decoder means) | truth."""
    from torchvision.utils import make_grid

    y = model.downscale(x)
    sr = model.super_resolve(y, num_samples=max(num_samples, 2))
    upsampled = torch.nn.functional.interpolate(y, scale_factor=model.factor, mode="nearest")
    columns = [upsampled, sr.mean, sr.means[0], sr.means[1], x]
    rows = torch.stack(columns, dim=1).flatten(0, 1)  # (5B, C, H, W), image by image
    return make_grid(_displayable(rows), nrow=len(columns), padding=1, pad_value=1.0)
