"""Data-parallel plumbing for :func:`pyro_srvae.train` under ``torchrun``.

``torchrun`` (``python -m torch.distributed.run``) starts one process per GPU (or per CPU
worker, on any number of nodes) and tells each one who it is through the environment:
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous address. :func:`connect` reads
those, joins the process group -- ``nccl`` when the device is a GPU (``cuda:LOCAL_RANK``),
``gloo`` on CPUs -- with a finite timeout, and returns a :class:`DistributedContext` whose
methods are the few collectives training needs. Without those variables, or with
``WORLD_SIZE=1``, no process group is created and every collective is the identity, so a
single process runs exactly as it always did.

Failures: a peer that dies makes the next collective on the survivors raise at once (its
sockets close); a peer that hangs makes it raise after the timeout (``PYRO_SRVAE_DIST_TIMEOUT``
seconds, default 300). The context turns either into :class:`ProcessGroupLost`, one line
naming this rank, so every survivor exits non-zero instead of waiting forever. (torchrun
also stops the remaining workers with SIGTERM when one fails; either path ends the job.)
"""

import datetime
import hashlib
import os
import re
from contextlib import contextmanager

import torch
import torch.distributed as dist

TIMEOUT_ENV = "PYRO_SRVAE_DIST_TIMEOUT"

DEFAULT_TIMEOUT_SECONDS = 300.0

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

GRADIENT_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size

# Text that marks a RuntimeError as a failed collective: torch raises plain RuntimeErrors
# from gloo ("Connection reset by peer", "Timed out waiting ... for recv") and DistError
# subclasses from c10d/NCCL; a bug in the model never says these.
_COMMUNICATION_MARKERS = (
    "gloo", "nccl", "c10d", "processgroup", "connection reset", "connection closed",
    "connection refused", "broken pipe", "timed out",
)  # fmt: skip


class ProcessGroupLost(SystemExit):
    """This rank lost contact with the others: a peer died, hung past the timeout, or the
    network failed.

    A ``SystemExit`` whose code is the one-line message, because a data-parallel worker can
    do nothing useful without its peers: unless caught, Python prints the line to stderr
    and exits with status 1, with no traceback, whichever front end called
    :func:`pyro_srvae.train`. ``except ProcessGroupLost`` handles it explicitly.
    """

    def __init__(self, message):
        super().__init__(message)
        self.message = message

    def __str__(self):
        return self.message


def launch_environment(environ=None):
    """``(rank, world_size, local_rank)`` from torchrun's variables, or ``None`` without them.

    Raises ``ValueError`` (one line) for a partial or inconsistent set.
    """
    environ = os.environ if environ is None else environ
    present = [name for name in LAUNCH_VARIABLES if name in environ]
    if not present:
        return None
    if len(present) != len(LAUNCH_VARIABLES):
        missing = sorted(set(LAUNCH_VARIABLES) - set(present))
        raise ValueError(
            f"found {', '.join(present)} but not {', '.join(missing)} in the environment: "
            f"start data-parallel runs with torchrun, which sets {', '.join(LAUNCH_VARIABLES)}"
        )
    try:
        rank, world_size, local_rank = (int(environ[name]) for name in LAUNCH_VARIABLES)
    except ValueError:
        values = ", ".join(f"{name}={environ[name]!r}" for name in LAUNCH_VARIABLES)
        raise ValueError(f"torchrun variables must be integers, got {values}") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"inconsistent torchrun variables RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}")
    return rank, world_size, local_rank


def timeout_from_env(environ=None):
    """How long a collective may wait for a peer before this rank gives up."""
    environ = os.environ if environ is None else environ
    text = environ.get(TIMEOUT_ENV)
    if text is None or text == "":
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_SECONDS)
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return datetime.timedelta(seconds=seconds)


def is_communication_failure(error):
    """Whether ``error`` came from a collective whose peers went away (see the markers above)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(marker in text for marker in _COMMUNICATION_MARKERS)


def state_digest(state):
    """SHA-256 of a state dict's names, dtypes, shapes and bytes: equal digests, equal weights.

    Ranks compare digests after training (``metrics.json`` records them), which costs one
    copy to the host instead of shipping every tensor between processes.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class DistributedContext:
    """Who this process is in the job, and the collectives training uses.

    With ``world_size == 1`` (no process group) every method is the identity or a no-op,
    so the training loop calls them unconditionally.
    """

    def __init__(self, rank=0, world_size=1, local_rank=0, device=None, backend=None, timeout=None, owns_group=False):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.backend = backend
        self.timeout = timeout
        self.owns_group = owns_group
        # Appended to the lost-contact message; training points at the last checkpoint.
        self.resume_hint = ""

    def __repr__(self):
        return (
            f"DistributedContext(rank={self.rank}, world_size={self.world_size}, "
            f"local_rank={self.local_rank}, device={self.device}, backend={self.backend})"
        )

    @property
    def enabled(self):
        """True when there are other processes to talk to."""
        return self.world_size > 1

    @property
    def is_main(self):
        """Rank 0 writes the checkpoint, the metrics and the figures, and logs."""
        return self.rank == 0

    # -- failures ---------------------------------------------------------------------

    def lost_contact(self, error, during="a collective operation"):
        """The :class:`ProcessGroupLost` to raise for a collective that failed with ``error``."""
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        detail = re.sub(r"^\[[^\]]*\]\s*", "", detail)  # gloo prefixes "[/path/pair.cc:545] "
        detail = detail.split(". This is typically caused")[0].rstrip(".")
        wait = f"{self.timeout.total_seconds():.0f} s" if self.timeout is not None else "the timeout"
        message = (
            f"error: rank {self.rank} of {self.world_size} lost contact with the process group during "
            f"{during} (a peer process died, or did not answer for {wait}; {TIMEOUT_ENV} sets the wait): "
            f"{detail}"
        )
        if self.resume_hint:
            message += f". {self.resume_hint}"
        return ProcessGroupLost(message)

    @contextmanager
    def lost_contact_on_failure(self, during="a collective operation"):
        """Turn a failed collective raised in the block (DDP's gradient all-reduce included)
        into :class:`ProcessGroupLost`; other errors pass through untouched."""
        try:
            yield
        except RuntimeError as error:
            if self.enabled and is_communication_failure(error):
                raise self.lost_contact(error, during) from error
            raise

    # -- collectives ------------------------------------------------------------------

    def barrier(self):
        if self.enabled:
            # nccl must be told the device, or it guesses (and warns).
            device_ids = [self.device.index] if self.backend == "nccl" else None
            with self.lost_contact_on_failure("a barrier"):
                dist.barrier(device_ids=device_ids)

    def all_reduce_sum(self, tensor):
        """Sum ``tensor`` over ranks in place (on this rank's device for nccl); returns it."""
        if self.enabled:
            with self.lost_contact_on_failure("an all-reduce"):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj):
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size
        with self.lost_contact_on_failure("an all-gather"):
            dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        with self.lost_contact_on_failure("a broadcast"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def main_first(self, enabled=True):
        """Run the block on rank 0, then on the others (e.g. rank 0 downloads, they read)."""
        if not (enabled and self.enabled):
            yield
            return
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def data_parallel(self, module):
        """``module`` wrapped in DistributedDataParallel (which broadcasts rank 0's weights),
        or ``module`` itself in a single process."""
        if not self.enabled:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        with self.lost_contact_on_failure("the start of DistributedDataParallel"):
            return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def all_reduce_gradients(self, parameters, bucket_bytes=GRADIENT_BUCKET_BYTES):
        """Sum every parameter's ``.grad`` over ranks, in flat buckets of ``bucket_bytes``.

        For losses that cannot go through DDP (Pyro ELBOs without ``differentiable_loss``
        compute their own backward). A few large all-reduces instead of one per tensor; a
        missing gradient counts as zeros so every rank reduces the same tensors.
        """
        if not self.enabled:
            return
        grads = []
        for parameter in parameters:
            if parameter.requires_grad:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                grads.append(parameter.grad)
        buckets, current, size = [], [], 0
        for grad in grads:
            if current and (size + grad.numel() * grad.element_size() > bucket_bytes or grad.dtype != current[0].dtype or grad.device != current[0].device):
                buckets.append(current)
                current, size = [], 0
            current.append(grad)
            size += grad.numel() * grad.element_size()
        if current:
            buckets.append(current)
        with self.lost_contact_on_failure("the gradient all-reduce"):
            for bucket in buckets:
                flat = torch.cat([grad.reshape(-1) for grad in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                offset = 0
                for grad in bucket:
                    grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                    offset += grad.numel()

    def close(self):
        """Leave the process group if :func:`connect` created it.

        Also after a failure: a gloo group left to the interpreter's exit can abort the
        process ("terminate called without an active exception") instead of exiting cleanly.
        """
        if self.owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def _device_for_rank(device, local_rank):
    """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK``; other devices are kept."""
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK {local_rank} but only {count} CUDA device(s) are visible: "
            f"start at most {count} processes per node (--nproc_per_node)"
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _import_dynamo_before_the_group_exists():
    """Work around a torch leak that can abort a worker at exit.

    The first import of ``torch._dynamo`` (DDP's constructor and ``torch.optim.Adam``
    import it lazily) keeps about ten references to the process group if one exists by
    then, so ``destroy_process_group()`` cannot free it and gloo's worker threads outlive
    the interpreter; one of them dropping its last work item during interpreter shutdown
    needs the GIL and calls ``std::terminate`` ("terminate called without an active
    exception", SIGABRT, about one run in 25 on a busy machine). Imported before the group
    exists, dynamo holds no reference and ``destroy_process_group()`` joins the threads.
    """
    try:
        import torch._dynamo  # noqa: F401
    except ImportError:  # pragma: no cover - builds without dynamo have no such leak
        pass


def connect(device):
    """The :class:`DistributedContext` for this process, joining the process group if needed.

    ``device`` is the resolved training device (``cpu`` or ``cuda``). Under torchrun with
    ``WORLD_SIZE`` > 1 this initialises the group (nccl on CUDA, gloo otherwise) with the
    :func:`timeout_from_env` timeout; a group the caller already initialised is used as it
    is and left open. Raises ``ValueError`` (one line) for unusable torchrun variables.
    """
    device = torch.device(device)
    environment = launch_environment()
    if dist.is_available() and dist.is_initialized():
        local_rank = environment[2] if environment else 0
        return DistributedContext(
            dist.get_rank(), dist.get_world_size(), local_rank, _device_for_rank(device, local_rank),
            dist.get_backend(), timeout=None, owns_group=False,
        )  # fmt: skip
    if environment is None or environment[1] == 1:
        return DistributedContext(device=device)
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed: it cannot run under torchrun")
    rank, world_size, local_rank = environment
    device = _device_for_rank(device, local_rank)
    _import_dynamo_before_the_group_exists()
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timeout_from_env()
    context = DistributedContext(rank, world_size, local_rank, device, backend, timeout, owns_group=True)
    with context.lost_contact_on_failure("the rendezvous (not every process joined)"):
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    return context
