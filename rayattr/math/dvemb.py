"""Data Value Embedding: the backward recursion and influence checkpointing.

Pure tensor math (Wang et al., ICLR 2025, Algorithms 1 and 2; conventions and the AdamW
extension in docs/method.md). Everything distributed in rayattr -- segment actors, the
reducer, queries -- calls into here, and the in-memory :func:`data_value_embeddings` is built
from the same pieces: one step (:meth:`SegmentRecursion.step`), the chain across segments
(:func:`compose_links`, the associative operation of the suffix scan for matrices, along
:func:`suffix_scan`'s rounds across the actors; :func:`carry_back` for Q;
:func:`chain_vectors_back`, one link for a test vector) and one finalisation per form
(:func:`finalise_step`, :func:`finalise_scores`). Every tensor argument is a dict layer name ->
tensor.

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

Curvature through the momentum (optional; docs/method.md §7): a perturbation of θ_t changes
the gradient at t, and the momentum spends that change over every later step, as it spends
an occurrence's gradient. So the exact K of the linearised run is
    K_t          alpha_t I - Σ_i (R_t u_i) g_iᵀ   (= alpha_t I - E_tᵀ G_t, E the step's embeddings)
rather than alpha_t I - eta_t Σ u gᵀ, which spends it all at once. [K, R] then moves as a pair,
[K_t, R_t] = [K_{t+1}, R_{t+1}] M_t with a full 2×2 block M_t, so a segment also sweeps from
[K, R] = [0, I] at its end (C, D below) and every occurrence has a second local row D^loc_t u,
what R at the segment's end acts on (β₁^(b-t) u with the momentum-free K).

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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import torch

Layers = Mapping[str, torch.Tensor]
"""Layer name -> tensor."""
T = TypeVar("T")


# ----------------------------------------------------------------------------- one step


def momentum_weight(momentum: float, step: int) -> float:
    """c_t = (1 - beta1) / (1 - beta1^(t+1)): the share of step t's gradient in its own bias-corrected
    momentum m̂_t (1 without momentum). ``step`` is Adam's 0-based step, so its counter is t + 1."""
    if momentum == 0.0:
        return 1.0
    return (1.0 - momentum) / (1.0 - momentum ** (step + 1))


def clipped_step_rows(grads: Layers, updates: Layers) -> dict[str, torch.Tensor]:
    """A clipped step's update rows (docs/method.md §7, "Clipping"): the step moves along
    κ ḡ with κ = c/‖ḡ‖, so a sample's weight turns it rather than lengthening it, and its
    response is κ (I − ĝĝᵀ) g (under AdamW P κ (I − ĝĝᵀ) g), not κ g:

        ũ_i = u_i − ū ⟨g_i, ḡ⟩ / ‖ḡ‖²,    ḡ = mean_i g_i,  ū = mean_i u_i  (u = g under SGD)

    over the step's whole global batch, the inner products summed over every layer. Taken in
    the rows' own (projected) space: a projection's error common to g, ḡ and the test gradient
    then scales both terms alike. K's curvature term Σ ũ gᵀ is (I − ĝĝᵀ) Σ u gᵀ, the clip's
    Jacobian, so the same rows serve the recursion and the values. κ itself stays in η."""
    gbar = {n: g.mean(0) for n, g in grads.items()}
    norm2 = sum(float(x.double() @ x.double()) for x in gbar.values())
    if norm2 == 0.0:
        return dict(updates)
    share = sum(g.double() @ gbar[n].double() for n, g in grads.items()) / norm2  # (B,): ⟨g_i, ḡ⟩/‖ḡ‖²
    return {n: u - share.to(u.dtype)[:, None] * u.mean(0) for n, u in updates.items()}


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
    momentum_curvature: bool = False
    """K's curvature term through the momentum, alpha K - R Σ u gᵀ (module docstring); needs
    momentum > 0 (without it the two K's are one) and is not combined with beta2."""
    last_step: int | None = field(init=False, default=None)
    """The last step fed (steps must decrease)."""
    carried: dict[str, torch.Tensor] | None = field(init=False, default=None)
    """With momentum, the last step's rows that R at the segment's end acts on: D^loc_t u under
    momentum_curvature, else β₁^(b-t) u (b - t the steps fed so far)."""

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
        if self.momentum_curvature and self.beta2:
            raise ValueError("momentum_curvature is not combined with v's response (beta2 > 0)")
        self.momentum_curvature = bool(self.momentum_curvature and self.momentum)
        # the sweep from [K, R] = [0, I] at the segment's end: C = ∂K/∂R_b, D = ∂R/∂R_b
        self._c_stacks = ({p: torch.zeros_like(K) for p, K in self._stacks.items()}
                          if self.momentum_curvature else None)
        self._d_stacks = ({p: torch.eye(p, dtype=self.dtype, device=self.device).repeat(len(self._groups[p]), 1, 1)
                           for p in self._stacks} if self.momentum_curvature else None)
        self._fed = 0  # steps fed: b - t after step t

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

    @property
    def C(self) -> dict[str, torch.Tensor] | None:
        """Layer -> ∂K/∂R_b, K's response to R at the segment's end (views); None unless
        momentum_curvature, where it is 0."""
        return self._unstack(self._c_stacks) if self._c_stacks is not None else None

    @property
    def D(self) -> dict[str, torch.Tensor] | None:
        """Layer -> ∂R/∂R_b (views); None unless momentum_curvature, where it is β₁^(b-t) I."""
        return self._unstack(self._d_stacks) if self._d_stacks is not None else None

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
        self._fed += 1
        out: dict[str, torch.Tensor] = {}
        carried: dict[str, torch.Tensor] = {}
        for p, names in self._groups.items():
            K = self._stacks[p]
            G = self._stack(grads, names, p)
            U = G if updates is None else self._stack(updates, names, p)
            C = CU = None
            if curvature is not None:
                C = self._stack(curvature, names, p)
                CU = C if curvature_updates is None else self._stack(curvature_updates, names, p)
            rows = batch_size if batch_size is not None else G.shape[1]  # |B_t| of the sampled-label scale
            if self.momentum_curvature:
                scale = rows / C.shape[1] if C is not None and C.shape[1] else 0.0
                weight = momentum_weight(self.momentum, step) * eta
                E = self._momentum_step(K, self._r_stacks[p], U, G, C, CU, scale, weight, decay)
                E2 = self._momentum_step(self._c_stacks[p], self._d_stacks[p], U, G, C, CU, scale, weight, decay)
                for i, n in enumerate(names):
                    out[n], carried[n] = E[i], E2[i]
                continue
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
                m = C.shape[1]
                KC = torch.matmul(K, CU.transpose(1, 2)) if m else None  # (L,p,m), before the decay
                _decay(K, decay)
                if m:
                    K.sub_(eta * rows / m * torch.matmul(KC, C))
            for i, n in enumerate(names):
                out[n] = E[i]
                if self._r_stacks is not None:
                    carried[n] = self.momentum ** self._fed * U[i]
        self.carried = carried if self._r_stacks is not None else None
        return out

    def _momentum_step(self, K, R, U, G, C, CU, scale: float, weight: float, decay: float) -> torch.Tensor:
        """One step of the pair [K, R] under momentum_curvature, in place: R_t = c_t eta_t K_{t+1}
        + beta1 R_{t+1}, then K_t = alpha_t K_{t+1} - R_t Σ u gᵀ (the sampled rows' (B/m) Σ û ĝᵀ
        with curvature). Returns the rows R_t u (L, B, p)."""
        R.mul_(self.momentum).add_(K, alpha=weight)
        E = torch.matmul(U, R.transpose(1, 2))
        _decay(K, decay)
        if C is None:
            K.sub_(torch.matmul(E.transpose(1, 2), G))
        elif C.shape[1]:
            K.sub_(scale * torch.matmul(torch.matmul(R, CU.transpose(1, 2)), C))
        return E

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


# ----------------------------------------------------------------------------- one segment, in memory


def segment_embeddings(
    grads: Sequence[Layers],
    step_sizes: Sequence[float],
    curvature: Sequence[Layers] | None = None,
    batch_sizes: Sequence[int] | None = None,
    updates: Sequence[Layers] | None = None,
    curvature_updates: Sequence[Layers] | None = None,
    momentum: float = 0.0,
    decay: Sequence[float] | None = None,
    first_step: int = 0,
    v_rows: Sequence[Layers] | None = None,
    beta2: float = 0.0,
    momentum_curvature: bool = False,
    carried: list | None = None,
) -> tuple[list[dict[str, torch.Tensor]], SegmentRecursion]:
    """Algorithm 2's work unit in memory: one segment's backward sweep, :meth:`SegmentRecursion.step`
    over its steps from the last to the first (a segment actor runs the same steps, reading them
    from the store).

    The per-step arguments are as in :func:`data_value_embeddings`, for this segment's steps
    only; ``first_step`` is the global 0-based index of the first one (the momentum's bias
    correction depends on it). Returns (local embeddings per step, the finished recursion): its
    ``K``, ``R`` (None without momentum), ``C``, ``D`` (None unless ``momentum_curvature``) and
    ``Q`` (None without beta2) are what :func:`segment_combine` chains. ``carried``, a list,
    receives each step's :attr:`SegmentRecursion.carried` rows (None without momentum). All are in the compute dtype: the input's for
    float32/float64, float32 for half precision.
    """
    T = len(grads)
    _check_lengths(grads, step_sizes, curvature, updates=updates, curvature_updates=curvature_updates,
                   decay=decay, batch_sizes=batch_sizes, v_rows=v_rows)
    first = grads[0]
    rec = SegmentRecursion({n: t.shape[1] for n, t in first.items()}, dtype=_dtype(first),
                           device=_device(first), momentum=momentum, beta2=beta2,
                           momentum_curvature=momentum_curvature)
    embs: list[dict[str, torch.Tensor]] = [None] * T  # type: ignore[list-item]
    rows: list = [None] * T
    for t in range(T - 1, -1, -1):
        embs[t] = rec.step(
            grads[t], float(step_sizes[t]), _at(curvature, t), _at(batch_sizes, t),
            step=first_step + t, updates=_at(updates, t), curvature_updates=_at(curvature_updates, t),
            decay=float(decay[t]) if decay is not None else 1.0, v_rows=_at(v_rows, t),
        )
        rows[t] = rec.carried
    if carried is not None:
        carried.extend(rows)
    return embs, rec


# ----------------------------------------------------------------------------- chaining the segments
#
# The matrix chain is a scan of one associative operation (compose_links): the segment actors
# run it along suffix_scan's rounds (rayattr/embed/segment.py, rayattr/pipeline/stages.py),
# the in-memory reference below in order. The vector chain is one link at a time.


def carry_back(S: Layers, X_loc: Layers, x_end: Layers, carry: float,
               dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """A carried matrix (R with beta1, Q with beta2) at a segment's start from its local one
    and its value at the segment's end (docs/method.md §7, Segments):

        X_{a_ℓ} = S_ℓ X^loc_{a_ℓ} + carry X_{b_ℓ},    carry = beta^(b_ℓ - a_ℓ)

    (:func:`compose_links` for R, :func:`carried_ends` for Q). X^loc is cast to ``dtype``;
    S and X_{b_ℓ} are taken as they are."""
    return {n: S[n] @ X_loc[n].to(dtype) + carry * x_end[n] for n in S}


class Link(NamedTuple):
    """An element of the suffix scan across segments (docs/method.md §4): segment ℓ's own

        M_ℓ = [[K_ℓ, R^loc_ℓ], [0, c_ℓ I]],    c_ℓ = β₁^(b_ℓ - a_ℓ)

    or a product M_j ⋯ M_i of consecutive ones (later segments on the left), which keeps that
    form. Right-multiplying the row block [S_ℓ, R_{b_ℓ}] by M_ℓ gives [S_{ℓ-1}, R_{b_{ℓ-1}}]
    (S_{ℓ-1} = S_ℓ K_ℓ, R_{a_ℓ} = S_ℓ R^loc_ℓ + c_ℓ R_{b_ℓ}), so segment ℓ's
    (S_ℓ, R_{b_ℓ}) is the (S, R) of M_{n-1} ⋯ M_{ℓ+1} (the identity for the last segment).
    With the curvature through the momentum the lower row is full, M_ℓ = [[K_ℓ, R^loc_ℓ],
    [C_ℓ, D_ℓ]] (module docstring), and C, D are kept."""

    S: dict[str, torch.Tensor]
    """The K block: a product of segment matrices, layer -> (p, p)."""
    R: dict[str, torch.Tensor] | None
    """The R block, layer -> (p, p); None without momentum (nothing crosses a segment's end)."""
    carry: float
    """c: β₁ to the power of the steps covered."""
    Q: dict[str, torch.Tensor] | None = None
    """The Q block of v's response (docs/method.md §7), carried like R with β₂: M gains a row
    and column [[K, R, Q], [0, c I, 0], [0, 0, c₂ I]]; None without it."""
    carry_q: float = 1.0
    """c₂: β₂ to the power of the steps covered."""
    C: dict[str, torch.Tensor] | None = None
    """The lower-left block, layer -> (p, p); None: 0 (the momentum-free K)."""
    D: dict[str, torch.Tensor] | None = None
    """The lower-right block, layer -> (p, p); None: c I."""


def segment_link(
    K: Layers,
    R_loc: Layers | None = None,
    length: int = 0,
    momentum: float = 0.0,
    dtype: torch.dtype = torch.float64,
    Q_loc: Layers | None = None,
    beta2: float = 0.0,
    C_loc: Layers | None = None,
    D_loc: Layers | None = None,
) -> Link:
    """Segment ℓ's own element M_ℓ of the suffix scan from its K_ℓ, local R^loc_ℓ (and Q^loc_ℓ
    of v's response) and its steps b_ℓ - a_ℓ, cast to ``dtype`` (float64 across the segment
    actors, the K's in :func:`segment_combine`). R is dropped without momentum, Q without β₂;
    C and D (the recursion's, under momentum_curvature) make the lower row full."""
    momentum, beta2 = check_momentum(momentum), check_momentum(beta2, "beta2")
    S = {n: k.to(dtype) for n, k in K.items()}
    R = {n: r.to(dtype) for n, r in R_loc.items()} if momentum and R_loc is not None else None
    Q = {n: q.to(dtype) for n, q in Q_loc.items()} if beta2 and Q_loc is not None else None
    full = R is not None and C_loc is not None and D_loc is not None
    C = {n: c.to(dtype) for n, c in C_loc.items()} if full else None
    D = {n: d.to(dtype) for n, d in D_loc.items()} if full else None
    return Link(S, R, momentum ** int(length), Q, beta2 ** int(length), C, D)


def compose_links(later: Link, earlier: Link) -> Link:
    """The scan's associative operation, the block product M_later M_earlier:

        (S₁, R₁, c₁) ∘ (S₂, R₂, c₂) = (S₁ S₂,  S₁ R₂ + c₂ R₁,  c₁ c₂)

(and Q with c₂ = β₂^steps the same way as R, under v's response)

    one p × p product per layer (two with momentum). ``later`` covers the later segments.
    Both carry R or neither. Used by :func:`segment_combine` in order, and by the segment
    actors along :func:`suffix_scan`'s rounds, so no process holds every K (docs/method.md §4)."""
    if (later.R is None) != (earlier.R is None):
        raise ValueError("compose_links: both links carry R (momentum) or neither does")
    if (later.Q is None) != (earlier.Q is None):
        raise ValueError("compose_links: both links carry Q (v's response) or neither does")
    if (later.D is None) != (earlier.D is None):
        raise ValueError("compose_links: both links have the full lower row (momentum_curvature) or neither does")
    if later.D is not None:  # [[K₁, R₁], [C₁, D₁]] [[K₂, R₂], [C₂, D₂]]
        return Link({n: later.S[n] @ earlier.S[n] + later.R[n] @ earlier.C[n] for n in earlier.S},
                    {n: later.S[n] @ earlier.R[n] + later.R[n] @ earlier.D[n] for n in earlier.S},
                    later.carry * earlier.carry, None, 1.0,
                    {n: later.C[n] @ earlier.S[n] + later.D[n] @ earlier.C[n] for n in earlier.S},
                    {n: later.C[n] @ earlier.R[n] + later.D[n] @ earlier.D[n] for n in earlier.S})
    S = {n: later.S[n] @ earlier.S[n] for n in earlier.S}
    R = None if earlier.R is None else carry_back(later.S, earlier.R, later.R, earlier.carry, _dtype(S))
    Q = None if earlier.Q is None else carry_back(later.S, earlier.Q, later.Q, earlier.carry_q, _dtype(S))
    return Link(S, R, later.carry * earlier.carry, Q, later.carry_q * earlier.carry_q)


def suffix_scan(items: Sequence[T], combine: Callable[[int, T, T], T], width: int | None = None) -> list[T]:
    """Inclusive suffix scan: item i of the result is items[n-1] ∘ ⋯ ∘ items[i]. Every combine
    is ``combine(i, x_later, x_i)`` and replaces item i's partial x_i; item i's combines come
    in order, and the combines of one round depend only on earlier ones.

    ``width``: how many combines can run at once (the devices the actors share; None: one per
    item). With width ≥ n it is Hillis–Steele: ⌈log2 n⌉ rounds, in the round of stride s every
    i with i + s < n takes x_{i+s} ∘ x_i. With width w < n the items are cut into w contiguous
    blocks: each block's suffix products in order (the blocks side by side), the blocks' firsts
    by Hillis–Steele across the blocks, then every other item composed with the next block's
    first: about 2n combines, 2(⌈n/w⌉ - 1) + ⌈log2 w⌉ combine times on the w devices
    (:func:`scan_rounds`), where Hillis–Steele's n log n would queue on them. Width 1 is the
    plain sequential chain.

    Only the schedule is here: :func:`compose_links` is the operation (:func:`segment_combine`
    runs it at width 1), and the driver's combine submits it to the segment actor that owns
    item i as a Ray task on object refs (the driver holds refs only). Hillis–Steele rather than
    a work-efficient (Blelloch) scan with one device per actor (the default): its n log n
    combines cost no more wall time there, and it has half the rounds."""
    parts = list(items)
    n = len(parts)
    if n < 2:
        return parts
    w = n if width is None else max(1, min(int(width), n))
    bounds = [n * b // w for b in range(w + 1)]  # block b: [bounds[b], bounds[b + 1])
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # 1. each block from its end
        for i in range(hi - 2, lo - 1, -1):
            parts[i] = combine(i, parts[i + 1], parts[i])
    firsts, stride = bounds[:-1], 1
    while stride < w:  # 2. Hillis–Steele over the blocks' firsts (all of the items at width n)
        prev = list(parts)
        for b in range(w - stride):
            i = firsts[b]
            parts[i] = combine(i, prev[firsts[b + stride]], prev[i])
        stride *= 2
    for b in range(w - 1):  # 3. the later blocks' product into the rest of each block
        for i in range(bounds[b] + 1, bounds[b + 1]):
            parts[i] = combine(i, parts[bounds[b + 1]], parts[i])
    return parts


def scan_rounds(n: int, width: int | None = None) -> int:
    """The critical path of :func:`suffix_scan` over n items on ``width`` devices (None: one per
    item), in combine times: its rounds at full width; at most that where blocks are uneven."""
    w = n if width is None else max(1, min(int(width), n))
    if n <= 1:
        return 0
    return 2 * (-(-n // w) - 1) + math.ceil(math.log2(w)) if w > 1 else n - 1


def segment_combine(
    Ks: Sequence[Layers],
    Rs: Sequence[Layers] | None = None,
    lengths: Sequence[int] | None = None,
    momentum: float = 0.0,
    Cs: Sequence[Layers] | None = None,
    Ds: Sequence[Layers] | None = None,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor] | None]]:
    """Chain all segments in memory: (S_ℓ, R_{b_ℓ}) for every segment ℓ, by :func:`suffix_scan`
    of :func:`compose_links` at width 1, i.e. from the last segment backwards (n - 2 combines,
    the fewest in one process), in the K's dtype.

    Ks: each segment's K (layer -> (p, p)), earliest segment first.
    Rs: each segment's local R at its first step (``SegmentRecursion.R``); only read with momentum.
    lengths: steps in each segment (b - a); only read with momentum.
    Cs, Ds: each segment's C and D (``SegmentRecursion.C``, ``.D``) under momentum_curvature.
    Returns the suffix products S_ℓ = K_{n-1} ⋯ K_{ℓ+1} (identity for the last) and the global
    R at each segment's end (zero for the last; all None without momentum: nothing is carried
    across segments).
    """
    momentum = check_momentum(momentum)
    n = len(Ks)
    if momentum and (Rs is None or lengths is None or len(Rs) != n or len(lengths) != n):
        raise ValueError("with momentum, segment_combine needs one local R and one length per segment")
    suffixes: list[dict[str, torch.Tensor]] = [None] * n  # type: ignore[list-item]
    r_ends: list[dict[str, torch.Tensor] | None] = [None] * n
    if not n:
        return suffixes, r_ends
    dtype = next(iter(Ks[-1].values())).dtype
    suffixes[-1] = {m: torch.eye(k.shape[0], dtype=k.dtype, device=k.device) for m, k in Ks[-1].items()}
    if momentum:
        r_ends[-1] = {m: torch.zeros_like(k) for m, k in Ks[-1].items()}
    own = [segment_link(Ks[ell], Rs[ell] if momentum else None, lengths[ell] if momentum else 0, momentum, dtype,
                        C_loc=_at(Cs, ell), D_loc=_at(Ds, ell))
           for ell in range(1, n)]
    for ell, link in enumerate(suffix_scan(own, lambda i, later, mine: compose_links(later, mine), width=1)):
        suffixes[ell], r_ends[ell] = link.S, link.R  # M_{n-1} ⋯ M_{ℓ+1}
    return suffixes, r_ends


def carried_ends(suffixes: Sequence[Layers], locals_: Sequence[Layers], lengths: Sequence[int],
                 beta: float) -> list[dict[str, torch.Tensor]]:
    """The global value at each segment's end of a carried matrix (Q with beta2; R comes with
    :func:`segment_combine`), by :func:`carry_back` backwards from zero after the last segment."""
    dtype = next(iter(suffixes[-1].values())).dtype
    x_end = {n: torch.zeros_like(S) for n, S in suffixes[-1].items()}
    ends: list[dict[str, torch.Tensor]] = [None] * len(suffixes)  # type: ignore[list-item]
    for ell in range(len(suffixes) - 1, -1, -1):
        ends[ell] = x_end
        x_end = carry_back(suffixes[ell], locals_[ell], x_end, beta ** int(lengths[ell]), dtype)
    return ends


def chain_vectors_back(
    K: Layers,
    w: Layers,
    R_loc: Layers | None = None,
    z: Layers | None = None,
    length: int = 0,
    momentum: float = 0.0,
    C_loc: Layers | None = None,
    D_loc: Layers | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """One link of the vector chain (docs/method.md §4, §7), segment ℓ's :class:`Link`
    transposed and applied to one test vector v: from segment ℓ's (w_ℓ, z_ℓ) and its own K_ℓ,
    R^loc_ℓ, the pair of segment ℓ-1:

        w_{ℓ-1} = K_ℓᵀ w_ℓ,    z_{ℓ-1} = R^locᵀ_ℓ w_ℓ + β₁^(b_ℓ - a_ℓ) z_ℓ

    (with the full lower row C, D of momentum_curvature: w_{ℓ-1} = K_ℓᵀ w_ℓ + C_ℓᵀ z_ℓ,
    z_{ℓ-1} = R^locᵀ_ℓ w_ℓ + D_ℓᵀ z_ℓ)

    where w_ℓ = S_ℓᵀ v and z_ℓ = R_{b_ℓ}ᵀ v, so a value is v·(S_ℓ e + β₁^(b-t) R_b u) =
    e·w_ℓ + β₁^(b-t) u·z_ℓ without ever forming S_ℓ or R_b. O(p²) per layer. ``z`` is None
    without momentum (nothing crosses a segment's end). Computed in w's dtype.
    """
    if check_momentum(momentum) and R_loc is not None and D_loc is not None:
        zd = z if z is not None else {n: torch.zeros_like(v) for n, v in w.items()}
        return ({n: K[n].to(v.dtype).T @ v + C_loc[n].to(v.dtype).T @ zd[n] for n, v in w.items()},
                {n: R_loc[n].to(v.dtype).T @ v + D_loc[n].to(v.dtype).T @ zd[n] for n, v in w.items()})
    w_prev = {n: K[n].to(v.dtype).T @ v for n, v in w.items()}
    if not check_momentum(momentum) or R_loc is None:
        return w_prev, None
    return w_prev, carry_vectors_back(R_loc, w, z, length, momentum)


def carry_vectors_back(X_loc: Layers, w: Layers, x: Layers | None, length: int, beta: float) -> dict[str, torch.Tensor]:
    """The vector form of :func:`carry_back` for one test vector v: from segment ℓ's w_ℓ = S_ℓᵀ v
    and x_ℓ = X_{b_ℓ}ᵀ v (None: zero, ℓ the last), segment ℓ-1's

        x_{ℓ-1} = X^locᵀ_ℓ w_ℓ + beta^(b_ℓ - a_ℓ) x_ℓ

    (z with R and beta1, :func:`chain_vectors_back`; the second-moment response's z_Q with Q and
    beta2). Computed in w's dtype."""
    carry = beta ** int(length)
    Xd = x if x is not None else {n: torch.zeros_like(v) for n, v in w.items()}
    return {n: X_loc[n].to(v.dtype).T @ v + carry * Xd[n] for n, v in w.items()}


def vector_chain(
    Ks: Sequence[Layers],
    test_grad: Layers,
    Rs: Sequence[Layers] | None = None,
    lengths: Sequence[int] | None = None,
    momentum: float = 0.0,
    Cs: Sequence[Layers] | None = None,
    Ds: Sequence[Layers] | None = None,
) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]]:
    """(w_ℓ, z_ℓ) for every segment ℓ, by :func:`chain_vectors_back` from the last backwards:
    w_{n-1} = v, z_{n-1} = 0. The vector form of :func:`segment_combine` for one test vector v:
    w_ℓ = S_ℓᵀ v and z_ℓ = R_{b_ℓ}ᵀ v (None without momentum)."""
    momentum = check_momentum(momentum)
    if momentum and (Rs is None or lengths is None):
        raise ValueError("with momentum, vector_chain needs one local R and one length per segment")
    n = len(Ks)
    out: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]] = [None] * n  # type: ignore[list-item]
    w = dict(test_grad)
    z = {k: torch.zeros_like(v) for k, v in w.items()} if momentum else None
    for ell in range(n - 1, -1, -1):
        out[ell] = (w, z)
        if ell:
            w, z = chain_vectors_back(Ks[ell], w, Rs[ell] if momentum else None, z,
                                      lengths[ell] if momentum else 0, momentum, _at(Cs, ell), _at(Ds, ell))
    return out


# ----------------------------------------------------------------------------- finalising a step


def finalise_step(
    local: Layers,
    suffix: Layers,
    r_end: Layers | None = None,
    updates: Layers | None = None,
    momentum: float = 0.0,
    steps_to_end: int | None = None,
    v_rows: Layers | None = None,
    q_end: Layers | None = None,
    beta2: float = 0.0,
    carried: Layers | None = None,
) -> dict[str, torch.Tensor]:
    """Final embeddings of one step's occurrences from their local ones (docs/method.md §4, §7).

    local: the step's local embeddings (R^loc_t u, or eta_t K g for SGD), layer -> (B, p).
    suffix, r_end: S_ℓ and R at the segment's end (a :class:`Link`'s S and R, :func:`segment_combine`).
    updates: the step's update rows u (its gradient rows when there is no preconditioner).
    steps_to_end: b - t, the steps from this one to the segment's end.
    v_rows, q_end, beta2: the second-moment response's rows y, Q at the segment's end and beta2.
    carried: the step's rows D^loc_t u under momentum_curvature (``SegmentRecursion.carried``),
        which R_b acts on in place of beta1^(b - t) u.
    Returns S_ℓ e + beta1^(b - t) R_b u - beta2^(b - t) Q_b y per row; without momentum and
    second-moment response just S_ℓ e.
    """
    out = {n: local[n] @ suffix[n].T.to(local[n].dtype) for n in local}  # rows e ↦ S e
    carries = []
    if momentum and r_end is not None and carried is not None:
        carries.append((carried, r_end, 1.0, "carried"))
    elif momentum and r_end is not None:
        carries.append((updates, r_end, momentum ** int(steps_to_end) if steps_to_end is not None else None, "update"))
    if beta2 and q_end is not None:
        carries.append((v_rows, q_end, -beta2 ** int(steps_to_end) if steps_to_end is not None else None, "v"))
    for rows, end, carry, what in carries:
        if rows is None or carry is None:
            raise ValueError(f"carrying across segments, finalise_step needs the step's {what} rows and steps_to_end")
        out = {n: e + carry * (rows[n].to(e.dtype) @ end[n].T.to(e.dtype)) for n, e in out.items()}
    return out


def finalise_scores(
    local: Layers,
    w: Layers,
    z: Layers | None = None,
    updates: Layers | None = None,
    momentum: float = 0.0,
    steps_to_end: int | None = None,
    v_rows: Layers | None = None,
    zq: Layers | None = None,
    beta2: float = 0.0,
    carried: Layers | None = None,
) -> dict[str, torch.Tensor]:
    """Per layer, each row's value v·(S e + β₁^(b-t) R_b u - β₂^(b-t) Q_b y) = e·w + β₁^(b-t) u·z
    - β₂^(b-t) y·z_Q, from the vector chain's (w, z) of the segment (:func:`chain_vectors_back`)
    and, with the second-moment response, z_Q = Q_bᵀ v (:func:`carry_vectors_back`) and the
    step's rows y, in w's dtype: the vector form of :func:`finalise_step`; (B,) per layer. Under
    momentum_curvature the ``carried`` rows D^loc_t u take β₁^(b-t) u's place."""
    out = {n: local[n].to(w[n].dtype) @ w[n] for n in local}
    carries = []
    if check_momentum(momentum) and z is not None and carried is not None:
        out = {n: s + carried[n].to(z[n].dtype) @ z[n] for n, s in out.items()}
    elif check_momentum(momentum) and z is not None:
        carries.append((updates, z, momentum, 1.0, "update"))
    if check_momentum(beta2, "beta2") and zq is not None:
        carries.append((v_rows, zq, beta2, -1.0, "v"))  # the response's sign: -Q y (docs/method.md §7)
    for rows, x, beta, sign, what in carries:
        if rows is None or steps_to_end is None:
            raise ValueError(f"carrying across segments, finalise_scores needs the step's {what} rows and steps_to_end")
        carry = sign * beta ** int(steps_to_end)
        out = {n: s + carry * (rows[n].to(x[n].dtype) @ x[n]) for n, s in out.items()}
    return out


# ----------------------------------------------------------------------------- public API


def data_value_embeddings(
    grads: Sequence[Layers],
    step_sizes: Sequence[float] | torch.Tensor,
    segments: int = 1,
    curvature: Sequence[Layers] | None = None,
    batch_sizes: Sequence[int] | None = None,
    updates: Sequence[Layers] | None = None,
    curvature_updates: Sequence[Layers] | None = None,
    momentum: float = 0.0,
    decay: Sequence[float] | torch.Tensor | None = None,
    v_rows: Sequence[Layers] | None = None,
    beta2: float | None = None,
    momentum_curvature: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """DVEmb(t, z) for every occurrence of every step, in memory: what the segment actors and
    the reducer compute, as the same composition (:func:`segment_embeddings` per segment,
    :func:`segment_combine`, :func:`finalise_step` per step).

    grads: list over steps t of dicts layer -> Tensor (B_t, p_layer).
    step_sizes: per-sample effective step size eta_t of each step.
    segments: number of influence-checkpoint segments (result is independent of it up to rounding).
    curvature: None (empirical Fisher of ``grads``), or list over steps of pseudo-gradient rows
        layer -> (m_t, p), with H_t = (B_t / m_t) Σ ĝ ĝᵀ.
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
    momentum_curvature: K's curvature term through the momentum (module docstring).
    Returns Σ_{s≥t} w_{t,s} eta_s K_{s+1→} u (- Q_t y with v_rows) per occurrence
    (docs/method.md §7), layer -> (B_t, p) in the input dtype. With the defaults this is SGD's
    eta_t K_{t+1→} g.
    """
    T = len(grads)
    if T == 0:
        return []
    steps = _floats(step_sizes)
    decays = _floats(decay) if decay is not None else None
    momentum = check_momentum(momentum)
    _check_lengths(grads, steps, curvature, updates=updates, curvature_updates=curvature_updates,
                   decay=decays, batch_sizes=batch_sizes, v_rows=v_rows)
    if (v_rows is None) != (beta2 is None):
        raise ValueError("v_rows (the second-moment response) and beta2 go together")
    beta2 = check_momentum(beta2, "beta2") if beta2 is not None else 0.0
    if v_rows is not None and not beta2:
        raise ValueError("the second-moment response needs beta2 in (0, 1), got 0")
    bounds = segment_bounds(T, segments)
    pieces = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    locals_, Ks, Rs, Qs, Cs, Ds, carried = [], [], [], [], [], [], []
    for sl in pieces:
        e, rec = segment_embeddings(grads[sl], steps[sl], _part(curvature, sl), _part(batch_sizes, sl),
                                    _part(updates, sl), _part(curvature_updates, sl), momentum,
                                    _part(decays, sl), sl.start, v_rows=_part(v_rows, sl), beta2=beta2,
                                    momentum_curvature=momentum_curvature, carried=carried)
        locals_.append(e)
        Ks.append(rec.K)
        Rs.append(rec.R)
        Qs.append(rec.Q)
        Cs.append(rec.C)
        Ds.append(rec.D)
    lengths = [sl.stop - sl.start for sl in pieces]
    full = Ds[0] is not None  # momentum_curvature with momentum: the finalisation takes the carried rows
    suffixes, r_ends = segment_combine(Ks, Rs, lengths, momentum, Cs, Ds)
    q_ends = carried_ends(suffixes, Qs, lengths, beta2) if beta2 else [None] * len(pieces)
    rows = updates if updates is not None else grads  # u, which momentum carries across segments
    out: list[dict[str, torch.Tensor]] = []
    for sl, e_seg, S, r_end, q_end in zip(pieces, locals_, suffixes, r_ends, q_ends):
        out.extend(finalise_step(e, S, r_end, rows[t], momentum, sl.stop - t,
                                 v_rows[t] if v_rows is not None else None, q_end, beta2,
                                 carried[t] if full else None)
                   for t, e in zip(range(sl.start, sl.stop), e_seg))
    # half-precision inputs were computed in float32; hand back what was given
    given = {n: t.dtype for n, t in grads[0].items()}
    return [{n: t.to(given[n]) for n, t in e.items()} for e in out]


def _floats(x: Sequence[float] | torch.Tensor) -> list[float]:
    return [float(s) for s in (x.tolist() if isinstance(x, torch.Tensor) else x)]


def _part(seq, sl: slice):
    return seq[sl] if seq is not None else None


def _at(seq, t: int):
    return seq[t] if seq is not None else None


def segment_bounds(num_steps: int, segments: int) -> list[int]:
    """Split [0, num_steps) into ``segments`` contiguous ranges of near-equal length (fewer when
    there are fewer steps): the segments' bounds, and the training phases' edges."""
    if segments < 1:
        raise ValueError(f"segments must be >= 1, got {segments}")
    segments = min(segments, num_steps) if num_steps else 1
    return [round(i * num_steps / segments) for i in range(segments + 1)]


def influence(embeddings: Sequence[Layers] | Layers, test_grads: Layers) -> list[torch.Tensor] | torch.Tensor:
    """Predicted increase of each test loss if an occurrence is removed (+ = helpful).

    embeddings: one step's dict layer -> (B, p), or a list of them.
    test_grads: dict layer -> (p,) or (n_test, p); layers are summed.
    Returns (B,) / (B, n_test) per step, matching the input nesting.
    """
    if isinstance(embeddings, (list, tuple)):
        return [influence(e, test_grads) for e in embeddings]
    unknown = set(embeddings) - set(test_grads)
    if unknown:
        raise KeyError(f"test gradients missing for layers {sorted(unknown)}")
    total = None
    for n, e in embeddings.items():
        g = test_grads[n].to(e.dtype)
        s = e @ g.T if g.ndim == 2 else e @ g
        total = s if total is None else total + s
    return total


# ----------------------------------------------------------------------------- helpers


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
