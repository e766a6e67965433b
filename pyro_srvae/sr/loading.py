"""A model from a checkpoint: the one loader that ``superresolve``, ``evaluate`` and ``calibrate`` share."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

from ..data.datasets import IMAGE_SHAPES
from ..model.image_model import DataScalingError
from ..training.checkpoint import CheckpointError, load_checkpoint
from ..training.config import ConfigError, TrainConfig
from ..training.factory import build_model
from ..utils.devices import resolve_device
from .calibration import IntervalCalibration, SpreadCalibration
from .tiling import MAX_VIEWS


# --------------------------------------------------------------------------- #
# Models from checkpoints
# --------------------------------------------------------------------------- #
def _image_shape(config, state, data_info=None):
    """(C, H, W) of the training images: as the checkpoint records it, else from the
    dataset's name, else from the weights (checkpoints written before the record)."""
    if data_info and data_info.get("image_shape"):
        return tuple(int(n) for n in data_info["image_shape"])
    if config.dataset in IMAGE_SHAPES:
        return tuple(IMAGE_SHAPES[config.dataset])
    # An srVAE's tensors give C and the low-resolution area; assume square images.
    try:
        channels = int(state["encoder_u.features.net.0.weight"].shape[1])
        cells = int(state["decoder_x.project.0.weight"].shape[0]) // 8
    except (KeyError, AttributeError, IndexError, TypeError):
        return None
    side = math.isqrt(cells)
    return (channels, side * config.factor, side * config.factor) if side * side == cells else None


def load_run(checkpoint, device=None, require_super_resolution=True, x_given_y=None):
    """(model, config, payload) from a training checkpoint; CheckpointError with one line.

    ``x_given_y`` rebuilds an srVAE with another p(x|y,.) around the same weights: the
    consistent density is normalized for any parameters, so a checkpoint trained on the
    spec's joint can be re-scored as a density of x."""
    path = Path(checkpoint)
    if path.is_file() and not zipfile.is_zipfile(path):
        # torch.save writes zip archives; say so rather than relay torch.load's advice.
        raise CheckpointError(f"{path} is not a pyro-srvae checkpoint (not a file written by torch.save)")
    payload = load_checkpoint(path)
    try:
        config = TrainConfig.from_dict(dict(payload["config"]))
    except (TypeError, ValueError, ConfigError) as error:
        raise CheckpointError(f"{path} has an unusable configuration: {error}") from None
    if x_given_y is not None and x_given_y != config.x_given_y:
        if config.model != "srvae":
            raise CheckpointError(f"{path} is a plain VAE's checkpoint: --x-given-y applies to an srVAE only")
        config.x_given_y = x_given_y
    if require_super_resolution and config.model != "srvae":
        raise CheckpointError(
            f"{path} is a checkpoint of a plain VAE (--model {config.model}), which cannot super-resolve; "
            "give a checkpoint trained with --model srvae"
        )
    state = payload["model_state"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no model weights")
    data_info = payload.get("data") if isinstance(payload.get("data"), dict) else {}
    shape = _image_shape(config, state, data_info)
    if shape is None:
        raise CheckpointError(f"{path}: cannot tell the image size of dataset {config.dataset!r}")
    try:
        model = build_model(config, shape)
        model.load_state_dict(state, strict=True)
    except DataScalingError as error:  # e.g. --x-given-y quantized on a standardized checkpoint
        raise CheckpointError(f"{path}: {error}") from None
    except (ConfigError, RuntimeError, ValueError, KeyError, TypeError) as error:
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else type(error).__name__
        raise CheckpointError(f"{path} does not match its own configuration: {first_line}") from None
    bits = data_info.get("bits", 8)
    if bits not in (8, 16):
        raise CheckpointError(f"{path} records {bits!r}-bit data; expected 8 or 16")
    model.bits = bits
    model.default_views = MAX_VIEWS if config.augment else 1  # trained on every flip and turn: each view is valid
    model.spread_calibration = None
    if payload.get("spread_calibration") is not None and config.model == "srvae":

        calibration = SpreadCalibration.from_dict(dict(payload["spread_calibration"]))
        if len(calibration.scale) != shape[0]:
            raise CheckpointError(f"{path}: spread_calibration has {len(calibration.scale)} factors for {shape[0]} channels")
        model.spread_calibration, model.spread_scale = calibration, list(calibration.scale)
    model.interval_calibration = None
    if payload.get("interval_calibration") is not None and config.model == "srvae":

        interval = IntervalCalibration.from_dict(dict(payload["interval_calibration"]))
        if interval.spread_scale is not None and len(interval.spread_scale) != shape[0]:
            raise CheckpointError(f"{path}: interval_calibration was fitted with {len(interval.spread_scale)} noise factors for {shape[0]} channels")
        model.interval_calibration = interval
    device = resolve_device(device if device is not None else "auto")
    model = model.to(device).eval()
    return model, config, payload


def load_model(checkpoint, *, device="auto", require_super_resolution=True):
    """The trained VAE/SRVAE of a ``checkpoint.pt``, in eval mode on ``device``.

    The architecture comes from the checkpoint's configuration (``build_model``) and the
    weights must load strictly. Raises :class:`pyro_srvae.training.checkpoint.CheckpointError`
    (one line) for a missing, corrupt or foreign file, and, unless
    ``require_super_resolution=False``, for the checkpoint of a plain VAE.
    """
    return load_run(checkpoint, device, require_super_resolution)[0]


