"""Named tensors <-> safetensors bytes (K matrices, suffix products, test gradients)."""

from __future__ import annotations

import torch
from safetensors.torch import load, save


def save_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({n: t.detach().contiguous().cpu() for n, t in tensors.items()})


def load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    return load(data)
