"""What a run is built from: the model for a configuration, and its data (splits, bit depth, standardization)."""

import dataclasses

from ..data.batching import band_statistics
from ..data.datasets import FOLDER, load_dataset
from ..model.srvae import SRVAE
from ..model.vae import VAE
from .config import ConfigError


def build_model(config, image_shape):
    """The VAE or SRVAE a configuration describes, for images of ``image_shape``."""
    config = dataclasses.replace(config).resolve_defaults()
    common = dict(
        prior=config.prior,
        mog_components=config.mog_components,
        hidden=config.hidden,
        likelihood=config.likelihood,
        likelihood_components=config.likelihood_components,
        arch=config.arch,
        pixel_scale_floor=config.pixel_scale_floor,
    )
    if config.model == "vae":
        return _weigh_faithful_scales(VAE(image_shape, z_dim=config.z_dim, **common), config)
    _, height, width = image_shape
    if height % config.factor or width % config.factor:
        raise ConfigError(
            f"--factor {config.factor} does not divide the {height}x{width} images of {config.dataset}"
        )
    model = SRVAE(
        image_shape,
        guide=config.guide,
        factor=config.factor,
        downscale_mode=config.downscale_mode,
        u_dim=config.u_dim,
        z_dim=config.z_dim,
        x_given_y=config.x_given_y,
        sr_base=config.sr_base,
        sr_arch=config.sr_arch,
        sr_hidden=config.sr_hidden,
        z_injection=config.z_injection,
        z_channels=config.z_channels,
        pixel_scale_from=config.pixel_scale_from,
        z_posterior=config.z_posterior,
        z_scale_floor=config.z_scale_floor,
        z_prior_rank=config.z_prior_rank,
        **common,
    )
    return _weigh_faithful_scales(model, config)


def _weigh_faithful_scales(model, config):
    # An instance attribute over the class's 1.0: it changes the gradient only, never a density.
    if config.likelihood == "gaussian-pixel-faithful":
        model.likelihood.scale_gradient_weight = float(getattr(config, "faithful_scale_weight", 1.0))
    return model


def dataset_options(config, progress=False):
    """The keyword arguments of :func:`pyro_srvae.data.datasets.load_dataset` for the run's data."""
    if config.dataset != FOLDER:
        return {}
    return dict(
        patch_size=config.patch_size, patch_stride=config.patch_stride, test_fraction=config.test_fraction,
        seed=config.seed, factor=config.factor, channels=config.channels, cache_dir=config.cache_dir,
        progress=progress,
    )  # fmt: skip


def load_split(config, split, progress=False):
    """One split of the run's data, as training reads it (``pyro-srvae evaluate`` reads it so too)."""
    return load_dataset(config.dataset, split, config.data_dir, config.download, **dataset_options(config, progress))


def check_bit_depth(model, bits):
    """16-bit data need a continuous density on the 16-bit grid: the 256-bin likelihoods and
    a y on the 8-bit grid (the ``bound`` route of --x-given-y, the model's ``quantized_y``)
    would not describe them."""
    if bits == 8:
        return
    if model.likelihood_name == "dlogistic-mix":
        raise ConfigError(
            f"{bits}-bit data: --likelihood dlogistic-mix has 256 bins (8 bits); use gaussian, gaussian-pixel or gaussian-pixel-faithful"
        )
    if getattr(model, "quantized_y", False):
        raise ConfigError(
            f"{bits}-bit data: this srVAE puts y on the 8-bit grid (--x-given-y {model.x_given_y}, "
            f"--downscale-mode {model.downscale_mode}); use --downscale-mode area with --x-given-y consistent"
        )


def data_summary(dataset):
    """What a checkpoint and metrics.json record of the training data: shape, bit depth, and
    for a folder the files and patches (so that superresolve knows its tile and its units)."""
    summary = {"image_shape": list(dataset.image_shape), "bits": dataset.bits, "num_images": len(dataset)}
    source = dataset.source
    if source is not None:
        summary.update(
            root=str(source.root), layout=source.layout, files=len(source.files), patch_size=source.patch_size,
            patch_stride=source.patch_stride, channels=source.channels, cache_file=str(source.cache_file or ""),
        )  # fmt: skip
    return summary


def standardizes(config, model, bits=8):
    """Whether the run standardizes its data per band (``--standardize``).

    ``auto``: for a ``--dataset folder`` of 16-bit images (bands that may fill a few thousand of
    65,536 levels), unless the model scores x on the 256-bin grid (``model.discretized``); not
    for 8-bit folders, whose pixels fill [0, 1] already and where a standardized run of the
    photographs' recipe diverged (docs/results.md, the fifteenth run); never for the named
    datasets, whose runs stay as they were. ``on`` with a discretized model is an error."""
    if config.standardize == "on" and model.discretized:
        raise ConfigError(
            "--standardize on: this model scores x on the 256-bin grid of [0, 1] (--likelihood dlogistic-mix, "
            "or y on the 8-bit grid: --x-given-y quantized, --downscale-mode bilinear); use --standardize off"
        )
    if config.standardize == "auto":
        return config.dataset == FOLDER and bits > 8 and not model.discretized
    return config.standardize == "on"


def set_standardization(model, train_set, log):
    """Set the training set's per-band mean and std (of the dequantized x) as the model's scaling."""
    mean, std = band_statistics(train_set.images)
    model.set_data_scaling(mean, std)
    listed = ", ".join(f"{m:.4g} +- {s:.4g}" for m, s in zip(mean.tolist(), std.tolist()))
    log(f"standardized per band for the networks: mean +- std of x on [0, 1] = {listed} ({len(train_set)} training images)")
