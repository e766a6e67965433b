"""The folder dataset: discovery, the split by image, the patch grid, 16-bit data, the cache, bad input."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from pyro_srvae.data import folder as folder_module
from pyro_srvae.data.batching import DeviceImages, _file_backed, dequantize
from pyro_srvae.data.datasets import DATASET_NAMES, DATASETS, FOLDER, load_dataset
from pyro_srvae.data.image_dataset import DatasetNotFoundError, bit_depth
from pyro_srvae.data.folder import FolderDatasetError, load_folder, patch_positions, split_files, split_score
from pyro_srvae.data.channels import match_channels
from pyro_srvae.data.images import RawImage, read_image, read_image_header, read_integer_image

RNG = np.random.default_rng(1234)


def png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def grey8(h, w):
    return RNG.integers(0, 256, (h, w), dtype=np.uint8)


def rgb8(h, w):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def bands16(c, h, w):
    return RNG.integers(0, 65536, (c, h, w), dtype=np.uint16)


def files_under(folder):
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def one_line_error(error, starts_with):
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(starts_with)), message
    return message


@pytest.fixture
def mixed8(tmp_path):
    """An 8-bit folder mixing grey and RGB PNGs, a JPEG, (H, W) and (C, H, W) .npy, one small image."""
    root = tmp_path / "mixed8"
    png(root / "a_grey.png", grey8(20, 17))
    png(root / "b_rgb.png", rgb8(16, 23))
    png(root / "nested" / "deeper" / "c_rgb.PNG", rgb8(12, 12))
    jpeg = root / "d_photo.jpg"
    Image.fromarray(rgb8(18, 21)).save(jpeg, quality=90)
    np.save(root / "e_grey.npy", grey8(15, 19))
    np.save(root / "f_bands.npy", RNG.integers(0, 256, (3, 14, 16), dtype=np.uint8))
    png(root / "g_small.png", rgb8(5, 40))  # smaller than an 8x8 patch on one side
    png(root / ".hidden.png", rgb8(30, 30))
    png(root / ".hidden_dir" / "x.png", rgb8(30, 30))
    (root / "notes.txt").write_text("not an image")
    return root


def expected_pixels(path, channels):
    """The integers the loader must cut patches from, decoded independently of the loader."""
    if path.suffix == ".npy":
        values = np.load(path)
        values = values[None] if values.ndim == 2 else values
    else:
        values = np.asarray(Image.open(path))
        values = values[None] if values.ndim == 2 else values.transpose(2, 0, 1)
    if values.shape[0] == 1 and channels == 3:
        values = np.repeat(values, 3, axis=0)
    return values


# --------------------------------------------------------------------------- #
# The patch grid
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("length, patch, stride, expected", [
    (10, 4, 2, [0, 2, 4, 6]),
    (11, 4, 2, [0, 2, 4, 6, 7]),  # the grid stops at 6: one more, flush with the edge
    (4, 4, 2, [0]),
    (3, 4, 2, []),
    (9, 4, 5, [0, 5]),  # a stride longer than the patch still ends at the edge
    (13, 4, 4, [0, 4, 8, 9]),
])  # fmt: skip
def test_patch_positions(length, patch, stride, expected):
    assert patch_positions(length, patch, stride) == expected


def test_patch_positions_cover_every_pixel_and_match_the_closed_form():
    for length in range(1, 40):
        for patch in (1, 2, 4, 6):
            for stride in (1, 2, 3, 5, 7):
                positions = patch_positions(length, patch, stride)
                if length < patch:
                    assert positions == []
                    continue
                closed = (length - patch) // stride + 1 + ((length - patch) % stride != 0)
                assert len(positions) == closed
                assert positions[0] == 0 and positions[-1] == length - patch
                assert all(b - a <= stride for a, b in zip(positions, positions[1:]))
                covered = np.zeros(length, bool)
                for p in positions:
                    covered[p : p + patch] = True
                assert covered.all() or stride > patch  # a stride past the patch leaves gaps by design


def test_patch_count_contents_and_skipped_images(mixed8, caplog):
    with caplog.at_level(logging.WARNING, logger="pyro_srvae.data.folder"):
        sets = {s: load_folder(mixed8, s, patch_size=8, patch_stride=3, test_fraction=0.3) for s in ("train", "test")}
    seen = set()
    for split, dataset in sets.items():
        source = dataset.source
        assert dataset.name == "folder" and dataset.classes == ("patch",) and dataset.split == split
        assert dataset.images.dtype == torch.uint8 and dataset.bits == 8 and source.channels == 3
        assert torch.equal(dataset.labels, torch.zeros(len(dataset), dtype=torch.int64))
        for index, name in enumerate(source.files):
            h, w = expected_pixels(mixed8 / name, 3).shape[1:]
            closed = [(n - 8) // 3 + 1 + ((n - 8) % 3 != 0) if n >= 8 else 0 for n in (h, w)]
            assert source.patches_per_file[index] == closed[0] * closed[1], name
        assert len(dataset) == sum(source.patches_per_file) == len(source.origins)
        for patch, (index, top, left) in zip(dataset.images, source.origins.tolist()):
            crop = expected_pixels(mixed8 / source.files[index], 3)[:, top : top + 8, left : left + 8]
            assert np.array_equal(patch.numpy(), crop)
        seen.update(source.files)
    # Recursive, any case of suffix, hidden files and non-images skipped.
    assert seen == {"a_grey.png", "b_rgb.png", "nested/deeper/c_rgb.PNG", "d_photo.jpg", "e_grey.npy",
                    "f_bands.npy", "g_small.png"}  # fmt: skip
    small_split = next(d for d in sets.values() if "g_small.png" in d.source.files)
    assert small_split.source.skipped == ("g_small.png",)
    assert any("smaller than 8x8" in r.getMessage() and "g_small.png" in r.getMessage() for r in caplog.records)


def test_whole_images_when_no_patch_size(tmp_path):
    root = tmp_path / "whole"
    images = {f"{i}.png": grey8(12, 10) for i in range(5)}
    for name, values in images.items():
        png(root / name, values)
    train = load_folder(root, "train", factor=2, test_fraction=0.3)
    assert train.images.shape[1:] == (1, 12, 10) and train.source.patch_size is None
    for patch, name in zip(train.images, train.source.files):
        assert np.array_equal(patch[0].numpy(), images[name])


# --------------------------------------------------------------------------- #
# The split
# --------------------------------------------------------------------------- #
def test_split_is_by_image_seeded_and_stable_when_files_are_added(tmp_path):
    root = tmp_path / "many"
    for i in range(40):
        png(root / f"img{i:03d}.png", grey8(9, 9))

    def split_of(seed=0):
        sets = {s: load_folder(root, s, patch_size=4, test_fraction=0.25, seed=seed) for s in ("train", "test")}
        for split, dataset in sets.items():  # every patch of a file lands in its file's split
            assert set(dataset.source.origins[:, 0].tolist()) == set(range(len(dataset.source.files)))
        train, test = set(sets["train"].source.files), set(sets["test"].source.files)
        assert not train & test
        return train, test

    train, test = split_of()
    assert train | test == {f"img{i:03d}.png" for i in range(40)}
    assert test == {name for name in train | test if split_score(name, 0) < 0.25}
    assert 0 < len(test) < 40

    for i in range(40, 70):
        png(root / f"img{i:03d}.png", grey8(9, 9))
    train2, test2 = split_of()
    assert train <= train2 and test <= test2  # earlier files keep their split
    assert split_of(seed=1) != (train2, test2)


def test_the_fallback_keeps_both_splits_non_empty(tmp_path):
    root = tmp_path / "few"
    names = [f"{i}.png" for i in range(3)]
    for name in names:
        png(root / name, grey8(8, 8))
    scores = {name: split_score(name, 0) for name in names}
    splits, layout = split_files(root, test_fraction=0.0)
    assert layout == "hash" and [p.name for p in splits["test"]] == [min(scores, key=scores.get)]
    splits, _ = split_files(root, test_fraction=0.999999)
    assert [p.name for p in splits["train"]] == [max(scores, key=scores.get)]


def test_train_and_test_folders_are_used_when_both_exist(tmp_path):
    root = tmp_path / "layout"
    png(root / "train" / "a.png", grey8(8, 8))
    png(root / "train" / "sub" / "b.png", grey8(8, 8))
    png(root / "test" / "c.png", grey8(8, 8))
    png(root / "ignored.png", grey8(8, 8))
    train = load_folder(root, "train", patch_size=8, test_fraction=0.99)
    test = load_folder(root, "test", patch_size=8)
    assert train.source.layout == "folders" and train.source.files == ("train/a.png", "train/sub/b.png")
    assert test.source.files == ("test/c.png",)


def test_load_dataset_accepts_the_folder_name(tmp_path):
    assert FOLDER in DATASET_NAMES and FOLDER not in DATASETS
    root = tmp_path / "two"
    png(root / "a.png", grey8(8, 8))
    png(root / "b.png", grey8(8, 8))
    dataset = load_dataset("folder", "test", root, patch_size=4, test_fraction=0.5)
    assert dataset.source.root == root and dataset.images.shape[1:] == (1, 4, 4)
    with pytest.raises(DatasetNotFoundError, match="data_dir"):
        load_dataset("folder", "train")


# --------------------------------------------------------------------------- #
# 16 bits and multi-band TIFFs
# --------------------------------------------------------------------------- #
def test_sixteen_bit_four_band_tiffs_and_npy_keep_their_dtype(tmp_path):
    root = tmp_path / "satellite"
    root.mkdir()
    planar, contig, pages, array = bands16(4, 20, 18), bands16(4, 17, 22), bands16(4, 16, 16), bands16(4, 18, 18)
    tifffile.imwrite(root / "planar.tif", planar, photometric="minisblack", planarconfig="separate")
    tifffile.imwrite(root / "contig.tiff", contig.transpose(1, 2, 0), photometric="minisblack", planarconfig="contig")
    pil_pages = [Image.fromarray(p) for p in pages]
    pil_pages[0].save(root / "pages.TIF", save_all=True, append_images=pil_pages[1:])
    np.save(root / "array.npy", array)
    truth = {"planar.tif": planar, "contig.tiff": contig, "pages.TIF": pages, "array.npy": array}

    total = 0
    for split in ("train", "test"):
        dataset = load_folder(root, split, patch_size=8, test_fraction=0.3, factor=4)
        assert dataset.images.dtype == torch.uint16 and dataset.bits == 16 and bit_depth(dataset.images) == 16
        assert dataset.images.shape[1:] == (4, 8, 8)
        for patch, (index, top, left) in zip(dataset.images, dataset.source.origins.tolist()):
            crop = truth[dataset.source.files[index]][:, top : top + 8, left : left + 8]
            assert np.array_equal(patch.numpy(), crop)
        total += len(dataset.source.files)
        x = dequantize(dataset.images)
        k = dataset.images.to(torch.float64)
        assert torch.all(x < 1) and torch.all(x.double() >= k / 65536) and torch.all(x.double() < (k + 1) / 65536)
    assert total == 4


def test_dequantize_follows_the_bit_depth():
    levels = torch.arange(65536, dtype=torch.int32).to(torch.uint16).repeat(8)
    x = dequantize(levels, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and torch.all(x < 1.0)
    assert torch.equal(torch.floor(x.double() * 65536).to(torch.int64), levels.to(torch.int64))
    noise = x.double() * 65536 - levels.double()
    assert abs(noise.mean().item() - 0.5) < 0.01  # uniform within the 16-bit bin, not 256 levels wide
    eight = torch.arange(256, dtype=torch.uint8)
    assert torch.all(dequantize(eight) * 256 < eight.float() + 1) and bit_depth(eight) == 8
    with pytest.raises(ValueError, match="uint8 or uint16"):
        dequantize(levels.to(torch.int32))


@pytest.mark.parametrize("resident", [True, False])
def test_device_images_serve_uint16(resident):
    images = torch.randint(0, 65536, (6, 4, 3, 3), dtype=torch.int32).to(torch.uint16)
    batch = DeviceImages(images, "cpu", resident=resident).batch(torch.tensor([4, 0]))
    assert batch.dtype == torch.uint16 and torch.equal(batch, images[[4, 0]])


def test_tiff_channel_axis_comes_from_tifffile_not_the_sizes(tmp_path):
    # A 3x5 RGB image with three samples per pixel, and three 5x3 planes: both (3, ., .) arrays.
    rgb = RNG.integers(0, 65536, (3, 5, 3), dtype=np.uint16)  # H=3, W=5, S=3
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb", planarconfig="contig")
    planes = RNG.integers(0, 65536, (3, 5, 3), dtype=np.uint16)  # C=3, H=5, W=3
    tifffile.imwrite(tmp_path / "planes.tif", planes, photometric="minisblack", planarconfig="separate")
    white = RNG.integers(0, 256, (4, 6), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "white.tif", white, photometric="miniswhite")
    rgba = RNG.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    cases = {
        "rgb.tif": (rgb.transpose(2, 0, 1), "rgb", 16),
        "planes.tif": (planes, "bands", 16),
        "white.tif": (255 - white[None], "grey", 8),  # MINISWHITE: 0 is white
        "rgba.tif": (rgba.transpose(2, 0, 1), "rgba", 8),
    }
    for name, (values, kind, bits) in cases.items():
        image = read_integer_image(tmp_path / name)
        header = read_image_header(tmp_path / name)
        assert np.array_equal(image.pixels, values) and image.kind == kind and image.bits == bits, name
        assert (header.channels, header.height, header.width, header.kind, header.bits) == (*values.shape, kind, bits)
        np.testing.assert_allclose(read_image(tmp_path / name).pixels, (values + 0.5) / 2**bits)
    # Four samples flagged alpha in a TIFF still serve a four-band model as they are.
    assert match_channels(read_integer_image(tmp_path / "rgba.tif"), 4)[0].shape == (4, 5, 6)


def test_integer_channel_conversions():
    rgb = RNG.integers(0, 65536, (3, 4, 5), dtype=np.uint16)
    image = RawImage(Path("x.tif"), rgb, "rgb", bits=16)
    grey, note = match_channels(image, 1)
    luma = np.rint(0.299 * rgb[0].astype(float) + 0.587 * rgb[1] + 0.114 * rgb[2])
    assert grey.dtype == np.uint16 and np.array_equal(grey[0], luma.astype(np.uint16)) and "luma" in note
    single = RawImage(Path("g.png"), rgb[:1], "grey", bits=16)
    replicated, _ = match_channels(single, 3)
    assert replicated.dtype == np.uint16 and all(np.array_equal(replicated[c], rgb[0]) for c in range(3))


def test_channels_can_be_forced(tmp_path):
    root = tmp_path / "force"
    colour = {f"{i}.png": rgb8(8, 8) for i in range(4)}
    for name, values in colour.items():
        png(root / name, values)
    with pytest.raises(FolderDatasetError) as error:
        load_folder(root, "train", patch_size=8, channels=4, test_fraction=0.3)
    assert "3 channels (RGB)" in one_line_error(error, root / "0.png") and "does not convert" in str(error.value)
    dataset = load_folder(root, "train", patch_size=8, channels=1, test_fraction=0.3)
    assert dataset.images.shape[1] == 1
    for patch, name in zip(dataset.images, dataset.source.files):
        values = colour[name].astype(float)
        luma = np.rint(values @ np.array([0.299, 0.587, 0.114]))
        assert np.array_equal(patch[0].numpy(), luma.astype(np.uint8))


# --------------------------------------------------------------------------- #
# The cache
# --------------------------------------------------------------------------- #
def test_cache_is_reused_without_decoding_and_never_written_through(mixed8, tmp_path, monkeypatch):
    cache = tmp_path / "run" / "cache"
    options = dict(patch_size=8, test_fraction=0.3, cache_dir=cache)
    first = load_folder(mixed8, "train", **options)
    assert not first.source.from_cache and first.source.cache_file.parent == cache
    assert files_under(cache) == [first.source.cache_file.name]  # no temporary file left
    reference = first.images.clone()

    def no_decoding(path):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(folder_module, "read_integer_image", no_decoding)
    second = load_folder(mixed8, "train", **options)
    assert second.source.from_cache and torch.equal(second.images, reference)
    assert _file_backed(second.images) and not _file_backed(reference)
    for resident in (True, False):  # indexed where it lies, not copied into RAM
        assert DeviceImages(second.images, "cpu", resident=resident).images.data_ptr() == second.images.data_ptr()
    second.images[0] = 0  # a private copy-on-write page: the cache file is untouched
    assert np.array_equal(np.load(second.source.cache_file)[0], reference[0].numpy())

    # A changed file, or other options, make another cache (and so decode again).
    with pytest.raises(AssertionError, match="decoded"):
        load_folder(mixed8, "train", **{**options, "patch_stride": 3})
    decoded = next(name for name, n in zip(first.source.files, first.source.patches_per_file) if n)
    os.utime(mixed8 / decoded, ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded"):
        load_folder(mixed8, "train", **options)
    assert files_under(cache) == [first.source.cache_file.name]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_memory_mapped_set_streams_to_the_gpu_without_being_pinned_whole(mixed8, tmp_path):
    dataset = load_folder(mixed8, "train", patch_size=8, test_fraction=0.3, cache_dir=tmp_path / "cache")
    dataset = load_folder(mixed8, "train", patch_size=8, test_fraction=0.3, cache_dir=tmp_path / "cache")
    source = DeviceImages(dataset.images, "cuda", resident=False)
    assert source.images.data_ptr() == dataset.images.data_ptr() and not source.images.is_pinned()
    batches = [source.batch(torch.tensor([i, len(dataset) - 1 - i])) for i in range(4)]
    torch.cuda.synchronize()
    for i, batch in enumerate(batches):
        assert batch.is_cuda and torch.equal(batch.cpu(), dataset.images[[i, len(dataset) - 1 - i]])
    assert torch.all(dequantize(source.batch(torch.arange(3))) < 1)


def test_a_cache_inside_the_data_folder_is_not_read_as_an_image(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        png(root / f"{i}.png", grey8(8, 8))
    first = load_folder(root, "train", patch_size=4, test_fraction=0.3, cache_dir=root)
    again = load_folder(root, "train", patch_size=4, test_fraction=0.3, cache_dir=root)
    assert again.source.from_cache and again.source.files == first.source.files


def test_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    root = tmp_path / "broken"
    for i in range(6):
        png(root / f"{i}.png", rgb8(16, 16))
    good = (root / "5.png").read_bytes()
    (root / "5.png").write_bytes(good[: len(good) // 2])  # header intact, pixels cut short
    cache = tmp_path / "cache"
    for split in ("train", "test"):  # wherever the truncated file fell, its split fails
        try:
            load_folder(root, split, patch_size=8, test_fraction=0.3, cache_dir=cache)
        except FolderDatasetError as error:
            message = str(error)
            break
    else:
        pytest.fail("the truncated file was not reported")
    assert message.startswith(str(root / "5.png")) and "\n" not in message and "not a readable image" in message
    assert not cache.exists()  # not even the folder it would have made

    (root / "5.png").write_bytes(good)
    real, calls = folder_module.read_integer_image, []

    def interrupted(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(folder_module, "read_integer_image", interrupted)
    cache.mkdir()
    with pytest.raises(KeyboardInterrupt):
        load_folder(root, "train", patch_size=8, test_fraction=0.3, cache_dir=cache)
    assert files_under(cache) == []


# --------------------------------------------------------------------------- #
# Bad input: one line each, starting with the path concerned
# --------------------------------------------------------------------------- #
def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError) as error:
        load_folder(tmp_path / "absent", "train")
    one_line_error(error, tmp_path / "absent")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetNotFoundError) as error:
        load_folder(tmp_path / "empty", "train", patch_size=8)
    assert "no images" in one_line_error(error, tmp_path / "empty")
    png(tmp_path / "one" / "only.png", grey8(8, 8))
    with pytest.raises(FolderDatasetError) as error:
        load_folder(tmp_path / "one", "train")
    assert "two or more" in one_line_error(error, tmp_path / "one" / "only.png")


def test_all_images_smaller_than_a_patch(tmp_path):
    root = tmp_path / "small"
    png(root / "a.png", grey8(10, 12))
    png(root / "b.png", grey8(6, 30))
    with pytest.raises(FolderDatasetError) as error:
        load_folder(root, "train", patch_size=16)
    message = one_line_error(error, root)
    assert "16x16" in message and "10x12" in message


def test_mixed_channel_counts_name_the_file_and_both_counts(tmp_path):
    root = tmp_path / "mixed"
    png(root / "a.png", rgb8(8, 8))
    png(root / "b.png", grey8(8, 8))  # grey with RGB is fine
    four = RNG.integers(0, 256, (4, 8, 8), dtype=np.uint8)
    tifffile.imwrite(root / "c.tif", four, photometric="minisblack", planarconfig="separate")
    with pytest.raises(FolderDatasetError) as error:
        load_folder(root, "train", patch_size=8)
    message = one_line_error(error, root / "c.tif")
    assert "4 channels" in message and "3 channels" in message and str(root / "a.png") in message


def test_patch_size_must_be_a_multiple_of_the_factor(tmp_path):
    png(tmp_path / "a.png", grey8(8, 8))
    with pytest.raises(FolderDatasetError) as error:
        load_folder(tmp_path, "train", patch_size=10, factor=4)
    assert "multiple of the factor 4" in one_line_error(error, tmp_path)
    assert not list(tmp_path.glob("*.npy"))


def test_mixed_bit_depths_name_the_file(tmp_path):
    root = tmp_path / "depths"
    png(root / "a.png", grey8(8, 8))
    png(root / "b.png", RNG.integers(0, 65536, (8, 8), dtype=np.uint16))
    with pytest.raises(FolderDatasetError) as error:
        load_folder(root, "train", patch_size=8)
    message = one_line_error(error, root / "b.png")
    assert "16-bit" in message and "8-bit" in message


def test_float_arrays_are_refused_for_training(tmp_path):
    root = tmp_path / "floats"
    png(root / "a.png", grey8(8, 8))
    np.save(root / "b.npy", RNG.random((8, 8)).astype(np.float32))
    with pytest.raises(FolderDatasetError) as error:
        load_folder(root, "train", patch_size=8)
    message = one_line_error(error, root / "b.npy")
    assert "float" in message and "uint8" in message and "uint16" in message


def test_whole_images_of_different_sizes_ask_for_patches(tmp_path):
    root = tmp_path / "sizes"
    png(root / "a.png", grey8(8, 8))
    png(root / "b.png", grey8(8, 10))
    with pytest.raises(FolderDatasetError) as error:
        load_folder(root, "train")
    assert "--patch-size" in one_line_error(error, root / "b.png")
    with pytest.raises(FolderDatasetError) as error:
        load_folder(tmp_path / "sizes", "train", patch_size=8, factor=2, patch_stride=0)
    one_line_error(error, root)


def test_a_truncated_npy_is_found_from_its_header(tmp_path):
    root = tmp_path / "npy"
    root.mkdir()
    np.save(root / "a.npy", grey8(8, 8))
    np.save(root / "b.npy", grey8(8, 8))
    data = (root / "b.npy").read_bytes()
    (root / "b.npy").write_bytes(data[:-10])
    with pytest.raises(FolderDatasetError) as error:
        load_folder(root, "train", patch_size=4, cache_dir=tmp_path / "cache")
    assert "not a readable .npy" in one_line_error(error, root / "b.npy")
    assert not (tmp_path / "cache").exists()
