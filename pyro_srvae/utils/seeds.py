"""Random seeds and RNG state: derived seeds for reproducible streams, and the state a checkpoint saves."""

import hashlib
import random

import numpy as np
import torch


def get_rng_state():
    """Every RNG a training step draws from, in a ``weights_only``-loadable form."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def derive_seed(*parts):
    """A seed in ``[0, 2**32)`` mixed from ``parts`` (numbers, strings), e.g. ``(seed, "rank", 3)``.

    Hashing makes every bit of every part count (torch's CPU generator keeps only the
    low 32 bits of a seed, and ``seed + rank`` would make run 0 / rank 1 and run 1 /
    rank 0 share a stream); 32 bits because ``pyro.set_rng_seed`` also seeds NumPy.
    """
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
