"""Reading images to super-resolve and writing what ``superresolve`` makes (atomically, as a set)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .. import plots
from ..data.channels import check_image_size, match_channels, to_uint8_image
from ..data.images import ImageError, read_image
from ..model.image_model import SuperResolution
from ..utils.io import StagedFiles

DEFAULT_OUT_DIR = "superresolved"

# What superresolve writes for an input <name>, keyed as in SuperResolvedImage.files.
OUTPUT_SUFFIXES = {
    "mean_png": "_sr_mean.png",
    "mean_npy": "_sr_mean.npy",
    "mean_tif": "_sr_mean.tif",
    "std_npy": "_sr_std.npy",
    "std_latent_npy": "_sr_std_latent.npy",
    "std_noise_npy": "_sr_std_noise.npy",
    "uncertainty_png": "_uncertainty.png",
    "samples_npy": "_sr_samples.npy",
    "samples_png": "_sr_samples.png",
}

# Written besides when the checkpoint holds an RCPS interval (pyro-srvae calibrate --method rcps)
# that applies to the draws (pyro_srvae.sr.calibration.interval_mismatch): its lower and upper ends,
# and the calibration record (lambda_hat, alpha, delta, n, the guarantee) they come from.
INTERVAL_SUFFIXES = {
    "lower_npy": "_sr_lower.npy",
    "upper_npy": "_sr_upper.npy",
    "interval_json": "_sr_interval.json",
}

STRIP_MAX_SAMPLES = 16


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #
def output_names(paths: Sequence[Path]) -> List[str]:
    """File-name stems for the outputs; inputs sharing a stem get their extension, then a number."""
    stems = Counter(p.stem for p in paths)
    names, used = [], set()
    for path in paths:
        name = path.stem
        if stems[name] > 1 and path.suffix:
            name = f"{name}_{path.suffix.lstrip('.').lower()}"
        candidate, number = name, 2
        while candidate in used:
            candidate, number = f"{name}_{number}", number + 1
        used.add(candidate)
        names.append(candidate)
    return names


def output_paths(out_dir, name, interval=False) -> Dict[str, Path]:
    """The files of input ``name``: :data:`OUTPUT_SUFFIXES`, and :data:`INTERVAL_SUFFIXES` with ``interval``."""
    suffixes = {**OUTPUT_SUFFIXES, **(INTERVAL_SUFFIXES if interval else {})}
    return {key: Path(out_dir) / f"{name}{suffix}" for key, suffix in suffixes.items()}


def same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def read_input(path, channels: int, factor: int, bits: int):
    """``(pixels (channels, H, W) float32 in [0, 1], note, stored bits)`` of one input file.

    Integer inputs must have the bit depth of the model's training data (``bits``): an
    8-bit image given to a model of 16-bit data (or the reverse) is refused with one line,
    because what its values mean on the other grid (full scale? the sensor's 12 bits?) would
    be a guess, and the output could not be written in the input's own units. Float inputs
    in [0, 1] carry no bit depth and are taken as they are.
    """
    image = read_image(path)
    pixels, note = match_channels(image, channels)
    check_image_size(pixels, factor, path)
    if image.bits is not None and image.bits != bits:
        raise ImageError(
            f"{path}: a {image.bits}-bit image, but the model was trained on {bits}-bit data; "
            f"convert it to uint{bits} (or to floats in [0, 1]) first: its units on the other grid would be a guess"
        )
    return pixels, note, image.bits


def native_pixels(pixels: np.ndarray, bits: Optional[int]) -> np.ndarray:
    """An image in [0, 1] in the input's own units: ``floor(2**bits x)`` as uint8 / uint16
    (the inverse of reading ``k`` as ``(k + 0.5) / 2**bits``), or float32 for float input.

    A value outside [0, 1] is clipped: to 0 or ``2**bits - 1`` (to 0.0 or 1.0 for float
    input); NaN becomes 0. With the consistent model each block of the mean averages to
    ``(k + 0.5) / 2**bits``, so the written block averages to ``k`` within half a level --
    except where the mean leaves [0, 1] and is clipped, which moves that block's average
    (near black or white only; ``NAME_sr_mean.npy`` keeps the unclipped values)."""
    values = np.nan_to_num(np.asarray(pixels, dtype=np.float64), nan=0.0)
    if bits is None:
        return np.clip(values, 0.0, 1.0).astype(np.float32)
    levels = 2**bits
    return np.clip(np.floor(values * levels), 0, levels - 1).astype(np.uint8 if bits == 8 else np.uint16)


def _save_tiff(array: np.ndarray):
    """A writer of ``(C, H, W)`` as a TIFF of C planes (tifffile takes a path, not a handle)."""
    import tifffile

    planar = {"planarconfig": "separate"} if array.shape[0] > 1 else {}
    data = array if array.shape[0] > 1 else array[0]
    return lambda path: tifffile.imwrite(path, data, photometric="minisblack", **planar)


def _save_npy(array):
    return lambda handle: np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def write_outputs(out_dir: Path, files: Dict[str, Path], result: SuperResolution, label: str, bits=None, interval=None):
    """The files of one input (:data:`OUTPUT_SUFFIXES`, and with ``interval``, ``(lower, upper,
    IntervalCalibration)``, :data:`INTERVAL_SUFFIXES`), all renamed into place at the end or none at all."""

    mean, std, samples = result.mean, result.std, result.samples
    shown = min(samples.shape[0], STRIP_MAX_SAMPLES)
    with StagedFiles(out_dir) as staged:
        staged.write(files["mean_png"], lambda h: to_uint8_image(mean.numpy()).save(h, format="PNG"))
        staged.write(files["mean_npy"], _save_npy(mean.numpy()))
        staged.write_via_path(files["mean_tif"], _save_tiff(native_pixels(mean.numpy(), bits)))
        staged.write(files["std_npy"], _save_npy(std.numpy()))
        staged.write(files["std_latent_npy"], _save_npy(result.std_latent.numpy()))
        staged.write(files["std_noise_npy"], _save_npy(result.std_noise.numpy()))
        staged.write(files["samples_npy"], _save_npy(samples.numpy()))
        if interval is not None:
            lower, upper, calibration = interval
            staged.write(files["lower_npy"], _save_npy(lower.numpy()))
            staged.write(files["upper_npy"], _save_npy(upper.numpy()))
            record = json.dumps(calibration.to_dict(), indent=2) + "\n"
            staged.write(files["interval_json"], lambda handle: handle.write(record.encode("utf-8")))
        staged.write_via_path(
            files["uncertainty_png"],
            lambda tmp: plots.plot_uncertainty_parts(
                std, result.std_latent, result.std_noise, tmp,
                title=f"{label}: per-pixel std of the SR predictive, {samples.shape[0]} samples",
            ),
        )
        count = f"{shown} of {samples.shape[0]}" if shown < samples.shape[0] else f"{shown}"
        staged.write_via_path(
            files["samples_png"],
            lambda tmp: plots.plot_sample_strip(
                samples, tmp, max_images=STRIP_MAX_SAMPLES, means=result.means,
                title=f"{label}: {count} SR draws: decoder means (what z proposes) over full samples",
            ),
        )
