"""Tests of pyro_srvae.data: datasets, file readers, dequantization and batching.

Every reader is exercised on small files this module writes itself in the real
on-disk formats; nothing here touches the network.
"""

import gzip
import hashlib
import importlib.util
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_srvae.data import datasets as data
from pyro_srvae.data.batching import dequantize, epoch_permutation, iterate_batches, num_batches
from pyro_srvae.data.datasets import DATASETS, load_dataset, read_idx
from pyro_srvae.data.image_dataset import DatasetNotFoundError, ImageDataset, validate_images

REPO_ROOT = Path(__file__).resolve().parents[1]
# In CI the shared data sits beside the repository clone (../shared).
FASHION_MNIST_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
needs_fashion_mnist_source = pytest.mark.skipif(
    not (FASHION_MNIST_SOURCE / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"original Fashion-MNIST files not found in {FASHION_MNIST_SOURCE}",
)

# SHA-256 of the packaged arrays' bytes (also listed in pyro_srvae/data/embedded/README.md).
MINI_ARRAY_SHA256 = {
    "train_images": "e1427044c614fabc29feeff0f27e6b68f88a9ee2f2cfe7d783b9157159864883",
    "train_labels": "2c02745d4ad8b4511333d0eca662ac5664a371860abaa4588b1670e7be59fbdf",
    "test_images": "96315b1732ab731e68b8def3c284f34b605f7deb7a61e683c7d786265c827c83",
    "test_labels": "b2095bc797d1201e84da76c94012c02d0e6f07af0938df4e00120a3b42d1aa4c",
}


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Make any attempt to download through torchvision fail loudly."""
    import torchvision.datasets

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for name in ("MNIST", "FashionMNIST", "CIFAR10"):
        monkeypatch.setattr(torchvision.datasets, name, refuse)


# ----------------------------------------------------------------------------
# Embedded fashion-mnist-mini
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("split, size, per_class", [("train", 10000, 1000), ("test", 2000, 200)])
def test_mini_shapes_dtypes_and_balance(split, size, per_class):
    dataset = load_dataset("fashion-mnist-mini", split)
    assert isinstance(dataset, ImageDataset)
    assert (dataset.name, dataset.split) == ("fashion-mnist-mini", split)
    assert dataset.images.shape == (size, 1, 28, 28)
    assert dataset.images.dtype == torch.uint8
    assert dataset.labels.shape == (size,) and dataset.labels.dtype == torch.int64
    assert dataset.image_shape == (1, 28, 28) and len(dataset) == size
    assert len(dataset.classes) == 10 and dataset.classes[9] == "Ankle boot"
    assert torch.bincount(dataset.labels, minlength=10).tolist() == [per_class] * 10
    # Real images, not a constant placeholder.
    assert dataset.images.min() == 0 and dataset.images.max() == 255


def test_mini_is_deterministic_and_matches_recorded_hashes():
    first = load_dataset("fashion-mnist-mini", "test")
    second = load_dataset("fashion-mnist-mini", "test")
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)

    package_file = Path(data.__file__).parent / "embedded" / "fashion_mnist_mini.npz"
    with np.load(package_file) as archive:
        assert sorted(archive.files) == sorted(MINI_ARRAY_SHA256)
        for key, expected in MINI_ARRAY_SHA256.items():
            assert archive[key].dtype == np.uint8
            assert hashlib.sha256(archive[key].tobytes()).hexdigest() == expected, key


def _load_build_script():
    path = REPO_ROOT / "scripts" / "build_fashion_mnist_mini.py"
    spec = importlib.util.spec_from_file_location("build_fashion_mnist_mini", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_fashion_mnist_source
def test_packaged_mini_equals_a_rebuild_from_the_source():
    rebuilt = _load_build_script().build_arrays(FASHION_MNIST_SOURCE)
    package_file = Path(data.__file__).parent / "embedded" / "fashion_mnist_mini.npz"
    with np.load(package_file) as archive:
        assert sorted(archive.files) == sorted(rebuilt)
        for key, array in rebuilt.items():
            assert archive[key].dtype == array.dtype, key
            assert np.array_equal(archive[key], array), key


def test_first_per_class_selection_rule():
    build = _load_build_script()
    labels = np.array([2, 0, 1, 0, 2, 1, 0, 1, 2, 2], dtype=np.uint8)
    # First two of each class, in file order.
    assert build.first_per_class(labels, 2, num_classes=3).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="class 0"):
        build.first_per_class(labels, 4, num_classes=3)


# ----------------------------------------------------------------------------
# Dequantization
# ----------------------------------------------------------------------------


def test_dequantize_stays_in_the_pixel_bin():
    pixels = torch.arange(256, dtype=torch.uint8).repeat(4000)  # ~1M values, every level
    generator = torch.Generator().manual_seed(0)
    values = dequantize(pixels, generator=generator)
    assert values.dtype == torch.float32 and values.shape == pixels.shape
    levels = pixels.to(torch.float32)
    assert torch.all(values >= levels / 256)
    assert torch.all(values < (levels + 1) / 256)
    assert torch.all(values < 1.0)
    # Quantizing again gives back the integers.
    assert torch.equal(torch.floor(values * 256).to(torch.uint8), pixels)


def test_dequantize_noise_is_uniform():
    pixel_generator = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (200_000,), dtype=torch.uint8, generator=pixel_generator)
    noise = dequantize(pixels, generator=torch.Generator().manual_seed(2)) * 256 - pixels.float()
    # Uniform[0, 1): mean 1/2, variance 1/12; allow 6 standard errors.
    standard_error = (1 / 12) ** 0.5 / len(noise) ** 0.5
    assert abs(noise.mean().item() - 0.5) < 6 * standard_error
    assert abs(noise.var().item() - 1 / 12) < 0.005
    # Roughly flat: each tenth of [0, 1) gets about a tenth of the values.
    histogram = torch.histc(noise, bins=10, min=0.0, max=1.0) / len(noise)
    assert torch.all((histogram - 0.1).abs() < 0.005)


def test_dequantize_generator_determinism_device_and_dtype_check():
    images = load_dataset("fashion-mnist-mini", "test").images[:8]
    first = dequantize(images, generator=torch.Generator().manual_seed(3))
    second = dequantize(images, generator=torch.Generator().manual_seed(3))
    third = dequantize(images, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, second) and not torch.equal(first, third)
    assert first.device == images.device and first.shape == images.shape
    with pytest.raises(ValueError, match="uint8"):
        dequantize(images.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dequantize_keeps_the_input_device():
    images = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8).cuda()
    assert dequantize(images).device == images.device
    # A CPU generator still works; the noise is moved to the images' device.
    assert dequantize(images, generator=torch.Generator().manual_seed(0)).device == images.device


# ----------------------------------------------------------------------------
# validate_images
# ----------------------------------------------------------------------------


def test_validate_images():
    good = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    assert validate_images(good, expected_shape=(1, 28, 28)) is good
    validate_images(good, expected_shape=(None, 1, 28, 28))
    with pytest.raises(ValueError, match="uint8"):
        validate_images(good.float(), name="batch")
    with pytest.raises(ValueError, match="4 dimensions"):
        validate_images(good[0])
    with pytest.raises(ValueError, match=r"mydata.*\(3, 32, 32\)"):
        validate_images(good, expected_shape=(3, 32, 32), name="mydata")
    with pytest.raises(ValueError, match="torch.Tensor"):
        validate_images(np.zeros((2, 1, 28, 28), dtype=np.uint8))


def test_image_dataset_checks_its_fields_and_compares_by_identity():
    images = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    labels = torch.zeros(3, dtype=torch.int64)
    dataset = ImageDataset("mnist", "test", images, labels, ("a",))
    assert dataset.image_shape == (1, 2, 2) and len(dataset) == 3
    assert dataset == dataset and dataset != ImageDataset("mnist", "test", images, labels, ("a",))
    assert "size=3" in repr(dataset)
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset("mnist", "test", images.float(), labels, ("a",))
    with pytest.raises(ValueError, match="int64"):
        ImageDataset("mnist", "test", images, labels[:2], ("a",))


# ----------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)
# ----------------------------------------------------------------------------

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array in the IDX format: magic 0 0 <type> <ndim>, big-endian dims, data."""
    type_codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    big_endian = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, type_codes[big_endian.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + big_endian.tobytes()


def write_idx_split(folder: Path, split: str, images, labels, gzipped: bool):
    folder.mkdir(parents=True, exist_ok=True)
    images_name, labels_name = IDX_NAMES[split]
    for name, array in ((images_name, images), (labels_name, labels)):
        content = idx_bytes(array)
        if gzipped:
            (folder / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (folder / name).write_bytes(content)


def random_digits(count: int, seed: int):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count, dtype=np.uint8)
    return images, labels


@pytest.mark.parametrize(
    "name, torchvision_folder", [("fashion-mnist", "FashionMNIST"), ("mnist", "MNIST")]
)
@pytest.mark.parametrize("gzipped", [True, False])
@pytest.mark.parametrize("layout", ["torchvision", "flat"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_idx_datasets_in_both_layouts(tmp_path, name, torchvision_folder, gzipped, layout, split):
    images, labels = random_digits(7, seed=len(name) + gzipped)
    folder = tmp_path / torchvision_folder / "raw" if layout == "torchvision" else tmp_path
    write_idx_split(folder, split, images, labels, gzipped)

    dataset = load_dataset(name, split, data_dir=tmp_path)
    assert dataset.name == name and dataset.split == split
    assert dataset.images.shape == (7, 1, 28, 28) and dataset.images.dtype == torch.uint8
    assert dataset.labels.dtype == torch.int64
    assert np.array_equal(dataset.images[:, 0].numpy(), images)
    assert np.array_equal(dataset.labels.numpy(), labels)
    expected_classes = data.FASHION_MNIST_CLASSES if name == "fashion-mnist" else data.MNIST_CLASSES
    assert dataset.classes == expected_classes


def test_data_dir_accepts_a_string(tmp_path):
    images, labels = random_digits(3, seed=5)
    write_idx_split(tmp_path, "test", images, labels, gzipped=True)
    assert len(load_dataset("mnist", "test", data_dir=str(tmp_path))) == 3


def test_read_idx_multibyte_big_endian(tmp_path):
    values = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    path = tmp_path / "values.idx"
    path.write_bytes(idx_bytes(values.astype(">i4")))
    read = read_idx(path)
    assert read.dtype == np.int32 and read.dtype.isnative
    assert np.array_equal(read, values)


def _good_idx(tmp_path):
    images, _ = random_digits(4, seed=9)
    return idx_bytes(images)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda good: good[:-10], "truncated"),
        (lambda good: good + b"\x00", "trailing"),
        (lambda good: good[:6], "truncated IDX header"),
        (lambda good: b"\x12\x34" + good[2:], "magic"),
        (lambda good: good[:2] + b"\x07" + good[3:], "magic"),  # unknown type code
        (lambda good: gzip.compress(good)[:-20], "gzip"),
        (lambda good: b"", "not an IDX file"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, corrupt, message):
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(corrupt(_good_idx(tmp_path)))
    with pytest.raises(ValueError, match=message) as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_truncated_dataset_file_names_the_file(tmp_path):
    images, labels = random_digits(5, seed=3)
    write_idx_split(tmp_path, "train", images, labels, gzipped=False)
    images_file = tmp_path / IDX_NAMES["train"][0]
    images_file.write_bytes(images_file.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated") as error:
        load_dataset("fashion-mnist", "train", data_dir=tmp_path)
    assert str(images_file) in str(error.value)


def test_mismatched_label_count_is_rejected(tmp_path):
    images, labels = random_digits(5, seed=3)
    write_idx_split(tmp_path, "test", images, labels[:4], gzipped=True)
    with pytest.raises(ValueError, match="labels"):
        load_dataset("mnist", "test", data_dir=tmp_path)


# ----------------------------------------------------------------------------
# CIFAR-10 pickles
# ----------------------------------------------------------------------------


class Python2StylePickler(pickle._Pickler):
    """Writes pickles as Python 2's cPickle did for the original CIFAR-10 files.

    Byte and text strings become BINSTRING opcodes and numpy arrays refer to
    ``numpy.core.multiarray._reconstruct`` - the format readers must handle.
    """

    dispatch = pickle._Pickler.dispatch.copy()
    _numpy_globals = {"_reconstruct": "numpy.core.multiarray", "ndarray": "numpy", "dtype": "numpy"}

    def save_as_binstring(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    def save_global(self, obj, name=None):  # classes and functions
        name = name or obj.__qualname__
        module = self._numpy_globals.get(name, obj.__module__)
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = save_as_binstring
    dispatch[str] = save_as_binstring
    dispatch[type(len)] = save_global  # built-in functions such as _reconstruct


def cifar_batch(count: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": rng.integers(0, 10, size=count).tolist(),
        b"data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
        b"filenames": [f"image_{i}.png".encode() for i in range(count)],
    }


def write_cifar_split(folder: Path, split: str, batches, style: str = "python3"):
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    for name, batch in zip(names, batches):
        buffer = io.BytesIO()
        if style == "python2":
            Python2StylePickler(buffer, protocol=2).dump(batch)
        else:
            protocol = 2 if style == "protocol2" else pickle.HIGHEST_PROTOCOL
            pickle.dump(batch, buffer, protocol=protocol)
        (folder / name).write_bytes(buffer.getvalue())


@pytest.mark.parametrize("style", ["python2", "protocol2", "python3"])
@pytest.mark.parametrize("layout", ["torchvision", "flat"])
def test_cifar10_reader_and_channel_order(tmp_path, style, layout):
    folder = tmp_path / "cifar-10-batches-py" if layout == "torchvision" else tmp_path
    batch = cifar_batch(3, seed=0)
    # Image 0: red 10, green 20, blue 30 everywhere except one marked pixel per channel.
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    row[0 * 1024 + 1] = 200  # red, pixel (0, 1)
    row[1 * 1024 + 32] = 201  # green, pixel (1, 0)
    row[2 * 1024 + 1023] = 202  # blue, pixel (31, 31)
    batch[b"data"][0] = row
    write_cifar_split(folder, "test", [batch], style=style)

    dataset = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert dataset.images.shape == (3, 3, 32, 32) and dataset.images.dtype == torch.uint8
    assert dataset.image_shape == (3, 32, 32)
    assert dataset.labels.tolist() == batch[b"labels"] and dataset.labels.dtype == torch.int64
    assert dataset.classes[0] == "airplane" and len(dataset.classes) == 10
    first = dataset.images[0]
    assert first[0, 0, 0] == 10 and first[1, 0, 0] == 20 and first[2, 0, 0] == 30
    assert first[0, 0, 1] == 200 and first[1, 1, 0] == 201 and first[2, 31, 31] == 202
    assert np.array_equal(dataset.images.reshape(3, -1).numpy(), batch[b"data"])


def test_cifar10_train_concatenates_five_batches_in_order(tmp_path):
    batches = [cifar_batch(2, seed=i) for i in range(5)]
    write_cifar_split(tmp_path / "cifar-10-batches-py", "train", batches)
    dataset = load_dataset("cifar10", "train", data_dir=tmp_path / "cifar-10-batches-py")
    assert len(dataset) == 10
    assert np.array_equal(
        dataset.images.reshape(10, -1).numpy(), np.concatenate([b[b"data"] for b in batches])
    )
    assert dataset.labels.tolist() == sum((b[b"labels"] for b in batches), [])


def test_cifar10_rejects_malformed_and_unsafe_pickles(tmp_path):
    batch = cifar_batch(2, seed=0)
    batch[b"data"] = batch[b"data"][:, :100]
    write_cifar_split(tmp_path, "test", [batch])
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        load_dataset("cifar10", "test", data_dir=tmp_path)

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, ("echo unsafe",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(ValueError, match="refusing") as error:
        load_dataset("cifar10", "test", data_dir=tmp_path)
    assert "test_batch" in str(error.value)


# ----------------------------------------------------------------------------
# Missing files, downloads, bad arguments
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, split, folder, files",
    [
        ("fashion-mnist", "train", "FashionMNIST/raw", IDX_NAMES["train"]),
        ("mnist", "test", "MNIST/raw", IDX_NAMES["test"]),
        ("cifar10", "train", "cifar-10-batches-py", ["data_batch_1", "data_batch_5"]),
        ("cifar10", "test", "cifar-10-batches-py", ["test_batch"]),
    ],
)
def test_missing_files_give_a_one_line_error(tmp_path, name, split, folder, files):
    # The autouse fixture turns any download attempt into an AssertionError.
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset(name, split, data_dir=tmp_path)
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    assert "\n" not in message
    assert str(tmp_path / folder) in message and f"{tmp_path} " in message
    for file_name in files:
        assert file_name in message
    assert "--download" in message


def test_partial_files_name_the_missing_one(tmp_path):
    images, labels = random_digits(2, seed=0)
    write_idx_split(tmp_path, "test", images, labels, gzipped=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing t10k-labels-idx1-ubyte"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_default_data_dir_is_dot_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"data[/\\]MNIST[/\\]raw"):
        load_dataset("mnist")
    images, labels = random_digits(2, seed=0)
    write_idx_split(tmp_path / "data" / "MNIST" / "raw", "train", images, labels, gzipped=False)
    assert len(load_dataset("mnist")) == 2


def test_download_uses_torchvision_then_the_own_reader(tmp_path, monkeypatch):
    import torchvision.datasets

    images, labels = random_digits(4, seed=7)
    calls = []

    class FakeFashionMNIST:
        """Stands in for torchvision: writes the files where torchvision would."""

        def __init__(self, root, train, download):
            calls.append((root, train, download))
            raw_folder = Path(root) / "FashionMNIST" / "raw"
            write_idx_split(raw_folder, "test", images, labels, gzipped=False)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    dataset = load_dataset("fashion-mnist", "test", data_dir=tmp_path, download=True)
    assert calls == [(str(tmp_path), False, True)]
    assert np.array_equal(dataset.images[:, 0].numpy(), images)
    # Files present now: no second download.
    load_dataset("fashion-mnist", "test", data_dir=tmp_path, download=True)
    assert len(calls) == 1


def test_failed_download_gives_a_short_error(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(root, train, download):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DatasetNotFoundError, match="downloading mnist .* failed") as error:
        load_dataset("mnist", "train", data_dir=tmp_path, download=True)
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_unknown_name_or_split_lists_the_choices():
    with pytest.raises(ValueError) as error:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="train, test"):
        load_dataset("fashion-mnist-mini", "validation")


@needs_fashion_mnist_source
def test_full_fashion_mnist_from_the_shared_folder():
    train = load_dataset("fashion-mnist", "train", data_dir=FASHION_MNIST_SOURCE)
    test = load_dataset("fashion-mnist", "test", data_dir=FASHION_MNIST_SOURCE)
    assert train.images.shape == (60000, 1, 28, 28) and len(train.labels) == 60000
    assert test.images.shape == (10000, 1, 28, 28) and len(test.labels) == 10000
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    # The embedded subset is made of the first test images of each class.
    mini = load_dataset("fashion-mnist-mini", "test")
    assert torch.equal(mini.images[:10], test.images[:10])


# ----------------------------------------------------------------------------
# Deterministic permutations and batches
# ----------------------------------------------------------------------------


def test_epoch_permutation_is_deterministic_and_private():
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    first = epoch_permutation(1000, seed=7, epoch=3)
    assert torch.equal(torch.get_rng_state(), global_state)  # global RNG untouched
    torch.manual_seed(999)  # ... and not consulted
    assert torch.equal(first, epoch_permutation(1000, seed=7, epoch=3))
    assert first.dtype == torch.int64
    assert torch.equal(torch.sort(first).values, torch.arange(1000))
    assert not torch.equal(first, epoch_permutation(1000, seed=7, epoch=4))
    assert not torch.equal(first, epoch_permutation(1000, seed=8, epoch=3))
    # torch keeps only 32 bits of a generator seed; seeds 2**32 apart must still differ.
    assert not torch.equal(first, epoch_permutation(1000, seed=7 + 2**32, epoch=3))


def test_iterate_batches_covers_the_permutation_in_order():
    batches = list(iterate_batches(103, 10, seed=1, epoch=2))
    assert len(batches) == num_batches(103, 10) == 11
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert all(b.dtype == torch.int64 for b in batches)
    assert torch.equal(torch.cat(batches), epoch_permutation(103, seed=1, epoch=2))


def test_iterate_batches_without_shuffle_and_with_drop_last():
    batches = list(iterate_batches(25, 10, seed=0, epoch=0, shuffle=False, drop_last=True))
    assert num_batches(25, 10, drop_last=True) == 2
    assert [b.tolist() for b in batches] == [list(range(10)), list(range(10, 20))]


def test_start_batch_resumes_the_same_sequence():
    full = list(iterate_batches(95, 8, seed=3, epoch=5))
    for start in (0, 1, 7, len(full)):
        resumed = list(iterate_batches(95, 8, seed=3, epoch=5, start_batch=start))
        assert len(resumed) == len(full) - start
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[start:]))
    with pytest.raises(ValueError, match="start_batch"):
        iterate_batches(95, 8, seed=3, epoch=5, start_batch=len(full) + 1)


@pytest.mark.parametrize(
    "num_items, drop_last", [(100, False), (100, True), (97, False), (97, True), (5, False)]
)
def test_shards_are_disjoint_and_make_up_the_global_batches(num_items, drop_last):
    world_size, batch_size = 3, 4
    order = epoch_permutation(num_items, seed=11, epoch=0)
    common = dict(seed=11, epoch=0, drop_last=drop_last, world_size=world_size)
    shards = [
        list(iterate_batches(num_items, batch_size, rank=rank, **common))
        for rank in range(world_size)
    ]
    expected_count = num_batches(num_items, batch_size, drop_last=drop_last, world_size=world_size)
    assert [len(s) for s in shards] == [expected_count] * world_size
    global_batch = batch_size * world_size
    for index in range(expected_count):
        parts = [shards[rank][index] for rank in range(world_size)]
        joined = torch.cat(parts)
        assert len(set(joined.tolist())) == len(joined)  # disjoint
        assert torch.equal(joined, order[index * global_batch:(index + 1) * global_batch])
        if len(joined) == global_batch:
            assert all(len(p) == batch_size for p in parts)
    covered = sum(len(b) for s in shards for b in s)
    assert covered == (num_items // global_batch * global_batch if drop_last else num_items)
    # A resumed rank continues its own shard.
    resumed = list(iterate_batches(num_items, batch_size, start_batch=1, rank=2, **common))
    assert all(torch.equal(a, b) for a, b in zip(resumed, shards[2][1:]))


def test_batching_argument_checks():
    with pytest.raises(ValueError, match="batch_size"):
        num_batches(10, 0)
    with pytest.raises(ValueError, match="rank"):
        iterate_batches(10, 2, seed=0, epoch=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="num_items"):
        epoch_permutation(-1, seed=0, epoch=0)
    assert num_batches(0, 4) == 0 and list(iterate_batches(0, 4, seed=0, epoch=0)) == []
