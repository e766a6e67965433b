"""Using a trained srVAE on a user's own images: tiled super-resolution with uncertainty.

:func:`superresolve_image` super-resolves one low-resolution image tensor of any size;
:func:`superresolve` does the same for image files (PNG / JPEG / TIFF) and ``.npy``
arrays, from a checkpoint or a model, and writes the results; ``pyro-srvae
superresolve`` is its command line. :func:`load_model` rebuilds a model from a
training checkpoint and :func:`evaluate_checkpoint` re-runs the end-of-training
evaluation (:func:`pyro_srvae.training.loop.evaluate_images`) on it (``pyro-srvae evaluate``).

Tiling
------
The model takes low-resolution tiles of its training size ``model.lr_shape[1:]``
(14x14 for 28x28 Fashion-MNIST and factor 2). An image of another size is cut into
tiles that overlap by ``overlap`` low-resolution pixels (default: half a tile) and
that lie on a regular grid of stride ``tile - overlap``. The image is first padded by
reflection (``overlap // 2`` pixels on each side, so border pixels also get context
from the padding rather than sitting on a tile edge), then further, evenly on both
sides, up to the smallest grid that covers it; tiles that reach outside the image see
the reflection. Each tile gets a separable raised-cosine window
``w(i) = sin^2(pi (i + 1/2) / T)`` over its ``T = tile`` low-resolution pixels, positive
everywhere and smallest at the tile's edges, where convolutions see their zero padding;
the windows of each pixel are normalised to sum to one, ``sum_i w_i = 1``, then repeated
over each ``factor x factor`` block of the high-resolution grid. After the blend (below)
the padding is cropped: the result is exactly ``factor * H x factor * W``.

* With ``overlap=0`` and an image a multiple of the tile size, no padding is needed,
  every output pixel comes from exactly one tile with weight exactly 1, and the result
  is the model's output on each tile (to float rounding of the network itself).
* Where tiles overlap, the blend's weights vary smoothly and vanish towards each tile's
  edge: no seams. For a model whose output is local (each output pixel depends only on
  nearby input pixels) the blended mean is the output on the whole image.

Blending draws, not only means
------------------------------
Draw s of tile i is a draw of the full predictive
q(u|y) p(z|y,u) p(x|y,z[,u]) (:meth:`pyro_srvae.SRVAE.super_resolve`), likelihood noise
included; u and z are drawn for each tile on its own, so the draws of overlapping tiles
are independent. With ``m_i`` the tile's predictive mean (its ``mean``) and
``r_{i,s} = X_{i,s} - m_i`` the residual of draw s, draw s of the image is

    out_s = M + sum_i v_i r_{i,s},   M = sum_i w_i m_i,   v_i = w_i / sqrt(sum_j w_j^2).

* The means get the convex weights ``w``: the predictive mean is an expectation, and a
  convex blend of the tiles' means (each the same quantity seen from another context)
  keeps its scale: a constant stays that constant.
* The residuals get ``v``, normalised in squares (``sum_i v_i^2 = 1``): the residuals of
  different tiles are independent with zero mean, so the variance of ``sum_i v_i r_{i,s}``
  is ``sum_i v_i^2 var_i``, a convex combination of the tiles' variances, and equals the
  variance of one tile's draw where the tiles agree. Blending the draws with ``w`` would
  give ``sum_i w_i^2 var_i``: half the variance where two tiles overlap equally, a
  quarter at a corner of four, an uncertainty map that draws the tile grid and
  intervals that cover too little. (The mean of a v-blend of draws would, in turn, be
  off by the factor ``sum_i v_i >= 1``; hence the split.)
* The weights are constant over each ``factor x factor`` block, so the blend commutes
  with the block average A: ``A out_s = sum_i w_i A m_i + sum_i v_i A r_{i,s}``. Under
  ``x_given_y="consistent"`` every tile's draws and means have block means y, so
  ``A m_i = y`` and ``A r_{i,s} = 0``, and every blended draw and the blended mean have
  block means exactly y (to float rounding). Weights varying within a block, as a
  high-resolution window would, would break that.

The decoder means ``means`` (the latent part) are blended the same way, with the same
``M``, so the output keeps their spread ``std_latent``. The likelihood's variance adds as
the residuals do: ``std_noise = sqrt(sum_i v_i^2 std_noise_i^2)``, so that
``std^2 = std_latent^2 + std_noise^2`` holds for the blend as for one tile, up to
sampling error. ``mean`` is the average of the blended ``means`` (that is ``M``); ``std``
and ``std_latent`` are the unbiased spreads (``correction=1``) of the blended ``samples``
and ``means``, as :meth:`~pyro_srvae.SRVAE.super_resolve` reports them. The blend is
computed as ``sum_i v_i X_{i,s} + sum_i (w_i - v_i) m_i`` (the same value): a pixel that
one tile covers is that tile's draw exactly, and a decoder that ignores the latents gives
equal blended means, ``std_latent`` exactly 0. ``observation_noise=False`` blends decoder
means only (``std == std_latent``, ``std_noise == 0``).

What the blend keeps is per pixel: the mean, the variance and its two parts, and the
block means. Where tiles overlap, one blended draw is a weighted sum of independent
tile draws: right in mean and variance, but its texture (the joint law of neighbouring
pixels) is a mix of two draws rather than one draw.

Latents are drawn from torch's RNG seeded with ``seed`` inside ``torch.random.fork_rng``:
the same call gives the same result, each input of :func:`superresolve` is seeded alike,
and the caller's RNG state is left as it was.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List

import torch
from tqdm.auto import tqdm

from ..data.images import ImageError
from .calibration import interval_mismatch
from .files import output_names, output_paths, read_input, same_file, write_outputs
from .loading import load_model
from .tiling import DEFAULT_SAMPLES, SuperResolvedImage, SuperResolveError, check_sr_model, superresolve_image


def _certified_interval(model, num_samples, views, overlap, log):
    """The model's RCPS interval calibration when it applies to these draws, else None; says which in ``log``."""
    calibration = getattr(model, "interval_calibration", None)
    if calibration is None:
        return None
    reason = interval_mismatch(calibration, model, num_samples, views, overlap)
    if reason is not None:
        log(f"note: the checkpoint's RCPS interval is not written: {reason}")
        return None
    log(
        f"interval: NAME_sr_lower.npy, NAME_sr_upper.npy = mean -+ {calibration.lambda_hat:.4g} x NAME_sr_std.npy "
        f"(RCPS, alpha {calibration.alpha:g}, delta {calibration.delta:g}, n = {calibration.num_images}; "
        f"the record in NAME_sr_interval.json): "
        f"{calibration.guarantee}"
    )
    return calibration


def superresolve(
    model,
    inputs,
    num_samples=DEFAULT_SAMPLES,
    out_dir=None,
    *,
    overlap=None,
    seed=0,
    device=None,
    tile_batch=None,
    progress=False,
    log=None,
    return_arrays=True,
    observation_noise=True,
    views=None,
) -> List[SuperResolvedImage]:
    """Super-resolve image files with a trained srVAE and, with ``out_dir``, write the results.

    Args:
        model: a ``checkpoint.pt`` path (see :func:`load_model`) or an SRVAE.
        inputs: a path or a list of paths: PNG / JPEG / TIFF images or ``.npy`` arrays
            ``(H, W)`` or ``(C, H, W)`` (uint8, uint16 or floats in [0, 1]), of any size
            of at least ``factor`` pixels a side. Grey and RGB images are converted to the
            model's channels where that is unambiguous (:func:`pyro_srvae.data.channels.match_channels`).
            Integer inputs must have the bit depth of the model's data (:func:`read_input`).
        num_samples: SR draws per image.
        out_dir: where to write, for an input ``name.ext``: ``name_sr_mean.png`` (an 8-bit
            preview) and ``.npy`` (float32, on the [0, 1] scale of the input as read, *not*
            clipped: the Gaussian likelihoods' means are unbounded, and on photographs they
            reach about -0.09 and 1.15 near black and white) of the predictive mean,
            ``name_sr_mean.tif`` (the mean in the input's own units, every band: uint16 for a
            16-bit input, uint8 for an 8-bit one, float32 for float input); the PNG and the
            TIFF clip a mean outside [0, 1] to the nearest end of their range
            (:func:`native_pixels`, :func:`pyro_srvae.data.channels.to_uint8_image`), the .npy keeps
            it, so its block means stay those of the input. ``name_sr_std.npy`` (the total per-pixel
            predictive std), ``name_sr_std_latent.npy`` and ``name_sr_std_noise.npy`` (its
            parts: the spread of the decoder means over the latents, the likelihood's
            noise), ``name_uncertainty.png`` (the three maps side by side, one shared colour
            bar), ``name_sr_samples.npy`` and ``.png`` (the draws); with a checkpoint
            calibrated by ``pyro-srvae calibrate --method rcps`` whose interval applies to
            these draws (:func:`pyro_srvae.sr.calibration.interval_mismatch`), also
            ``name_sr_lower.npy`` and ``name_sr_upper.npy``: the certified interval
            ``mean -+ lambda_hat * std`` (float32, the units of ``name_sr_mean.npy``), and
            ``name_sr_interval.json``: the calibration record (lambda_hat, alpha, delta, n, guarantee).
            ``None``: write nothing, only return the arrays.
        overlap, seed, tile_batch, device, observation_noise, views: as in :func:`superresolve_image`.
        progress: a progress bar over the inputs.
        log: called with one-line notes (channel conversions, which interval is written, files written).
        return_arrays: ``False`` returns results without the arrays (``None``), so that
            memory does not grow with the number of inputs.

    Every input is read and checked, and the output names are checked against the
    inputs, before anything is computed or written: a bad input raises
    :class:`SuperResolveError` (one line per problem) and leaves no file. Each input's
    files are written under temporary names and renamed together at the end; an input
    file is never overwritten. Raises :class:`~pyro_srvae.training.checkpoint.CheckpointError`
    for a bad checkpoint.

    Returns one :class:`SuperResolvedImage` per input, in order (duplicates removed).
    """
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    model = _checked_model(model, device)
    log = log or (lambda *_: None)
    paths = _unique_paths(inputs)
    channels, factor, bits = model.lr_shape[0], model.factor, int(getattr(model, "bits", 8))
    notes = _checked_inputs(paths, channels, factor, bits)
    interval = _certified_interval(model, num_samples, views, overlap, log)
    names, planned = [path.stem for path in paths], [{} for _ in paths]
    if out_dir is not None:
        out_dir = Path(out_dir)
        names, planned = _planned_outputs(out_dir, paths, interval)
    for path, note in zip(paths, notes):
        if note:
            log(f"note: {path}: {note}")
    draw = dict(overlap=overlap, seed=seed, tile_batch=tile_batch, device=device,
                observation_noise=observation_noise, views=views)  # fmt: skip
    bar = tqdm(total=len(paths), disable=not progress, unit="image", dynamic_ncols=True, file=sys.stderr)
    results = []
    try:
        for path, name, note, files in zip(paths, names, notes, planned):
            try:
                pixels, _, input_bits = read_input(path, channels, factor, bits)
            except ImageError as error:  # changed since it was checked
                raise SuperResolveError(str(error)) from None
            sr = superresolve_image(model, torch.from_numpy(pixels), num_samples, **draw)
            bounds = None
            if interval is not None:
                spread = interval.lambda_hat * sr.std
                bounds = (sr.mean - spread, sr.mean + spread, interval)
            if files:
                _write(out_dir, files, sr, path, input_bits, bounds)
                (bar.write if progress else log)(
                    f"{path}: {pixels.shape[1]}x{pixels.shape[2]} -> {sr.mean.shape[1]}x{sr.mean.shape[2]}, "
                    f"{num_samples} samples, mean std {sr.std.mean().item():.4g} "
                    f"(latent {sr.std_latent.mean().item():.4g}, noise {sr.std_noise.mean().item():.4g}) "
                    f"-> {out_dir / name}_*"
                )
            results.append(_result(path, sr, files, note, input_bits, bounds, return_arrays))
            bar.update(1)
    finally:
        bar.close()
    return results


def _checked_model(model, device):
    """The SRVAE itself, loaded first when ``model`` is a checkpoint's path."""
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model, device=device if device is not None else "auto")
    try:
        check_sr_model(model)
    except TypeError as error:
        raise SuperResolveError(str(error)) from None
    return model


def _unique_paths(inputs) -> List[Path]:
    """The input paths in order, each file once."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths, seen = [], set()
    for item in inputs:
        path = Path(item)
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            paths.append(path)
    if not paths:
        raise SuperResolveError("no input given")
    return paths


def _checked_inputs(paths, channels, factor, bits) -> List[str]:
    """Every input read and checked before any work: their notes, or one error naming each bad one."""
    # each is read again when its turn comes: memory stays bounded by one image however many there are
    notes, errors = [], []
    for path in paths:
        try:
            notes.append(read_input(path, channels, factor, bits)[1])
        except ImageError as error:
            errors.append(str(error))
    if errors:
        raise SuperResolveError(errors)
    return notes


def _planned_outputs(out_dir: Path, paths, interval):
    """Output names and files per input, checked to overwrite no input; the folder created."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SuperResolveError(f"{out_dir}: the output folder is an existing file")
    names = output_names(paths)
    planned = [output_paths(out_dir, name, interval=interval is not None) for name in names]
    clashes = [
        f"{source}: the output {target} would overwrite an input; choose another output folder"
        for files in planned
        for target in files.values()
        for source in paths
        if same_file(target, source)
    ]
    if clashes:
        raise SuperResolveError(clashes)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SuperResolveError(f"{out_dir}: cannot create the output folder ({error.strerror or error})") from None
    return names, planned


def _write(out_dir, files, sr, path, input_bits, bounds) -> None:
    try:
        write_outputs(out_dir, files, sr, path.name, input_bits, bounds)
    except OSError as error:
        raise SuperResolveError(f"{path}: cannot write the outputs to {out_dir} ({error.strerror or error})") from None


def _result(path, sr, files, note, input_bits, bounds, return_arrays) -> SuperResolvedImage:
    if return_arrays:
        arrays = (sr.mean.numpy(), sr.std.numpy(), sr.samples.numpy())
        parts = dict(std_latent=sr.std_latent.numpy(), std_noise=sr.std_noise.numpy())
        if bounds is not None:
            parts.update(lower=bounds[0].numpy(), upper=bounds[1].numpy())
    else:
        arrays, parts = (None, None, None), {}
    return SuperResolvedImage(path, *arrays, files=files, note=note, bits=input_bits, **parts)
