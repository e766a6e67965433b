"""Devices: the one place a ``--device`` name becomes a :class:`torch.device`, and where a model lives."""

from __future__ import annotations

from typing import Optional

import torch


def model_device(model) -> torch.device:
    """The device of ``model``'s first parameter (else buffer); the CPU for a model without tensors."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")


def resolve_device(name) -> Optional[torch.device]:
    """The package's one device resolver: ``"auto"`` is a GPU if there is one, else the CPU;
    ``None`` stays ``None`` (the caller's default). Raises ``ValueError`` (one line) for
    ``cuda`` where no GPU is available."""
    if name is None:
        return None
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA GPU is available (use auto or cpu)")
    return device
