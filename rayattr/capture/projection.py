"""Seeded random projections for the two factors of a layer's per-sample gradient.

A projection matrix is a pure function of (seed, layer name, side, dimension, rank, kind):
nothing about it is stored, so a test gradient computed later at the final model (another
process, another machine) regenerates exactly the matrices used during training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import torch

_KINDS = ("gaussian", "rademacher")


@dataclasses.dataclass(frozen=True)
class ProjectionSpec:
    """How per-sample gradients are compressed: G (d_out x d_in+1) -> P_s G P_a^T (r_s x r_a)."""

    rank: int = 16
    """Default rank for both sides (r_a = r_s = rank unless overridden below)."""
    seed: int = 0
    """Seed mixed with the layer name and shape; same seed -> same matrices everywhere."""
    kind: str = "gaussian"
    """"gaussian": entries N(0, 1/r); "rademacher": entries +-1/sqrt(r)."""
    rank_in: int | None = None
    """Override for r_a, the rank of the activation (input) side."""
    rank_out: int | None = None
    """Override for r_s, the rank of the output-gradient side."""
    mix: int | None = None
    """Follow the Kronecker projection with a dense random one of its r_s·r_a numbers to `mix`
    (p = mix per layer): a Kronecker projection errs by about 1/√r where one side's factors are
    aligned across samples, a dense one by 1/√p (docs/method.md §5); the dense step acts on the
    r_s·r_a numbers, not on the layer's d_out·d_in."""
    members: int = 1
    """Independent estimates in one run: each layer is projected `members` times, member j with
    matrices of its own (seeded by `member_name(layer, j)`), and each member is valued apart;
    their mean is the value and their spread its standard error (docs/method.md §8)."""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"ProjectionSpec.kind must be one of {_KINDS}, got {self.kind!r}")
        for field in ("rank", "rank_in", "rank_out", "mix", "members"):
            value = getattr(self, field)
            if value is None and field != "rank":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ProjectionSpec.{field} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"ProjectionSpec.seed must be an int, got {self.seed!r}")

    @property
    def r_in(self) -> int:
        """Rank r_a of the activation side."""
        return self.rank_in if self.rank_in is not None else self.rank

    @property
    def r_out(self) -> int:
        """Rank r_s of the output-gradient side."""
        return self.rank_out if self.rank_out is not None else self.rank

    @property
    def dim(self) -> int:
        """Projected gradient size per layer: p = r_s * r_a, or `mix`."""
        return self.mix if self.mix is not None else self.r_in * self.r_out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict for run manifests."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProjectionSpec":
        """Inverse of `to_dict`; rejects unknown keys so a typo in a manifest is not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ProjectionSpec fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


MEMBER_SEP = "~"


def member_name(layer: str, member: int) -> str:
    """The name member `member` of a layer's projection is captured, stored and seeded under:
    the layer's own for member 0 (a one-member run is the run it always was), `layer~j` else."""
    return layer if member == 0 else f"{layer}{MEMBER_SEP}{member}"


def member_of(name: str) -> tuple[str, int]:
    """(layer, member) of a captured name: the inverse of `member_name`."""
    base, sep, j = name.rpartition(MEMBER_SEP)
    if sep and j.isdigit() and int(j) > 0:
        return base, int(j)
    return name, 0


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from a sha256 of the parts (Python's hash() is salted per process). torch's
    CPU generator keeps only its low 32 bits, which sha256 mixes as well as the rest."""
    payload = json.dumps([str(p) for p in parts]).encode()
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little") & ((1 << 63) - 1)


def random_matrix(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """(rows x cols) float32 CPU matrix, entries N(0, 1/rows) or +-1/sqrt(rows), so E[P^T P] = I."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scale = 1.0 / math.sqrt(rows)
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=gen, dtype=torch.float32) * scale
    if kind == "rademacher":
        signs = torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.int8)
        return (signs.to(torch.float32) * 2.0 - 1.0) * scale
    raise ValueError(f"unknown projection kind {kind!r}; expected one of {_KINDS}")


def projection_matrices(
    spec: ProjectionSpec, name: str, d_in_aug: int, d_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_a, P_s) for layer `name`: P_a is (r_a x d_in_aug), P_s is (r_s x d_out), float32 on CPU.

    d_in_aug counts the bias column (d_in + 1 for a layer with bias). The side ("in"/"out") is
    part of the seed so the two factors are independent even when their shapes coincide.
    """
    if d_in_aug <= 0 or d_out <= 0:
        raise ValueError(f"layer {name!r}: dimensions must be positive, got d_in_aug={d_in_aug}, d_out={d_out}")
    p_a = random_matrix(spec.kind, spec.r_in, d_in_aug, stable_seed(spec.seed, name, "in", d_in_aug, spec.r_in))
    p_s = random_matrix(spec.kind, spec.r_out, d_out, stable_seed(spec.seed, name, "out", d_out, spec.r_out))
    return p_a, p_s


def mixing_matrix(spec: ProjectionSpec, name: str) -> torch.Tensor:
    """The dense second stage of layer `name`'s projection, (mix x r_s·r_a), float32 on CPU,
    entries as `random_matrix` draws them, so that E[MᵀM] = I."""
    if spec.mix is None:
        raise ValueError("mixing_matrix needs a ProjectionSpec with mix set")
    width = spec.r_in * spec.r_out
    return random_matrix(spec.kind, spec.mix, width, stable_seed(spec.seed, name, "mix", width, spec.mix))
