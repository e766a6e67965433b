"""Figures of the SR predictive's uncertainty: its spread, its parts, calibration curves and sample strips."""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from .common import (
    CELL_INCHES,
    PathLike,
    check_match,
    check_plot_images,
    grid_shape,
    new_figure,
    plot_tensor,
    save_figure,
    show_image,
    show_std,
    spread_map,
    std_vmax,
    to_float,
    with_note,
)


def plot_uncertainty(
    sr_mean: torch.Tensor, sr_std: torch.Tensor, path: PathLike,
    title: Optional[str] = None,
) -> PathLike:
    """One image: SR mean (C, H, W) next to its per-pixel std heat map.

    ``sr_std`` is (C', H, W) with any C' (averaged over channels) or (H, W);
    it is shown with the ``magma`` colour map and its own colour bar.
    """
    mean = check_plot_images(sr_mean, "sr_mean", "(C, H, W)")
    std = plot_tensor(sr_std, "sr_std")
    if std.dim() == 2:
        std = std.unsqueeze(0)
    std = check_plot_images(std, "sr_std", "(C, H, W)")
    check_match("sr_mean", mean, [1, 2], "sr_std", std, [1, 2],
                 "spatial size (H, W)")
    std_hw = spread_map(std)
    fig = new_figure(6.2, 3.3)
    ax_m, ax_s = fig.subplots(1, 2)
    show_image(ax_m, mean)
    ax_m.set_title("SR mean", fontsize=10)
    im = show_std(ax_s, std_hw.numpy(), std_vmax(std_hw))
    ax_s.set_title("per-pixel std", fontsize=10)
    cbar = fig.colorbar(im, ax=ax_s, shrink=0.9, pad=0.02)
    cbar.ax.tick_params(labelsize=8)
    fig.suptitle(with_note(title or "Super-resolution uncertainty", mean.shape[0]))
    return save_figure(fig, path)


def plot_uncertainty_parts(
    std: torch.Tensor, std_latent: torch.Tensor, std_noise: torch.Tensor,
    path: PathLike, title: Optional[str] = None,
) -> PathLike:
    """One image's per-pixel predictive std and its two parts, side by side.

    Panels: ``total std`` | ``latent part`` (the spread of the decoder means over
    u and z) | ``noise part`` (the likelihood's), all with the ``magma`` colour
    map on one scale from 0 to the largest value of the three, with ONE shared
    colour bar, so that the panels compare by colour. Each map is (C, H, W) with
    any C (averaged over channels) or (H, W); the three must have the same (H, W).
    """
    maps = []
    for name, value in (("std", std), ("std_latent", std_latent), ("std_noise", std_noise)):
        t = plot_tensor(value, name)
        if t.dim() == 2:
            t = t.unsqueeze(0)
        maps.append((name, check_plot_images(t, name, "(C, H, W)")))
    for name, t in maps[1:]:
        check_match("std", maps[0][1], [1, 2], name, t, [1, 2], "spatial size (H, W)")
    shown = [spread_map(t) for _, t in maps]
    vmax = std_vmax(torch.stack(shown))
    h, w = shown[0].shape
    panel = 2.6
    fig = new_figure(3 * panel * min(1.6, max(w / h, 0.6)) + 1.0, panel + 0.9)
    axes = fig.subplots(1, 3)
    im = None
    for ax, header, hw in zip(axes, ("total std", "latent part", "noise part"), shown):
        im = show_std(ax, hw.numpy(), vmax)
        ax.set_title(header, fontsize=10)
    cbar = fig.colorbar(im, ax=list(axes), shrink=0.9, pad=0.02)
    cbar.ax.tick_params(labelsize=8)
    cbar.set_label("per-pixel std", fontsize=9)
    fig.suptitle(with_note(title or "Super-resolution uncertainty: total = sqrt(latent^2 + noise^2)",
                            maps[0][1].shape[0]))
    return save_figure(fig, path)


_CALIBRATION_SETS = (("all", "all HR pixels", "tab:blue", "o"),
                     ("detail", "detail pixels (chosen by x)", "tab:orange", "s"),
                     ("edges", "edge pixels (chosen from y)", "tab:green", "^"))

#: Pixel sets a coverage table may lack (written before the package measured them).
_OPTIONAL_CALIBRATION_SETS = ("edges",)


def _coverage_table(coverage, key: str) -> dict:
    table = coverage[key]
    if not isinstance(table, Mapping):
        raise ValueError(
            f"`coverage[{key!r}]` must be a dict mapping levels such as '0.9' to coverages, "
            f"got {type(table).__name__}"
        )
    out = {}
    for level, value in table.items():
        try:
            nominal = float(level)
        except (TypeError, ValueError):
            raise ValueError(
                f"`coverage[{key!r}]` has a key {level!r} that is not a level such as '0.9'"
            ) from None
        try:
            observed = to_float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"`coverage[{key!r}][{level!r}]` must be a number, got {value!r}"
            ) from None
        if not (0.0 <= nominal <= 1.0) or not (math.isnan(observed) or 0.0 <= observed <= 1.0):
            raise ValueError(
                f"`coverage[{key!r}][{level!r}]` must be a fraction in [0, 1] for a level "
                f"in [0, 1], got {value!r}"
            )
        out[str(level)] = (nominal, observed)
    return out


def plot_calibration(coverage: Mapping[str, Mapping], num_samples: int,
                     path: PathLike, title: Optional[str] = None) -> PathLike:
    """Calibration of the SR uncertainty: observed against expected coverage.

    ``coverage`` is ``{"all": {"0.5": c, "0.8": c, ...}, "detail": {...},
    "edges": {...}, "expected": {"0.5": e, ...}}``: the observed fraction of high-resolution
    pixels inside the central interval of each level, over all pixels, over
    the "detail" pixels and (optional) the "edge" pixels, and the coverage those intervals should have when they
    are estimated from ``num_samples`` draws. "all" and "detail" must give a
    value for every level of "expected" (NaN, e.g. no detail pixels, leaves that
    point out). One point per level and pixel set, joined per set and labelled
    with the level, the diagonal (a calibrated model) dashed; points below it
    cover too little, above it too much.
    """
    if not isinstance(coverage, Mapping):
        raise ValueError(
            f"`coverage` must be a dict with keys 'all', 'detail' and 'expected', "
            f"got {type(coverage).__name__}"
        )
    missing = [k for k in ("all", "detail", "expected") if k not in coverage]
    if missing:
        raise ValueError(
            f"`coverage` is missing key(s) {missing}: expected keys 'all', 'detail' and "
            f"'expected', got {sorted(map(str, coverage))}"
        )
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}")
    expected = _coverage_table(coverage, "expected")
    if not expected:
        raise ValueError("`coverage['expected']` is empty: no level to plot")
    if any(math.isnan(e) for _, e in expected.values()):
        raise ValueError("`coverage['expected']` must give a number for every level, got NaN")
    tables = {}
    for key, *_ in _CALIBRATION_SETS:
        if key in _OPTIONAL_CALIBRATION_SETS and key not in coverage:
            continue
        tables[key] = _coverage_table(coverage, key)
        absent = [level for level in expected if level not in tables[key]]
        if absent:
            raise ValueError(
                f"`coverage[{key!r}]` is missing level(s) {absent} given in "
                f"`coverage['expected']`"
            )
    levels = sorted(expected, key=lambda level: expected[level][0])

    fig = new_figure(5.0, 4.6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.5", linewidth=1, label="calibrated (observed = expected)")
    for key, label, colour, marker in _CALIBRATION_SETS:
        if key not in tables:
            continue
        points = [(expected[lv][1], tables[key][lv][1], lv) for lv in levels
                  if not math.isnan(tables[key][lv][1])]
        if not points:
            continue
        xs, ys, names = zip(*points)
        ax.plot(xs, ys, marker=marker, color=colour, label=label)
        if key == "all":
            for x, y_, name in points:
                ax.annotate(f"{float(name):g}", (x, y_), textcoords="offset points",
                            xytext=(4, -10), fontsize=7, color="0.3")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel(f"expected coverage (central intervals from {int(num_samples)} draws)")
    ax.set_ylabel("observed coverage of HR pixels")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"SR calibration, {int(num_samples)} draws per image", fontsize=10)
    return save_figure(fig, path)


def plot_sample_strip(
    samples: torch.Tensor, path: PathLike, max_images: int = 16,
    title: Optional[str] = None, means: Optional[torch.Tensor] = None,
) -> PathLike:
    """Several samples (S, C, H, W) of one image in a strip (8 per row).

    With ``means`` (S, C, H, W), the decoder means of the same draws (what z proposes)
    fill the rows above the samples, ``z draw k`` over ``sample k``."""
    s = check_plot_images(samples, "samples", "(S, C, H, W)")
    n = min(s.shape[0], int(max_images))
    if n < 1:
        raise ValueError(f"`max_images` must be >= 1, got {max_images}")
    blocks = [("sample", s)]
    if means is not None:
        means = check_plot_images(means, "means", "(S, C, H, W)")
        check_match("samples", s, range(4), "means", means, range(4), "shape (S, C, H, W)")
        blocks.insert(0, ("z draw", means))
    nrows, ncols = grid_shape(n)
    fig = new_figure(CELL_INCHES * ncols + 0.2, CELL_INCHES * 1.1 * nrows * len(blocks) + 0.6)
    axes = fig.subplots(nrows * len(blocks), ncols, squeeze=False)
    for b, (label, images) in enumerate(blocks):
        for i in range(nrows * ncols):
            row, col = divmod(i, ncols)
            ax = axes[b * nrows + row, col]
            if i < n:
                show_image(ax, images[i])
                ax.set_title(f"{label} {i + 1}", fontsize=8)
            else:
                ax.set_axis_off()
    fig.suptitle(with_note(title or f"{s.shape[0]} samples of one image",
                            s.shape[1]))
    return save_figure(fig, path)
