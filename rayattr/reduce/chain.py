"""Chaining the segments: suffix products of their K's and, with momentum, the global R at each
segment's end (the sequential part of Algorithm 2; docs/method.md §4 and §7)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rayattr.dvemb import segment_combine
from rayattr.embed.segment import k_path, r_path
from rayattr.embed.tensors import load_tensors
from rayattr.store import Run


def load_segment_tensors(run: Run, n_segments: int, path=k_path, what: str = "K") -> list[dict[str, torch.Tensor]]:
    missing = [i for i in range(n_segments) if not run.exists(path(i))]
    if missing:
        raise RuntimeError(f"segments {missing} of {run.uri} have no {what} matrix: the embedding stage did not finish")
    return [load_tensors(run.read_bytes(path(i))) for i in range(n_segments)]


def chain_segments(run: Run, n_segments: int, dtype: torch.dtype = torch.float64, momentum: float = 0.0,
                   lengths: Sequence[int] | None = None
                   ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor] | None]]:
    """(S_ℓ = K_{n-1} ⋯ K_{ℓ+1}, R at segment ℓ's end) per segment, in float64 (a handful of p×p
    products). Without momentum the R's are None; with it `lengths` are the segments' steps."""
    cast = lambda seg: {n: k.to(dtype) for n, k in seg.items()}  # noqa: E731
    ks = [cast(seg) for seg in load_segment_tensors(run, n_segments)]
    rs = [cast(seg) for seg in load_segment_tensors(run, n_segments, r_path, "R")] if momentum else None
    return segment_combine(ks, rs, lengths, momentum)
