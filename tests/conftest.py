import pyro
import pytest
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
