"""Figures, drawn without pyplot's global state and written atomically: a training run's (``training``)
and the SR predictive's uncertainty (``uncertainty``), on shared helpers (``common``)."""

from .common import image_grid
from .training import (
    plot_loss_curves,
    plot_model_samples,
    plot_mog_components,
    plot_reconstructions,
    plot_samples,
    plot_super_resolution,
)
from .uncertainty import plot_calibration, plot_sample_strip, plot_uncertainty, plot_uncertainty_parts

__all__ = [
    "image_grid",
    "plot_calibration",
    "plot_loss_curves",
    "plot_mog_components",
    "plot_model_samples",
    "plot_reconstructions",
    "plot_sample_strip",
    "plot_samples",
    "plot_super_resolution",
    "plot_uncertainty",
    "plot_uncertainty_parts",
]
