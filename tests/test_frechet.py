"""The offline sample-quality metric ``fd`` and the optional Inception FID."""

import math
import socket
import warnings

import pytest
import torch

from pyro_srvae import SRVAE, VAE
from pyro_srvae.metrics import frechet
from pyro_srvae.data.datasets import load_dataset
from pyro_srvae.metrics.frechet import (
    FeatureClassifier,
    classifier_accuracy,
    classifier_path,
    compute_fd,
    frechet_distance,
    frechet_distance_from_moments,
    inception_fid,
    inception_fid_unavailable_reason,
    load_or_train_classifier,
    train_classifier,
)

# A short training that still reaches > 80% test accuracy (~5 s on one core).
QUICK = dict(epochs=4, width=16, max_train_images=3000)
TINY = dict(epochs=1, width=4, feature_dim=8, max_train_images=200)


@pytest.fixture(scope="module")
def mini():
    return load_dataset("fashion-mnist-mini", "train"), load_dataset("fashion-mnist-mini", "test")


@pytest.fixture(scope="module")
def quick_classifier(mini, tmp_path_factory):
    return load_or_train_classifier(tmp_path_factory.mktemp("cache"), train_data=mini[0], **QUICK)


def _random_covariance(d, generator):
    a = torch.randn(d, d, generator=generator, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_fd_of_a_set_with_itself_is_zero_and_fd_is_symmetric():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 16, generator=g) @ torch.randn(16, 16, generator=g)
    b = torch.randn(400, 16, generator=g) + 0.5
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6 * frechet_distance(a, b))
    assert frechet_distance(a, b) == frechet_distance(b, a)  # exactly, by construction
    assert frechet_distance(a, b) > 0


def test_fd_from_moments_matches_closed_forms():
    g = torch.Generator().manual_seed(1)
    # commuting (diagonal) covariances: tr(... ) = sum (sqrt(a_i) - sqrt(b_i))^2
    var_a = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    var_b = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    mu_a, mu_b = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    expected = ((mu_a - mu_b) ** 2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum()
    value = frechet_distance_from_moments(mu_a, torch.diag(var_a), mu_b, torch.diag(var_b))
    assert value == pytest.approx(expected.item(), rel=1e-10)
    # general covariances: tr sqrt(S_a S_b) from the (real, positive) eigenvalues of the non-symmetric product
    cov_a, cov_b = _random_covariance(6, g), _random_covariance(6, g)
    cross = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0).sqrt().sum()
    expected = torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    zero = torch.zeros(6, dtype=torch.float64)
    assert frechet_distance_from_moments(zero, cov_a, zero, cov_b) == pytest.approx(expected.item(), rel=1e-8)


def test_fd_of_gaussian_samples_approaches_the_closed_form():
    g = torch.Generator().manual_seed(2)
    d, n = 4, 40_000
    cov_a, cov_b = _random_covariance(d, g), _random_covariance(d, g)
    mu_a, mu_b = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.5, dtype=torch.float64)
    exact = frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b)
    a = mu_a + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov_a).T
    b = mu_b + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov_b).T
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.05)


def test_fd_input_checks():
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.randn(1, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((5, 3), math.nan), torch.randn(5, 3))


def test_quick_classifier_is_accurate_on_the_mini_test_set(mini, quick_classifier):
    assert not quick_classifier.loaded_from_cache
    accuracy = classifier_accuracy(quick_classifier, mini[1].images, mini[1].labels)
    assert accuracy > 0.8


def test_training_is_deterministic_and_leaves_the_global_rng_alone(mini):
    images, labels = mini[0].images[:100], mini[0].labels[:100]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = train_classifier(images, labels, 10, seed=3, epochs=1, width=4, feature_dim=8)
    assert torch.equal(torch.get_rng_state(), state)
    torch.set_num_threads(2)  # training itself runs on one thread: the weights do not depend on this
    try:
        second = train_classifier(images, labels, 10, seed=3, epochs=1, width=4, feature_dim=8)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(1)
    third = train_classifier(images, labels, 10, seed=4, epochs=1, width=4, feature_dim=8)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name])
    assert not torch.equal(first.head.weight, third.head.weight)


def test_cache_is_reused_and_a_corrupt_file_is_retrained(mini, tmp_path, monkeypatch):
    calls = []
    original = frechet.train_classifier

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(frechet, "train_classifier", counting)
    first = load_or_train_classifier(tmp_path, train_data=mini[0], seed=1, **TINY)
    path = classifier_path(tmp_path, "fashion-mnist-mini", 1)
    assert path.name == "classifier-fashion-mnist-mini-1.pt" and path.is_file()
    assert first.cache_path == path and not first.loaded_from_cache and len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    mtime = path.stat().st_mtime_ns

    second = load_or_train_classifier(tmp_path, train_data=mini[0], seed=1, **TINY)
    assert second.loaded_from_cache and len(calls) == 1 and path.stat().st_mtime_ns == mtime
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name])

    messages = []
    path.write_bytes(path.read_bytes()[:100])  # truncated
    third = load_or_train_classifier(tmp_path, train_data=mini[0], seed=1, log=messages.append, **TINY)
    assert not third.loaded_from_cache and len(calls) == 2
    assert any("unreadable" in m and "retraining" in m for m in messages)
    assert load_or_train_classifier(tmp_path, train_data=mini[0], seed=1, **TINY).loaded_from_cache

    # other training settings under the same file name: retrained, not silently reused
    other = dict(TINY, epochs=2)
    messages.clear()
    retrained = load_or_train_classifier(tmp_path, train_data=mini[0], seed=1, log=messages.append, **other)
    assert not retrained.loaded_from_cache
    assert any("other settings (config)" in m for m in messages)


def test_compute_fd_separates_real_from_bad_images(mini, quick_classifier):
    test = mini[1].images
    real_vs_real = compute_fd(test[:1000], test[1000:], quick_classifier)
    noise = torch.rand(1000, 1, 28, 28)
    blank = torch.zeros(1000, 1, 28, 28) + 0.5
    noise_fd = compute_fd(noise, test[1000:], quick_classifier)
    assert real_vs_real < 0.1 * noise_fd
    assert real_vs_real < 0.1 * compute_fd(blank + 1e-3 * torch.rand_like(blank), test[1000:], quick_classifier)
    # reproducible: the dequantization noise is seeded
    assert compute_fd(test[:1000], test[1000:], quick_classifier) == real_vs_real


@pytest.mark.parametrize("model_class", [VAE, SRVAE])
def test_compute_fd_of_a_model_uses_its_samples(mini, model_class):
    classifier = FeatureClassifier((1, 28, 28), 10, width=4, feature_dim=8).eval()
    model = model_class((1, 28, 28), hidden=4)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    value = compute_fd(model, mini[1].images[:64], classifier, num_samples=50, batch_size=20)
    assert math.isfinite(value) and value >= 0
    assert torch.equal(torch.get_rng_state(), state)  # sampling is seeded in a forked RNG
    assert compute_fd(model, mini[1].images[:64], classifier, num_samples=50, batch_size=20) == value


def test_inception_fid_is_skipped_offline_without_touching_the_network(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("inception_fid tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch.hub cache
    monkeypatch.delenv(frechet.INCEPTION_WEIGHTS_ENV, raising=False)
    images = torch.rand(4, 1, 28, 28)

    # torch-fidelity missing (as here) or present: either way a clear reason and None
    for fidelity_installed in (False, True):
        monkeypatch.setattr(frechet, "_torch_fidelity_available", lambda: fidelity_installed)
        reason = inception_fid_unavailable_reason()
        assert reason.startswith("Inception FID skipped")
        assert ("torch-fidelity is not installed" in reason) != fidelity_installed
        with pytest.warns(UserWarning, match="Inception FID skipped"):
            assert inception_fid(images, images) is None
    assert "no download is attempted" in inception_fid_unavailable_reason(tmp_path / "missing.pth")


def test_inception_fid_uses_local_weights_when_present(monkeypatch, tmp_path):
    """With the weights on disk the metric is built from that file (torchmetrics is faked here)."""
    weights = tmp_path / frechet.INCEPTION_WEIGHTS_FILE
    weights.write_bytes(b"not really weights")
    built = {}

    class FakeFID:
        def __init__(self, **kwargs):
            built.update(kwargs)
            self.batches = []

        def to(self, device):
            return self

        def update(self, images, real):
            assert images.shape[1] == 3 and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1
            self.batches.append((len(images), real))

        def compute(self):
            return torch.tensor(12.5)

    import torchmetrics.image.fid as fid_module

    monkeypatch.setattr(frechet, "_torch_fidelity_available", lambda: True)
    monkeypatch.setattr(fid_module, "FrechetInceptionDistance", FakeFID)
    monkeypatch.setenv(frechet.INCEPTION_WEIGHTS_ENV, str(weights))
    assert inception_fid_unavailable_reason() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        real = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
        value = inception_fid(real, torch.rand(3, 1, 8, 8), batch_size=2)
    assert value == 12.5
    assert built["feature_extractor_weights_path"] == str(weights) and built["normalize"] is True
