"""``pyro-srvae evaluate``: a checkpoint's test-set evaluation with the run's own settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyro

from ..training.factory import load_split
from ..training.loop import evaluate_images
from ..utils.devices import model_device
from ..utils.io import atomic_write_text
from .loading import load_run

# --------------------------------------------------------------------------- #
# Evaluation of a checkpoint
# --------------------------------------------------------------------------- #
ALL = "all"


def evaluate_checkpoint(
    checkpoint,
    *,
    eval_samples=None,
    sr_samples=None,
    eval_limit=None,
    data_dir=None,
    device="auto",
    seed=None,
    out_dir=None,
    progress=False,
    x_given_y=None,
):
    """The end-of-training test-set evaluation (:func:`pyro_srvae.training.loop.evaluate_images`, the
    same function), run on a saved checkpoint.

    Defaults come from the checkpoint's configuration (``eval_samples``, ``sr_samples``,
    ``eval_limit``, ``data_dir``, ``seed``), and the images per batch follow the same rule
    (:func:`~pyro_srvae.metrics.likelihood.evaluation_batch_size`), so the numbers reproduce the run's
    ``metrics.json`` ``test`` section on the same device; ``eval_limit="all"`` lifts the
    run's limit. Writes ``evaluation.json`` into ``out_dir`` (default: the checkpoint's
    folder), atomically, and returns its content: ``checkpoint``, ``step``, ``epoch``,
    ``config`` (with ``x_given_y`` as evaluated: pass ``x_given_y="consistent"`` to re-score a
    checkpoint of the spec's joint as a normalized density of x), ``evaluation``, ``test``;
    ``evaluation`` (the settings used), ``test`` (the metrics of
    :func:`pyro_srvae.evaluate_model`, ``sr_coverage90`` included for an srVAE) and
    ``spread_calibration`` (the checkpoint's :class:`~pyro_srvae.sr.calibration.SpreadCalibration`
    as a dict, which the SR draws used, or None: the model's own spread).

    Raises ``CheckpointError`` and ``DatasetNotFoundError`` with one-line messages.
    """
    model, config, payload = load_run(checkpoint, device, require_super_resolution=False, x_given_y=x_given_y)
    eval_samples = config.eval_samples if eval_samples is None else int(eval_samples)
    sr_samples = config.sr_samples if sr_samples is None else int(sr_samples)
    seed = config.seed if seed is None else int(seed)
    limit = config.eval_limit if eval_limit is None else (None if eval_limit == ALL else int(eval_limit))
    for name, value in (("eval_samples", eval_samples), ("sr_samples", sr_samples), ("eval_limit", limit)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if data_dir is not None:
        config.data_dir = str(data_dir)
    test_set = load_split(config, "test")
    images = test_set.images[:limit] if limit is not None else test_set.images
    device = model_device(model)
    settings = dataclasses.replace(config, eval_samples=eval_samples, sr_samples=sr_samples)
    # the SR baseline's scale is fitted on the run's training images, as at the end of training
    train_images = load_split(config, "train").images[: config.train_limit] if config.model == "srvae" else None
    with pyro.get_param_store().scope():
        test = evaluate_images(model, settings, train_images, images, device, progress=progress, seed=seed)
    report = {
        "checkpoint": str(checkpoint),
        "step": payload.get("step"),
        "epoch": payload.get("epoch"),
        "config": config.to_dict(),
        "evaluation": {
            "dataset": config.dataset,
            "num_images": int(images.shape[0]),
            "eval_samples": eval_samples,
            "sr_samples": sr_samples,
            "eval_limit": limit,
            "seed": seed,
            "device": str(device),
        },
        "test": test,
        # The SR draws (coverage, CRPS) come from the calibrated spread when the checkpoint holds one.
        "spread_calibration": None if model.spread_calibration is None else model.spread_calibration.to_dict(),
    }
    out_dir = Path(out_dir) if out_dir is not None else Path(checkpoint).parent
    report["path"] = str(atomic_write_text(out_dir / "evaluation.json", json.dumps(report, indent=2) + "\n"))
    return report
