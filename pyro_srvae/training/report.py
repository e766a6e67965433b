"""A run's report: metrics.json, the summary table, and the figures."""

import csv
import io
import json
import math

import torch

from .. import plots
from ..data.batching import dequantize
from ..metrics.sr_scores import bicubic_upsample
from ..model.srvae import SRVAE
from ..utils.io import atomic_write_text
from .config import MIN_STEPS_TO_LEARN, TrainConfig
from .guard import GUARD_RESCUE_AFTER, GUARD_WINDOW, update_guard_summary
from .objective import upgrade_epoch_record

TEST_KEYS = [
    "elbo_bpd", "iw_bpd", "iw_samples", "x_density",
    "sr_psnr", "bicubic_psnr", "bilinear_psnr", "consistent_bicubic_psnr", "consistent_bilinear_psnr",
    "sr_ssim", "bicubic_ssim", "bilinear_ssim", "consistent_bicubic_ssim", "consistent_bilinear_ssim",
    "sr_coverage", "sr_coverage90", "sr_coverage90_expected", "sr_crps", "bicubic_mae",
    "sr_std_rms", "sr_std_latent_rms", "sr_std_noise_rms",
    "sr_bpd", "sr_bpd_dims", "sr_bpd_baseline", "sr_baseline_scale", "num_images", "bits",
    "kl_z_bits", "kl_u_bits", "active_z", "active_u", "z_dim", "u_dim",
    "sr_latent_share", "sr_latent_share_detail", "sr_best_of_psnr", "sr_best_of_gain", "sr_draw_psnr",
]  # fmt: skip

#: What each ``x_density`` means, printed next to every bits/dim.
X_DENSITY_NOTES = {
    "exact": "a normalized density of x",
    "bound": "a lower bound on a normalized density of x (y on the 8-bit grid)",
    "joint": "the spec's joint p(x, y=f(x)): not a density of x, not comparable with a VAE",
}

MIXTURE_BOUND_WARNING = (
    "warning: --elbo meanfield-mog-bound minimises the eq. (23) bound, which is linear in the mixture "
    "weights: training on it concentrates them on one component (see mixture.effective_components in "
    "metrics.json and docs/derivation.md)"
)


def mixture_summary(prior):
    """The weights of a mixture prior and their effective number of components, exp(entropy).

    Training on the eq. (23) bound concentrates the weights (docs/derivation.md): an effective
    number near 1 says the "mixture" has become one Gaussian. None for a non-mixture prior.
    """
    weights = getattr(prior, "weights", None)
    if weights is None:
        return None
    weights = weights.detach().double().cpu()
    entropy = -(weights * torch.log(weights.clamp_min(1e-300))).sum().item()
    return {"weights": weights.tolist(), "effective_components": math.exp(entropy)}


def top_prior(model):
    """p(u) of an srVAE, p(z) of a VAE."""
    return model.prior_u if isinstance(model, SRVAE) else model.prior_z


def run_metrics(config, model, history, test, context, state_digests, guard=None):
    test = dict(test, x_density=getattr(model, "x_density", None))
    metrics = {
        "config": config.to_dict(),
        "epochs": history["epochs"],
        "test": {key: test.get(key) for key in TEST_KEYS},
        "mixture": mixture_summary(top_prior(model)),
        "gamma_x": item_or_none(model.gamma_x),
        "gamma_y": item_or_none(getattr(model, "gamma_y", None)),
        # Per band, x' = (x - offset) / scale for the networks (docs/own-images.md); None: x itself.
        "data_scaling": _data_scaling(model),
        "world_size": context.world_size,
        "wall_seconds": history["wall_seconds"],
        "steps": history["steps"],
    }
    if guard is not None:
        metrics.update(update_guard_summary(guard))
    if context.enabled:
        metrics["distributed"] = {
            "backend": context.backend,
            "world_size": context.world_size,
            "global_batch_size": config.batch_size * context.world_size,
            # SHA-256 of each rank's state dict at the end (distributed.state_digest).
            "state_digests": state_digests,
            "ranks_identical": len(set(state_digests)) == 1,
        }
    return metrics


def skipped_updates_row(metrics):
    """The summary's row of the skipped updates; None for metrics from before the update guard."""
    if "skipped_updates" not in metrics:
        return None
    skipped, nonfinite = metrics["skipped_updates"], metrics["skipped_nonfinite_updates"]
    steps = metrics["epochs"][-1]["step"] if metrics["epochs"] else 0
    factor, clip = metrics["config"].get("skip_factor") or 0, metrics["config"].get("clip_factor") or 0
    if not factor and not clip:
        return ("skipped updates", f"{skipped} of {steps} steps; the update guard is off (--skip-factor 0)")
    median = metrics["gradient_norm_median"]
    median = "none yet" if median is None else f"{median:.3g} at the end"
    finite = (f"{skipped - nonfinite} with a gradient norm above {factor:g} x the median of the last {GUARD_WINDOW} "
              f"steps taken" if factor else f"no finite one (--skip-factor 0); the median of the last {GUARD_WINDOW} steps taken")
    clipped = f"; {metrics.get('clipped_updates', 0)} clipped to {clip:g} x that median" if clip else ""
    rescued = metrics.get("rescued_updates", 0)
    rescued = f"; {rescued} taken clipped to the threshold after {GUARD_RESCUE_AFTER} skips in a row" if rescued else ""
    return ("skipped updates", f"{skipped} of {steps} steps: {nonfinite} with a non-finite gradient, {finite} "
            f"(median {median}){clipped}{rescued}")  # fmt: skip


def write_metrics(out_dir, metrics):
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    buffer = io.StringIO()
    fields = ["epoch", "train_objective_bpd", "train_objective", "test_elbo_bpd", "step", "kl_scale"]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for record in metrics["epochs"]:
        writer.writerow({key: record.get(key) for key in writer.fieldnames})
    atomic_write_text(out_dir / "metrics.csv", buffer.getvalue())


def draw_figures(model, test_images, history, out_dir, config, test_metrics, num_images=8):
    """The run's PNGs, drawn under a private RNG so they are reproducible."""
    device = model.device
    paths = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(config.seed)
        model.eval()
        x = dequantize(test_images[:num_images].to(device))
        paths.append(plots.plot_loss_curves(history["epochs"], out_dir / "loss_curves.png", steps=history["steps"]))
        paths.append(plots.plot_reconstructions(x, model.reconstruct(x), out_dir / "reconstructions.png"))
        if isinstance(model, SRVAE):
            generated = model.sample(16)
            paths.append(plots.plot_samples(generated.x, out_dir / "samples.png", y=generated.y))
            y = model.downscale(x)
            sr = model.super_resolve(y, num_samples=config.sr_samples)
            paths.append(
                plots.plot_super_resolution(
                    y, bicubic_upsample(y, model.factor), sr.mean, sr.samples, sr.std, x, out_dir / "super_resolution.png",
                    sr_means=sr.means,
                )
            )
            coverage = test_metrics.get("sr_coverage")
            if coverage:
                paths.append(plots.plot_calibration(coverage, coverage["num_samples"], out_dir / "calibration.png"))
            decode, prior = model.decode_y, model.prior_u
        else:
            paths.append(plots.plot_samples(model.sample(16), out_dir / "samples.png"))
            decode, prior = model.decode, model.prior_z
        if config.prior == "mog":
            paths.append(plots.plot_mog_components(model.to_data_units(decode(prior.means)), prior.weights, out_dir / "mog_components.png"))
    return paths


def model_label(config):
    """'vae' or 'srvae (full guide)', for summaries."""
    return "vae" if config["model"] == "vae" else f"srvae ({config['guide']} guide)"


#: The SR coverage rows of a run's summary: pixel set, label, and what the set means for calibration.
COVERAGE_ROWS = (
    ("all", "all pixels", ""),
    ("detail", "detail pixels", " (chosen by the truth x: below the level even when calibrated)"),
    ("edges", "edge pixels", " (chosen from y: a calibration test)"),
)


def bits_note(test):
    """' (exact density of x)' and the like: what a bits/dim of this run is."""
    density = test.get("x_density")
    parts = [X_DENSITY_NOTES[density]] if density in X_DENSITY_NOTES else []
    if test.get("bits", 8) != 8:  # 16-bit data: + 16, not + 8 (evaluation.bits_per_dim)
        parts.append(f"of {test['bits']}-bit data")
    return f" ({', '.join(parts)})" if parts else ""


def evaluation_rows(test):
    """(label, value) rows of the test metrics, shared by the training and evaluation summaries."""
    note = bits_note(test)
    rows = [
        ("test ELBO", f"{test['elbo_bpd']:.4f} bits/dim{note}"),
        (f"test IW (K={test['iw_samples']})", f"{test['iw_bpd']:.4f} bits/dim{note}"),
    ]
    if test.get("sr_psnr") is not None:
        rows += [
            ("SR PSNR", f"{test['sr_psnr']:.2f} dB (bicubic {test['bicubic_psnr']:.2f}, consistent bicubic "
                        f"{test['consistent_bicubic_psnr']:.2f}, bilinear {test['bilinear_psnr']:.2f} dB)"),
            ("SR SSIM", f"{test['sr_ssim']:.4f} (bicubic {test['bicubic_ssim']:.4f}, consistent bicubic "
                        f"{test['consistent_bicubic_ssim']:.4f})"),
            ("SR CRPS", f"{test['sr_crps']:.5f} (bicubic's absolute error {test['bicubic_mae']:.5f})"),
        ]  # fmt: skip
        coverage = test.get("sr_coverage")
        if coverage:
            for subset, label, note in COVERAGE_ROWS:
                if subset in coverage:  # runs before the edge pixels have no "edges"
                    observed = ", ".join(f"{float(level):.0%} {coverage[subset][level]:.3f}" for level in coverage[subset])
                    rows.append((f"SR coverage ({label})", observed + note))
            expected = ", ".join(f"{float(level):.0%} {value:.3f}" for level, value in coverage["expected"].items())
            rows.append(("  expected", f"{expected} (from {coverage['num_samples']} draws)"))
        if test.get("sr_bpd") is not None:
            baseline = test.get("sr_bpd_baseline")
            # The convention and the kind of number (evaluation.conditional_bits_per_dim), said in the row.
            rows.append(("SR -log p(x|y)", f"{test['sr_bpd']:.4f} bits/dim of the {test['sr_bpd_dims']} dims not fixed by y"
                         + (f" (consistent-bicubic Gaussian {baseline:.4f})" if baseline is not None else "")
                         + "; y = block means; an estimate (IW log p(x,y) - IW log p(y)), not a bound"))  # fmt: skip
    return rows + latent_rows(test)


def latent_rows(test):
    """(label, value) rows of what the latents carry (:mod:`pyro_srvae.metrics.latents`); none for older metrics."""
    sites = [key[3:-5] for key in sorted(test) if key.startswith("kl_") and key.endswith("_bits") and test[key] is not None]
    sites.sort(key=lambda site: site != "z")  # z first: the latent of the high resolution
    rows = []
    if sites:
        kls = ", ".join(f"{site} {test[f'kl_{site}_bits']:.1f}" for site in sites)
        active = ", ".join(f"{site} {test[f'active_{site}']}/{test[f'{site}_dim']}" for site in sites)
        rows += [("KL(q || p)", f"{kls} bits/image"), ("active units", f"{active} (Cov > 0.01)")]
    if test.get("sr_latent_share") is not None:
        samples = test["sr_coverage"]["num_samples"]
        rows += [
            ("SR latent share", f"{test['sr_latent_share']:.3f} of the predictive variance "
                                f"({test['sr_latent_share_detail']:.3f} on detail pixels); the rest is the likelihood's noise"),
            (f"SR best of {samples}", f"{test['sr_best_of_psnr']:.2f} dB ({test['sr_best_of_gain']:+.2f} dB over the mean): "
                                      f"the closest decoder mean of {samples} latent draws"),
            ("SR full draws", f"{test['sr_draw_psnr']:.2f} dB PSNR on average (noise included)"),
        ]  # fmt: skip
    return rows


def format_rows(rows):
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label.ljust(width)}  {value}" for label, value in rows)


def train_objective_row(metrics):
    """The summary's row of the last epoch's running training loss, named for what it is (not the test ELBO)."""
    if not metrics["epochs"]:
        return None
    last = upgrade_epoch_record(metrics["epochs"][-1], TrainConfig.from_dict(metrics["config"]))
    if last["train_objective_bpd"] is None:
        return ("train objective", "none kept: the update guard skipped every step of the last epoch")
    return ("train objective", f"{last['train_objective_bpd']:.4f} bits/dim: minus the {last['train_objective']}, "
            "mean over the last epoch's steps")  # fmt: skip


def summary_table(metrics):
    """A short plain-text table of the final test metrics."""
    config = metrics["config"]
    rows = [
        ("model", f"{model_label(config)}, {config['prior']} prior, {config['elbo']} ELBO"),
        ("epochs / steps", f"{len(metrics['epochs'])} / {metrics['epochs'][-1]['step'] if metrics['epochs'] else 0}"),
    ]
    steps = metrics["epochs"][-1]["step"] if metrics["epochs"] else 0
    if config.get("max_steps") is None and steps < MIN_STEPS_TO_LEARN:
        rows.append(("too short", f"only {steps} update steps, too few to learn: raise --epochs or set --max-steps"))
    rows += [row for row in [train_objective_row(metrics), skipped_updates_row(metrics)] if row is not None]
    rows += evaluation_rows(metrics["test"])
    mixture = metrics.get("mixture")
    if mixture is not None:
        rows.append(("mixture weights", f"effective number of components {mixture['effective_components']:.2f} "
                     f"of {len(mixture['weights'])}"))  # fmt: skip
    if metrics["gamma_x"] is not None:  # the learned scalar scale of the spec's Gaussian likelihood
        units = " (of x / band std)" if metrics.get("data_scaling") else ""
        rows.append(("gamma_x" + (" / gamma_y" if metrics["gamma_y"] is not None else "") + units, _gammas(metrics)))
    rows.append(("wall time", f"{metrics['wall_seconds']:.0f} s"))
    return format_rows(rows)


def _data_scaling(model):
    if not model.standardized:
        return None
    return {"offset": model.data_offset.flatten().tolist(), "scale": model.data_scale.flatten().tolist()}


def item_or_none(tensor):
    return None if tensor is None else tensor.item()


def _gammas(metrics):
    if metrics["gamma_y"] is None:
        return f"{metrics['gamma_x']:.4f}"
    return f"{metrics['gamma_x']:.4f} / {metrics['gamma_y']:.4f}"
