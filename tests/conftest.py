import pyro
import pytest
import tifffile
import torch

# The networks in the tests are tiny: threads buy nothing, and on a 2-core machine
# shared with another busy process, OpenMP's spinning threads slow torch down ~30x.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_pyro_state():
    """Every test starts with an empty param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def tiny_images(batch=4, shape=(1, 8, 8), seed=0):
    """Dequantized-looking images in (0, 1), deterministic."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (batch,) + tuple(shape), generator=g).float() + 0.5) / 256


def hold_latents_fixed(model):
    """Collapse q(u|y) and p(z|y,u) to their means: the SR draws then differ by the likelihood's noise alone,
    so drawing that noise times ``t`` is exactly the model's predictive with the spread factor ``t``."""

    def pinned(module, args, output):
        loc, scale = output
        return loc, torch.full_like(scale, 1e-12)

    model.encoder_u.register_forward_hook(pinned)
    model.prior_z.register_forward_hook(pinned)
    return model


def write_tiff(path, bands):
    """A multi-band TIFF, bands first, as satellite scenes are stored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, bands, photometric="minisblack", planarconfig="separate")
    return path


def write_scene_folder(root, make_bands, counts=(("train", 3), ("test", 1))):
    """``root/images/{train,test}/sceneN.tif``, each ``make_bands()``; returns ``root/images``."""
    for split, count in counts:
        for index in range(count):
            write_tiff(root / "images" / split / f"scene{index}.tif", make_bands())
    return root / "images"
