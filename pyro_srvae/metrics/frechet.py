"""Sample quality without network access: Fréchet distances between image sets.

``fd``: the Fréchet distance between generated and test images in the feature space of a
small CNN classifier that the project trains itself on the dataset's train split
(:func:`load_or_train_classifier`; weights cached as ``classifier-{dataset}-{seed}.pt``,
training reproducible from the seed). It is the recipe of FID (Heusel et al. 2017) with
the Inception network replaced by a classifier of the data at hand, so it needs no
download and works for 28x28 grayscale images; its values are comparable between models
evaluated with the same classifier (same dataset, seed and training settings), not with
published FIDs.

The Fréchet distance between Gaussians N(mu_a, S_a) and N(mu_b, S_b) fitted to two feature
sets is

    FD = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2})

(:func:`frechet_distance`; the matrix square root of a symmetric PSD matrix by eigh, so no
scipy is needed).

Optional: the Inception FID of torchmetrics (:func:`inception_fid`) when torch-fidelity and
its Inception weights are available locally; otherwise it returns ``None`` with a message
and never attempts a download.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batching import dequantize
from ..data.datasets import load_dataset
from ..utils.devices import model_device
from ..utils.io import atomic_write_bytes

CLASSIFIER_FORMAT = "pyro-srvae-fd-classifier"

CLASSIFIER_VERSION = 1

#: Training settings of the cached classifier (part of the cache's identity).
DEFAULT_TRAINING = dict(epochs=3, batch_size=64, lr=2e-3, width=32, feature_dim=128, max_train_images=None)


# ---------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------


class FeatureClassifier(nn.Module):
    """A small CNN classifier; its penultimate layer is the feature space of ``fd``.

    conv(width) -> pool -> conv(2 width) -> pool -> conv(2 width) -> adaptive 4x4 average
    pool -> linear(feature_dim) -> ReLU [features] -> linear(num_classes). Inputs are images
    in [0, 1] of any size >= 4x4, ``(N, C, H, W)``.
    """

    def __init__(self, image_shape, num_classes, width=32, feature_dim=128):
        super().__init__()
        channels = image_shape[0]
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        #: Set by :func:`load_or_train_classifier`: whether the weights came from the cache.
        self.loaded_from_cache = False
        self.cache_path = None

    def features(self, images):
        """Penultimate-layer features ``(N, feature_dim)`` of images in [0, 1]."""
        return self.body((images - 0.5) / 0.5)

    def forward(self, images):
        return self.head(self.features(images))


@contextlib.contextmanager
def _deterministic_kernels(device):
    """cuDNN in deterministic mode; on CPU one thread, so results do not depend on the thread count."""
    previous = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    threads = torch.get_num_threads()
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous
        torch.set_num_threads(threads)


def _rng_devices(device):
    device = torch.device(device)
    return [device] if device.type == "cuda" else []


def train_classifier(
    images,
    labels,
    num_classes,
    seed=0,
    epochs=DEFAULT_TRAINING["epochs"],
    batch_size=DEFAULT_TRAINING["batch_size"],
    lr=DEFAULT_TRAINING["lr"],
    width=DEFAULT_TRAINING["width"],
    feature_dim=DEFAULT_TRAINING["feature_dim"],
    device="cpu",
    log: Optional[Callable[[str], None]] = None,
):
    """Train a :class:`FeatureClassifier` on ``uint8`` images ``(N, C, H, W)`` and labels.

    Deterministic given ``seed``: initialisation, dequantization noise (fresh every epoch)
    and batch order all come from it, inside ``torch.random.fork_rng`` so the caller's
    random state is untouched. On CPU training runs on one thread (restored afterwards), so
    the weights do not depend on the thread count; on CUDA cuDNN is put in deterministic
    mode. Bitwise equality still needs the same kind of device and torch version.
    Adam, cross-entropy, cosine learning-rate decay; on the 10,000 fashion-mnist-mini
    images the defaults take ~30 s on one CPU core and reach ~88% test accuracy.
    Returns the model in eval mode, on CPU.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"train_classifier expects uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if labels.shape != (images.shape[0],):
        raise ValueError(f"expected {images.shape[0]} labels, got shape {tuple(labels.shape)}")
    device = torch.device(device)
    with torch.random.fork_rng(devices=_rng_devices(device)), _deterministic_kernels(device):
        torch.manual_seed(seed)
        model = FeatureClassifier(tuple(images.shape[1:]), num_classes, width, feature_dim).to(device)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        n = images.shape[0]
        steps_per_epoch = -(-n // batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
        model.train()
        for epoch in range(epochs):
            x_all = dequantize(images, generator=generator)
            order = torch.randperm(n, generator=generator)
            total, correct = 0.0, 0
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                x, y = x_all[index].to(device), labels[index].to(device)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(index)
                correct += (logits.argmax(-1) == y).sum().item()
            if log is not None:
                log(f"classifier epoch {epoch + 1}/{epochs}: loss {total / n:.4f}, train accuracy {correct / n:.4f}")
    return model.cpu().eval()


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------


def classifier_path(cache_dir, dataset, seed=0) -> Path:
    """``cache_dir / f"classifier-{dataset}-{seed}.pt"``."""
    return Path(cache_dir) / f"classifier-{dataset}-{seed}.pt"


def _load_cached(path: Path, identity: dict):
    """The cached classifier if ``path`` holds a valid one for ``identity``; else a reason string."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, not a torch file, ...
        return f"unreadable ({type(error).__name__})"
    if not isinstance(payload, dict) or payload.get("format") != CLASSIFIER_FORMAT:
        return "not a pyro-srvae classifier file"
    if payload.get("version") != CLASSIFIER_VERSION:
        return f"format version {payload.get('version')!r}, expected {CLASSIFIER_VERSION}"
    stored = {key: payload.get(key) for key in identity}
    if stored != identity:
        changed = ", ".join(sorted(k for k in identity if stored[k] != identity[k]))
        return f"trained with other settings ({changed})"
    config = identity["config"]
    model = FeatureClassifier(
        tuple(identity["image_shape"]), identity["num_classes"], config["width"], config["feature_dim"]
    )
    try:
        model.load_state_dict(payload["state_dict"])
    except Exception as error:
        return f"weights do not fit ({type(error).__name__})"
    return model.eval()


def load_or_train_classifier(
    cache_dir,
    dataset="fashion-mnist-mini",
    seed=0,
    *,
    data_dir=None,
    train_data=None,
    epochs=DEFAULT_TRAINING["epochs"],
    batch_size=DEFAULT_TRAINING["batch_size"],
    lr=DEFAULT_TRAINING["lr"],
    width=DEFAULT_TRAINING["width"],
    feature_dim=DEFAULT_TRAINING["feature_dim"],
    max_train_images=DEFAULT_TRAINING["max_train_images"],
    device="cpu",
    log: Optional[Callable[[str], None]] = None,
):
    """The ``fd`` classifier of ``dataset``: loaded from the cache, or trained and cached.

    The cache file is ``cache_dir / f"classifier-{dataset}-{seed}.pt"``. It is used when it
    is a readable classifier file trained on the same dataset, seed and settings; otherwise
    (missing, corrupt, other settings) the classifier is trained with :func:`train_classifier`
    on the train split (``train_data``, an :class:`~pyro_srvae.data.image_dataset.ImageDataset`, or
    ``load_dataset(dataset, "train", data_dir)``; the first ``max_train_images`` if given)
    and written atomically (:func:`~pyro_srvae.utils.io.atomic_write_bytes`: a normal
    file's mode, readable by whoever shares the cache). The returned model has
    ``loaded_from_cache`` and ``cache_path`` set. ``log`` receives one-line progress messages.
    """
    path = classifier_path(cache_dir, dataset, seed)
    if train_data is None:
        train_data = load_dataset(dataset, "train", data_dir)
    images, labels = train_data.images, train_data.labels
    if max_train_images is not None:
        images, labels = images[:max_train_images], labels[:max_train_images]
    num_classes = len(train_data.classes) if getattr(train_data, "classes", None) else int(labels.max()) + 1
    config = dict(
        epochs=epochs, batch_size=batch_size, lr=lr, width=width, feature_dim=feature_dim,
        max_train_images=max_train_images, num_train=int(images.shape[0]),
    )
    identity = dict(
        dataset=dataset, seed=seed, image_shape=list(images.shape[1:]), num_classes=num_classes, config=config
    )
    if path.exists():
        cached = _load_cached(path, identity)
        if isinstance(cached, nn.Module):
            cached.loaded_from_cache, cached.cache_path = True, path
            if log is not None:
                log(f"fd classifier loaded from {path}")
            return cached
        if log is not None:
            log(f"fd classifier cache {path} is {cached}; retraining")
    elif log is not None:
        log(f"training the fd classifier on {dataset} ({images.shape[0]} images, {epochs} epochs) -> {path}")
    model = train_classifier(
        images, labels, num_classes, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
        width=width, feature_dim=feature_dim, device=device, log=log,
    )
    payload = dict(identity, format=CLASSIFIER_FORMAT, version=CLASSIFIER_VERSION, state_dict=model.state_dict())
    atomic_write_bytes(path, lambda handle: torch.save(payload, handle))
    model.loaded_from_cache, model.cache_path = False, path
    return model


# ---------------------------------------------------------------------------
# Features and distances
# ---------------------------------------------------------------------------


def _as_float_images(images, generator=None, name="images"):
    """uint8 images are dequantized ((k + U) / 256); float images must already be in [0, 1]."""
    if not torch.is_tensor(images) or images.dim() != 4:
        raise ValueError(f"{name} must be a tensor of shape (N, C, H, W)")
    if images.dtype == torch.uint8:
        return dequantize(images, generator=generator)
    if not images.is_floating_point():
        raise ValueError(f"{name} must be uint8 or float images, got {images.dtype}")
    return images


@torch.no_grad()
def extract_features(classifier, images, batch_size=500):
    """Penultimate-layer features of float images in [0, 1], ``(N, feature_dim)``, on CPU."""
    device = model_device(classifier)
    was_training = classifier.training
    classifier.eval()
    try:
        chunks = [
            classifier.features(images[i : i + batch_size].to(device)).cpu()
            for i in range(0, len(images), batch_size)
        ]
    finally:
        classifier.train(was_training)
    return torch.cat(chunks)


@torch.no_grad()
def classifier_accuracy(classifier, images, labels, batch_size=500, seed=0):
    """Fraction of ``images`` (uint8, dequantized with a fixed seed, or float) classified right."""
    x = _as_float_images(images, torch.Generator().manual_seed(seed))
    device = model_device(classifier)
    predictions = torch.cat(
        [classifier(x[i : i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(x), batch_size)]
    )
    return (predictions == labels.cpu()).double().mean().item()


def _psd_sqrt(matrix):
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def _trace_sqrt_product(cov_a, cov_b):
    """tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}) = tr((S_a S_b)^{1/2}), by two symmetric eigendecompositions."""
    root = _psd_sqrt(cov_a)
    middle = root @ cov_b @ root
    middle = (middle + middle.T) / 2
    return torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()


def frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2}), in float64.

    The cross term is averaged over both orders (equal in exact arithmetic), which makes
    the result symmetric in (a, b) to the last bit. Clamped at 0 against rounding.
    """
    mu_a, mu_b, cov_a, cov_b = (torch.as_tensor(t, dtype=torch.float64) for t in (mu_a, mu_b, cov_a, cov_b))
    diff = mu_a - mu_b
    cross = (_trace_sqrt_product(cov_a, cov_b) + _trace_sqrt_product(cov_b, cov_a)) / 2
    value = diff @ diff + (torch.trace(cov_a) + torch.trace(cov_b)) - 2 * cross
    return max(value.item(), 0.0)


def _moments(features, name):
    features = torch.as_tensor(features, dtype=torch.float64)
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"{name} must be a (N, F) matrix with N >= 2, got shape {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    mu = features.mean(0)
    centred = features - mu
    return mu, centred.T @ centred / (features.shape[0] - 1)


def frechet_distance(features_a, features_b):
    """The Fréchet distance between Gaussians fitted to two feature sets ``(N_a, F)``, ``(N_b, F)``.

    Means and unbiased covariances in float64; see :func:`frechet_distance_from_moments`.
    Like FID, the estimate is biased upwards for small N (it is ~0 only for identical sets).
    """
    mu_a, cov_a = _moments(features_a, "features_a")
    mu_b, cov_b = _moments(features_b, "features_b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape[0]} and {mu_b.shape[0]}")
    return frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b)


def _model_rng_devices(model):
    for parameter in model.parameters():
        return _rng_devices(parameter.device)
    return []


@torch.no_grad()
def generate_images(model, num_samples, batch_size=500, seed=0):
    """``num_samples`` images from ``model.sample(n)`` (``.x`` of an srVAE sample), clamped to [0, 1].

    Seeded inside ``torch.random.fork_rng``: reproducible, and the caller's RNG is untouched.
    """
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.random.fork_rng(devices=_model_rng_devices(model)):
            torch.manual_seed(seed)
            for start in range(0, num_samples, batch_size):
                sample = model.sample(min(batch_size, num_samples - start))
                sample = getattr(sample, "x", sample)
                chunks.append(sample.clamp(0.0, 1.0).cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def compute_fd(model_or_images, test_images, classifier, num_samples=None, batch_size=500, seed=0):
    """``fd``: Fréchet distance between generated and test images in the classifier's features.

    Args:
        model_or_images: a model with ``sample(n)`` (VAE: images; srVAE: ``.x`` is used), or
            a tensor of images (uint8, dequantized here, or float in [0, 1]).
        test_images: the reference images, uint8 (dequantized with noise seeded by ``seed``)
            or float in [0, 1].
        classifier: a :class:`FeatureClassifier` (:func:`load_or_train_classifier`).
        num_samples: how many images to generate (default: as many as there are test
            images); for a tensor, its first ``num_samples`` images.
        seed: seeds the sampling and the dequantization noise (the result is reproducible).

    Generated images are the models' decoder means, clamped to [0, 1] (the range the
    classifier was trained on).
    """
    test = _as_float_images(test_images, torch.Generator().manual_seed(seed), "test_images")
    n = len(test) if num_samples is None else int(num_samples)
    if n < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples!r}")
    if torch.is_tensor(model_or_images):
        generated = _as_float_images(model_or_images, torch.Generator().manual_seed(seed + 1), "images")[:n]
    else:
        generated = generate_images(model_or_images, n, batch_size, seed)
    if tuple(generated.shape[1:]) != tuple(test.shape[1:]):
        raise ValueError(
            f"generated images {tuple(generated.shape[1:])} and test images {tuple(test.shape[1:])} differ"
        )
    return frechet_distance(
        extract_features(classifier, generated, batch_size), extract_features(classifier, test, batch_size)
    )


# ---------------------------------------------------------------------------
# Optional: Inception FID (torchmetrics + torch-fidelity, local weights only)
# ---------------------------------------------------------------------------

#: Environment variable naming a local copy of torch-fidelity's Inception weights.
INCEPTION_WEIGHTS_ENV = "PYRO_SRVAE_INCEPTION_WEIGHTS"

#: The file torch-fidelity downloads (and torch.hub caches under ``<hub dir>/checkpoints``).
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


def _hub_weights_file():
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _torch_fidelity_available():
    return importlib.util.find_spec("torch_fidelity") is not None


def inception_weights_path(weights_path: Optional[Union[str, Path]] = None) -> Optional[Path]:
    """The local Inception weights: ``weights_path``, else ``$PYRO_SRVAE_INCEPTION_WEIGHTS``,
    else torch.hub's cached copy (``<hub dir>/checkpoints/weights-inception-2015-12-05-6726825d.pth``).
    ``None`` if the chosen file does not exist. Never downloads."""
    if weights_path is None:
        weights_path = os.environ.get(INCEPTION_WEIGHTS_ENV) or _hub_weights_file()
    path = Path(weights_path)
    return path if path.is_file() else None


def inception_fid_unavailable_reason(weights_path=None) -> Optional[str]:
    """None if :func:`inception_fid` can run offline; otherwise a one-line reason."""
    if not _torch_fidelity_available():
        return (
            "Inception FID skipped: the optional package torch-fidelity is not installed "
            "(pip install 'torchmetrics[image]'); the offline fd metric is unaffected"
        )
    if inception_weights_path(weights_path) is None:
        where = weights_path or os.environ.get(INCEPTION_WEIGHTS_ENV) or _hub_weights_file()
        return (
            f"Inception FID skipped: no local Inception weights at {where} (pass weights_path=, set "
            f"{INCEPTION_WEIGHTS_ENV}, or place {INCEPTION_WEIGHTS_FILE} in torch.hub's checkpoints folder); "
            "no download is attempted"
        )
    return None


def _to_inception_input(images):
    """uint8 or [0, 1] float images -> float RGB in [0, 1] (grayscale repeated to 3 channels)."""
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0.0, 1.0)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"Inception FID needs 1- or 3-channel images, got {images.shape[1]} channels")
    return images


def inception_fid(real_images, fake_images, weights_path=None, batch_size=50, device="cpu") -> Optional[float]:
    """Inception FID (torchmetrics' ``FrechetInceptionDistance``) from *local* weights only.

    Returns ``None`` -- after a ``UserWarning`` carrying the reason of
    :func:`inception_fid_unavailable_reason` -- when torch-fidelity is missing or no local
    weights file is found; it never lets torch-fidelity download them. Images: uint8 or
    float in [0, 1], ``(N, 1 or 3, H, W)``; grayscale is repeated to RGB.
    """
    reason = inception_fid_unavailable_reason(weights_path)
    if reason is not None:
        warnings.warn(reason, stacklevel=2)
        return None
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(
        feature=2048, normalize=True, feature_extractor_weights_path=str(inception_weights_path(weights_path))
    ).to(device)
    for images, real in ((real_images, True), (fake_images, False)):
        for start in range(0, len(images), batch_size):
            metric.update(_to_inception_input(images[start : start + batch_size]).to(device), real=real)
    return float(metric.compute())
