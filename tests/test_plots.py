"""Tests for pyro_srvae.plots: PNGs are written, valid, non-blank, atomic."""

import logging
import os
import sys
import warnings

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pyro_srvae import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHAPES = {1: (1, 28, 28), 3: (3, 32, 32), 4: (4, 16, 16)}


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _images(n, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w),
                            indexing="ij")
    base = torch.stack([((k + 1) * xx + (c - k) * yy) % 1.0 for k in range(c)])
    return (0.8 * base + 0.2 * torch.rand(n, c, h, w, generator=g)).clamp(0, 1)


def _read_png(path, min_w=150, min_h=100):
    """Check ``path`` is a real, non-trivial, non-blank PNG; return RGB array."""
    path = os.fspath(path)
    assert os.path.isfile(path), f"{path} was not written"
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC, "not a PNG file"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h, f"figure too small: {w}x{h}"
    rgb = img[..., :3].astype(np.float64)
    assert rgb.std() > 0.05, "figure looks blank (pixel values hardly vary)"
    return rgb


def _only_file(directory, name):
    """The directory holds exactly ``name`` (no leftover temp files)."""
    assert sorted(os.listdir(directory)) == [name]


def _frac(mask):
    return float(np.mean(mask))


@pytest.fixture
def figs(monkeypatch):
    """Record every Figure that the plotting functions save."""
    captured = []
    orig = plots.common.save_figure

    def spy(fig, path):
        captured.append(fig)
        return orig(fig, path)

    for module in (plots.common, plots.training, plots.uncertainty):

        monkeypatch.setattr(module, "save_figure", spy)
    return captured


def _sr_inputs(c, h, w, n=3, s=5, seed=0):
    hr = _images(n, c, h, w, seed)
    lr = torch.nn.functional.avg_pool2d(hr, 2)
    bic = torch.nn.functional.interpolate(lr, size=(h, w), mode="bicubic").clamp(0, 1)
    g = torch.Generator().manual_seed(seed + 1)
    samples = (hr.unsqueeze(0) + 0.1 * torch.randn(s, *hr.shape, generator=g)).clamp(0, 1)
    return lr, bic, samples.mean(0), samples, samples.std(0), hr


def _epochs():
    return [
        {"epoch": 1, "train_objective_bpd": 3.0, "test_elbo_bpd": 3.1},
        {"epoch": 2, "train_objective_bpd": 2.5},  # test missing
        {"epoch": 3, "train_objective_bpd": torch.tensor(2.2), "test_elbo_bpd": None},
        {"epoch": 4, "train_objective_bpd": 2.0, "test_elbo_bpd": 2.1},
    ]


# One call per public plotting function, for generic checks.
def _call(name, c, path):
    shape = SHAPES[c]
    x = _images(3, *shape)
    if name == "loss":
        return plots.plot_loss_curves(_epochs(), path, steps=[(i, 3 - i / 50) for i in range(50)])
    if name == "reconstructions":
        return plots.plot_reconstructions(x, (x * 0.9).clamp(0, 1), path)
    if name == "samples":
        return plots.plot_samples(x, path, y=torch.nn.functional.avg_pool2d(x, 2))
    if name == "super_resolution":
        return plots.plot_super_resolution(*_sr_inputs(c, *shape[1:], n=2, s=2), path)
    if name == "mog":
        return plots.plot_mog_components(x, torch.tensor([0.2, 0.3, 0.5]), path)
    if name == "uncertainty":
        lr, bic, mean, smp, std, hr = _sr_inputs(c, *shape[1:], n=1)
        return plots.plot_uncertainty(mean[0], std[0], path)
    if name == "strip":
        return plots.plot_sample_strip(x, path)
    if name == "uncertainty_parts":
        std = _sr_inputs(c, *shape[1:], n=1)[4][0]
        return plots.plot_uncertainty_parts(std, 0.6 * std, 0.8 * std, path)
    if name == "calibration":
        return plots.plot_calibration(_coverage(), 16, path)
    raise AssertionError(name)


def _coverage():
    return {
        "all": {"0.5": 0.46, "0.8": 0.74, "0.9": 0.85, "0.95": 0.91},
        "detail": {"0.5": 0.31, "0.8": 0.58, "0.9": 0.7, "0.95": 0.79},
        "expected": {"0.5": 0.471, "0.8": 0.765, "0.9": 0.882, "0.95": 0.882},
    }


ALL = ["loss", "reconstructions", "samples", "super_resolution", "mog",
       "uncertainty", "strip", "uncertainty_parts", "calibration"]
NO_IMAGES = ("loss", "calibration")  # no channel count to vary


# --------------------------------------------------------------------------- #
# generic: every function writes a valid PNG for C in {1, 3, 4}
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("c", [1, 3, 4])
@pytest.mark.parametrize("name", [n for n in ALL if n not in NO_IMAGES])
def test_writes_valid_png_for_each_channel_count(tmp_path, name, c):
    path = str(tmp_path / f"{name}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no imshow clipping warnings
        out = _call(name, c, path)
    assert out == path
    _read_png(path)
    _only_file(tmp_path, f"{name}.png")


def test_loss_curves_png(tmp_path):
    path = str(tmp_path / "loss.png")
    assert _call("loss", 1, path) == path
    _read_png(path, min_w=400, min_h=250)
    _only_file(tmp_path, "loss.png")


def test_pathlib_path_returned_and_parent_created(tmp_path):
    path = tmp_path / "a" / "b" / "strip.png"
    out = plots.plot_sample_strip(_images(3, 1, 28, 28), path)
    assert out is path
    _read_png(path)


def test_overwrites_existing_file(tmp_path):
    path = tmp_path / "s.png"
    path.write_bytes(b"old")
    plots.plot_sample_strip(_images(2, 3, 32, 32), path)
    _read_png(path)
    _only_file(tmp_path, "s.png")


# --------------------------------------------------------------------------- #
# atomic writes
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", ALL)
def test_failed_save_leaves_no_file(tmp_path, monkeypatch, name):
    def broken_savefig(self, fname, *args, **kwargs):
        # write a partial figure, then crash
        if hasattr(fname, "write"):
            fname.write(PNG_MAGIC + b"partial")
        else:
            with open(fname, "wb") as fh:
                fh.write(PNG_MAGIC + b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    path = tmp_path / "fig.png"
    with pytest.raises(RuntimeError, match="disk full"):
        _call(name, 3, str(path))
    assert not path.exists()
    assert os.listdir(tmp_path) == [], "temporary file left behind"


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "fig.png"
    path.write_bytes(b"previous figure")

    def broken_savefig(self, fname, *args, **kwargs):
        fname.write(b"half")
        raise OSError("boom")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="boom"):
        plots.plot_sample_strip(_images(2, 1, 28, 28), path)
    assert path.read_bytes() == b"previous figure"
    _only_file(tmp_path, "fig.png")


def test_keyboard_interrupt_during_save_cleans_up(tmp_path, monkeypatch):
    def interrupted(self, fname, *args, **kwargs):
        fname.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plots.plot_sample_strip(_images(2, 1, 28, 28), tmp_path / "f.png")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- #
# display conventions (checked on the figure and on the rendered pixels)
# --------------------------------------------------------------------------- #
def test_grey_uses_gray_cmap_fixed_range(tmp_path, figs):
    x = torch.zeros(3, 1, 28, 28)  # black images
    path = tmp_path / "g.png"
    plots.plot_sample_strip(x, path)
    ims = [im for ax in figs[0].axes for im in ax.get_images()]
    assert len(ims) == 3
    for im in ims:
        assert im.get_cmap().name == "gray"
        assert im.get_clim() == (0.0, 1.0)
    rgb = _read_png(path)
    # black images must actually show up as black pixels (not rescaled grey)
    assert _frac(rgb.max(axis=2) < 0.05) > 0.1


def test_rgb_and_four_band_colours(tmp_path, figs):
    red = torch.zeros(2, 3, 32, 32)
    red[:, 0] = 1.0
    p1 = tmp_path / "red.png"
    plots.plot_sample_strip(red, p1)
    rgb = _read_png(p1)
    assert _frac((rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.1) & (rgb[..., 2] < 0.1)) > 0.1

    # 4 bands: channels 0-2 shown as RGB (green here), band 3 ignored
    four = torch.zeros(2, 4, 16, 16)
    four[:, 1] = 1.0
    four[:, 3] = 1.0
    p2 = tmp_path / "four.png"
    plots.plot_sample_strip(four, p2)
    rgb = _read_png(p2)
    assert _frac((rgb[..., 1] > 0.9) & (rgb[..., 0] < 0.1) & (rgb[..., 2] < 0.1)) > 0.1
    assert "channels 0-2 of 4" in figs[-1]._suptitle.get_text()
    assert "channel" not in figs[0]._suptitle.get_text()


def test_two_channel_shows_channel0_grey(tmp_path, figs):
    x = torch.zeros(2, 2, 16, 16)
    x[:, 1] = 1.0  # channel 1 white, channel 0 black -> shown black
    path = tmp_path / "c2.png"
    plots.plot_sample_strip(x, path)
    im = figs[0].axes[0].get_images()[0]
    assert im.get_cmap().name == "gray"
    assert np.asarray(im.get_array()).max() == 0.0
    assert "channel 0 of 2" in figs[0]._suptitle.get_text()
    _read_png(path)


def test_out_of_range_values_are_clamped(tmp_path, figs, caplog):
    x = torch.linspace(-2, 3, 3 * 32 * 32).reshape(1, 3, 32, 32)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        plots.plot_sample_strip(x, tmp_path / "c.png")
        plots.plot_samples(torch.linspace(-1, 2, 32 * 32).reshape(1, 1, 32, 32),
                           tmp_path / "g.png", y=x[..., ::2, ::2])
    # clamped by us, so matplotlib has nothing to clip (it would log a warning)
    assert not [r for r in caplog.records if "Clipping" in r.getMessage()]
    arr = np.asarray(figs[0].axes[0].get_images()[0].get_array())
    assert arr.min() == 0.0 and arr.max() == 1.0
    grey = np.asarray(figs[1].axes[1].get_images()[0].get_array())
    assert grey.min() == 0.0 and grey.max() == 1.0


def test_gpu_or_grad_tensors_accepted(tmp_path):
    x = _images(2, 1, 28, 28).requires_grad_(True)
    if torch.cuda.is_available():
        x = x.cuda()
    plots.plot_sample_strip(x * 1.0, tmp_path / "g.png")
    _read_png(tmp_path / "g.png")


# --------------------------------------------------------------------------- #
# per-function content
# --------------------------------------------------------------------------- #
def test_image_grid():
    x = torch.stack([torch.full((1, 4, 5), float(i) / 10) for i in range(5)])
    g = plots.image_grid(x, nrow=2, padding=1, pad_value=1.0)
    assert g.shape == (1, 3 * (4 + 1) + 1, 2 * (5 + 1) + 1)  # 3 rows, 2 cols, C kept
    assert torch.all(g[:, 1:5, 1:6] == 0.0)  # image 0 top-left
    assert torch.allclose(g[:, 1:5, 7:12], torch.tensor(0.1))  # image 1
    assert torch.allclose(g[:, 11:15, 1:6], torch.tensor(0.4))  # image 4
    assert torch.all(g[:, 11:15, 7:12] == 1.0)  # empty cell is padding
    g3 = plots.image_grid(_images(4, 3, 8, 8), nrow=8, padding=0)
    assert g3.shape == (3, 8, 32)
    with pytest.raises(ValueError, match=r"4-D.*\(N, C, H, W\).*got 3-D"):
        plots.image_grid(torch.rand(3, 8, 8), nrow=2)
    with pytest.raises(ValueError, match="nrow"):
        plots.image_grid(x, nrow=0)


def test_loss_curves_content(tmp_path, figs):
    steps = [(i, 3.0 - i / 100) for i in range(100)]
    path = tmp_path / "loss.png"
    assert plots.plot_loss_curves(_epochs(), path, steps=steps) == path
    fig = figs[0]
    ax, ax2 = fig.axes
    assert ax.get_xlabel() == "epoch"
    assert ax.get_ylabel() == "bits/dim"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train: -objective", "test: -ELBO"]
    train, test = ax.get_lines()
    assert list(train.get_xdata()) == [1, 2, 3, 4]
    assert np.allclose(train.get_ydata(), [3.0, 2.5, 2.2, 2.0])
    assert list(test.get_xdata()) == [1, 4]  # epochs without a test value skipped
    assert ax2.get_xlabel() == "step"
    assert len(ax2.get_lines()[0].get_xdata()) == 100
    wide = _read_png(path)

    plots.plot_loss_curves(_epochs()[1:3], tmp_path / "l1.png")  # no test values
    assert len(figs[1].axes) == 1
    assert len(figs[1].axes[0].get_lines()) == 1
    narrow = _read_png(tmp_path / "l1.png")
    assert wide.shape[1] > 1.5 * narrow.shape[1]


def test_loss_curves_errors(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plots.plot_loss_curves([], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"epochs\[1\].*missing.*train_objective_bpd"):
        plots.plot_loss_curves([{"epoch": 1, "train_objective_bpd": 1.0}, {"epoch": 2}],
                               tmp_path / "x.png")
    with pytest.raises(ValueError, match="must be a dict"):
        plots.plot_loss_curves([(1, 2.0)], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"steps\[0\].*pair"):
        plots.plot_loss_curves(_epochs(), tmp_path / "x.png", steps=[(1, 2, 3)])
    assert os.listdir(tmp_path) == []


def test_reconstructions_layout(tmp_path, figs):
    x = _images(16, 1, 28, 28)
    plots.plot_reconstructions(x, 1 - x, tmp_path / "r.png", max_images=10)
    fig = figs[0]
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labels == ["original", "reconstruction"] * 2  # 10 -> two row pairs
    assert sum(len(ax.get_images()) for ax in fig.axes) == 20
    assert fig._suptitle.get_text() == "Reconstructions"
    for ax in fig.axes:
        if ax.get_images():
            assert len(ax.get_xticks()) == 0 and len(ax.get_yticks()) == 0
        else:  # empty cells of the last row pair are hidden
            assert not ax.axison
    _read_png(tmp_path / "r.png")


def test_reconstructions_errors(tmp_path):
    x = _images(4, 1, 28, 28)
    with pytest.raises(ValueError, match=r"`x` must be a 4-D.*got 3-D.*\(1, 28, 28\)"):
        plots.plot_reconstructions(x[0], x[0], tmp_path / "r.png")
    with pytest.raises(ValueError, match=r"`x_hat`.*expected \(4, 1, 28, 28\), got \(3, 1, 28, 28\)"):
        plots.plot_reconstructions(x, x[:3], tmp_path / "r.png")
    with pytest.raises(ValueError, match="max_images"):
        plots.plot_reconstructions(x, x, tmp_path / "r.png", max_images=0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        plots.plot_reconstructions([1, 2], x, tmp_path / "r.png")
    assert os.listdir(tmp_path) == []


def test_samples_with_low_res_rows(tmp_path, figs):
    x = _images(5, 3, 32, 32)
    y = _images(5, 3, 8, 8, seed=1)
    plots.plot_samples(x, tmp_path / "s.png", y=y)
    fig = figs[0]
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labels == ["y ~ p(y|u)", "x ~ p(x|y,z)"]
    # y is shown nearest-neighbour upscaled to x's size
    y_shown = np.asarray(fig.axes[0].get_images()[0].get_array())
    assert y_shown.shape == (32, 32, 3)
    expected = y[0].repeat_interleave(4, 1).repeat_interleave(4, 2).permute(1, 2, 0)
    assert np.allclose(y_shown, expected.numpy())
    _read_png(tmp_path / "s.png")

    plots.plot_samples(x, tmp_path / "s2.png", max_images=3)
    assert sum(len(ax.get_images()) for ax in figs[1].axes) == 3
    _read_png(tmp_path / "s2.png")


def test_samples_errors(tmp_path):
    x = _images(4, 1, 28, 28)
    with pytest.raises(ValueError, match=r"`y` must have the same number of images N.*expected 4, got 3"):
        plots.plot_samples(x, tmp_path / "s.png", y=x[:3, :, ::2, ::2])
    with pytest.raises(ValueError, match=r"`y` must be a 4-D.*got 3-D"):
        plots.plot_samples(x, tmp_path / "s.png", y=x[0])
    with pytest.raises(ValueError, match="non-empty"):
        plots.plot_samples(x[:0], tmp_path / "s.png")
    assert os.listdir(tmp_path) == []


def test_super_resolution_columns(tmp_path, figs):
    lr, bic, mean, samples, std, hr = _sr_inputs(3, 32, 32, n=10, s=6)
    plots.plot_super_resolution(lr, bic, mean, samples, std, hr, tmp_path / "sr.png",
                                max_images=2)
    fig = figs[0]
    headers = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert headers == ["LR input (16x16)", "bicubic", "SR mean", "SR sample 1",
                       "SR sample 2", "SR sample 3", "SR sample 4", "per-pixel std",
                       "HR truth (32x32)"]
    image_axes = [ax for ax in fig.axes if ax.get_images()]
    assert len(image_axes) == 2 * 9  # 2 rows x 9 columns
    std_ims = [im for ax in fig.axes for im in ax.get_images()
               if im.get_cmap().name == "magma"]
    assert len(std_ims) == 2
    assert std_ims[0].get_clim()[0] == 0.0
    assert len(fig.axes) == 2 * 9 + 1  # one shared colour bar
    lr_shown = np.asarray(fig.axes[0].get_images()[0].get_array())
    assert lr_shown.shape == (32, 32, 3)  # LR upscaled to HR size
    _read_png(tmp_path / "sr.png", min_w=600, min_h=250)


def test_super_resolution_shows_the_z_draws_beside_the_full_draws(tmp_path, figs):
    lr, bic, mean, samples, std, hr = _sr_inputs(1, 28, 28, n=2, s=5)
    means = torch.stack([hr * 0.5, hr * 0.6, hr * 0.7, hr * 0.8, hr * 0.9])  # what z proposes, told apart
    plots.plot_super_resolution(lr, bic, mean, samples, std, hr, tmp_path / "sr.png", sr_means=means)
    fig = figs[0]
    headers = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert headers == ["LR input (14x14)", "bicubic", "SR mean", "z draw 1", "z draw 2", "z draw 3",
                       "SR sample 1", "SR sample 2", "SR sample 3", "per-pixel std", "HR truth (28x28)"]
    shown = {ax.get_title(): np.asarray(ax.get_images()[0].get_array()) for ax in fig.axes[:11]}
    np.testing.assert_allclose(shown["z draw 2"], (hr[0, 0] * 0.6).numpy(), atol=1e-6)
    np.testing.assert_allclose(shown["SR sample 2"], samples[1, 0, 0].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="`sr_means` must have the same per-draw shape"):
        plots.plot_super_resolution(lr, bic, mean, samples, std, hr, tmp_path / "bad.png", sr_means=means[:, :, :, :27])


def test_the_sample_strip_puts_the_z_draws_above_the_samples(tmp_path, figs):
    samples = _images(3, 1, 28, 28)
    means = samples * 0.5
    plots.plot_sample_strip(samples, tmp_path / "strip.png", means=means)
    axes = [ax for ax in figs[0].axes if ax.get_images()]
    assert [ax.get_title() for ax in axes] == ["z draw 1", "z draw 2", "z draw 3", "sample 1", "sample 2", "sample 3"]
    np.testing.assert_allclose(np.asarray(axes[1].get_images()[0].get_array()), means[1, 0].numpy(), atol=1e-6)
    _read_png(tmp_path / "strip.png")


def test_super_resolution_optional_columns(tmp_path, figs):
    lr, bic, mean, samples, std, hr = _sr_inputs(1, 28, 28, n=2)
    plots.plot_super_resolution(lr, None, mean, None, None, None, tmp_path / "sr.png")
    headers = [ax.get_title() for ax in figs[0].axes if ax.get_title()]
    assert headers == ["LR input (14x14)", "SR mean"]
    _read_png(tmp_path / "sr.png")


def test_super_resolution_errors(tmp_path):
    lr, bic, mean, samples, std, hr = _sr_inputs(3, 32, 32, n=3, s=4)
    p = tmp_path / "sr.png"
    with pytest.raises(ValueError, match=r"`sr_samples` must be a 5-D.*\(S, N, C, H, W\).*got 4-D"):
        plots.plot_super_resolution(lr, bic, mean, samples[0], std, hr, p)
    with pytest.raises(ValueError, match=r"`hr`.*expected \(3, 3, 32, 32\), got \(2, 3, 32, 32\)"):
        plots.plot_super_resolution(lr, bic, mean, samples, std, hr[:2], p)
    with pytest.raises(ValueError, match=r"`lr`.*\(N, C\).*expected \(3, 3\), got \(2, 3\)"):
        plots.plot_super_resolution(lr[:2], bic, mean, samples, std, hr, p)
    with pytest.raises(ValueError, match=r"`sr_std`.*expected \(3, 32, 32\), got \(3, 16, 16\)"):
        plots.plot_super_resolution(lr, bic, mean, samples, std[..., ::2, ::2], hr, p)
    with pytest.raises(ValueError, match=r"`sr_samples`.*expected \(3, 3, 32, 32\), got \(2, 3, 32, 32\)"):
        plots.plot_super_resolution(lr, bic, mean, samples[:, :2], std, hr, p)
    assert os.listdir(tmp_path) == []


def test_mog_components(tmp_path, figs):
    comps = _images(3, 1, 28, 28)
    w = torch.tensor([0.5, 0.3, 0.2])
    plots.plot_mog_components(comps, w, tmp_path / "m.png")
    fig = figs[0]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["k=0\nw=0.500", "k=1\nw=0.300", "k=2\nw=0.200"]
    bars = [p.get_height() for ax in fig.axes for p in ax.patches]
    assert np.allclose(bars, [0.5, 0.3, 0.2])
    _read_png(tmp_path / "m.png")
    plots.plot_mog_components(comps, [0.2, 0.3, 0.5], tmp_path / "m2.png")  # list ok
    _read_png(tmp_path / "m2.png")


def test_mog_errors(tmp_path):
    comps = _images(3, 1, 28, 28)
    with pytest.raises(ValueError, match=r"expected K=3.*got 2"):
        plots.plot_mog_components(comps, torch.tensor([0.5, 0.5]), tmp_path / "m.png")
    with pytest.raises(ValueError, match=r"`weights` must be a 1-D.*got 2-D"):
        plots.plot_mog_components(comps, torch.ones(3, 1), tmp_path / "m.png")
    with pytest.raises(ValueError, match=r"\(K, C, H, W\).*got 3-D"):
        plots.plot_mog_components(comps[0], torch.ones(1), tmp_path / "m.png")
    assert os.listdir(tmp_path) == []


def test_uncertainty(tmp_path, figs):
    mean = _images(1, 3, 32, 32)[0]
    std = torch.rand(3, 32, 32) * 0.2
    out = plots.plot_uncertainty(mean, std, tmp_path / "u.png", title="my image")
    assert out == tmp_path / "u.png"
    fig = figs[0]
    assert fig._suptitle.get_text() == "my image"
    assert [ax.get_title() for ax in fig.axes[:2]] == ["SR mean", "per-pixel std"]
    assert len(fig.axes) == 3  # mean, std, colour bar
    std_im = fig.axes[1].get_images()[0]
    assert std_im.get_cmap().name == "magma"
    assert np.allclose(np.asarray(std_im.get_array()), std.mean(0).numpy())
    _read_png(tmp_path / "u.png")
    # a 2-D std map and an all-zero std are fine too
    plots.plot_uncertainty(mean, torch.zeros(32, 32), tmp_path / "u0.png")
    _read_png(tmp_path / "u0.png")


def test_uncertainty_errors(tmp_path):
    mean = _images(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"`sr_mean` must be a 3-D.*\(C, H, W\).*got 4-D"):
        plots.plot_uncertainty(mean, mean[0], tmp_path / "u.png")
    with pytest.raises(ValueError, match=r"`sr_std`.*spatial size.*expected \(32, 32\), got \(16, 16\)"):
        plots.plot_uncertainty(mean[0], torch.rand(3, 16, 16), tmp_path / "u.png")
    assert os.listdir(tmp_path) == []


def test_uncertainty_parts(tmp_path, figs):
    std = torch.rand(3, 20, 36) * 0.2
    latent, noise = 0.5 * std, torch.full((20, 36), 0.05)  # a 2-D map is fine too
    out = plots.plot_uncertainty_parts(std, latent, noise, tmp_path / "u.png", title="scene")
    assert out == tmp_path / "u.png"
    fig = figs[0]
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert [ax.get_title() for ax in panels] == ["total std", "latent part", "noise part"]
    assert len(fig.axes) == 4  # three maps and ONE colour bar
    ims = [ax.get_images()[0] for ax in panels]
    assert {im.get_cmap().name for im in ims} == {"magma"}
    shared = std.mean(0).max().item()  # the largest of the three maps sets every panel's scale
    assert all(im.get_clim() == (0.0, pytest.approx(shared)) for im in ims)
    for im, expected in zip(ims, (std.mean(0), latent.mean(0), noise)):
        assert np.allclose(np.asarray(im.get_array()), expected.numpy())
    assert fig._suptitle.get_text() == "scene"
    _read_png(tmp_path / "u.png", min_w=400)
    plots.plot_uncertainty_parts(torch.zeros(1, 8, 8), torch.zeros(8, 8), torch.zeros(8, 8), tmp_path / "z.png")
    _read_png(tmp_path / "z.png")


def test_uncertainty_parts_errors(tmp_path):
    std = torch.rand(1, 16, 16)
    with pytest.raises(ValueError, match=r"`std_noise`.*spatial size.*expected \(16, 16\), got \(8, 8\)"):
        plots.plot_uncertainty_parts(std, std, torch.rand(1, 8, 8), tmp_path / "u.png")
    with pytest.raises(ValueError, match=r"`std_latent` must be a 3-D.*got 4-D"):
        plots.plot_uncertainty_parts(std, std[None], std, tmp_path / "u.png")
    assert os.listdir(tmp_path) == []


def test_calibration(tmp_path, figs):
    coverage = _coverage()
    coverage["detail"]["0.95"] = float("nan")  # e.g. too few detail pixels: that point is left out
    out = plots.plot_calibration(coverage, 16, tmp_path / "c.png")
    assert out == tmp_path / "c.png"
    (ax,) = figs[0].axes
    assert "16 draws" in ax.get_title()
    assert "expected coverage" in ax.get_xlabel() and "observed coverage" in ax.get_ylabel()
    diagonal, everything, detail = ax.get_lines()
    assert np.allclose(diagonal.get_xdata(), [0, 1]) and np.allclose(diagonal.get_ydata(), [0, 1])
    assert np.allclose(everything.get_xdata(), [0.471, 0.765, 0.882, 0.882])
    assert np.allclose(everything.get_ydata(), [0.46, 0.74, 0.85, 0.91])
    assert np.allclose(detail.get_ydata(), [0.31, 0.58, 0.7])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[1:] == ["all HR pixels", "detail pixels (chosen by x)"] and "calibrated" in labels[0]
    assert ax.get_xlim() == (0.0, 1.0) and ax.get_ylim() == (0.0, 1.0)
    _read_png(tmp_path / "c.png", min_w=300, min_h=300)
    _only_file(tmp_path, "c.png")


def test_calibration_draws_the_edge_pixels_when_the_table_has_them(tmp_path, figs):
    coverage = _coverage()
    coverage["edges"] = {"0.5": 0.4, "0.8": 0.7, "0.9": 0.8, "0.95": 0.86}
    plots.plot_calibration(coverage, 16, tmp_path / "c.png")
    (ax,) = figs[0].axes
    _, _, _, edges = ax.get_lines()
    assert np.allclose(edges.get_ydata(), [0.4, 0.7, 0.8, 0.86])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[1:] == ["all HR pixels", "detail pixels (chosen by x)", "edge pixels (chosen from y)"]


@pytest.mark.parametrize("coverage, message", [
    ({"all": {"0.9": 0.8}, "expected": {"0.9": 0.85}}, r"missing key\(s\) \['detail'\]"),
    ({"detail": {}}, r"missing key\(s\) \['all', 'expected'\]"),
    ([0.9, 0.8], r"`coverage` must be a dict with keys 'all', 'detail' and 'expected'"),
    ({"all": {"0.9": 0.8}, "detail": {}, "expected": {"0.9": 0.85}},
     r"`coverage\['detail'\]` is missing level\(s\) \['0.9'\]"),
    ({"all": {"0.9": 1.3}, "detail": {"0.9": 0.5}, "expected": {"0.9": 0.85}},
     r"\['all'\]\['0.9'\].*fraction in \[0, 1\]"),
    ({"all": {"ninety": 0.8}, "detail": {}, "expected": {"0.9": 0.85}}, r"key 'ninety' that is not a level"),
    ({"all": 0.8, "detail": {}, "expected": {"0.9": 0.85}}, r"`coverage\['all'\]` must be a dict"),
    ({"all": {}, "detail": {}, "expected": {}}, r"`coverage\['expected'\]` is empty"),
])
def test_calibration_errors(tmp_path, coverage, message):
    with pytest.raises(ValueError, match=message):
        plots.plot_calibration(coverage, 16, tmp_path / "c.png")
    with pytest.raises(ValueError, match="num_samples"):
        plots.plot_calibration(_coverage(), 0, tmp_path / "c.png")
    assert os.listdir(tmp_path) == []


def test_sample_strip(tmp_path, figs):
    s = _images(20, 4, 16, 16)
    plots.plot_sample_strip(s, tmp_path / "st.png", max_images=9)
    titles = [ax.get_title() for ax in figs[0].axes if ax.get_title()]
    assert titles == [f"sample {i}" for i in range(1, 10)]
    _read_png(tmp_path / "st.png")
    with pytest.raises(ValueError, match=r"\(S, C, H, W\).*got 5-D"):
        plots.plot_sample_strip(s.unsqueeze(0), tmp_path / "x.png")


def test_no_pyplot_state(tmp_path):
    """Using the module never creates pyplot figures or switches the backend."""
    had_pyplot = "matplotlib.pyplot" in sys.modules
    backend = matplotlib.rcParams._get("backend")
    if had_pyplot:
        import matplotlib.pyplot as plt
        before = plt.get_fignums()
    _call("uncertainty", 1, str(tmp_path / "u.png"))
    _call("mog", 3, str(tmp_path / "m.png"))
    assert matplotlib.rcParams._get("backend") == backend
    if had_pyplot:
        assert plt.get_fignums() == before
    else:
        assert "matplotlib.pyplot" not in sys.modules
