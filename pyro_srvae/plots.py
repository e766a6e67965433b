"""Plotting helpers for srVAE experiments.

Every ``plot_*`` function takes torch tensors (on any device; they are detached
and moved to the CPU), draws a :class:`matplotlib.figure.Figure` rendered with
the non-interactive Agg canvas, writes it as a PNG to ``path`` and returns
``path``.  No pyplot global state is touched, so importing or using this module
never changes a user's interactive backend.

Images are float tensors in ``[0, 1]`` (values outside are clamped for display)
of shape ``(N, C, H, W)``:

* ``C == 1``: shown in grey (``cmap="gray"``, ``vmin=0``, ``vmax=1``);
* ``C == 3``: shown as RGB;
* ``C == 2``: channel 0 is shown in grey (noted in the figure title);
* ``C >= 4`` (e.g. 4-band satellite images): channels 0-2 are shown as RGB
  (noted in the figure title).

``uint8`` tensors are accepted as well and scaled by ``1/255``.

PNGs are written atomically: the figure is saved to a temporary file in the
destination directory, which is then renamed over ``path`` with
:func:`os.replace`.  If saving fails, neither a partial figure under the final
name nor the temporary file is left behind (an existing file at ``path`` is
kept unchanged).
"""

from __future__ import annotations

import math
import os
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .checkpoint import atomic_write_bytes

__all__ = [
    "image_grid",
    "plot_loss_curves",
    "plot_reconstructions",
    "plot_samples",
    "plot_super_resolution",
    "plot_mog_components",
    "plot_uncertainty",
    "plot_uncertainty_parts",
    "plot_calibration",
    "plot_sample_strip",
    "plot_model_samples",
]

PathLike = Union[str, "os.PathLike[str]"]

_DPI = 100
_CELL = 1.15  # inches per image cell
_MAX_COLS = 8  # images per row before wrapping
_STD_CMAP = "magma"


# --------------------------------------------------------------------------- #
# Input handling
# --------------------------------------------------------------------------- #
def _as_tensor(x, name: str) -> torch.Tensor:
    """Detach, move to CPU and convert to float32 (uint8 is scaled by 1/255)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor, got {type(x).__name__}"
        )
    x = x.detach().cpu()
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if x.dtype == torch.uint16:
        return x.float() / 65535.0
    return x.float()


def _check_images(x, name: str, layout: str = "(N, C, H, W)") -> torch.Tensor:
    """Validate a tensor whose dimensions are described by ``layout``."""
    x = _as_tensor(x, name)
    ndim = layout.count(",") + 1
    if x.dim() != ndim:
        raise ValueError(
            f"`{name}` must be a {ndim}-D tensor of shape {layout}, "
            f"got {x.dim()}-D tensor of shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(
            f"`{name}` must be non-empty, got shape {tuple(x.shape)} ({layout})"
        )
    return x


def _check_match(
    name_a: str, a: torch.Tensor, dims_a: Sequence[int],
    name_b: str, b: torch.Tensor, dims_b: Sequence[int], what: str,
) -> None:
    got_a = tuple(a.shape[d] for d in dims_a)
    got_b = tuple(b.shape[d] for d in dims_b)
    if got_a != got_b:
        raise ValueError(
            f"`{name_b}` must have the same {what} as `{name_a}`: "
            f"expected {got_a[0] if len(got_a) == 1 else got_a}, "
            f"got {got_b[0] if len(got_b) == 1 else got_b} "
            f"(`{name_a}` shape {tuple(a.shape)}, `{name_b}` shape {tuple(b.shape)})"
        )


def _channel_note(c: int) -> str:
    if c in (1, 3):
        return ""
    if c == 2:
        return "channel 0 of 2 shown in grey"
    return f"channels 0-2 of {c} shown as RGB"


def _with_note(title: str, c: int) -> str:
    note = _channel_note(c)
    return f"{title}\n({note})" if note else title


def _display_array(img: torch.Tensor) -> Tuple[np.ndarray, Optional[str]]:
    """(C, H, W) tensor -> (array for imshow, cmap), clamped to [0, 1]."""
    img = img.clamp(0.0, 1.0)
    c = img.shape[0]
    if c >= 3:
        return img[:3].permute(1, 2, 0).numpy(), None
    return img[0].numpy(), "gray"


def _upsample_nearest(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="nearest")


# --------------------------------------------------------------------------- #
# Figure helpers
# --------------------------------------------------------------------------- #
def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(max(width, 2.5), max(height, 1.8)), dpi=_DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _clear_axis(ax) -> None:
    """Remove ticks and spines but keep the axis labels usable."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _show(ax, img: torch.Tensor):
    arr, cmap = _display_array(img)
    if cmap is None:
        im = ax.imshow(arr, interpolation="nearest")
    else:
        im = ax.imshow(arr, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    _clear_axis(ax)
    return im


def _show_std(ax, std_hw: np.ndarray, vmax: float):
    im = ax.imshow(std_hw, cmap=_STD_CMAP, vmin=0.0, vmax=vmax,
                   interpolation="nearest")
    _clear_axis(ax)
    return im


def _std_map(std: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) std -> (..., H, W), averaged over channels."""
    return std.mean(dim=-3)


def _std_vmax(std: torch.Tensor) -> float:
    finite = std[torch.isfinite(std)]
    vmax = float(finite.max()) if finite.numel() else 0.0
    return vmax if vmax > 0 else 1e-6


def _save_figure(fig: Figure, path: PathLike) -> PathLike:
    """Save ``fig`` as PNG to ``path`` atomically (temporary file, fsync, rename); return ``path``."""
    atomic_write_bytes(path, lambda handle: fig.savefig(handle, format="png", dpi=_DPI))
    return path


def _block_axes(fig: Figure, nblocks: int, rows_per_block: int, ncols: int):
    """Axes array (nblocks * rows_per_block, ncols) with a thin gap between blocks."""
    if nblocks == 1 or rows_per_block == 1:
        return fig.subplots(nblocks * rows_per_block, ncols, squeeze=False)
    ratios: List[float] = []
    for b in range(nblocks):
        if b:
            ratios.append(0.12)
        ratios.extend([1.0] * rows_per_block)
    gs = fig.add_gridspec(len(ratios), ncols, height_ratios=ratios)
    axes = np.empty((nblocks * rows_per_block, ncols), dtype=object)
    for b in range(nblocks):
        for r in range(rows_per_block):
            g = b * (rows_per_block + 1) + r
            for j in range(ncols):
                axes[b * rows_per_block + r, j] = fig.add_subplot(gs[g, j])
    return axes


def _grid_shape(n: int, max_cols: int = _MAX_COLS) -> Tuple[int, int]:
    ncols = min(n, max_cols)
    return int(math.ceil(n / ncols)), ncols


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2,
               pad_value: float = 1.0) -> torch.Tensor:
    """Tile ``images`` (N, C, H, W) into one (C, H', W') image.

    ``nrow`` is the number of images per row (as in
    :func:`torchvision.utils.make_grid`), but unlike ``make_grid`` the number
    of channels is preserved (grey images stay single-channel).
    """
    x = _check_images(images, "images")
    if int(nrow) < 1:
        raise ValueError(f"`nrow` must be >= 1, got {nrow}")
    if padding < 0:
        raise ValueError(f"`padding` must be >= 0, got {padding}")
    n, c, h, w = x.shape
    ncols = min(int(nrow), n)
    nrows = int(math.ceil(n / ncols))
    p = int(padding)
    grid = x.new_full((c, nrows * (h + p) + p, ncols * (w + p) + p), float(pad_value))
    for i in range(n):
        r, col = divmod(i, ncols)
        top, left = p + r * (h + p), p + col * (w + p)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid


def _to_float(v) -> float:
    if v is None:
        return float("nan")
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().item()
    v = float(v)
    return v if math.isfinite(v) else float("nan")


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
        e = _to_float(rec["epoch"])
        ep.append(e)
        train.append(_to_float(rec["train_objective_bpd"]))
        if rec.get("train_objective") and rec["train_objective"] not in names:
            names.append(rec["train_objective"])
        t = _to_float(rec.get("test_elbo_bpd"))
        if not math.isnan(t):
            test_ep.append(e)
            test.append(t)

    for i, pair in enumerate(step_list):
        if len(pair) != 2:
            raise ValueError(
                f"`steps[{i}]` must be a (step, loss_bpd) pair, got {pair!r}"
            )
    npanels = 2 if step_list else 1
    fig = _new_figure(5.2 * npanels, 3.8)
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
        xs = [_to_float(s) for s, _ in step_list]
        ys = [_to_float(v) for _, v in step_list]
        ax2.plot(xs, ys, linewidth=0.8, color="tab:blue", alpha=0.8,
                 label="train objective, running mean")
        ax2.set_xlabel("step")
        ax2.set_ylabel("minus the training objective (bits/dim)")
        ax2.set_title("per step")
        ax2.grid(True, alpha=0.3)
        ax2.legend()

    fig.suptitle(title or "Training curves")
    return _save_figure(fig, path)


def plot_reconstructions(
    x: torch.Tensor, x_hat: torch.Tensor, path: PathLike, max_images: int = 16,
    title: Optional[str] = None,
) -> PathLike:
    """Originals ``x`` above reconstructions ``x_hat`` (both (N, C, H, W)).

    At most ``max_images`` pairs are shown, 8 per row; with more than 8 the
    figure has several (original, reconstruction) row pairs.
    """
    x = _check_images(x, "x")
    x_hat = _check_images(x_hat, "x_hat")
    _check_match("x", x, range(4), "x_hat", x_hat, range(4), "shape (N, C, H, W)")
    n = min(x.shape[0], int(max_images))
    if n < 1:
        raise ValueError(f"`max_images` must be >= 1, got {max_images}")
    nblocks, ncols = _grid_shape(n)
    fig = _new_figure(_CELL * ncols + 0.6, _CELL * 2.1 * nblocks + 0.6)
    axes = _block_axes(fig, nblocks, 2, ncols)
    for b in range(nblocks):
        for j in range(ncols):
            i = b * ncols + j
            ax_o, ax_r = axes[2 * b, j], axes[2 * b + 1, j]
            if i < n:
                _show(ax_o, x[i])
                _show(ax_r, x_hat[i])
            else:
                ax_o.set_axis_off()
                ax_r.set_axis_off()
        axes[2 * b, 0].set_ylabel("original")
        axes[2 * b + 1, 0].set_ylabel("reconstruction")
    fig.suptitle(_with_note(title or "Reconstructions", x.shape[1]))
    return _save_figure(fig, path)


def plot_samples(
    x: torch.Tensor, path: PathLike, y: Optional[torch.Tensor] = None,
    max_images: int = 16, title: Optional[str] = None,
) -> PathLike:
    """Samples ``x`` (N, C, H, W) in a grid (8 per row).

    If ``y`` (N, C', h, w), the low-resolution samples, is given, each row of
    ``y`` (nearest-neighbour upscaled to ``x``'s size) is shown above the
    matching row of ``x``, labelled ``y ~ p(y|u)`` and ``x ~ p(x|y,z)``.
    """
    x = _check_images(x, "x")
    if y is not None:
        y = _check_images(y, "y")
        _check_match("x", x, [0], "y", y, [0], "number of images N")
    n = min(x.shape[0], int(max_images))
    if n < 1:
        raise ValueError(f"`max_images` must be >= 1, got {max_images}")
    nblocks, ncols = _grid_shape(n)
    rows_per_block = 1 if y is None else 2
    fig = _new_figure(_CELL * ncols + (0.6 if y is not None else 0.2),
                      _CELL * rows_per_block * 1.05 * nblocks + 0.6)
    axes = _block_axes(fig, nblocks, rows_per_block, ncols)
    if y is not None:
        y_up = _upsample_nearest(y[:n], tuple(x.shape[-2:]))
    for b in range(nblocks):
        for j in range(ncols):
            i = b * ncols + j
            col_axes = [axes[rows_per_block * b + r, j] for r in range(rows_per_block)]
            if i >= n:
                for ax in col_axes:
                    ax.set_axis_off()
                continue
            if y is None:
                _show(col_axes[0], x[i])
            else:
                _show(col_axes[0], y_up[i])
                _show(col_axes[1], x[i])
        if y is not None:
            axes[2 * b, 0].set_ylabel("y ~ p(y|u)")
            axes[2 * b + 1, 0].set_ylabel("x ~ p(x|y,z)")
    if y is None:
        default = "Samples"
    else:
        default = (f"Samples: y {y.shape[-2]}x{y.shape[-1]} (upscaled) "
                   f"above x {x.shape[-2]}x{x.shape[-1]}")
    fig.suptitle(_with_note(title or default, x.shape[1]))
    return _save_figure(fig, path)


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
    lr = _check_images(lr, "lr")
    sr_mean = _check_images(sr_mean, "sr_mean")
    _check_match("sr_mean", sr_mean, [0, 1], "lr", lr, [0, 1],
                 "number of images and channels (N, C)")
    if bicubic is not None:
        bicubic = _check_images(bicubic, "bicubic")
        _check_match("sr_mean", sr_mean, range(4), "bicubic", bicubic, range(4),
                     "shape (N, C, H, W)")
    if hr is not None:
        hr = _check_images(hr, "hr")
        _check_match("sr_mean", sr_mean, range(4), "hr", hr, range(4),
                     "shape (N, C, H, W)")
    if sr_samples is not None:
        sr_samples = _check_images(sr_samples, "sr_samples", "(S, N, C, H, W)")
        _check_match("sr_mean", sr_mean, range(4), "sr_samples", sr_samples,
                     range(1, 5), "per-sample shape (N, C, H, W)")
    if sr_means is not None:
        sr_means = _check_images(sr_means, "sr_means", "(S, N, C, H, W)")
        _check_match("sr_mean", sr_mean, range(4), "sr_means", sr_means,
                     range(1, 5), "per-draw shape (N, C, H, W)")
    if sr_std is not None:
        sr_std = _check_images(sr_std, "sr_std")
        _check_match("sr_mean", sr_mean, [0, 2, 3], "sr_std", sr_std, [0, 2, 3],
                     "(N, H, W)")

    n = min(sr_mean.shape[0], int(max_images))
    if n < 1:
        raise ValueError(f"`max_images` must be >= 1, got {max_images}")
    hw = tuple(sr_mean.shape[-2:])
    lr_up = _upsample_nearest(lr[:n], hw)

    # (header, kind, payload)
    columns: List[Tuple[str, str, Optional[torch.Tensor]]] = [
        (f"LR input ({lr.shape[-2]}x{lr.shape[-1]})", "img", lr_up)
    ]
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
        std_map = _std_map(sr_std[:n])
        vmax = _std_vmax(std_map)
        columns.append(("per-pixel std", "std", std_map))
    if hr is not None:
        columns.append((f"HR truth ({hw[0]}x{hw[1]})", "img", hr))

    ncols = len(columns)
    has_cbar = sr_std is not None
    fig = _new_figure(_CELL * 1.1 * ncols + (1.1 if has_cbar else 0.5),
                      _CELL * 1.1 * n + 0.9)
    axes = fig.subplots(n, ncols, squeeze=False)
    std_im = None
    std_axes = []
    for j, (header, kind, data) in enumerate(columns):
        for i in range(n):
            ax = axes[i, j]
            if kind == "img":
                _show(ax, data[i])
            else:
                std_im = _show_std(ax, data[i].numpy(), vmax)
                std_axes.append(ax)
        axes[0, j].set_title(header, fontsize=9)
    for i in range(n):
        axes[i, 0].set_ylabel(f"#{i}", fontsize=9)
    if std_im is not None:
        cbar = fig.colorbar(std_im, ax=std_axes, location="right", shrink=0.9,
                            aspect=max(10, 12 * n), pad=0.02)
        cbar.ax.tick_params(labelsize=7)
    fig.suptitle(_with_note(title or "Super-resolution", sr_mean.shape[1]))
    return _save_figure(fig, path)


def plot_mog_components(
    component_images: torch.Tensor, weights, path: PathLike,
    title: Optional[str] = None,
) -> PathLike:
    """Decoded mean of each mixture component with its weight, plus a bar chart.

    ``component_images`` is (K, C, H, W); ``weights`` has K entries (tensor,
    array or list).  Images are laid out 8 per row, each titled with its
    index and weight.
    """
    imgs = _check_images(component_images, "component_images", "(K, C, H, W)")
    if not isinstance(weights, torch.Tensor):
        weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    w = _as_tensor(weights, "weights")
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
    nrows, ncols = _grid_shape(k)
    fig = _new_figure(max(_CELL * ncols, 4.0) + 0.2, _CELL * 1.15 * nrows + 2.6)
    gs = fig.add_gridspec(nrows + 1, ncols,
                          height_ratios=[1.0] * nrows + [max(1.6, 0.9 * nrows)])
    for i in range(nrows * ncols):
        r, c = divmod(i, ncols)
        ax = fig.add_subplot(gs[r, c])
        if i < k:
            _show(ax, imgs[i])
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
    fig.suptitle(_with_note(title or "Mixture-of-Gaussians prior components",
                            imgs.shape[1]))
    return _save_figure(fig, path)


def plot_uncertainty(
    sr_mean: torch.Tensor, sr_std: torch.Tensor, path: PathLike,
    title: Optional[str] = None,
) -> PathLike:
    """One image: SR mean (C, H, W) next to its per-pixel std heat map.

    ``sr_std`` is (C', H, W) with any C' (averaged over channels) or (H, W);
    it is shown with the ``magma`` colour map and its own colour bar.
    """
    mean = _check_images(sr_mean, "sr_mean", "(C, H, W)")
    std = _as_tensor(sr_std, "sr_std")
    if std.dim() == 2:
        std = std.unsqueeze(0)
    std = _check_images(std, "sr_std", "(C, H, W)")
    _check_match("sr_mean", mean, [1, 2], "sr_std", std, [1, 2],
                 "spatial size (H, W)")
    std_hw = _std_map(std)
    fig = _new_figure(6.2, 3.3)
    ax_m, ax_s = fig.subplots(1, 2)
    _show(ax_m, mean)
    ax_m.set_title("SR mean", fontsize=10)
    im = _show_std(ax_s, std_hw.numpy(), _std_vmax(std_hw))
    ax_s.set_title("per-pixel std", fontsize=10)
    cbar = fig.colorbar(im, ax=ax_s, shrink=0.9, pad=0.02)
    cbar.ax.tick_params(labelsize=8)
    fig.suptitle(_with_note(title or "Super-resolution uncertainty", mean.shape[0]))
    return _save_figure(fig, path)


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
        t = _as_tensor(value, name)
        if t.dim() == 2:
            t = t.unsqueeze(0)
        maps.append((name, _check_images(t, name, "(C, H, W)")))
    for name, t in maps[1:]:
        _check_match("std", maps[0][1], [1, 2], name, t, [1, 2], "spatial size (H, W)")
    shown = [_std_map(t) for _, t in maps]
    vmax = _std_vmax(torch.stack(shown))
    h, w = shown[0].shape
    panel = 2.6
    fig = _new_figure(3 * panel * min(1.6, max(w / h, 0.6)) + 1.0, panel + 0.9)
    axes = fig.subplots(1, 3)
    im = None
    for ax, header, hw in zip(axes, ("total std", "latent part", "noise part"), shown):
        im = _show_std(ax, hw.numpy(), vmax)
        ax.set_title(header, fontsize=10)
    cbar = fig.colorbar(im, ax=list(axes), shrink=0.9, pad=0.02)
    cbar.ax.tick_params(labelsize=8)
    cbar.set_label("per-pixel std", fontsize=9)
    fig.suptitle(_with_note(title or "Super-resolution uncertainty: total = sqrt(latent^2 + noise^2)",
                            maps[0][1].shape[0]))
    return _save_figure(fig, path)


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
            observed = _to_float(value)
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

    fig = _new_figure(5.0, 4.6)
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
    return _save_figure(fig, path)


def plot_sample_strip(
    samples: torch.Tensor, path: PathLike, max_images: int = 16,
    title: Optional[str] = None, means: Optional[torch.Tensor] = None,
) -> PathLike:
    """Several samples (S, C, H, W) of one image in a strip (8 per row).

    With ``means`` (S, C, H, W), the decoder means of the same draws (what z proposes)
    fill the rows above the samples, ``z draw k`` over ``sample k``."""
    s = _check_images(samples, "samples", "(S, C, H, W)")
    n = min(s.shape[0], int(max_images))
    if n < 1:
        raise ValueError(f"`max_images` must be >= 1, got {max_images}")
    blocks = [("sample", s)]
    if means is not None:
        means = _check_images(means, "means", "(S, C, H, W)")
        _check_match("samples", s, range(4), "means", means, range(4), "shape (S, C, H, W)")
        blocks.insert(0, ("z draw", means))
    nrows, ncols = _grid_shape(n)
    fig = _new_figure(_CELL * ncols + 0.2, _CELL * 1.1 * nrows * len(blocks) + 0.6)
    axes = fig.subplots(nrows * len(blocks), ncols, squeeze=False)
    for b, (label, images) in enumerate(blocks):
        for i in range(nrows * ncols):
            row, col = divmod(i, ncols)
            ax = axes[b * nrows + row, col]
            if i < n:
                _show(ax, images[i])
                ax.set_title(f"{label} {i + 1}", fontsize=8)
            else:
                ax.set_axis_off()
    fig.suptitle(_with_note(title or f"{s.shape[0]} samples of one image",
                            s.shape[1]))
    return _save_figure(fig, path)


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
    grids = [image_grid(_check_images(s, f"samples[{i}]"), nrow=per_row) for i, s in enumerate(samples)]
    channels = {g.shape[0] for g in grids}
    ncols = min(int(columns), len(grids))
    nrows = int(math.ceil(len(grids) / ncols))
    height, width = max(g.shape[1] for g in grids), max(g.shape[2] for g in grids)
    scale = 3.2 / max(height, width)
    fig = _new_figure(ncols * width * scale + 0.2, nrows * (height * scale + 0.35) + 0.2)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i in range(nrows * ncols):
        ax = axes[divmod(i, ncols)]
        if i < len(grids):
            _show(ax, grids[i])
            ax.set_title(titles[i], fontsize=10)
        else:
            ax.set_axis_off()
    fig.suptitle(_with_note("Samples, same seed for every model", max(channels)))
    return _save_figure(fig, path)
