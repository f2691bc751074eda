"""Data Value Embedding: the backward recursion and influence checkpointing.

Pure tensor math (Wang et al., ICLR 2025, Algorithms 1 and 2; conventions in docs/method.md).
Everything distributed in rayattr -- segment actors, the reducer, queries -- calls into here.

Notation, per layer (layers are independent: block-diagonal curvature):
    g            a recorded per-sample gradient row (p,)
    eta_t        per-sample step size at step t (lr_t / |B_t| for a mean loss)
    H_t          curvature at step t: Σ g gᵀ over the batch (empirical Fisher, the paper), or
                 (|B_t|/m_t) Σ ĝ ĝᵀ over sampled-label pseudo-gradients (docs/method.md §3)
    K_{t→}       Π_{k=t}^{T-1} (I - eta_k H_k), later steps on the left
    DVEmb(t, z)  eta_t K_{t+1→} g_z

We carry K itself rather than M = I - K: the two are the same memory traffic, and with the
empirical Fisher K Gᵀ is just the transposed embeddings, so a step costs two (B×p)(p×p)
products either way, and the sampled-label curvature shares the code path.

Sign: influence = ∇ℓ_test · DVEmb = predicted *increase* of the test loss if the occurrence
is removed (positive = helpful).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

Grads = torch.Tensor | Mapping[str, torch.Tensor]


# ----------------------------------------------------------------------------- one segment


@dataclass
class SegmentRecursion:
    """Backward sweep over one influence-checkpoint segment, one step at a time.

    Feed steps in *decreasing* order with :meth:`step`; each call returns the local embeddings
    ``eta_t K_{t+1→t_end} g`` of that step's samples. After the first step of the segment has
    been fed, :attr:`K` holds the segment matrix ``Π_{t∈segment} (I - eta_t H_t)``.

    Layers with the same width are stacked and processed with one batched matmul.
    """

    dims: Mapping[str, int]
    """Layer name -> projected gradient width p."""
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    last_step: int | None = field(init=False, default=None)
    """The last step fed (steps must decrease)."""

    def __post_init__(self) -> None:
        self.dims = dict(self.dims)
        # group layer names by width: one (L, p, p) stack per group
        self._groups: dict[int, list[str]] = {}
        for name, p in self.dims.items():
            self._groups.setdefault(int(p), []).append(name)
        self._stacks = {
            p: torch.eye(p, dtype=self.dtype, device=self.device).repeat(len(names), 1, 1)
            for p, names in self._groups.items()
        }

    @property
    def K(self) -> dict[str, torch.Tensor]:
        """Layer -> product Π (I - eta_t H_t) over the steps fed so far (views, not copies)."""
        return {n: self._stacks[p][i] for p, names in self._groups.items() for i, n in enumerate(names)}

    def step(
        self,
        grads: Mapping[str, torch.Tensor],
        eta: float,
        curvature: Mapping[str, torch.Tensor] | None = None,
        batch_size: int | None = None,
        step: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Process one training step (the next earlier one) and return its local embeddings.

        grads: layer -> (B, p) per-sample gradients of this step's samples.
        curvature: layer -> (m, p) pseudo-gradient rows, H = (batch_size / m) Σ ĝ ĝᵀ;
            None uses the empirical Fisher of ``grads`` itself.
        batch_size: |B_t| for the sampled-label scale; defaults to the rows in ``grads``.
        step: optional global step index, checked to be strictly decreasing.
        """
        if step is not None:
            if self.last_step is not None and step >= self.last_step:
                raise ValueError(f"steps must be fed in decreasing order: got {step} after {self.last_step}")
            self.last_step = step
        missing = set(self.dims) - set(grads)
        if missing:
            raise KeyError(f"gradients missing for layers {sorted(missing)}")
        out: dict[str, torch.Tensor] = {}
        for p, names in self._groups.items():
            K = self._stacks[p]
            G = torch.stack([_as(grads[n], self.dtype, self.device, p, n) for n in names])  # (L,B,p)
            E = eta * torch.matmul(G, K.transpose(1, 2))  # (L,B,p): eta K g per row
            if curvature is None:
                # K Gᵀ = Eᵀ / eta, so K ← K - eta K Gᵀ G = K - Eᵀ G
                K.sub_(torch.matmul(E.transpose(1, 2), G))
            else:
                C = torch.stack([_as(curvature[n], self.dtype, self.device, p, n) for n in names])
                m = C.shape[1]
                if m:
                    scale = eta * (batch_size if batch_size is not None else G.shape[1]) / m
                    KC = torch.matmul(K, C.transpose(1, 2))  # (L,p,m)
                    K.sub_(scale * torch.matmul(KC, C))
            for i, n in enumerate(names):
                out[n] = E[i]
        return out


def _as(x: torch.Tensor, dtype: torch.dtype, device, p: int, name: str) -> torch.Tensor:
    if x.ndim != 2 or x.shape[1] != p:
        raise ValueError(f"layer {name!r}: expected rows of width {p}, got shape {tuple(x.shape)}")
    return x.to(device=device, dtype=dtype)


def segment_embeddings(
    grads: Sequence[Grads],
    step_sizes: Sequence[float],
    curvature: Sequence[Grads] | None = None,
    batch_sizes: Sequence[int] | None = None,
) -> tuple[list[Grads], Grads]:
    """Algorithm 2's work unit: local embeddings and K of one segment (steps given in order).

    Returns (embeddings in the input structure, K as Tensor or dict layer -> (p, p)), both in
    the compute dtype: the input's for float32/float64, float32 for half precision (they are
    intermediate results, still to be multiplied by the later segments' K).
    """
    single = isinstance(grads[0], torch.Tensor) if grads else False
    gl = [_layers(g) for g in grads]
    cl = [_layers(c) for c in curvature] if curvature is not None else None
    _check_lengths(gl, step_sizes, cl)
    first = gl[0]
    rec = SegmentRecursion({n: t.shape[1] for n, t in first.items()}, dtype=_dtype(first), device=_device(first))
    embs: list[dict[str, torch.Tensor]] = [None] * len(gl)  # type: ignore[list-item]
    for t in range(len(gl) - 1, -1, -1):
        bs = batch_sizes[t] if batch_sizes is not None else None
        embs[t] = rec.step(gl[t], float(step_sizes[t]), cl[t] if cl is not None else None, bs)
    K = rec.K
    if single:
        return [e["_"] for e in embs], K["_"]
    return embs, K


# ----------------------------------------------------------------------------- combination


def suffix_products(Ks: Sequence[Grads]) -> list[Grads]:
    """S_ℓ = K_{n-1} ⋯ K_{ℓ+1} for each segment ℓ (identity for the last): the factor that
    turns segment ℓ's local embeddings into final ones. Later segments multiply on the left."""
    if not Ks:
        return []
    single = isinstance(Ks[0], torch.Tensor)
    layers = [_layers(k) for k in Ks]
    out: list[dict[str, torch.Tensor]] = [None] * len(layers)  # type: ignore[list-item]
    acc = {n: torch.eye(k.shape[0], dtype=k.dtype, device=k.device) for n, k in layers[-1].items()}
    for ell in range(len(layers) - 1, -1, -1):
        out[ell] = acc
        acc = {n: acc[n] @ layers[ell][n] for n in acc}
    return [o["_"] for o in out] if single else out


def apply_suffix(local: Grads, suffix: Grads) -> Grads:
    """Final embeddings from local ones: rows e ↦ S e (i.e. E Sᵀ)."""
    if isinstance(local, torch.Tensor):
        return local @ suffix.T.to(local.dtype)
    return {n: local[n] @ suffix[n].T.to(local[n].dtype) for n in local}


# ----------------------------------------------------------------------------- public API


def data_value_embeddings(
    grads: Sequence[Grads],
    step_sizes: Sequence[float] | torch.Tensor,
    segments: int = 1,
    curvature: Sequence[Grads] | None = None,
    batch_sizes: Sequence[int] | None = None,
) -> list[Grads]:
    """DVEmb(t, z) for every occurrence of every step.

    grads: list over steps t of Tensor (B_t, p), or of dict layer -> Tensor (B_t, p_layer).
    step_sizes: per-sample effective step size eta_t of each step.
    segments: number of influence-checkpoint segments (result is independent of it up to rounding).
    curvature: None (empirical Fisher of ``grads``), or list over steps of pseudo-gradient rows
        (m_t, p) / dicts of them, with H_t = (B_t / m_t) Σ ĝ ĝᵀ.
    batch_sizes: B_t for the sampled-label scale (default: rows of grads[t]).
    Returns the same structure as grads, in the input dtype.
    """
    T = len(grads)
    if T == 0:
        return []
    steps = [float(s) for s in (step_sizes.tolist() if isinstance(step_sizes, torch.Tensor) else step_sizes)]
    _check_lengths(grads, steps, curvature)
    bounds = segment_bounds(T, segments)
    locals_, Ks = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        e, K = segment_embeddings(
            grads[a:b], steps[a:b],
            curvature[a:b] if curvature is not None else None,
            batch_sizes[a:b] if batch_sizes is not None else None,
        )
        locals_.append(e)
        Ks.append(K)
    out: list[Grads] = []
    for e_seg, S in zip(locals_, suffix_products(Ks)):
        out.extend(apply_suffix(e, S) for e in e_seg)
    # half-precision inputs were computed in float32; hand back what was given
    given = {n: t.dtype for n, t in _layers(grads[0]).items()}
    if isinstance(out[0], torch.Tensor):
        return [e.to(given["_"]) for e in out]
    return [{n: t.to(given[n]) for n, t in e.items()} for e in out]


def segment_bounds(num_steps: int, segments: int) -> list[int]:
    """Split [0, num_steps) into ``segments`` contiguous ranges of near-equal length."""
    if segments < 1:
        raise ValueError(f"segments must be >= 1, got {segments}")
    segments = min(segments, num_steps) if num_steps else 1
    return [round(i * num_steps / segments) for i in range(segments + 1)]


def influence(embeddings: Sequence[Grads] | Grads, test_grads: Grads) -> list[torch.Tensor] | torch.Tensor:
    """Predicted increase of each test loss if an occurrence is removed (+ = helpful).

    embeddings: one step's Tensor (B, p) / dict, or a list of them.
    test_grads: (p,) or (n_test, p), or dict layer -> such; layers are summed.
    Returns (B,) / (B, n_test) per step, matching the input nesting.
    """
    if isinstance(embeddings, (list, tuple)):
        return [influence(e, test_grads) for e in embeddings]
    E, G = _layers(embeddings), _layers(test_grads)
    unknown = set(E) - set(G)
    if unknown:
        raise KeyError(f"test gradients missing for layers {sorted(unknown)}")
    total = None
    for n, e in E.items():
        g = G[n].to(e.dtype)
        s = e @ g.T if g.ndim == 2 else e @ g
        total = s if total is None else total + s
    return total


def sum_by_key(rows: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum rows sharing a key (e.g. all-epochs sum per sample, or per source).

    Returns (unique keys sorted, summed rows). Works for values (N,) or embeddings (N, p).
    """
    uniq, inv = torch.unique(keys, return_inverse=True)
    out = torch.zeros((len(uniq),) + tuple(rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    out.index_add_(0, inv.to(rows.device), rows)
    return uniq, out


# ----------------------------------------------------------------------------- helpers


def _layers(x: Grads) -> dict[str, torch.Tensor]:
    return {"_": x} if isinstance(x, torch.Tensor) else dict(x)


def _dtype(d: Mapping[str, torch.Tensor]) -> torch.dtype:
    dt = next(iter(d.values())).dtype
    return dt if dt in (torch.float32, torch.float64) else torch.float32


def _device(d: Mapping[str, torch.Tensor]) -> torch.device:
    return next(iter(d.values())).device


def _check_lengths(grads, steps, curvature) -> None:
    if len(steps) != len(grads):
        raise ValueError(f"{len(grads)} steps of gradients but {len(steps)} step sizes")
    if curvature is not None and len(curvature) != len(grads):
        raise ValueError(f"{len(grads)} steps of gradients but {len(curvature)} steps of curvature rows")
