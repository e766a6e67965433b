"""The test-set evaluation: bits/dim of x (ELBO and importance-weighted), super-resolution scores,
what the latents carry, in one pass over the images (``evaluate_model``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
from tqdm.auto import tqdm

from ..data.batching import dequantize
from ..data.image_dataset import bit_depth
from ..utils.devices import model_device
from ..utils.seeds import derive_seed
from .latents import latent_metrics_from_sums, latent_sum_keys, latent_sums
from .likelihood import bits_per_dim, conditional_bits_per_dim, log_importance_weights
from .sr_scores import SR_SUM_KEYS, baseline_log_likelihood, sr_metric_sums, sr_metrics_from_sums


def evaluate_model(
    model,
    images: torch.Tensor,
    *,
    elbo_samples: int,
    iw_samples: int,
    batch_size: int = 64,
    sr_samples: int = 16,
    device: Optional[Union[str, torch.device]] = None,
    seed: int = 0,
    progress: bool = False,
    chunk_size: Optional[int] = None,
    super_resolution: bool = True,
    rank: int = 0,
    world_size: int = 1,
    baseline_scale: Optional[float] = None,
    latents: bool = True,
) -> Dict[str, float]:
    """Evaluate a VAE or SRVAE on a uint8 (or uint16) test set ``images`` ``(N, C, H, W)``.

    Each batch is dequantized as ``x = (k + u) / 256`` (``/ 65536`` for uint16, whose bits/dim
    then carry ``+ 16``: :func:`bits_per_dim`; the result's ``bits`` says which)
    (:func:`pyro_srvae.data.batching.dequantize`, the same map as in training) with
    ``u`` drawn from a private CPU ``torch.Generator`` seeded with ``seed``, then
    ``max(elbo_samples, iw_samples)`` log-weights are drawn per image; the
    ELBO uses the first ``elbo_samples`` (mean of log-weights) and the IW
    estimate the first ``iw_samples`` (logmeanexp).  With equal counts,
    ``iw_bpd <= elbo_bpd`` holds exactly.  Both are converted with
    :func:`bits_per_dim` using ``D = C*H*W`` of ``x``.

    For the SRVAE the model observes both ``x`` and ``y = downscale(x)``; what
    the estimate of ``log p(x, y = f(x))`` is as a function of x is the model's
    ``x_density``, returned under that key: ``"exact"`` (the default
    ``x_given_y="consistent"``: a normalized density of x, comparable with a
    VAE's), ``"bound"`` (y on the 8-bit grid: a lower bound on one) or
    ``"joint"`` (``x_given_y="spec"``: y scored twice, not a density of x).

    For an SRVAE (detected by ``hasattr(model, "super_resolve")``) also
    reports the metrics of :func:`super_resolution_metrics` (PSNR/SSIM of the SR mean
    and of four baselines, coverage of the central intervals on the SR draws over all
    and over detail pixels, CRPS), computed on the same dequantized ``x``, and, for a
    model whose ``x_density`` is ``"exact"``, ``sr_bpd``: the conditional likelihood of
    super-resolution, ``-log p(x | y)`` in bits per dimension of x not fixed by y
    (``sr_bpd_dims = D - D_y``), from ``log p(x, y) - log p(y)``, each importance-weighted
    with ``iw_samples`` (log p(y) with the model's ``lr_model``/``lr_guide``: p(u) p(y|u)
    and q(u|y) alone). With ``baseline_scale`` (:func:`fit_baseline_scale` on the training
    set), ``sr_bpd_baseline`` is the same score of the consistent-bicubic Gaussian
    baseline (:func:`baseline_log_likelihood`). ``sr_bpd`` is None for a bound or joint.
    Its convention (:func:`conditional_bits_per_dim`): a density per detail dimension with y
    the block *mean*, and a difference of two importance-weighted estimates, not a bound.

    Reproducibility: latent samples are drawn through Pyro, i.e. torch's
    global RNG.  It is seeded for every batch from ``(seed, batch index)``
    inside ``torch.random.fork_rng``, so the caller's RNG state (CPU and the
    CUDA device used) is restored on exit and evaluating in the middle of
    training does not change the training run.  An ``nn.Module`` model is
    put in ``eval()`` mode for the duration (batch-norm/dropout must not use
    batch statistics) and its previous mode is restored.

    Sharding: with ``world_size > 1`` (an initialised ``torch.distributed``
    process group; every rank must call this with the same arguments) rank
    ``r`` evaluates batches ``r, r + world_size, ...`` and the sums are
    all-reduced, so every rank returns the numbers one process would have
    computed, up to the order of floating-point additions: each batch gets
    the same dequantization and latent noise whichever rank evaluates it.

    Args:
        model: a VAE/SRVAE-like object with ``.model(x)`` and ``.guide(x)``.
        images: uint8 or uint16 tensor ``(N, C, H, W)`` of raw pixel values (8- or
            16-bit data; the bit depth follows the dtype).
        elbo_samples, iw_samples: ``K`` for the ELBO and the IW estimate.
        batch_size: images per batch; memory is bounded independently of
            ``K`` by chunking the particles (see ``chunk_size``).
        sr_samples: draws per image for the SR metrics (SRVAE only).
        device: where to evaluate; default: the model's parameters' device.
        seed: seeds both the dequantization noise and the latent samples.
        progress: show a tqdm bar over batches (if tqdm is installed).
        super_resolution: set False to skip the SR metrics (e.g. a quick per-epoch ELBO).
        latents: set False to skip what the latents carry (:mod:`pyro_srvae.metrics.latents`: ``kl_u_bits``,
            ``kl_z_bits``, ``active_u``, ``active_z`` of ``u_dim``, ``z_dim``), reported by default.
        chunk_size: particles per vectorized pass, passed on to
            :func:`log_importance_weights` (default chosen from the batch size).
        rank, world_size: this process's share of a sharded evaluation.

    Returns a dict of Python floats averaged over all images: ``elbo_bpd``,
    ``iw_bpd``, ``elbo``, ``iw_log_likelihood`` (nats per image) and the SR
    metrics, plus the ints ``iw_samples``, ``elbo_samples`` and
    ``num_images``.
    """
    images = _checked_images(images, elbo_samples, iw_samples, batch_size, rank, world_size)
    device = torch.device(device) if device is not None else model_device(model)
    is_sr = super_resolution and hasattr(model, "super_resolve")
    plan = _BatchPlan(
        elbo_samples=elbo_samples,
        iw_samples=iw_samples,
        chunk_size=chunk_size,
        super_resolution=is_sr,
        sr_samples=sr_samples,
        conditional=is_sr and getattr(model, "x_density", None) == "exact" and hasattr(model, "lr_model"),
        baseline_scale=baseline_scale,
        latents=latents,
    )
    sums = _sum_over_batches(model, images, plan, batch_size, device, seed, progress, rank, world_size)
    if world_size > 1:
        sums = _all_reduce(sums, model, plan, device)
    return _result(model, images, plan, sums)


@dataclass(frozen=True)
class _BatchPlan:
    """What each batch adds to the sums: which estimates, with how many particles."""

    elbo_samples: int
    iw_samples: int
    chunk_size: Optional[int]
    super_resolution: bool  # the SR metrics, with sr_samples draws per image
    sr_samples: int
    conditional: bool  # log p(x|y) = log p(x, y) - log p(y), each importance-weighted
    baseline_scale: Optional[float]
    latents: bool


def _checked_images(images, elbo_samples, iw_samples, batch_size, rank, world_size) -> torch.Tensor:
    if elbo_samples < 1 or iw_samples < 1:
        raise ValueError("elbo_samples and iw_samples must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank {rank} of {world_size}")
    if world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(f"world_size {world_size} needs an initialised torch.distributed process group")
    images = torch.as_tensor(images)
    if images.dtype not in (torch.uint8, torch.uint16):
        raise TypeError(f"images must be uint8 or uint16 (N, C, H, W), got dtype {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    return images


def _sum_over_batches(model, images, plan, batch_size, device, seed, progress, rank, world_size) -> Dict[str, float]:
    """This rank's sums over its batches, in eval mode, under a forked RNG seeded per batch."""
    gen = torch.Generator().manual_seed(seed)
    batch_indices = range(math.ceil(images.shape[0] / batch_size))
    if progress:
        batch_indices = tqdm(batch_indices, desc="evaluate", leave=False)
    cuda_devices = []
    if device.type == "cuda":
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    was_training = model.training if isinstance(model, torch.nn.Module) else None
    sums: Dict[str, float] = {"elbo": 0.0, "iw": 0.0, "log_p_x_given_y": 0.0, "baseline_log_p_x_given_y": 0.0}
    try:
        if was_training is not None:
            model.eval()
        with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
            for index in batch_indices:
                batch = images[index * batch_size : (index + 1) * batch_size]
                # Every rank draws the dequantization noise of every batch (cheap next to
                # the model), so each batch's noise is the one a single process would draw.
                x = dequantize(batch, generator=gen)
                if index % world_size != rank:
                    continue  # another rank's batch
                batch_seed = _batch_seed(seed, index)
                torch.default_generator.manual_seed(batch_seed)
                if cuda_devices:
                    with torch.cuda.device(cuda_devices[0]):
                        torch.cuda.manual_seed(batch_seed)
                _add_batch(sums, model, x.to(device), plan)
    finally:
        if was_training is not None:
            model.train(was_training)
    return sums


def _add_batch(sums: Dict[str, float], model, x: torch.Tensor, plan: _BatchPlan) -> None:
    """Add one batch's log-likelihood estimates, latent and SR sums to ``sums`` (in place)."""
    k_total = max(plan.elbo_samples, plan.iw_samples)
    log_w = log_importance_weights(model.model, model.guide, x, k_total, chunk_size=plan.chunk_size)
    lw = log_w.double()
    iw = torch.logsumexp(lw[: plan.iw_samples], 0) - math.log(plan.iw_samples)
    sums["elbo"] += lw[: plan.elbo_samples].mean(0).sum().item()
    sums["iw"] += iw.sum().item()
    if plan.conditional:  # log p(x | y) = log p(x, y) - log p(y), both importance-weighted
        lw_y = log_importance_weights(model.lr_model, model.lr_guide, x, plan.iw_samples, chunk_size=plan.chunk_size)
        iw_y = torch.logsumexp(lw_y.double(), 0) - math.log(plan.iw_samples)
        sums["log_p_x_given_y"] += (iw - iw_y).sum().item()
        if plan.baseline_scale is not None:
            baseline = baseline_log_likelihood(x.double(), model.factor, plan.baseline_scale)
            sums["baseline_log_p_x_given_y"] += baseline.sum().item()
    if plan.latents:  # what the latents carry (metrics.latents)
        for key, value in latent_sums(model, x).items():
            sums[f"latent.{key}"] = sums.get(f"latent.{key}", 0.0) + value
    if plan.super_resolution:
        for key, value in sr_metric_sums(model, x, plan.sr_samples).items():
            sums[f"sr.{key}"] = sums.get(f"sr.{key}", 0.0) + value


def _all_reduce(sums: Dict[str, float], model, plan: _BatchPlan, device) -> Dict[str, float]:
    """One all-reduce of every sum, on the evaluation device (nccl reduces GPU tensors)."""
    # A rank may have evaluated no batch: every rank's dict must have the same keys.
    if plan.super_resolution:
        sums = {**{f"sr.{key}": 0.0 for key in SR_SUM_KEYS}, **sums}
    if plan.latents:
        sums = {**{f"latent.{key}": 0.0 for key in latent_sum_keys(model)}, **sums}
    names = sorted(sums)
    totals = torch.tensor([sums[name] for name in names], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM)
    return dict(zip(names, totals.tolist()))


def _result(model, images: torch.Tensor, plan: _BatchPlan, sums: Dict[str, float]) -> Dict[str, float]:
    """Means per image, in bits/dim where the name says so, from the (all-reduced) sums."""
    n, num_dims, bits = images.shape[0], images[0].numel(), bit_depth(images)
    elbo = sums["elbo"] / n
    iw = sums["iw"] / n
    result: Dict[str, float] = {
        "elbo_bpd": float(bits_per_dim(elbo, num_dims, bits)),
        "iw_bpd": float(bits_per_dim(iw, num_dims, bits)),
        "bits": bits,
        "elbo": elbo,
        "iw_log_likelihood": iw,
        "iw_samples": int(plan.iw_samples),
        "elbo_samples": int(plan.elbo_samples),
        "num_images": int(n),
    }
    if getattr(model, "x_density", None) is not None:
        result["x_density"] = model.x_density
    result.update(latent_metrics_from_sums({k[7:]: v for k, v in sums.items() if k.startswith("latent.")}, n))
    if plan.super_resolution:
        result.update(sr_metrics_from_sums({k[3:]: v for k, v in sums.items() if k.startswith("sr.")}, plan.sr_samples))
        detail_dims = num_dims - model.lr_shape[0] * model.lr_shape[1] * model.lr_shape[2]
        result["sr_bpd_dims"] = detail_dims
        result["sr_bpd"] = None
        result["sr_bpd_baseline"] = None
        if plan.conditional:
            result["sr_bpd"] = float(conditional_bits_per_dim(sums["log_p_x_given_y"] / n, detail_dims, bits))
        if plan.conditional and plan.baseline_scale is not None:
            result["sr_bpd_baseline"] = float(conditional_bits_per_dim(sums["baseline_log_p_x_given_y"] / n, detail_dims, bits))
            result["sr_baseline_scale"] = float(plan.baseline_scale)
    return result


def _batch_seed(seed: int, batch_index: int) -> int:
    """The seed of one evaluation batch: a hash, so that nearby seeds share no stream."""
    return derive_seed(seed, "evaluation batch", batch_index)
