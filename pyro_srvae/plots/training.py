"""Figures of a training run: loss curves, reconstructions, samples, super-resolution, mixture components."""

from __future__ import annotations

import math
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .common import (
    CELL_INCHES,
    PathLike,
    block_axes,
    check_match,
    check_plot_images,
    grid_shape,
    image_grid,
    new_figure,
    plot_tensor,
    save_figure,
    show_image,
    show_std,
    spread_map,
    std_vmax,
    to_float,
    upsample_nearest,
    with_note,
)


def _train_label(names):
    """The legend of the training curve: minus the objective(s) it traced, in order (warm-up first)."""
    if not names:
        return "train: -objective"  # records from before the objective was named
    if len(names) == 1:
        return f"train: -{names[0]}"
    return f"train: -{names[0]}\n... -{names[-1]}"


def plot_loss_curves(
    epochs: Sequence[Mapping[str, object]],
    path: PathLike,
    steps: Optional[Iterable[Tuple[float, float]]] = None,
    title: Optional[str] = None,
) -> PathLike:
    """Per epoch, the running training objective and the test negative ELBO (bits/dim).

    ``epochs`` is a list of dicts with keys ``"epoch"``, ``"train_objective_bpd"``
    (minus the training objective: the ELBO, or under KL warm-up, a bound or free
    bits another objective), optionally ``"train_objective"`` (its name, shown in
    the legend) and ``"test_elbo_bpd"`` (the test value may be ``None`` or missing
    for some epochs). Records from before the rename hold the same number as
    ``"train_elbo_bpd"``, read as ``"train_objective_bpd"``.  If ``steps`` — a
    list of ``(step, loss_bpd)`` pairs of the running objective — is given and
    non-empty, a second panel shows the per-step training curve.
    """
    epochs = list(epochs)
    step_list = [] if steps is None else list(steps)
    if not epochs and not step_list:
        raise ValueError("nothing to plot: `epochs` is empty and no `steps` given")

    ep, train, test_ep, test, names = _epoch_series(epochs)
    for i, pair in enumerate(step_list):
        if len(pair) != 2:
            raise ValueError(
                f"`steps[{i}]` must be a (step, loss_bpd) pair, got {pair!r}"
            )
    npanels = 2 if step_list else 1
    fig = new_figure(5.2 * npanels, 3.8)
    axes = fig.subplots(1, npanels, squeeze=False)[0]

    ax = axes[0]
    if epochs:
        ax.plot(ep, train, marker="o", markersize=3, label=_train_label(names))
        if test:
            ax.plot(test_ep, test, marker="s", markersize=3, label="test: -ELBO")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no completed epochs yet", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("bits/dim")
    ax.set_title("per epoch")
    ax.grid(True, alpha=0.3)

    if step_list:
        ax2 = axes[1]
        xs = [to_float(s) for s, _ in step_list]
        ys = [to_float(v) for _, v in step_list]
        ax2.plot(xs, ys, linewidth=0.8, color="tab:blue", alpha=0.8,
                 label="train objective, running mean")
        ax2.set_xlabel("step")
        ax2.set_ylabel("minus the training objective (bits/dim)")
        ax2.set_title("per step")
        ax2.grid(True, alpha=0.3)
        ax2.legend()

    fig.suptitle(title or "Training curves")
    return save_figure(fig, path)



def _epoch_series(epochs):
    """(epochs, training objective, test epochs, test -ELBO, objective names) from the records, checked."""
    ep, train, test_ep, test, names = [], [], [], [], []
    for i, rec in enumerate(epochs):
        if not isinstance(rec, Mapping):
            raise ValueError(
                f"`epochs[{i}]` must be a dict with keys 'epoch', 'train_objective_bpd' "
                f"and optionally 'test_elbo_bpd', got {type(rec).__name__}"
            )
        if "train_elbo_bpd" in rec and "train_objective_bpd" not in rec:
            rec = {**rec, "train_objective_bpd": rec["train_elbo_bpd"]}  # a record from before the rename
        missing = [k for k in ("epoch", "train_objective_bpd") if k not in rec]
        if missing:
            raise ValueError(
                f"`epochs[{i}]` is missing key(s) {missing}: expected keys "
                f"'epoch', 'train_objective_bpd' (and optionally 'test_elbo_bpd'), "
                f"got {sorted(rec.keys())}"
            )
        e = to_float(rec["epoch"])
        ep.append(e)
        train.append(to_float(rec["train_objective_bpd"]))
        if rec.get("train_objective") and rec["train_objective"] not in names:
            names.append(rec["train_objective"])
        t = to_float(rec.get("test_elbo_bpd"))
        if not math.isnan(t):
            test_ep.append(e)
            test.append(t)
    return ep, train, test_ep, test, names


def plot_reconstructions(
    x: torch.Tensor, x_hat: torch.Tensor, path: PathLike, max_images: int = 16,
    title: Optional[str] = None,
) -> PathLike:
    """Originals ``x`` above reconstructions ``x_hat`` (both (N, C, H, W)).

    At most ``max_images`` pairs are shown, 8 per row; with more than 8 the
    figure has several (original, reconstruction) row pairs.
    """
    x = check_plot_images(x, "x")
    x_hat = check_plot_images(x_hat, "x_hat")
    check_match("x", x, range(4), "x_hat", x_hat, range(4), "shape (N, C, H, W)")
    n = min(x.shape[0], int(max_images))
    if n < 1:
        raise ValueError(f"`max_images` must be >= 1, got {max_images}")
    nblocks, ncols = grid_shape(n)
    fig = new_figure(CELL_INCHES * ncols + 0.6, CELL_INCHES * 2.1 * nblocks + 0.6)
    axes = block_axes(fig, nblocks, 2, ncols)
    for b in range(nblocks):
        for j in range(ncols):
            i = b * ncols + j
            ax_o, ax_r = axes[2 * b, j], axes[2 * b + 1, j]
            if i < n:
                show_image(ax_o, x[i])
                show_image(ax_r, x_hat[i])
            else:
                ax_o.set_axis_off()
                ax_r.set_axis_off()
        axes[2 * b, 0].set_ylabel("original")
        axes[2 * b + 1, 0].set_ylabel("reconstruction")
    fig.suptitle(with_note(title or "Reconstructions", x.shape[1]))
    return save_figure(fig, path)


def plot_samples(
    x: torch.Tensor, path: PathLike, y: Optional[torch.Tensor] = None,
    max_images: int = 16, title: Optional[str] = None,
) -> PathLike:
    """Samples ``x`` (N, C, H, W) in a grid (8 per row).

    If ``y`` (N, C', h, w), the low-resolution samples, is given, each row of
    ``y`` (nearest-neighbour upscaled to ``x``'s size) is shown above the
    matching row of ``x``, labelled ``y ~ p(y|u)`` and ``x ~ p(x|y,z)``.
    """
    x = check_plot_images(x, "x")
    if y is not None:
        y = check_plot_images(y, "y")
        check_match("x", x, [0], "y", y, [0], "number of images N")
    n = min(x.shape[0], int(max_images))
    if n < 1:
        raise ValueError(f"`max_images` must be >= 1, got {max_images}")
    nblocks, ncols = grid_shape(n)
    rows_per_block = 1 if y is None else 2
    fig = new_figure(CELL_INCHES * ncols + (0.6 if y is not None else 0.2),
                      CELL_INCHES * rows_per_block * 1.05 * nblocks + 0.6)
    axes = block_axes(fig, nblocks, rows_per_block, ncols)
    if y is not None:
        y_up = upsample_nearest(y[:n], tuple(x.shape[-2:]))
    for b in range(nblocks):
        for j in range(ncols):
            i = b * ncols + j
            col_axes = [axes[rows_per_block * b + r, j] for r in range(rows_per_block)]
            if i >= n:
                for ax in col_axes:
                    ax.set_axis_off()
                continue
            if y is None:
                show_image(col_axes[0], x[i])
            else:
                show_image(col_axes[0], y_up[i])
                show_image(col_axes[1], x[i])
        if y is not None:
            axes[2 * b, 0].set_ylabel("y ~ p(y|u)")
            axes[2 * b + 1, 0].set_ylabel("x ~ p(x|y,z)")
    if y is None:
        default = "Samples"
    else:
        default = (f"Samples: y {y.shape[-2]}x{y.shape[-1]} (upscaled) "
                   f"above x {x.shape[-2]}x{x.shape[-1]}")
    fig.suptitle(with_note(title or default, x.shape[1]))
    return save_figure(fig, path)


def plot_super_resolution(
    lr: torch.Tensor,
    bicubic: Optional[torch.Tensor],
    sr_mean: torch.Tensor,
    sr_samples: Optional[torch.Tensor],
    sr_std: Optional[torch.Tensor],
    hr: Optional[torch.Tensor],
    path: PathLike,
    max_images: int = 8,
    title: Optional[str] = None,
    sr_means: Optional[torch.Tensor] = None,
) -> PathLike:
    """Super-resolution comparison, one row per image.

    Columns: ``LR input`` (nearest-neighbour upscaled to the HR size) |
    ``bicubic`` | ``SR mean`` | up to 3 ``z draw k`` (with ``sr_means``: the
    decoder means of single latent draws, what z proposes) | up to 4 (3 beside
    the z draws) ``SR sample k`` (full draws, the likelihood's noise included) |
    ``per-pixel std`` (channel-averaged, ``magma`` heat map with a shared colour
    bar) | ``HR truth``.

    Shapes: ``lr`` (N, C, h, w); ``bicubic``, ``sr_mean``, ``hr``
    (N, C, H, W); ``sr_samples`` and ``sr_means`` (S, N, C, H, W); ``sr_std``
    (N, C', H, W) with any C' (averaged over channels).  ``bicubic``,
    ``sr_samples``, ``sr_means``, ``sr_std`` and ``hr`` may be ``None``, which
    drops their columns (e.g. when no HR ground truth exists).
    """
    lr, bicubic, sr_mean, sr_samples, sr_std, hr, sr_means = _checked_sr_images(
        lr, bicubic, sr_mean, sr_samples, sr_std, hr, sr_means
    )
    n = min(sr_mean.shape[0], int(max_images))
    if n < 1:
        raise ValueError(f"`max_images` must be >= 1, got {max_images}")
    hw = tuple(sr_mean.shape[-2:])
    lr_up = upsample_nearest(lr[:n], hw)

    # (header, kind, payload)
    columns: List[Tuple[str, str, Optional[torch.Tensor]]] = [(f"LR input ({lr.shape[-2]}x{lr.shape[-1]})", "img", lr_up)]
    if bicubic is not None:
        columns.append(("bicubic", "img", bicubic))
    columns.append(("SR mean", "img", sr_mean))
    if sr_means is not None:
        for s in range(min(sr_means.shape[0], 3)):
            columns.append((f"z draw {s + 1}", "img", sr_means[s]))
    if sr_samples is not None:
        for s in range(min(sr_samples.shape[0], 4 if sr_means is None else 3)):
            columns.append((f"SR sample {s + 1}", "img", sr_samples[s]))
    std_map = vmax = None
    if sr_std is not None:
        std_map = spread_map(sr_std[:n])
        vmax = std_vmax(std_map)
        columns.append(("per-pixel std", "std", std_map))
    if hr is not None:
        columns.append((f"HR truth ({hw[0]}x{hw[1]})", "img", hr))

    ncols = len(columns)
    has_cbar = sr_std is not None
    fig = new_figure(CELL_INCHES * 1.1 * ncols + (1.1 if has_cbar else 0.5),
                      CELL_INCHES * 1.1 * n + 0.9)
    axes = fig.subplots(n, ncols, squeeze=False)
    std_im = None
    std_axes = []
    for j, (header, kind, data) in enumerate(columns):
        for i in range(n):
            ax = axes[i, j]
            if kind == "img":
                show_image(ax, data[i])
            else:
                std_im = show_std(ax, data[i].numpy(), vmax)
                std_axes.append(ax)
        axes[0, j].set_title(header, fontsize=9)
    for i in range(n):
        axes[i, 0].set_ylabel(f"#{i}", fontsize=9)
    if std_im is not None:
        cbar = fig.colorbar(std_im, ax=std_axes, location="right", shrink=0.9,
                            aspect=max(10, 12 * n), pad=0.02)
        cbar.ax.tick_params(labelsize=7)
    fig.suptitle(with_note(title or "Super-resolution", sr_mean.shape[1]))
    return save_figure(fig, path)



def _checked_sr_images(lr, bicubic, sr_mean, sr_samples, sr_std, hr, sr_means):
    """The images of :func:`plot_super_resolution` as float tensors, their shapes checked against ``sr_mean``."""
    lr = check_plot_images(lr, "lr")
    sr_mean = check_plot_images(sr_mean, "sr_mean")
    check_match("sr_mean", sr_mean, [0, 1], "lr", lr, [0, 1],
                 "number of images and channels (N, C)")
    if bicubic is not None:
        bicubic = check_plot_images(bicubic, "bicubic")
        check_match("sr_mean", sr_mean, range(4), "bicubic", bicubic, range(4),
                     "shape (N, C, H, W)")
    if hr is not None:
        hr = check_plot_images(hr, "hr")
        check_match("sr_mean", sr_mean, range(4), "hr", hr, range(4),
                     "shape (N, C, H, W)")
    if sr_samples is not None:
        sr_samples = check_plot_images(sr_samples, "sr_samples", "(S, N, C, H, W)")
        check_match("sr_mean", sr_mean, range(4), "sr_samples", sr_samples,
                     range(1, 5), "per-sample shape (N, C, H, W)")
    if sr_means is not None:
        sr_means = check_plot_images(sr_means, "sr_means", "(S, N, C, H, W)")
        check_match("sr_mean", sr_mean, range(4), "sr_means", sr_means,
                     range(1, 5), "per-draw shape (N, C, H, W)")
    if sr_std is not None:
        sr_std = check_plot_images(sr_std, "sr_std")
        check_match("sr_mean", sr_mean, [0, 2, 3], "sr_std", sr_std, [0, 2, 3],
                     "(N, H, W)")
    return lr, bicubic, sr_mean, sr_samples, sr_std, hr, sr_means


def plot_mog_components(
    component_images: torch.Tensor, weights, path: PathLike,
    title: Optional[str] = None,
) -> PathLike:
    """Decoded mean of each mixture component with its weight, plus a bar chart.

    ``component_images`` is (K, C, H, W); ``weights`` has K entries (tensor,
    array or list).  Images are laid out 8 per row, each titled with its
    index and weight.
    """
    imgs = check_plot_images(component_images, "component_images", "(K, C, H, W)")
    if not isinstance(weights, torch.Tensor):
        weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    w = plot_tensor(weights, "weights")
    if w.dim() != 1:
        raise ValueError(
            f"`weights` must be a 1-D tensor of shape (K,), got "
            f"{w.dim()}-D shape {tuple(w.shape)}"
        )
    k = imgs.shape[0]
    if w.numel() != k:
        raise ValueError(
            f"`weights` must have one entry per component: expected K={k} "
            f"(from `component_images` shape {tuple(imgs.shape)}), got {w.numel()}"
        )
    nrows, ncols = grid_shape(k)
    fig = new_figure(max(CELL_INCHES * ncols, 4.0) + 0.2, CELL_INCHES * 1.15 * nrows + 2.6)
    gs = fig.add_gridspec(nrows + 1, ncols,
                          height_ratios=[1.0] * nrows + [max(1.6, 0.9 * nrows)])
    for i in range(nrows * ncols):
        r, c = divmod(i, ncols)
        ax = fig.add_subplot(gs[r, c])
        if i < k:
            show_image(ax, imgs[i])
            ax.set_title(f"k={i}\nw={float(w[i]):.3f}", fontsize=8)
        else:
            ax.set_axis_off()
    ax_bar = fig.add_subplot(gs[nrows, :])
    ax_bar.bar(np.arange(k), w.numpy(), color="tab:blue")
    ax_bar.set_xlabel("component k")
    ax_bar.set_ylabel("mixture weight")
    if k <= 32:
        ax_bar.set_xticks(np.arange(k))
    ax_bar.tick_params(labelsize=7)
    ax_bar.grid(True, axis="y", alpha=0.3)
    fig.suptitle(with_note(title or "Mixture-of-Gaussians prior components",
                            imgs.shape[1]))
    return save_figure(fig, path)


def plot_model_samples(
    samples: Sequence[torch.Tensor], titles: Sequence[str], path: PathLike,
    per_row: int = 4, columns: int = 3,
) -> PathLike:
    """Samples of several models side by side: one panel (a grid of ``per_row``
    images a row) per model, ``columns`` panels a row, each titled."""
    if len(samples) != len(titles):
        raise ValueError(f"{len(samples)} sample sets but {len(titles)} titles")
    if not samples:
        raise ValueError("no samples to draw")
    grids = [image_grid(check_plot_images(s, f"samples[{i}]"), nrow=per_row) for i, s in enumerate(samples)]
    channels = {g.shape[0] for g in grids}
    ncols = min(int(columns), len(grids))
    nrows = int(math.ceil(len(grids) / ncols))
    height, width = max(g.shape[1] for g in grids), max(g.shape[2] for g in grids)
    scale = 3.2 / max(height, width)
    fig = new_figure(ncols * width * scale + 0.2, nrows * (height * scale + 0.35) + 0.2)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i in range(nrows * ncols):
        ax = axes[divmod(i, ncols)]
        if i < len(grids):
            show_image(ax, grids[i])
            ax.set_title(titles[i], fontsize=10)
        else:
            ax.set_axis_off()
    fig.suptitle(with_note("Samples, same seed for every model", max(channels)))
    return save_figure(fig, path)
