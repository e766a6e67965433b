"""Training: one function, :func:`train`, behind ``examples/train_srvae.py``.

Pyro builds the objective: each step asks a Pyro ELBO (:func:`pyro_srvae.make_elbo`)
for the loss of ``model.model`` against ``model.guide`` and its gradients -- what
``pyro.infer.SVI.step`` does inside. The step then goes to a plain ``torch.optim.Adam``
over the module's parameters, which gives global-norm clipping and an optimizer
state that checkpoints and resumes exactly. Before it, :class:`UpdateGuard` skips an update
whose gradient norm is not finite or far above its recent history (docs/training-faults.md).

A run writes into its output directory: ``checkpoint.pt`` (atomic), ``metrics.json``,
``metrics.csv``, PNG figures (:mod:`pyro_srvae.plots`) and, with ``tensorboard=True``,
TensorBoard event files under ``tensorboard/`` (:mod:`pyro_srvae.training.tensorboard`).

Under ``torchrun`` the same loop runs data-parallel, one process per GPU or CPU worker
(:mod:`pyro_srvae.training.distributed`): ``--batch-size`` is per process, gradients are summed
over the global batch (:class:`DataParallelElbo`), evaluation is sharded, and rank 0
alone writes files. Each rank draws its own noise; checkpoints hold every rank's RNG
state, so a resumed data-parallel run continues exactly as well.
"""

import dataclasses
import math
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from ..data.batching import DeviceImages, augment_dihedral, dequantize, iterate_batches, num_batches
from ..data.datasets import FOLDER
from ..metrics.evaluate import evaluate_model
from ..metrics.likelihood import bits_per_dim, evaluation_batch_size
from ..metrics.sr_scores import fit_baseline_scale
from ..model.elbo import make_elbo
from ..model.srvae import SRVAE
from ..utils.devices import resolve_device
from ..utils.io import remove_stale_temporaries
from ..utils.seeds import derive_seed, get_rng_state, set_rng_state
from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, default_out_dir, resolve_epochs, short_run_note, too_short
from .factory import build_model, check_bit_depth, data_summary, load_split, set_standardization, standardizes
from .guard import TrainingDiverged, UpdateGuard
from .objective import (
    DataParallelElbo,
    kl_scale,
    learning_rate,
    make_optimizer,
    objective_name,
    set_learning_rate,
    total_steps,
    training_mode,
    training_step,
    upgrade_epoch_record,
)
from .report import (
    MIXTURE_BOUND_WARNING,
    draw_figures,
    item_or_none,
    mixture_summary,
    run_metrics,
    summary_table,
    top_prior,
    write_metrics,
)
from .tensorboard import LOG_DIR as BOARD_DIR
from .tensorboard import open_board

# Steps between host syncs (divergence check, progress bar, and in a data-parallel run the
# moment all ranks agree to stop on a signal): rare enough not to stall a GPU queue.
SYNC_EVERY = 10

# What a run writes into its output directory: the checkpoint, the metrics, draw_figures's PNGs.
OUTPUT_FILES = ("checkpoint.pt", "metrics.json", "metrics.csv")

FIGURE_FILES = (
    "loss_curves.png", "reconstructions.png", "samples.png", "super_resolution.png", "calibration.png",
    "mog_components.png",
)  # fmt: skip


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; a checkpoint was written before stopping."""

    def __init__(self, message, signal_number):
        super().__init__(message)
        self.signal_number = signal_number


@dataclass
class TrainResult:
    model: torch.nn.Module
    metrics: dict
    out_dir: Path
    checkpoint: Path
    figures: list = field(default_factory=list)


def _synchronise(context, loss_sum, epoch_images, signal_state):
    """The host sync every few steps: the epoch's loss and image count so far over all
    ranks, and the signal any rank received (SIGTERM before SIGINT; ``None`` if none).

    One all-reduce carries all three, so every rank reaches the same decision to stop.
    """
    local_signal = signal_state.get("signal")
    counts = [epoch_images, local_signal == signal.SIGINT, local_signal == signal.SIGTERM]
    packed = torch.cat([loss_sum.detach().double().reshape(1), torch.tensor(counts, dtype=torch.float64, device=loss_sum.device)])
    total_loss, images, sigints, sigterms = context.all_reduce_sum(packed).tolist()
    stop_signal = int(signal.SIGTERM) if sigterms else int(signal.SIGINT) if sigints else None
    return total_loss, int(images), stop_signal


@contextmanager
def _stop_on_signals(state):
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (main thread only)."""

    def handler(signal_number, frame):
        state["signal"] = signal_number

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _config_from_checkpoint(payload, overrides):
    try:
        config = TrainConfig.from_dict(dict(payload["config"]))
    except (TypeError, ConfigError) as error:
        raise CheckpointError(f"checkpoint has an unusable configuration: {error}") from None
    for name, value in overrides.items():
        if name in TrainConfig.RESUMABLE and value is not None:
            setattr(config, name, value)
    # A step limit stops one invocation (a smoke run, a time slice); it is not part of
    # the run's identity, so a resumed run has only the limit it is given now.
    config.max_steps = overrides.get("max_steps")
    return config


def train(config=None, *, resume=None, progress=True, log=print, **overrides):
    """Train (or resume), evaluate and draw figures; returns a :class:`TrainResult`.

    ``config`` is a :class:`TrainConfig` (or ``None`` for the defaults) and keyword
    ``overrides`` replace its fields. With ``resume=CHECKPOINT`` the configuration comes
    from the checkpoint and only the fields in ``TrainConfig.RESUMABLE`` (``epochs``,
    ``max_steps``, ``device``, ...) may be overridden; training continues from the
    exact step, with the optimizer, the RNGs and the data order restored.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this with the same
    arguments and trains data-parallel (:mod:`pyro_srvae.training.distributed`): each rank takes
    ``batch_size`` images of every global batch of ``batch_size * world_size``, gradients
    are summed over ranks (:class:`DataParallelElbo`), evaluation is sharded and reduced,
    and only rank 0 writes the checkpoint, the metrics and the figures, and logs.

    Raises :class:`ConfigError`, :class:`CheckpointError`, :class:`TrainingDiverged`
    or :class:`TrainingInterrupted` (after writing a checkpoint), and in a data-parallel
    run :class:`pyro_srvae.training.distributed.ProcessGroupLost` when a peer is lost.
    """
    started = time.time()
    payload = None
    if resume is not None:
        payload = load_checkpoint(resume)
        config = _config_from_checkpoint(payload, overrides)
        if config.out is None:
            config.out = str(Path(resume).parent)
    else:
        config = dataclasses.replace(config or TrainConfig(), **overrides)
    config.validate()
    try:
        context = distributed.connect(resolve_device(config.device))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    try:
        with context.lost_contact_on_failure():
            return _train(
                config, payload, resume, context, started,
                progress=progress and context.is_main, log=log if context.is_main else _silent,
            )  # fmt: skip
    finally:
        context.close()


def _silent(*args, **kwargs):
    """The log of ranks other than 0: one copy of every message is enough."""


def _train(config, payload, resume, context, started, progress, log):
    """The body of :func:`train` once the configuration and the process group are settled."""
    # The default directory name holds the time: every rank takes rank 0's.
    out_dir = Path(context.broadcast_object(config.out or str(default_out_dir(config))))
    config.out = str(out_dir)
    context.resume_hint = f"Resume from the last checkpoint with --resume {out_dir / 'checkpoint.pt'}"

    train_set, test_set = _load_data(config, context, progress)
    _log_data(train_set, test_set, log)
    global_batch = config.batch_size * context.world_size
    if len(train_set) < global_batch:
        per_rank = f" x {context.world_size} processes = {global_batch}" if context.enabled else ""
        raise ConfigError(f"--batch-size {config.batch_size}{per_rank} exceeds the {len(train_set)} training images")

    if config.epochs is None:
        log(resolve_epochs(config, len(train_set), context.world_size))
    run = _Run(config, context, out_dir, started, *_build(config, train_set, context, log, fresh=payload is None))
    check_bit_depth(run.model, train_set.bits)
    run.model.bits = train_set.bits
    run.data = data_summary(train_set)
    if payload is not None:
        _restore(run, payload, resume)
        log(f"resuming {resume} at epoch {run.epoch + 1}, step {run.step}")
    if context.is_main:  # what writers killed in an earlier session of this run left behind
        remove_stale_temporaries(out_dir, OUTPUT_FILES + FIGURE_FILES)
    run.board = _open_board(config, out_dir, context, run.step)
    try:
        _fit(run, train_set, test_set, progress, log)
        test = _evaluate(run, train_set, test_set, progress, log)
        return _finish(run, test, test_set, log)
    finally:
        run.board.close()


def _load_data(config, context, progress=False):
    """The training and test sets of the run, cut to ``--train-limit`` / ``--eval-limit``."""
    if config.dataset == FOLDER and config.cache_dir is None:
        # Next to the run, shared by the runs beside it: a second run reads the patches
        # from the cache instead of decoding the images again.
        config.cache_dir = str(Path(config.out).parent / "folder-cache")
    # With --download, rank 0 fetches the files before the other ranks read them; rank 0
    # also builds a folder's patch cache first, which the others then open.
    with context.main_first(config.download or config.dataset == FOLDER):
        train_set = load_split(config, "train", progress and context.is_main)
        test_set = load_split(config, "test", progress and context.is_main)
    return _first(train_set, config.train_limit), _first(test_set, config.eval_limit)


def _log_data(train_set, test_set, log):
    """For a folder: where the patches came from, what was converted, what was too small."""
    for dataset in (train_set, test_set):
        source = dataset.source
        if source is None:
            continue
        cached = " (from the cache)" if source.from_cache else ""
        log(
            f"{dataset.split}: {len(dataset)} patches of {dataset.image_shape[1]}x{dataset.image_shape[2]} "
            f"from {len(source.files)} images, {source.bits}-bit, {source.channels} channel(s){cached}"
        )
        for note in source.notes:
            log(f"  note: {note}")
        if source.skipped:
            log(f"  {len(source.skipped)} image(s) smaller than one patch left out, e.g. {source.skipped[0]}")


def _build(config, train_set, context, log=None, fresh=True):
    """The seeded model (the same initial weights on every rank) and its optimizer.

    A fresh run that standardizes (:func:`standardizes`) sets the training set's per-band
    statistics; a resumed one gets them from its checkpoint's state dict (:func:`_restore`)."""
    pyro.clear_param_store()
    torch.manual_seed(config.seed)
    pyro.set_rng_seed(config.seed)
    model = build_model(config, train_set.image_shape).to(context.device)
    if fresh and standardizes(config, model, train_set.bits):
        set_standardization(model, train_set, log or _silent)
    if config.compile:
        model.compile_networks()
    if context.rank > 0:
        # Same initial weights on every rank (seeded above; DDP broadcasts rank 0's anyway),
        # but each rank draws its own latent and dequantization noise from here on.
        pyro.set_rng_seed(derive_seed(config.seed, "rank", context.rank))
    return model, make_optimizer(model, config.lr)


def _open_board(config, out_dir, context, step):
    """Rank 0's TensorBoard writer with ``--tensorboard``, else one that writes nothing.

    It purges from ``step`` on: whatever an interrupted session logged at or after the
    checkpoint this run resumes from, or a finished run's events when a fresh run reuses
    ``--out``. :func:`_replay_to_board` logs that step's own values again."""
    try:
        return open_board(
            config.tensorboard and context.is_main, out_dir / BOARD_DIR, purge_step=step, seed=config.seed,
            sr_samples=min(config.sr_samples, 8),
        )  # fmt: skip
    except ImportError as error:
        raise ConfigError(str(error)) from None


class _Run:
    """One session of a run, shared by the steps of :func:`_train`: the model and optimizer,
    where the run stands (epoch, batch in it, step), its history, and the checkpoint."""

    def __init__(self, config, context, out_dir, started, model, optimizer):
        self.config, self.context, self.out_dir, self.started = config, context, out_dir, started
        self.model, self.optimizer = model, optimizer
        self.checkpoint_path = out_dir / "checkpoint.pt"
        self.history = {"epochs": [], "steps": [], "wall_seconds": 0.0}
        self.epoch, self.batch_start, self.step = 0, 0, 0
        # The run's loss so far (all ranks) of an epoch cut by a checkpoint.
        self.partial_epoch = {"loss_sum": 0.0, "images": 0}
        self.prior_wall = 0.0  # the wall time of the earlier sessions of this run
        self.board = None
        self.data = {}  # data_summary of the training set
        self.guard = UpdateGuard(config.skip_factor, config.max_consecutive_skips, context.device, clip_factor=config.clip_factor)

    def reached_max_steps(self):
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    def checkpoint(self, epoch_index, batch_index, loss_sum=0.0, images=0, rng_states=None):
        # Every rank calls this, so that its RNG state goes into the file; rank 0 writes it.
        context = self.context
        rng_states = rng_states or context.all_gather_object(get_rng_state())
        if not context.is_main:
            return
        self.history["wall_seconds"] = self.prior_wall + time.time() - self.started
        state = {
            "config": self.config.to_dict(),
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "param_store": {k: v.detach().cpu() for k, v in pyro.get_param_store().items()},
            "epoch": epoch_index,
            "batch_in_epoch": batch_index,
            "partial_epoch": {"loss_sum": float(loss_sum), "images": images},
            "step": self.step,
            "rng": rng_states[0],
            "world_size": context.world_size,
            "history": self.history,
            "data": self.data,
            "update_guard": self.guard.state_dict(),
        }
        if context.enabled:
            state["rng_by_rank"] = rng_states
        save_checkpoint(self.checkpoint_path, state)

    def interrupted(self, signal_number):
        self.context.barrier()  # every rank leaves after rank 0 has written the checkpoint
        return TrainingInterrupted(
            f"interrupted by signal {signal_number} at step {self.step}; resume with --resume {self.checkpoint_path}",
            signal_number,
        )


def _restore(run, payload, resume):
    """The checkpoint's weights, optimizer state, history, position and RNG streams."""
    try:
        run.model.load_state_dict(payload["model_state"])
        run.optimizer.load_state_dict(payload["optimizer_state"])
    except (RuntimeError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{resume} does not match its own configuration: {first_line}") from None
    run.history = payload.get("history", run.history)
    run.history["epochs"] = [upgrade_epoch_record(record, run.config) for record in run.history["epochs"]]
    run.epoch, run.batch_start, run.step = payload["epoch"], payload.get("batch_in_epoch", 0), payload["step"]
    run.partial_epoch = payload.get("partial_epoch", run.partial_epoch)
    run.guard.load_state_dict(payload.get("update_guard", {}))  # none in checkpoints from before the guard
    saved_world_size = payload.get("world_size", 1)
    if saved_world_size != run.context.world_size and run.batch_start:
        raise CheckpointError(
            f"{resume} was saved in the middle of an epoch by {saved_world_size} process(es) and the "
            f"position in an epoch depends on the global batch: resume it with {saved_world_size} "
            f"process(es) (or change the process count at an epoch-end checkpoint)"
        )
    _restore_rng_state(payload, run.context, run.config.seed, run.step)
    run.prior_wall = run.history.get("wall_seconds", 0.0)


def _fit(run, train_set, test_set, progress, log):
    """The training loop: epochs of steps from where the run stands, each ending with its
    record and a checkpoint, until ``--epochs``, ``--max-steps`` or a signal."""
    config, context, model = run.config, run.context, run.model
    # Pixels are uint8 on the device, validated once here; each batch is dequantized
    # on the device, so the per-call checks inside the model can be skipped.
    train_images = DeviceImages(train_set.images, context.device)
    elbo = make_elbo(config.elbo, num_particles=config.num_particles, vectorize_particles=config.num_particles > 1,
                     free_bits=config.free_bits)
    if config.elbo == "meanfield-mog-bound":
        log(MIXTURE_BOUND_WARNING)
    objective = DataParallelElbo(model, elbo, context, config.precision)
    batches_per_epoch = num_batches(len(train_set), config.batch_size, drop_last=True, world_size=context.world_size)
    num_dims = train_set.images[0].numel()
    if context.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
    if context.enabled:
        log(
            f"data-parallel on {context.world_size} processes ({context.backend}, gradients by {objective.sync}): "
            f"{config.batch_size} images per rank, global batch {config.batch_size * context.world_size}"
        )

    signal_state = {}
    total, done = config.epochs * batches_per_epoch, run.epoch * batches_per_epoch + run.batch_start
    if too_short(config, total):
        log(f"warning: {short_run_note(config, total, len(train_set))}")
    bar = _progress_bar(progress, total=total, initial=done)
    try:
        with _stop_on_signals(signal_state), training_mode(model, elbo):
            _replay_to_board(run, test_set.images)
            while run.epoch < config.epochs and not run.reached_max_steps():
                batch, run_loss, run_images, stop_signal = _run_epoch(
                    run, train_images, objective, batches_per_epoch, num_dims, signal_state, bar
                )
                _end_epoch(run, batch, run_loss, run_images, test_set.images, batches_per_epoch, num_dims)
                if not context.enabled:
                    stop_signal = stop_signal or signal_state.get("signal")
                if stop_signal:
                    raise run.interrupted(stop_signal)
    finally:
        bar.close()


def _run_epoch(run, train_images, objective, batches_per_epoch, num_dims, signal_state, bar):
    """The steps of one epoch from ``run.batch_start``, to its end, ``--max-steps`` or a signal.

    Returns ``(batch, run_loss, run_images, stop_signal)``: the position reached in the
    epoch, the epoch's loss and image count over all ranks at the last host sync, and the
    signal the ranks agreed to stop on (``None`` if none).
    """
    config, context, model = run.config, run.context, run.model
    model.train()
    # Rank 0 carries the sums of an epoch resumed part-way; the others add their shares.
    carried = run.partial_epoch if context.is_main else {"loss_sum": 0.0, "images": 0}
    tally = _EpochTally(carried["loss_sum"], carried["images"], context.device)
    guard = run.guard if run.guard.enabled else None
    run_loss, run_images = run.partial_epoch["loss_sum"], run.partial_epoch["images"]  # all ranks, last sync
    stop_signal = None
    unchecked = 0
    epoch, batch = run.epoch, run.batch_start
    for indices in iterate_batches(
        len(train_images), config.batch_size, config.seed, epoch, start_batch=run.batch_start, drop_last=True,
        rank=context.rank, world_size=context.world_size,
    ):  # fmt: skip
        x = dequantize(train_images.batch(indices))
        if config.augment:
            x = augment_dihedral(x)
        beta = kl_scale(config, epoch, batch, batches_per_epoch)
        set_learning_rate(run.optimizer, learning_rate(config, run.step, total_steps(config, batches_per_epoch)))
        loss = training_step(model, run.optimizer, objective, x, beta, config.clip_norm, guard, run.step + 1)
        tally.add(loss, x.shape[0], guard.taken if guard is not None else None)
        unchecked += 1
        run.step += 1
        batch += 1
        bar.update(1)
        limit_reached = run.reached_max_steps()
        checkpoint_due = config.checkpoint_every and run.step % config.checkpoint_every == 0
        epoch_done = batch == batches_per_epoch
        # A single process answers a signal at once. The ranks of a data-parallel run
        # must stop at the same step, so they share their signals only at these
        # sync points, which every rank reaches at the same steps.
        signalled_alone = bool(signal_state) and not context.enabled
        if unchecked >= SYNC_EVERY or limit_reached or checkpoint_due or epoch_done or signalled_alone:
            run_loss, run_images, stop_signal = _sync_point(run, tally, signal_state, epoch, num_dims, bar)
            unchecked = 0
        if epoch_done:
            break  # the epoch record and checkpoint are written by _end_epoch
        if checkpoint_due or stop_signal:
            run.checkpoint(epoch, batch, run_loss, run_images)
        if stop_signal:
            raise run.interrupted(stop_signal)
        if limit_reached:
            break
    return batch, run_loss, run_images, stop_signal


class _EpochTally:
    """This rank's loss and image count over an epoch's steps, summed on the device.

    A step whose update the guard skipped counts neither (its loss may be NaN): the running
    loss is that of the steps taken. The guard's decisions stay on the device until a host sync.
    """

    def __init__(self, loss_sum, images, device):
        self.loss_sum = torch.tensor(loss_sum, device=device)
        self.images = images  # on the host: the steps counted without a guard
        self.guarded_images = None  # on the device: the steps counted by the guard's decisions

    def add(self, loss, images, taken=None):
        if taken is None:
            self.loss_sum = self.loss_sum + loss
            self.images += images
            return
        self.loss_sum = self.loss_sum + torch.where(taken, loss.to(taken.device), 0.0)
        counted = taken.long() * images
        self.guarded_images = counted if self.guarded_images is None else self.guarded_images + counted

    def host_images(self):
        return self.images + (0 if self.guarded_images is None else int(self.guarded_images))


def _sync_point(run, tally, signal_state, epoch, num_dims, bar):
    """The loop's host sync every few steps: the guard's counts (stop after too many skips in a
    row), the epoch's loss so far over all ranks (stop on divergence), the bar and the board.

    Returns ``(run_loss, run_images, stop_signal)`` as :func:`_synchronise` does."""
    run_loss, run_images, stop_signal = _synchronise(run.context, tally.loss_sum, tally.host_images(), signal_state)
    note = ""
    if run.guard.enabled:
        counts = run.guard.counts()
        run.guard.stop_if_stuck(counts, run.checkpoint_path)
        run.board.skipped_updates(run.step, counts["skipped"], counts["nonfinite"])
        note = f", {counts['skipped']} skipped" if counts["skipped"] else ""
    if not run_images:  # every step of the epoch so far was skipped: no loss to report
        return run_loss, run_images, stop_signal
    mean_bpd = bits_per_dim(-run_loss / run_images, num_dims, run.model.bits)
    if not math.isfinite(mean_bpd):
        raise TrainingDiverged(
            f"the loss became {mean_bpd} at step {run.step} (epoch {epoch + 1}); "
            f"stopped without saving, the last good checkpoint is {run.checkpoint_path}"
        )
    run.history["steps"].append([run.step, mean_bpd])
    run.board.running_loss(run.step, mean_bpd)
    bar.set_postfix_str(f"epoch {epoch + 1} loss {mean_bpd:.3f} bpd{note}")
    return run_loss, run_images, stop_signal


def _end_epoch(run, batch, run_loss, run_images, test_images, batches_per_epoch, num_dims):
    """The record of the epoch (or of its part done), the position after it, the checkpoint."""
    config, history, epoch = run.config, run.history, run.epoch
    complete = batch == batches_per_epoch
    end_scale = kl_scale(config, epoch, batch, batches_per_epoch)
    record = {
        "epoch": epoch + 1,
        # The running training loss (not the ELBO under warm-up, a bound or free bits: train_objective
        # says which); None when the update guard skipped every step of the epoch: no loss was kept.
        "train_objective_bpd": bits_per_dim(-run_loss / run_images, num_dims, run.model.bits) if run_images else None,
        "train_objective": objective_name(config, kl_scale(config, epoch, 0, batches_per_epoch), end_scale),
        "test_elbo_bpd": _test_elbo_bpd(run.model, test_images, config, run.context),
        "step": run.step,
        "kl_scale": end_scale,
        "complete": complete,
    }
    if history["epochs"] and history["epochs"][-1]["epoch"] == epoch + 1:
        history["epochs"][-1] = record  # a partial epoch, now extended
    else:
        history["epochs"].append(record)
    _board_epoch(run, record, test_images)
    if complete:
        run.epoch, run.batch_start = epoch + 1, 0
        run.partial_epoch = {"loss_sum": 0.0, "images": 0}
    else:
        run.batch_start = batch
        run.partial_epoch = {"loss_sum": run_loss, "images": run_images}
    run.checkpoint(run.epoch, run.batch_start, **run.partial_epoch)


def _board_epoch(run, record, test_images):
    if not run.board.enabled:
        return
    model = run.model
    gammas = {"x": item_or_none(model.gamma_x), "y": item_or_none(getattr(model, "gamma_y", None))}
    run.board.epoch(record, model, test_images, gammas, mixture_summary(top_prior(model)))


def _replay_to_board(run, test_images):
    """What the board purged at the step this session starts from, logged again.

    The checkpoint holds that step's loss and epoch record, and the restored weights
    give its terms and images; nothing before it is logged twice. A fresh run has none."""
    for step, bpd in run.history["steps"]:
        if step >= run.step:
            run.board.running_loss(step, bpd)
    if run.step and run.guard.enabled:  # the update guard's counts, logged at that step's host sync
        counts = run.guard.counts()
        run.board.skipped_updates(run.step, counts["skipped"], counts["nonfinite"])
    epochs = run.history["epochs"]
    if epochs and epochs[-1]["step"] >= run.step:
        _board_epoch(run, epochs[-1], test_images)


def _evaluate(run, train_set, test_set, progress, log):
    """The final test metrics, sharded over the ranks."""
    config, context = run.config, run.context
    log(f"training done: {run.step} steps; evaluating on {len(test_set)} test images")
    return evaluate_images(
        run.model, config, train_set.images, test_set.images, context.device,
        progress=progress, rank=context.rank, world_size=context.world_size,
    )  # fmt: skip


def evaluate_images(model, config, train_images, images, device, progress=False, rank=0, world_size=1, seed=None):
    """The end-of-training evaluation of ``model`` on the uint8 (or uint16) ``images``, with the
    run's settings: K = ``eval_samples``, ``sr_samples`` draws, the run's seed (or ``seed``), the
    batches of :func:`~pyro_srvae.metrics.likelihood.evaluation_batch_size`, and for the srVAE the
    consistent-bicubic baseline of -log p(x|y) fitted on ``train_images`` with the run's seed.
    ``pyro-srvae evaluate`` calls it too, so it reproduces these numbers."""
    baseline_scale = fit_baseline_scale(train_images, config.factor, config.seed) if isinstance(model, SRVAE) else None
    return evaluate_model(
        model,
        images,
        elbo_samples=config.eval_samples,
        iw_samples=config.eval_samples,
        sr_samples=config.sr_samples,
        batch_size=evaluation_batch_size(config.eval_samples, device),
        device=device,
        seed=config.seed if seed is None else seed,
        progress=progress,
        rank=rank,
        world_size=world_size,
        baseline_scale=baseline_scale,
    )


def _finish(run, test, test_set, log):
    """The metrics; on rank 0 their files, the figures, the board's hparams, the last checkpoint."""
    config, context, model, out_dir = run.config, run.context, run.model, run.out_dir
    # Gathered while every rank is here; rank 0 alone goes on to write files.
    gathered = context.all_gather_object(
        (get_rng_state(), distributed.state_digest(model.state_dict()) if context.enabled else None)
    )
    rng_states = [rng for rng, _ in gathered]
    run.history["wall_seconds"] = run.prior_wall + time.time() - run.started
    metrics = run_metrics(config, model, run.history, test, context, [digest for _, digest in gathered], run.guard)
    metrics["data"] = run.data
    if metrics.get("distributed") and not metrics["distributed"]["ranks_identical"]:
        log("warning: the ranks' weights differ after training (see state_digests in metrics.json)")
    if not context.is_main:
        return TrainResult(model=model, metrics=metrics, out_dir=out_dir, checkpoint=run.checkpoint_path)
    write_metrics(out_dir, metrics)
    figures = []
    if config.figures:
        figures = draw_figures(model, test_set.images, run.history, out_dir, config, metrics["test"])
    run.board.final(run.step, metrics["config"], metrics["test"])
    metrics["wall_seconds"] = run.prior_wall + time.time() - run.started
    write_metrics(out_dir, metrics)
    # The final wall time and history, same weights.
    run.checkpoint(run.epoch, run.batch_start, **run.partial_epoch, rng_states=rng_states)
    log(summary_table(metrics))
    return TrainResult(model=model, metrics=metrics, out_dir=out_dir, checkpoint=run.checkpoint_path, figures=figures)


def _restore_rng_state(payload, context, seed, step):
    """Each rank continues its own RNG streams from the checkpoint: exact when the number
    of processes is unchanged. Otherwise rank 0 continues its stream and the others
    start fresh ones seeded by (seed, rank, step)."""
    states = payload.get("rng_by_rank") or ([payload["rng"]] if "rng" in payload else [])
    if len(states) == context.world_size:
        set_rng_state(states[context.rank])
    elif context.rank == 0 and states:
        set_rng_state(states[0])
    elif context.rank > 0:
        pyro.set_rng_seed(derive_seed(seed, "rank", context.rank, "step", step))


def _first(dataset, limit):
    if limit is None:
        return dataset
    return dataclasses.replace(dataset, images=dataset.images[:limit], labels=dataset.labels[:limit])


def _progress_bar(enabled, total, initial):
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, file=sys.stderr)


def _test_elbo_bpd(model, images, config, context):
    """A one-sample ELBO on the test set each epoch: cheap, unbiased, no RNG side effects;
    sharded over the ranks of a data-parallel run."""
    result = evaluate_model(
        model, images, elbo_samples=1, iw_samples=1, batch_size=256, seed=config.seed, super_resolution=False,
        latents=False, rank=context.rank, world_size=context.world_size,
    )  # fmt: skip
    return result["elbo_bpd"]
