"""Data Value Embedding: the backward recursion and influence checkpointing.

Pure tensor math (Wang et al., ICLR 2025, Algorithms 1 and 2; conventions and the AdamW
extension in docs/method.md). Everything distributed in rayattr -- segment actors, the
reducer, queries -- calls into here.

Notation, per layer (layers are independent: block-diagonal curvature):
    g            a recorded per-sample gradient row (p,)
    eta_t        per-sample step size at step t (lr_t / |B_t| for a mean loss)
    H_t          curvature at step t: Σ g gᵀ over the batch (empirical Fisher, the paper), or
                 (|B_t|/m_t) Σ ĝ ĝᵀ over sampled-label pseudo-gradients (docs/method.md §3)
    K_{t→}       Π_{k=t}^{T-1} (I - eta_k H_k), later steps on the left
    DVEmb(t, z)  eta_t K_{t+1→} g_z

AdamW (docs/method.md §7): u = P_t g is the occurrence's update direction (P the frozen
preconditioner), alpha_t = 1 - lr_t λ the decoupled decay and beta1 the momentum. Then
    K_t          alpha_t I - eta_t Σ u gᵀ   (sampled-label: alpha_t I - eta_t (|B_t|/m_t) Σ û ĝᵀ)
    w_{t,s}      (1 - beta1) beta1^(s-t) / (1 - beta1^(s+1))   momentum weights, bias-corrected
    DVEmb(t, z)  Σ_{s≥t} w_{t,s} eta_s K_{s+1→} u_z = R_t u_z
    R_t          c_t eta_t K_{t+1→} + beta1 R_{t+1},  c_t = (1 - beta1)/(1 - beta1^(t+1)),  R_T = 0
With beta1 = 0 R_t is eta_t K_{t+1→}, so R is only carried when there is momentum.

Second-moment response (optional; docs/method.md §7, "v's response"): removing an occurrence
also lowers Adam's v for every later step, which raises later steps' P. To first order, with
D_t = m̂_t ⊙ P_t² / √v̂_t frozen at the occurrence's step and y = D_t ⊙ ḡ_t ⊙ g its row,
    DVEmb(t, z) -= Q_t y_z,   Q_t = c2_t eta_t K_{t+1→} + beta2 Q_{t+1},  c2_t = (1 - beta2)/(1 - beta2^(t+1))
Q has R's shape and recursion with beta2 in place of beta1; beta2 = 0 (the default) leaves v frozen.

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


def momentum_weight(momentum: float, step: int) -> float:
    """c_t = (1 - beta1) / (1 - beta1^(t+1)): the share of step t's gradient in its own bias-corrected
    momentum m̂_t (1 without momentum). ``step`` is Adam's 0-based step, so its counter is t + 1."""
    if momentum == 0.0:
        return 1.0
    return (1.0 - momentum) / (1.0 - momentum ** (step + 1))


@dataclass
class SegmentRecursion:
    """Backward sweep over one influence-checkpoint segment, one step at a time.

    Feed steps in *decreasing* order with :meth:`step`; each call returns the local embeddings
    of that step's samples: ``eta_t K_{t+1→t_end} g`` for SGD, ``R_t u`` for AdamW. After the
    first step of the segment has been fed, :attr:`K` holds the segment matrix
    ``Π_{t∈segment} K_t`` and :attr:`R` the segment's local R at its first step (both are
    what :func:`segment_combine` needs).

    Layers with the same width are stacked and processed with one batched matmul.
    """

    dims: Mapping[str, int]
    """Layer name -> projected gradient width p."""
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    momentum: float = 0.0
    """Adam's beta1; > 0 carries R next to K and needs each step's index (bias correction)."""
    beta2: float = 0.0
    """Adam's beta2 for the second-moment response; > 0 carries Q next to K and needs each
    step's ``v_rows`` (0: v frozen, no Q)."""
    last_step: int | None = field(init=False, default=None)
    """The last step fed (steps must decrease)."""

    def __post_init__(self) -> None:
        self.dims = dict(self.dims)
        self.momentum = check_momentum(self.momentum)
        self.beta2 = check_momentum(self.beta2, "beta2")
        # group layer names by width: one (L, p, p) stack per group
        self._groups: dict[int, list[str]] = {}
        for name, p in self.dims.items():
            self._groups.setdefault(int(p), []).append(name)
        self._stacks = {
            p: torch.eye(p, dtype=self.dtype, device=self.device).repeat(len(names), 1, 1)
            for p, names in self._groups.items()
        }
        # R starts at R_{t_end} = 0 (local to the segment); without momentum it is eta K, not stored
        self._r_stacks = {
            p: torch.zeros_like(K) for p, K in self._stacks.items()
        } if self.momentum else None
        self._q_stacks = {p: torch.zeros_like(K) for p, K in self._stacks.items()} if self.beta2 else None

    @property
    def K(self) -> dict[str, torch.Tensor]:
        """Layer -> product of the step Jacobians K_t over the steps fed so far (views, not copies)."""
        return self._unstack(self._stacks)

    @property
    def R(self) -> dict[str, torch.Tensor] | None:
        """Layer -> local R at the last step fed (views); None without momentum, where it is not
        needed to combine segments."""
        return self._unstack(self._r_stacks) if self._r_stacks is not None else None

    @property
    def Q(self) -> dict[str, torch.Tensor] | None:
        """Layer -> local Q (the second-moment response's R) at the last step fed; None when v is frozen."""
        return self._unstack(self._q_stacks) if self._q_stacks is not None else None

    def _unstack(self, stacks) -> dict[str, torch.Tensor]:
        return {n: stacks[p][i] for p, names in self._groups.items() for i, n in enumerate(names)}

    def _stack(self, rows: Mapping[str, torch.Tensor], names: list[str], p: int) -> torch.Tensor:
        return torch.stack([_as(rows[n], self.dtype, self.device, p, n) for n in names])  # (L,B,p)

    def step(
        self,
        grads: Mapping[str, torch.Tensor],
        eta: float,
        curvature: Mapping[str, torch.Tensor] | None = None,
        batch_size: int | None = None,
        step: int | None = None,
        updates: Mapping[str, torch.Tensor] | None = None,
        curvature_updates: Mapping[str, torch.Tensor] | None = None,
        decay: float = 1.0,
        v_rows: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Process one training step (the next earlier one) and return its local embeddings.

        grads: layer -> (B, p) per-sample gradients g of this step's samples.
        curvature: layer -> (m, p) pseudo-gradient rows, H = (batch_size / m) Σ ĝ ĝᵀ;
            None uses the empirical Fisher of ``grads`` itself.
        batch_size: |B_t| for the sampled-label scale; defaults to the rows in ``grads``.
        step: global 0-based optimizer step; checked to be strictly decreasing, and required
            with momentum (its bias correction depends on it).
        updates: layer -> (B, p) update directions u = P_t g (None: SGD, u = g).
        curvature_updates: layer -> (m, p) rows P_t ĝ matching ``curvature``; required when
            both ``curvature`` and ``updates`` are given.
        decay: alpha_t = 1 - lr_t λ, the decoupled weight decay's factor in K_t.
        v_rows: layer -> (B, p) rows y = D_t ⊙ ḡ_t ⊙ g of the second-moment response; required
            with beta2 > 0, refused without it.
        """
        _check_step_inputs(self.dims, grads, curvature, updates, curvature_updates)
        if (self.momentum or self.beta2) and step is None:
            raise ValueError("with momentum, step= (the 0-based optimizer step) is required for the bias correction")
        if (v_rows is None) != (self._q_stacks is None):
            raise ValueError("v_rows (the second-moment response rows) go with beta2 > 0, and beta2 > 0 needs them")
        if v_rows is not None:
            missing = set(self.dims) - set(v_rows)
            if missing:
                raise KeyError(f"v_rows missing for layers {sorted(missing)}")
        self._check_step(step)  # last: a refused call leaves the recursion where it was
        out: dict[str, torch.Tensor] = {}
        for p, names in self._groups.items():
            K = self._stacks[p]
            G = self._stack(grads, names, p)
            U = G if updates is None else self._stack(updates, names, p)
            if self._r_stacks is None:
                E = eta * torch.matmul(U, K.transpose(1, 2))  # (L,B,p): eta K u per row
            else:
                R = self._r_stacks[p]  # R_{t+1} -> R_t = c_t eta_t K_{t+1→} + beta1 R_{t+1}
                R.mul_(self.momentum).add_(K, alpha=momentum_weight(self.momentum, step) * eta)
                E = torch.matmul(U, R.transpose(1, 2))
            if self._q_stacks is not None:
                Q = self._q_stacks[p]  # Q_t = c2_t eta_t K_{t+1→} + beta2 Q_{t+1}, before K moves on
                Q.mul_(self.beta2).add_(K, alpha=momentum_weight(self.beta2, step) * eta)
                E = E - torch.matmul(self._stack(v_rows, names, p), Q.transpose(1, 2))
            if curvature is None:
                # K_{t→} = K (alpha I - eta Uᵀ G); eta K Uᵀ is Eᵀ unless momentum changed E
                KU = (E.transpose(1, 2) if self._r_stacks is None and self._q_stacks is None
                      else eta * torch.matmul(K, U.transpose(1, 2)))
                _decay(K, decay)
                K.sub_(torch.matmul(KU, G))
            else:
                C = self._stack(curvature, names, p)
                CU = C if curvature_updates is None else self._stack(curvature_updates, names, p)
                m = C.shape[1]
                KC = torch.matmul(K, CU.transpose(1, 2)) if m else None  # (L,p,m), before the decay
                _decay(K, decay)
                if m:
                    scale = eta * (batch_size if batch_size is not None else G.shape[1]) / m
                    K.sub_(scale * torch.matmul(KC, C))
            for i, n in enumerate(names):
                out[n] = E[i]
        return out

    def _check_step(self, step: int | None) -> None:
        if step is None:
            return
        if self.last_step is not None and step >= self.last_step:
            raise ValueError(f"steps must be fed in decreasing order: got {step} after {self.last_step}")
        self.last_step = step


def _decay(K: torch.Tensor, decay: float) -> None:
    if decay != 1.0:  # SGD leaves K untouched, bit for bit
        K.mul_(decay)


def check_momentum(momentum: float, what: str = "momentum (Adam's beta1)") -> float:
    """A decay rate (beta1, beta2) as a float in [0, 1), or a ValueError."""
    beta = float(momentum)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {momentum!r}")
    return beta


def _check_step_inputs(dims, grads, curvature, updates, curvature_updates) -> None:
    for what, rows in (("gradients", grads), ("updates", updates)):
        missing = set(dims) - set(rows) if rows is not None else set()
        if missing:
            raise KeyError(f"{what} missing for layers {sorted(missing)}")
    if curvature is not None and updates is not None and curvature_updates is None:
        raise ValueError("curvature and updates need curvature_updates (the rows P_t ĝ matching curvature)")
    if curvature_updates is not None and (curvature is None or updates is None):
        raise ValueError("curvature_updates only go with both curvature and updates")
    if updates is not None:
        for n in dims:
            if updates[n].shape[0] != grads[n].shape[0]:
                raise ValueError(f"layer {n!r}: {updates[n].shape[0]} update rows for {grads[n].shape[0]} gradient rows")
    if curvature_updates is not None:
        for n in dims:
            if curvature_updates[n].shape[0] != curvature[n].shape[0]:
                raise ValueError(f"layer {n!r}: {curvature_updates[n].shape[0]} curvature update rows "
                                 f"for {curvature[n].shape[0]} curvature rows")


def _as(x: torch.Tensor, dtype: torch.dtype, device, p: int, name: str) -> torch.Tensor:
    if x.ndim != 2 or x.shape[1] != p:
        raise ValueError(f"layer {name!r}: expected rows of width {p}, got shape {tuple(x.shape)}")
    return x.to(device=device, dtype=dtype)


def segment_embeddings(
    grads: Sequence[Grads],
    step_sizes: Sequence[float],
    curvature: Sequence[Grads] | None = None,
    batch_sizes: Sequence[int] | None = None,
    updates: Sequence[Grads] | None = None,
    curvature_updates: Sequence[Grads] | None = None,
    momentum: float = 0.0,
    decay: Sequence[float] | None = None,
    first_step: int = 0,
) -> tuple[list[Grads], Grads, Grads | None]:
    """Algorithm 2's work unit: local embeddings, K and local R of one segment (steps in order).

    The per-step arguments are as in :func:`data_value_embeddings`, for this segment's steps
    only; ``first_step`` is the global 0-based index of the first one (momentum's bias
    correction depends on it). Returns (embeddings in the input structure, K, R) with K and R
    Tensors or dicts layer -> (p, p); R is the local R at the segment's first step, None
    without momentum. All are in the compute dtype: the input's for float32/float64, float32
    for half precision (they are intermediate results, still to be combined with later segments).
    """
    embs, rec = _sweep(grads, step_sizes, curvature, batch_sizes, updates, curvature_updates,
                       momentum, decay, first_step)
    K, R = rec.K, rec.R
    if isinstance(grads[0], torch.Tensor):
        return [e["_"] for e in embs], K["_"], R["_"] if R is not None else None
    return embs, K, R


def _sweep(grads, step_sizes, curvature, batch_sizes, updates, curvature_updates, momentum, decay,
           first_step, v_rows=None, beta2=0.0) -> tuple[list[dict[str, torch.Tensor]], SegmentRecursion]:
    """One segment's backward sweep: (local embeddings as layer dicts, the finished recursion)."""
    gl = [_layers(g) for g in grads]
    per_step = _per_step_layers(len(gl), curvature=curvature, updates=updates,
                                curvature_updates=curvature_updates, v_rows=v_rows)
    _check_lengths(gl, step_sizes, per_step["curvature"], updates=updates,
                   curvature_updates=curvature_updates, decay=decay, batch_sizes=batch_sizes, v_rows=v_rows)
    first = gl[0]
    rec = SegmentRecursion({n: t.shape[1] for n, t in first.items()}, dtype=_dtype(first),
                           device=_device(first), momentum=momentum, beta2=beta2)
    embs: list[dict[str, torch.Tensor]] = [None] * len(gl)  # type: ignore[list-item]
    for t in range(len(gl) - 1, -1, -1):
        embs[t] = rec.step(
            gl[t], float(step_sizes[t]), per_step["curvature"][t],
            batch_sizes[t] if batch_sizes is not None else None,
            step=first_step + t, updates=per_step["updates"][t],
            curvature_updates=per_step["curvature_updates"][t],
            decay=float(decay[t]) if decay is not None else 1.0,
            v_rows=per_step["v_rows"][t],
        )
    return embs, rec


def _per_step_layers(T: int, **seqs: Sequence[Grads] | None) -> dict[str, list]:
    """Each optional per-step sequence as a list of layer dicts, or of None when not given."""
    return {k: [_layers(x) for x in s] if s is not None else [None] * T for k, s in seqs.items()}


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


def segment_combine(
    Ks: Sequence[Grads],
    Rs: Sequence[Grads] | None = None,
    lengths: Sequence[int] | None = None,
    momentum: float = 0.0,
) -> tuple[list[Grads], list[Grads | None]]:
    """Chain the segments: (S_ℓ, R at the end of segment ℓ) for every segment ℓ.

    Ks: each segment's K (Tensor or dict layer -> (p, p)), earliest segment first.
    Rs: each segment's local R at its first step (from :func:`segment_embeddings` or
        ``SegmentRecursion.R``); only read with momentum.
    lengths: steps in each segment (b - a); only read with momentum.
    Returns the suffix products S_ℓ (:func:`suffix_products`) and the global R at each
    segment's end, R_{b_ℓ} (zero for the last segment), computed backwards by
    R_{a_ℓ} = S_ℓ R^loc_{a_ℓ} + beta1^(b_ℓ - a_ℓ) R_{b_ℓ}. Without momentum the second list is
    all None: nothing is carried across segments.
    """
    suffixes = suffix_products(Ks)
    momentum = check_momentum(momentum)
    if not momentum:
        return suffixes, [None] * len(Ks)
    if Rs is None or lengths is None or len(Rs) != len(Ks) or len(lengths) != len(Ks):
        raise ValueError("with momentum, segment_combine needs one local R and one length per segment")
    return suffixes, carried_ends(suffixes, Rs, lengths, momentum)


def carried_ends(suffixes: Sequence[Grads], locals_: Sequence[Grads], lengths: Sequence[int],
                 beta: float) -> list[Grads]:
    """The global value at each segment's end of a carried matrix (R with beta1, Q with beta2),
    from the segments' local ones at their first steps: X_{a_ℓ} = S_ℓ X^loc_{a_ℓ} + beta^(b_ℓ - a_ℓ) X_{b_ℓ},
    backwards from zero after the last segment."""
    single = isinstance(suffixes[0], torch.Tensor)
    x_end = {n: torch.zeros_like(S) for n, S in _layers(suffixes[-1]).items()}
    ends: list[dict[str, torch.Tensor]] = [None] * len(suffixes)  # type: ignore[list-item]
    for ell in range(len(suffixes) - 1, -1, -1):
        ends[ell] = x_end
        S, X_loc = _layers(suffixes[ell]), _layers(locals_[ell])
        carry = beta ** int(lengths[ell])
        x_end = {n: S[n] @ X_loc[n].to(S[n].dtype) + carry * x_end[n] for n in S}
    return [e["_"] for e in ends] if single else ends


def apply_suffix(local: Grads, suffix: Grads) -> Grads:
    """Final embeddings from local ones: rows e ↦ S e (i.e. E Sᵀ)."""
    if isinstance(local, torch.Tensor):
        return local @ suffix.T.to(local.dtype)
    return {n: local[n] @ suffix[n].T.to(local[n].dtype) for n in local}


def finalise_step(
    local: Grads,
    suffix: Grads,
    r_end: Grads | None = None,
    updates: Grads | None = None,
    momentum: float = 0.0,
    steps_to_end: int | None = None,
    v_rows: Grads | None = None,
    q_end: Grads | None = None,
    beta2: float = 0.0,
) -> Grads:
    """Final embeddings of one step's occurrences from their local ones.

    local: the step's local embeddings (R^loc_t u, or eta_t K g for SGD), (B, p) / dict.
    suffix, r_end: S_ℓ and R at the segment's end, as :func:`segment_combine` returns them.
    updates: the step's update rows u (its gradient rows when there is no preconditioner).
    steps_to_end: b - t, the steps from this one to the segment's end.
    v_rows, q_end, beta2: the second-moment response's rows y, Q at the segment's end and beta2.
    Returns S_ℓ e + beta1^(b - t) R_b u - beta2^(b - t) Q_b y per row; without momentum and
    second-moment response just S_ℓ e.
    """
    carries = []
    if momentum and r_end is not None:
        carries.append((updates, r_end, momentum ** int(steps_to_end) if steps_to_end is not None else None, "update"))
    if beta2 and q_end is not None:
        carries.append((v_rows, q_end, -beta2 ** int(steps_to_end) if steps_to_end is not None else None, "v"))
    if not carries:
        return apply_suffix(local, suffix)
    out = _layers(apply_suffix(local, suffix))
    for rows, end, carry, what in carries:
        if rows is None or carry is None:
            raise ValueError(f"carrying across segments, finalise_step needs the step's {what} rows and steps_to_end")
        X, M = _layers(rows), _layers(end)
        out = {n: e + carry * (X[n].to(e.dtype) @ M[n].T.to(e.dtype)) for n, e in out.items()}
    return out["_"] if isinstance(local, torch.Tensor) else out


# ----------------------------------------------------------------------------- vector chain


def chain_vectors_back(
    K: Grads,
    w: Grads,
    R_loc: Grads | None = None,
    z: Grads | None = None,
    length: int = 0,
    momentum: float = 0.0,
) -> tuple[Grads, Grads | None]:
    """One link of the vector chain (docs/method.md §4, §7): from segment ℓ's (w_ℓ, z_ℓ) and
    its own K_ℓ, R^loc_ℓ, the pair of segment ℓ-1:

        w_{ℓ-1} = K_ℓᵀ w_ℓ,    z_{ℓ-1} = R^locᵀ_ℓ w_ℓ + β₁^(b_ℓ - a_ℓ) z_ℓ

    where w_ℓ = S_ℓᵀ v and z_ℓ = R_{b_ℓ}ᵀ v, so a value is v·(S_ℓ e + β₁^(b-t) R_b u) =
    e·w_ℓ + β₁^(b-t) u·z_ℓ without ever forming S_ℓ or R_b. O(p²) per layer. ``z`` is None
    without momentum (nothing crosses a segment's end). Computed in w's dtype.
    """
    single = isinstance(w, torch.Tensor)
    Kd, Wd = _layers(K), _layers(w)
    w_prev = {n: Kd[n].to(v.dtype).T @ v for n, v in Wd.items()}
    if not check_momentum(momentum) or R_loc is None:
        return (w_prev["_"] if single else w_prev), None
    Rd = _layers(R_loc)
    Zd = _layers(z) if z is not None else {n: torch.zeros_like(v) for n, v in Wd.items()}
    carry = momentum ** int(length)
    z_prev = {n: Rd[n].to(v.dtype).T @ v + carry * Zd[n] for n, v in Wd.items()}
    return (w_prev["_"], z_prev["_"]) if single else (w_prev, z_prev)


def vector_chain(
    Ks: Sequence[Grads],
    test_grad: Grads,
    Rs: Sequence[Grads] | None = None,
    lengths: Sequence[int] | None = None,
    momentum: float = 0.0,
) -> list[tuple[Grads, Grads | None]]:
    """(w_ℓ, z_ℓ) for every segment ℓ, from the last backwards: w_{n-1} = v, z_{n-1} = 0.
    The vector form of :func:`segment_combine` for one test vector v: w_ℓ = S_ℓᵀ v and
    z_ℓ = R_{b_ℓ}ᵀ v (None without momentum)."""
    momentum = check_momentum(momentum)
    if momentum and (Rs is None or lengths is None):
        raise ValueError("with momentum, vector_chain needs one local R and one length per segment")
    n = len(Ks)
    out: list[tuple[Grads, Grads | None]] = [None] * n  # type: ignore[list-item]
    w = test_grad
    z = ({k: torch.zeros_like(v) for k, v in _layers(w).items()} if momentum else None)
    if momentum and isinstance(w, torch.Tensor):
        z = z["_"]
    for ell in range(n - 1, -1, -1):
        out[ell] = (w, z)
        if ell:
            w, z = chain_vectors_back(Ks[ell], w, Rs[ell] if momentum else None, z,
                                      lengths[ell] if momentum else 0, momentum)
    return out


def chain_suffix_back(
    K: Grads,
    S: Grads | None,
    R_loc: Grads | None = None,
    r_end: Grads | None = None,
    length: int = 0,
    momentum: float = 0.0,
) -> tuple[Grads, Grads | None]:
    """One link of the matrix scan across segment actors: from segment ℓ's S_ℓ (None: the
    identity, ℓ the last) and R_{b_ℓ} with its own K_ℓ, R^loc_ℓ, segment ℓ-1's pair

        S_{ℓ-1} = S_ℓ K_ℓ,    R_{b_{ℓ-1}} = R_{a_ℓ} = S_ℓ R^loc_ℓ + β₁^(b_ℓ - a_ℓ) R_{b_ℓ}

    (:func:`segment_combine`, one step of its loop), in float64. Only the segment that owns K_ℓ
    runs it, so no process holds every K (docs/method.md §4)."""
    single = isinstance(K, torch.Tensor)
    Kd = {n: k.to(torch.float64) for n, k in _layers(K).items()}
    Sd = _layers(S) if S is not None else {n: torch.eye(k.shape[0], dtype=torch.float64) for n, k in Kd.items()}
    s_prev = {n: Sd[n] @ Kd[n] for n in Kd}
    if not check_momentum(momentum) or R_loc is None:
        return (s_prev["_"] if single else s_prev), None
    Rd = _layers(R_loc)
    Ed = _layers(r_end) if r_end is not None else {n: torch.zeros_like(m) for n, m in Kd.items()}
    carry = momentum ** int(length)
    r_prev = {n: Sd[n] @ Rd[n].to(torch.float64) + carry * Ed[n] for n in Kd}
    return (s_prev["_"], r_prev["_"]) if single else (s_prev, r_prev)


def chain_sums_forward(
    K: Grads,
    x: Grads,
    y_prev: Grads | None = None,
    R_loc: Grads | None = None,
    d: Grads | None = None,
    c: Grads | None = None,
    length: int = 0,
    momentum: float = 0.0,
) -> tuple[Grads, Grads | None]:
    """One link of the forward scan that finalises sums of embeddings without any suffix
    matrix (docs/method.md §4, §7). Summed over segments, the final sums are
    Σ_ℓ S_ℓ x_ℓ + R_{b_ℓ} c_ℓ (x: local sums, c: Σ β₁^(b−t) u), and by Horner's rule from the
    first segment on

        y_ℓ = K_ℓ y_{ℓ-1} + x_ℓ + R^loc_ℓ d_ℓ,    d_{ℓ+1} = β₁^(b_ℓ - a_ℓ) d_ℓ + c_ℓ,    y_{-1} = d_0 = 0

    so y_{n-1} is the total: one matrix times a (keys × p) block per layer and segment, O(p²)
    per key. Tensors are (k, p) rows (one per key) or dicts of them; returns (y_ℓ, d_{ℓ+1})
    in float64, d None without momentum."""
    single = isinstance(x, torch.Tensor)
    Kd, Xd = _layers(K), _layers(x)
    f64 = torch.float64
    y = {n: Xd[n].to(f64) + (_layers(y_prev)[n].to(f64) @ Kd[n].to(f64).T if y_prev is not None else 0.0)
         for n in Xd}
    if not check_momentum(momentum) or R_loc is None:
        return (y["_"] if single else y), None
    Rd, Cd = _layers(R_loc), _layers(c)
    Dd = _layers(d) if d is not None else {n: torch.zeros_like(v, dtype=f64) for n, v in Xd.items()}
    y = {n: y[n] + Dd[n].to(f64) @ Rd[n].to(f64).T for n in y}
    carry = momentum ** int(length)
    d_next = {n: carry * Dd[n].to(f64) + Cd[n].to(f64) for n in Xd}
    return (y["_"], d_next["_"]) if single else (y, d_next)


def finalise_scores(
    local: Grads,
    w: Grads,
    z: Grads | None = None,
    updates: Grads | None = None,
    momentum: float = 0.0,
    steps_to_end: int | None = None,
) -> dict[str, torch.Tensor] | torch.Tensor:
    """Per layer, each row's value v·(S e + β₁^(b-t) R_b u) = e·w + β₁^(b-t) u·z, from the
    vector chain's (w, z) of the segment (:func:`vector_chain`), in w's dtype; (B,) per layer."""
    E, W = _layers(local), _layers(w)
    out = {n: E[n].to(W[n].dtype) @ W[n] for n in E}
    if check_momentum(momentum) and z is not None:
        if updates is None or steps_to_end is None:
            raise ValueError("with momentum, finalise_scores needs the step's update rows and steps_to_end")
        U, Z = _layers(updates), _layers(z)
        carry = momentum ** int(steps_to_end)
        out = {n: s + carry * (U[n].to(Z[n].dtype) @ Z[n]) for n, s in out.items()}
    return out["_"] if isinstance(local, torch.Tensor) else out


# ----------------------------------------------------------------------------- public API


def data_value_embeddings(
    grads: Sequence[Grads],
    step_sizes: Sequence[float] | torch.Tensor,
    segments: int = 1,
    curvature: Sequence[Grads] | None = None,
    batch_sizes: Sequence[int] | None = None,
    updates: Sequence[Grads] | None = None,
    curvature_updates: Sequence[Grads] | None = None,
    momentum: float = 0.0,
    decay: Sequence[float] | torch.Tensor | None = None,
    v_rows: Sequence[Grads] | None = None,
    beta2: float | None = None,
) -> list[Grads]:
    """DVEmb(t, z) for every occurrence of every step.

    grads: list over steps t of Tensor (B_t, p), or of dict layer -> Tensor (B_t, p_layer).
    step_sizes: per-sample effective step size eta_t of each step.
    segments: number of influence-checkpoint segments (result is independent of it up to rounding).
    curvature: None (empirical Fisher of ``grads``), or list over steps of pseudo-gradient rows
        (m_t, p) / dicts of them, with H_t = (B_t / m_t) Σ ĝ ĝᵀ.
    batch_sizes: B_t for the sampled-label scale (default: rows of grads[t]).
    updates: AdamW: list over steps, shaped like grads, of update directions u = P_t g
        (None: SGD, u = g).
    curvature_updates: the rows P_t ĝ matching ``curvature``; required when both ``curvature``
        and ``updates`` are given.
    momentum: Adam's beta1, in [0, 1). Step s (0-based position in ``grads``) uses the
        occurrence at t with weight (1 - beta1) beta1^(s-t) / (1 - beta1^(s+1)).
    decay: per step alpha_t = 1 - lr_t λ (decoupled weight decay); None: 1.
    v_rows: the second-moment response: list over steps, shaped like grads, of rows
        y = D_t ⊙ ḡ_t ⊙ g (D_t = m̂_t ⊙ P_t² / √v̂_t); needs ``beta2``. None: v frozen.
    beta2: Adam's beta2 for ``v_rows``, in (0, 1).
    Returns Σ_{s≥t} w_{t,s} eta_s K_{s+1→} u (- Q_t y with v_rows) per occurrence
    (docs/method.md §7), the same structure as grads, in the input dtype. With the defaults
    this is SGD's eta_t K_{t+1→} g.
    """
    T = len(grads)
    if T == 0:
        return []
    steps = _floats(step_sizes)
    decays = _floats(decay) if decay is not None else None
    momentum = check_momentum(momentum)
    _check_lengths(grads, steps, curvature, updates=updates, curvature_updates=curvature_updates,
                   decay=decays, batch_sizes=batch_sizes)
    if curvature is not None and updates is not None and curvature_updates is None:
        raise ValueError("curvature and updates need curvature_updates (the rows P_t ĝ matching curvature)")
    if (v_rows is None) != (beta2 is None):
        raise ValueError("v_rows (the second-moment response) and beta2 go together")
    beta2 = check_momentum(beta2, "beta2") if beta2 is not None else 0.0
    if v_rows is not None and not beta2:
        raise ValueError("the second-moment response needs beta2 in (0, 1), got 0")
    single = isinstance(grads[0], torch.Tensor)
    bounds = segment_bounds(T, segments)
    pieces = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    locals_, Ks, Rs, Qs = [], [], [], []
    for sl in pieces:
        e, rec = _sweep(grads[sl], steps[sl], _part(curvature, sl), _part(batch_sizes, sl),
                        _part(updates, sl), _part(curvature_updates, sl), momentum, _part(decays, sl),
                        sl.start, v_rows=_part(v_rows, sl), beta2=beta2)
        locals_.append(e)
        Ks.append(rec.K)
        Rs.append(rec.R)
        Qs.append(rec.Q)
    lengths = [sl.stop - sl.start for sl in pieces]
    suffixes, r_ends = segment_combine(Ks, Rs, lengths, momentum)
    q_ends = carried_ends(suffixes, Qs, lengths, beta2) if beta2 else [None] * len(pieces)
    rows = updates if updates is not None else grads  # u, which momentum carries across segments
    out: list[Grads] = []
    for sl, e_seg, S, r_end, q_end in zip(pieces, locals_, suffixes, r_ends, q_ends):
        out.extend(finalise_step(e, S, r_end, _layers(rows[t]), momentum, sl.stop - t,
                                 _layers(v_rows[t]) if v_rows is not None else None, q_end, beta2)
                   for t, e in zip(range(sl.start, sl.stop), e_seg))
    if single:
        out = [e["_"] for e in out]
    # half-precision inputs were computed in float32; hand back what was given
    given = {n: t.dtype for n, t in _layers(grads[0]).items()}
    if isinstance(out[0], torch.Tensor):
        return [e.to(given["_"]) for e in out]
    return [{n: t.to(given[n]) for n, t in e.items()} for e in out]


def _floats(x: Sequence[float] | torch.Tensor) -> list[float]:
    return [float(s) for s in (x.tolist() if isinstance(x, torch.Tensor) else x)]


def _part(seq, sl: slice):
    return seq[sl] if seq is not None else None


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


def _check_lengths(grads, steps, curvature, **per_step) -> None:
    """Every per-step argument that is given has one entry per step of gradients."""
    if len(steps) != len(grads):
        raise ValueError(f"{len(grads)} steps of gradients but {len(steps)} step sizes")
    given = {"curvature": curvature, **per_step}
    for what, seq in given.items():
        if seq is not None and len(seq) != len(grads):
            raise ValueError(f"{len(grads)} steps of gradients but {len(seq)} steps of {what}")
