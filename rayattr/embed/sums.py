"""Per-(source, phase) sums of embeddings, accumulated inside a segment as it sweeps.

Everything is linear in the embeddings, so a source's embedding is the sum of its
occurrences' and the K-products commute with the sum (docs/method.md §4): dataset-level
answers cost O(#sources · #phases · p), never O(#samples · p).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch


class SourcePhaseSums:
    """(source, phase) -> occurrence count and per-layer embedding sum, in float64 whatever
    the embeddings' dtype: a source's sum runs over millions of occurrences, where float32
    loses the small values to the large ones."""

    dtype = torch.float64

    def __init__(self, dims: Mapping[str, int]):
        self.dims = dict(dims)
        self.count: dict[tuple[str, int], int] = {}
        self.sum: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def add(self, sources: Sequence[str], phase: int, emb: Mapping[str, torch.Tensor]) -> None:
        """Add one step's embeddings (rows aligned with `sources`), all in `phase`."""
        src = np.asarray(sources, dtype=object)
        for name in np.unique(src):
            rows = torch.from_numpy(np.flatnonzero(src == name))
            key = (str(name), int(phase))
            acc = self.sum.setdefault(key, {n: torch.zeros(p, dtype=self.dtype) for n, p in self.dims.items()})
            for n in self.dims:
                acc[n] += emb[n][rows].to(self.dtype).sum(0)
            self.count[key] = self.count.get(key, 0) + len(rows)

    def merge(self, other: "SourcePhaseSums") -> "SourcePhaseSums":
        for key, vecs in other.sum.items():
            acc = self.sum.setdefault(key, {n: torch.zeros(p, dtype=self.dtype) for n, p in self.dims.items()})
            for n in self.dims:
                acc[n] += vecs[n].to(self.dtype)
            self.count[key] = self.count.get(key, 0) + other.count[key]
        return self

    def transformed(self, suffix: Mapping[str, torch.Tensor]) -> "SourcePhaseSums":
        """The sums with every embedding mapped e ↦ S e (local -> final)."""
        out = SourcePhaseSums(self.dims)
        out.count = dict(self.count)
        # each layer's matrix cast once, not once per key: a p x p float64 copy per (key, layer)
        # left the allocator's heap fragmented at GBs (measured with bench/scale.py)
        keys = sorted(self.sum)
        out.sum = {k: {} for k in keys}
        for n in self.dims:
            S = suffix[n].to(self.dtype)
            if not keys:
                continue
            mapped = torch.stack([self.sum[k][n] for k in keys]) @ S.T  # rows v ↦ S v
            for i, k in enumerate(keys):
                out.sum[k][n] = mapped[i].clone()
            del S, mapped
        return out

    def add_vectors(self, other: "SourcePhaseSums") -> "SourcePhaseSums":
        """Add other's vectors key by key, counts unchanged: the momentum term R_b·Σβ₁^(b−t)u
        of the same occurrences (docs/method.md §7, Segments)."""
        for key, vecs in other.sum.items():
            acc = self.sum.get(key)
            if acc is None:  # a key only the other has: its vectors, no occurrences of its own
                acc = self.sum[key] = {n: torch.zeros(p, dtype=self.dtype) for n, p in self.dims.items()}
                self.count[key] = 0
            for n in self.dims:
                acc[n] += vecs[n].to(self.dtype)
        return self

    def scaled(self, factor: float) -> "SourcePhaseSums":
        """The sums times a scalar, counts unchanged."""
        out = SourcePhaseSums(self.dims)
        out.count = dict(self.count)
        out.sum = {k: {n: factor * v[n] for n in self.dims} for k, v in self.sum.items()}
        return out

    def by_source(self) -> dict[str, dict[str, torch.Tensor]]:
        """Phases summed: source -> layer -> embedding."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for (source, _), vecs in self.sum.items():
            acc = out.setdefault(source, {n: torch.zeros(p, dtype=self.dtype) for n, p in self.dims.items()})
            for n in self.dims:
                acc[n] += vecs[n]
        return out

    def to_table(self) -> pa.Table:
        keys = sorted(self.sum)
        cols = {"source": pa.array([k[0] for k in keys], pa.string()),
                "phase": pa.array([k[1] for k in keys], pa.int64()),
                "n_occurrences": pa.array([self.count[k] for k in keys], pa.int64())}
        for n, p in self.dims.items():
            flat = np.concatenate([self.sum[k][n].double().numpy() for k in keys]) if keys else np.zeros(0)
            cols[n] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float64()), p)
        return pa.table(cols)

    @classmethod
    def from_table(cls, table: pa.Table, dims: Mapping[str, int]) -> "SourcePhaseSums":
        out = cls(dims)
        sources, phases = table["source"].to_pylist(), table["phase"].to_pylist()
        counts = table["n_occurrences"].to_pylist()
        mats = {n: torch.from_numpy(table[n].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, p).copy()).to(out.dtype)
                for n, p in out.dims.items()}
        for i, key in enumerate(zip(sources, phases)):
            out.count[key] = counts[i]
            out.sum[key] = {n: mats[n][i].clone() for n in out.dims}
        return out


def chain_sums_forward(K: Mapping[str, torch.Tensor], local: SourcePhaseSums,
                       prev: tuple | None = None,
                       R_loc: Mapping[str, torch.Tensor] | None = None, carry: SourcePhaseSums | None = None,
                       length: int = 0, momentum: float = 0.0, Q_loc: Mapping[str, torch.Tensor] | None = None,
                       v_carry: SourcePhaseSums | None = None, beta2: float = 0.0,
                       C_loc: Mapping[str, torch.Tensor] | None = None,
                       D_loc: Mapping[str, torch.Tensor] | None = None) -> tuple:
    """One link of the forward scan that finalises the per-(source, phase) sums without any
    suffix matrix (docs/method.md §4, §7). Summed over segments the final sums are
    Σ_ℓ S_ℓ x_ℓ + R_{b_ℓ} c_ℓ (x: segment ℓ's local sums, c: its Σ β₁^(b−t) u), and by
    Horner's rule from the first segment on

        y_ℓ = K_ℓ y_{ℓ-1} + x_ℓ + R^loc_ℓ d_ℓ,    d_{ℓ+1} = β₁^(b_ℓ - a_ℓ) d_ℓ + c_ℓ,    y_{-1} = d_0 = 0

    so y_{n-1} is the total: one matrix times the block of sum vectors per layer and segment.
    ``prev`` is the previous link's (y_{ℓ-1}, d_ℓ) (None for the first segment); returns
    (y_ℓ, d_{ℓ+1}), d None without momentum. With the second-moment response (``beta2`` > 0,
    Q^loc and ``v_carry`` = Σ β₂^(b−t) y) the same again for Q, subtracted:
    y_ℓ -= Q^loc_ℓ q_ℓ, q_{ℓ+1} = β₂^(b_ℓ - a_ℓ) q_ℓ + v_carry_ℓ, and the link is (y, d, q).
    Under embed.momentum_curvature the segment's link has a full lower row [C_ℓ, D_ℓ] and c its
    carried rows' sums: d_{ℓ+1} = C_ℓ y_{ℓ-1} + D_ℓ d_ℓ + c_ℓ."""
    y_prev = prev[0] if prev is not None else SourcePhaseSums(local.dims)
    y = y_prev.transformed(K)
    y.merge(local)
    d_out = None
    if momentum:
        d_in = prev[1] if prev is not None else SourcePhaseSums(local.dims)
        y.add_vectors(d_in.transformed(R_loc))
        if D_loc is not None:
            d_out = y_prev.transformed(C_loc).add_vectors(d_in.transformed(D_loc)).add_vectors(carry)
        else:
            d_out = d_in.scaled(momentum ** length).add_vectors(carry)
    if not beta2:
        return y, d_out
    q_in = prev[2] if prev is not None else SourcePhaseSums(local.dims)
    y.add_vectors(q_in.transformed(Q_loc).scaled(-1.0))
    return y, d_out, q_in.scaled(beta2 ** length).add_vectors(v_carry)
