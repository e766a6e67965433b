"""Checkpoints written atomically and read back with clear errors.

A checkpoint is a ``torch.save`` dict that ``torch.load(weights_only=True)`` can read:
tensors, numbers, strings, lists and dicts only, so loading a file never runs code
from it. It is written to a temporary file in the same directory, flushed, fsynced
and renamed over the final name: a crash at any moment leaves either the previous
checkpoint or the new one under that name, never a partial file. A process killed
mid-write leaves its temporary file behind (``.checkpoint.pt.<random>.tmp``, never the
final name); :func:`remove_stale_temporaries` clears those when a run starts again.
"""

import hashlib
import os
import random
import secrets
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FORMAT = "pyro-srvae-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable pyro-srvae checkpoint."""


def atomic_write_bytes(path, write):
    """Call ``write(file)`` on a temporary file, then fsync and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(path.parent)
    return path


def atomic_write_text(path, text):
    return atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))


def _create_temporary(path):
    """A new ``.NAME.<pid>.<random>.tmp`` beside ``path``, opened for writing.

    Created with O_EXCL and mode 0o666, so the user's umask decides the final file's
    permissions (``mkstemp`` would make every checkpoint, metrics file and figure 0600).
    """
    while True:
        tmp_name = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp_name
        except FileExistsError:  # pragma: no cover - a 32-bit random collision
            continue


def remove_stale_temporaries(directory, names):
    """Delete the temporary files that killed writers of ``names`` left in ``directory``.

    Only call this when no other process is writing there (the run that owns the
    directory, at start-up): a live writer's temporary file would vanish under it.
    Returns the paths removed.
    """
    removed = []
    for name in names:
        for stale in Path(directory).glob(f".{name}.*.tmp"):
            try:
                stale.unlink()
                removed.append(stale)
            except FileNotFoundError:  # pragma: no cover - raced with another cleaner
                pass
    return removed


def fsync_directory(directory):
    # The rename itself must reach the disk, or a power cut can undo it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def get_rng_state():
    """Every RNG a training step draws from, in a ``weights_only``-loadable form."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def derive_seed(*parts):
    """A seed in ``[0, 2**32)`` mixed from ``parts`` (numbers, strings), e.g. ``(seed, "rank", 3)``.

    Hashing makes every bit of every part count (torch's CPU generator keeps only the
    low 32 bits of a seed, and ``seed + rank`` would make run 0 / rank 1 and run 1 /
    rank 0 share a stream); 32 bits because ``pyro.set_rng_seed`` also seeds NumPy.
    """
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, payload):
    """Write ``payload`` (a dict) atomically under ``path``, tagged with the format."""
    payload = dict(payload, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
    return atomic_write_bytes(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint, raising :class:`CheckpointError` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for garbage input
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not a readable pyro-srvae checkpoint ({first_line})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a pyro-srvae checkpoint (no {CHECKPOINT_FORMAT!r} tag)")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} is a pyro-srvae checkpoint of version {payload.get('version')}, "
            f"this version reads version {CHECKPOINT_VERSION}"
        )
    missing = {"config", "model_state", "optimizer_state", "epoch", "step"} - payload.keys()
    if missing:
        raise CheckpointError(f"{path} is an incomplete pyro-srvae checkpoint: missing {sorted(missing)}")
    return payload
