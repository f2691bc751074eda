"""Chaining the segments' K matrices into suffix products (the sequential part of Algorithm 2)."""

from __future__ import annotations

import torch

from rayattr.dvemb import suffix_products
from rayattr.embed.segment import k_path
from rayattr.embed.tensors import load_tensors
from rayattr.store import Run


def load_segment_ks(run: Run, n_segments: int) -> list[dict[str, torch.Tensor]]:
    missing = [i for i in range(n_segments) if not run.exists(k_path(i))]
    if missing:
        raise RuntimeError(f"segments {missing} of {run.uri} have no K matrix: the embedding stage did not finish")
    return [load_tensors(run.read_bytes(k_path(i))) for i in range(n_segments)]


def chain_segments(run: Run, n_segments: int, dtype: torch.dtype = torch.float64) -> list[dict[str, torch.Tensor]]:
    """S_ℓ = K_{n-1} ⋯ K_{ℓ+1} per segment, multiplied in float64 (a handful of p×p products)."""
    ks = [{n: k.to(dtype) for n, k in seg.items()} for seg in load_segment_ks(run, n_segments)]
    return suffix_products(ks)
