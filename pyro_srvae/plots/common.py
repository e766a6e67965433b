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
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..utils.io import atomic_write_bytes

PathLike = Union[str, "os.PathLike[str]"]

_DPI = 100

CELL_INCHES = 1.15  # inches per image cell

_MAX_COLS = 8  # images per row before wrapping

_STD_CMAP = "magma"


# --------------------------------------------------------------------------- #
# Input handling
# --------------------------------------------------------------------------- #
def plot_tensor(x, name: str) -> torch.Tensor:
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


def check_plot_images(x, name: str, layout: str = "(N, C, H, W)") -> torch.Tensor:
    """Validate a tensor whose dimensions are described by ``layout``."""
    x = plot_tensor(x, name)
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


def check_match(
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


def with_note(title: str, c: int) -> str:
    note = _channel_note(c)
    return f"{title}\n({note})" if note else title


def _display_array(img: torch.Tensor) -> Tuple[np.ndarray, Optional[str]]:
    """(C, H, W) tensor -> (array for imshow, cmap), clamped to [0, 1]."""
    img = img.clamp(0.0, 1.0)
    c = img.shape[0]
    if c >= 3:
        return img[:3].permute(1, 2, 0).numpy(), None
    return img[0].numpy(), "gray"


def upsample_nearest(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="nearest")


# --------------------------------------------------------------------------- #
# Figure helpers
# --------------------------------------------------------------------------- #
def new_figure(width: float, height: float) -> Figure:
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


def show_image(ax, img: torch.Tensor):
    arr, cmap = _display_array(img)
    if cmap is None:
        im = ax.imshow(arr, interpolation="nearest")
    else:
        im = ax.imshow(arr, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    _clear_axis(ax)
    return im


def show_std(ax, std_hw: np.ndarray, vmax: float):
    im = ax.imshow(std_hw, cmap=_STD_CMAP, vmin=0.0, vmax=vmax,
                   interpolation="nearest")
    _clear_axis(ax)
    return im


def spread_map(std: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) std -> (..., H, W), averaged over channels."""
    return std.mean(dim=-3)


def std_vmax(std: torch.Tensor) -> float:
    finite = std[torch.isfinite(std)]
    vmax = float(finite.max()) if finite.numel() else 0.0
    return vmax if vmax > 0 else 1e-6


def save_figure(fig: Figure, path: PathLike) -> PathLike:
    """Save ``fig`` as PNG to ``path`` atomically (temporary file, fsync, rename); return ``path``."""
    atomic_write_bytes(path, lambda handle: fig.savefig(handle, format="png", dpi=_DPI))
    return path


def block_axes(fig: Figure, nblocks: int, rows_per_block: int, ncols: int):
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


def grid_shape(n: int, max_cols: int = _MAX_COLS) -> Tuple[int, int]:
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
    x = check_plot_images(images, "images")
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


def to_float(v) -> float:
    if v is None:
        return float("nan")
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().item()
    v = float(v)
    return v if math.isfinite(v) else float("nan")
