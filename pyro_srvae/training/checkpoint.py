"""Checkpoints: the file format, and the one loader every command shares (``weights_only=True``)."""

from pathlib import Path

import torch

from ..utils.io import atomic_write_bytes

CHECKPOINT_FORMAT = "pyro-srvae-checkpoint"

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable pyro-srvae checkpoint."""


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
