"""GradientCapture: per-sample (projected) gradients of Linear / Conv1D layers via hooks.

How a forward is paired with its backward: the forward hook projects the layer input and
registers a hook on that call's *output tensor*, closing over the projected input. Autograd
fires that hook with exactly this call's output gradient, so pairing needs no shared
stack, and a forward that is never backpropagated (evaluation inside the block) leaves
nothing behind: the closure is freed with its graph.

Update rows whose preconditioner is known only after the step (AdamW's P_t needs the step's
own v_t): with `defer_updates=True` each hooked call keeps its raw factors (the layer's input
and output gradient) until `finish_updates(P)` projects them; until then they cost about what
the layer's saved input and output gradient cost during the backward.

Micro-batches: forward calls are numbered by micro-batch (a new one starts at the first
forward after any backward hook has fired, or on `next_micro_batch()`). Calls of the same
module within one micro-batch (a reused layer) are summed, as the parameter's gradient is.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterable, Iterator

import torch
from torch import nn

from . import kernels
from .background import BackgroundWorker
from .layers import LayerInfo, layer_info, select_layers
from .precondition import Preconditioner, Response
from .projection import ProjectionSpec, member_name, mixing_matrix, projection_matrices


class _Layer:
    """One hooked module, or one member of its projection (ProjectionSpec.members): its shapes
    and its projection matrices, cached per device/dtype. `info.name` is the captured name
    (the member's); `base` the module's, under which its preconditioner and response come."""

    def __init__(self, info: LayerInfo, module: nn.Module, spec: ProjectionSpec | None, base: str | None = None,
                 member: int = 0):
        self.info = info
        self.module = module
        self.base = base or info.name
        self.member = member
        self.spec = spec
        self._cpu: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cache: dict[tuple[torch.device, torch.dtype], tuple] = {}
        self.handle = None
        self.preconditioner: Preconditioner | None = None
        self._update_cache: dict[tuple[torch.device, torch.dtype], tuple] = {}
        self._mix_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def dim(self) -> int:
        if self.spec is None:
            return self.info.d_out * self.info.d_in_aug
        return self.spec.dim

    def matrices(self, device: torch.device, dtype: torch.dtype):
        """(P_a without bias column, P_a's bias column or None, P_s) on device in dtype."""
        key = (device, dtype)
        cached = self._cache.get(key)
        if cached is None:
            if self._cpu is None:
                self._cpu = projection_matrices(self.spec, self.info.name, self.info.d_in_aug, self.info.d_out)
            p_a, p_s = (m.to(device=device, dtype=dtype) for m in self._cpu)
            d = self.info.d_in
            bias_col = p_a[:, d].contiguous() if self.info.has_bias else None
            cached = (p_a[:, :d].contiguous(), bias_col, p_s.contiguous())
            self._cache[key] = cached
        return cached

    def mixed(self, rows: torch.Tensor) -> torch.Tensor:
        """Projected rows (B, r_s·r_a) through the projection's dense second stage, when it has
        one (ProjectionSpec.mix): (B, mix). Linear, so it commutes with every sum over calls."""
        if self.spec is None or self.spec.mix is None:
            return rows
        key = (rows.device, rows.dtype)
        m = self._mix_cache.get(key)
        if m is None:
            m = self._mix_cache[key] = mixing_matrix(self.spec, self.info.name).to(device=rows.device, dtype=rows.dtype)
        return rows @ m.T

    def set_preconditioner(self, pre: Preconditioner | None) -> None:
        if pre is not None:
            _check_preconditioner(self.info, pre, exact=self.spec is None)
        self.preconditioner = pre
        self._update_cache = {}

    def update_matrices(self, device: torch.device, dtype: torch.dtype):
        """The projections of the update row: P_a's columns scaled by γ, P_s's by ρ, so that
        (a ⊙ γ) P_aᵀ and (δ ⊙ ρ) P_sᵀ cost what the raw projections cost."""
        key = (device, dtype)
        cached = self._update_cache.get(key)
        if cached is None:
            cached = kernels.scale_projections(*self.matrices(device, dtype), self.preconditioner.rho,
                                               self.preconditioner.gamma)
            self._update_cache[key] = cached
        return cached


def _check_preconditioner(info: LayerInfo, pre: Preconditioner, exact: bool) -> None:
    shapes = {"rho": (pre.rho, (info.d_out,)), "gamma": (pre.gamma, (info.d_in_aug,))}
    if exact:
        if pre.full is None:
            raise ValueError(f"layer {info.name!r}: exact capture (projection=None) needs the full "
                             "diagonal preconditioner (adam_preconditioner(..., full=True))")
        shapes["full"] = (pre.full, (info.d_out, info.d_in_aug))
    for what, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"layer {info.name!r}: preconditioner {what} has shape {tuple(t.shape)}, expected {shape}")


class _Pending:
    """What a forward call leaves for its backward: the (projected) a-factor and context."""

    __slots__ = ("micro", "generation", "a_factor", "mask", "batch", "compute_dtype", "out_dtype", "consumed",
                 "update", "deferred_a")

    def __init__(self, micro, generation, a_factor, mask, batch, compute_dtype, out_dtype):
        self.consumed = False  # set by the first backward through this call's output
        # (projected a-factor of the update row, ρ-scaled P_s) or (None, flattened full diagonal)
        # when a preconditioner is set: the one in force at the forward is the one the backward uses
        self.update: tuple | None = None
        # the raw input (projected mode) or True (exact mode) when the update row waits for P
        self.deferred_a: torch.Tensor | bool | None = None
        self.micro = micro
        self.generation = generation
        self.a_factor = a_factor
        self.mask = mask
        self.batch = batch
        self.compute_dtype = compute_dtype
        self.out_dtype = out_dtype


class _Deferred:
    """One hooked call's factors kept for its update row until the step's P is known."""

    __slots__ = ("layer", "micro", "a", "ds", "mask", "compute_dtype", "out_dtype", "scale")

    def __init__(self, layer, micro, a, ds, mask, compute_dtype, out_dtype, scale):
        self.layer, self.micro, self.a, self.ds, self.mask = layer, micro, a, ds, mask
        self.compute_dtype, self.out_dtype, self.scale = compute_dtype, out_dtype, scale


class GradientCapture:
    """Capture per-sample gradients of each selected layer while the model trains.

    Usage::

        cap = GradientCapture(model, projection=ProjectionSpec(rank=16, seed=0))
        with cap:                          # hooks live only inside the block
            per_sample_losses.sum().backward()
        grads = cap.gradients()            # {layer name: (B, p_layer) tensor}

    Args:
        model: the module to hook (pass the unwrapped model, e.g. a DeepSpeed engine's
            `.module`, so layer names, and therefore projections, match at test time).
        projection: a ProjectionSpec, or None for exact per-sample gradients
            G = sum_s ds_s [a_s, 1]^T of shape (d_out, d_in+1), flattened row-major.
        layers: None for every trainable Linear/Conv1D, or fnmatch patterns on module names.
        loss_scale: the backpropagated loss equals loss_scale * sum of per-sample losses
            (mean over B -> 1/B; fp16 dynamic scale S -> times S); gradients are divided by it.
            May be changed between backwards.
        mask: optional (B, S) padding mask; tokens where it is 0/False contribute nothing.
        background: run the backward-side projections on a worker thread instead of the
            autograd thread (None: only for CUDA gradients). Off by default: on an H100 it
            did not measurably lower the overhead (see bench/capture_overhead.py --background).
        preconditioner: {layer name: Preconditioner} (see `set_preconditioner`), or None.
        defer_updates: forwards made without a preconditioner keep their factors for update
            rows formed later by `finish_updates` (the P of a step known only after it).

    With a preconditioner set, each sample also gets an *update row* u = P ⊙ G, projected like
    the raw row (docs/method.md §7); `updates()` returns them.
    """

    def __init__(
        self,
        model: nn.Module,
        projection: ProjectionSpec | None = None,
        layers: Iterable[str] | None = None,
        loss_scale: float = 1.0,
        mask: torch.Tensor | None = None,
        background: bool | None = False,
        preconditioner: dict[str, Preconditioner] | None = None,
        defer_updates: bool = False,
    ):
        if projection is not None and not isinstance(projection, ProjectionSpec):
            raise TypeError(f"projection must be a ProjectionSpec or None, got {type(projection).__name__}")
        self.model = model
        self.projection = projection
        members = projection.members if projection is not None else 1
        self._layers = {
            member_name(name, j): _Layer(layer_info(member_name(name, j), module), module, projection, name, j)
            for name, module in select_layers(model, layers).items() for j in range(members)
        }
        self._only: int | None = None  # `only(member)`: the other members' hooks stand aside
        self.loss_scale = loss_scale
        self._mask: torch.Tensor | None = None
        self._mask_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.set_mask(mask)
        self._active = False
        self._generation = 0
        self._rows: dict[str, dict[int, torch.Tensor]] = {}
        self._update_rows: dict[str, dict[int, torch.Tensor]] = {}
        self._response_rows: dict[str, dict[int, torch.Tensor]] = {}
        self.defer_updates = defer_updates
        self._deferred: list[_Deferred] = []
        self._micro = 0
        self._backward_seen = False
        self.background = background
        self._worker = BackgroundWorker()
        self.set_preconditioner(preconditioner)

    # ------------------------------------------------------------------ configuration
    @property
    def loss_scale(self) -> float:
        """Factor between the backpropagated loss and the sum of per-sample losses."""
        return self._loss_scale

    @loss_scale.setter
    def loss_scale(self, value: float) -> None:
        value = float(value)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"loss_scale must be a positive finite number, got {value}")
        self._loss_scale = value

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Set (or clear with None) the (B, S) padding mask used by subsequent forwards."""
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.dim() != 2:
                raise ValueError(f"mask must be (batch, seq), got shape {tuple(mask.shape)}")
        self._mask = mask
        self._mask_cache = {}

    @contextlib.contextmanager
    def mask(self, mask: torch.Tensor | None) -> Iterator["GradientCapture"]:
        """`with cap.mask(m):` sets the padding mask for the forwards inside, then restores."""
        previous = self._mask
        self.set_mask(mask)
        try:
            yield self
        finally:
            self.set_mask(previous)

    def set_preconditioner(self, preconditioner: dict[str, Preconditioner] | None) -> None:
        """Set (or clear with None) Adam's preconditioner per layer for subsequent forwards.

        Every captured layer needs one (projected mode: ρ and γ; exact mode: the full
        diagonal). A forward keeps the one in force when it ran, so refreshing between steps
        never mixes two v's in one row.
        """
        if preconditioner is not None:
            missing = set(self.module_names()) - set(preconditioner)
            if missing:
                raise KeyError(f"preconditioner missing for layers {sorted(missing)}")
        for layer in self._layers.values():
            layer.set_preconditioner(preconditioner[layer.base] if preconditioner is not None else None)

    def layer_names(self) -> list[str]:
        """Names of the captured layers (with ProjectionSpec.members, every member's), in module order."""
        return list(self._layers)

    def module_names(self) -> list[str]:
        """Names of the hooked modules, in order: what preconditioners and responses are keyed by."""
        return list(dict.fromkeys(layer.base for layer in self._layers.values()))

    @contextlib.contextmanager
    def only(self, member: int | None) -> Iterator["GradientCapture"]:
        """Forwards inside give rows to one member of the projection only (None: to all), so
        that each member's sampled labels are its own draws."""
        previous, self._only = self._only, member
        try:
            yield self
        finally:
            self._only = previous

    def layer_info(self) -> dict[str, LayerInfo]:
        """Static shapes of each captured layer."""
        return {name: layer.info for name, layer in self._layers.items()}

    def layer_dims(self) -> dict[str, int]:
        """Per-sample gradient size p of each layer (r_s*r_a, or d_out*(d_in+1) when exact)."""
        return {name: layer.dim for name, layer in self._layers.items()}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "GradientCapture":
        if self._active:
            raise RuntimeError("GradientCapture is already active; blocks cannot be nested")
        self.reset()
        self._attach()
        return self

    @contextlib.contextmanager
    def resumed(self) -> Iterator["GradientCapture"]:
        """A block that keeps what the capture holds: its forwards add micro-batches after those
        of earlier blocks (rows, update rows and deferred factors alike), for a step whose rows
        come from several calls (the recorder's sampled-label draws, one call per micro-batch)."""
        if self._active:
            raise RuntimeError("GradientCapture is already active; blocks cannot be nested")
        self._attach()
        try:
            yield self
        finally:
            self.__exit__(None, None, None)

    def _attach(self) -> None:
        for layer in self._layers.values():
            layer.handle = layer.module.register_forward_hook(functools.partial(self._forward_hook, layer))
        self._active = True

    def __exit__(self, *exc) -> None:
        self._active = False
        for layer in self._layers.values():
            if layer.handle is not None:
                layer.handle.remove()
                layer.handle = None
        self._worker.stop()

    def reset(self) -> None:
        """Drop captured rows; backward hooks of forwards made before this are ignored."""
        self._worker.drain()
        self._generation += 1
        self._rows = {}
        self._update_rows = {}
        self._response_rows = {}
        self._deferred = []
        self._micro = 0
        self._backward_seen = False

    def next_micro_batch(self) -> None:
        """Start a new micro-batch explicitly (only needed when several forwards precede one backward)."""
        self._micro += 1
        self._backward_seen = False

    # ------------------------------------------------------------------ results
    def synchronize(self) -> None:
        """Wait for background capture work (gradients() does this itself)."""
        self._worker.drain()

    def gradients(self) -> dict[str, torch.Tensor]:
        """{layer name: (N, p)} with all micro-batches' rows concatenated in forward order.

        float32 (float64 for a float64 model), on the model's device. Layers that saw no
        backward give a (0, p) tensor.
        """
        return self._collect(self._rows)

    def updates(self) -> dict[str, torch.Tensor]:
        """{layer name: (N, p)} update rows u = P ⊙ G (projected like gradients()), in the same
        order; (0, p) for a layer whose forwards ran without a preconditioner."""
        self._worker.drain()
        if self._deferred:
            raise RuntimeError("update rows are deferred: call finish_updates(preconditioner) first")
        return self._collect(self._update_rows)

    def responses(self) -> dict[str, torch.Tensor]:
        """{layer name: (N, p)} second-moment response rows y = M_t ⊙ G (projected like
        gradients()), formed by finish_updates(..., response=); (0, p) where none were."""
        self._worker.drain()
        if self._deferred:
            raise RuntimeError("response rows are deferred: call finish_updates(preconditioner, response) first")
        return self._collect(self._response_rows)

    def finish_updates(self, preconditioner: dict[str, Preconditioner] | None,
                       response: dict[str, Response] | None = None) -> None:
        """Form the deferred update rows with this preconditioner per layer (the step's own P)
        and free the factors kept for them; None only frees them (no P exists: u = g).
        ``response``: also form each layer's second-moment response rows y = M_t ⊙ G from the
        same factors (docs/method.md §7, "v's response"; :class:`Response`), read by responses()."""
        self._worker.drain()
        deferred, self._deferred = self._deferred, []
        if deferred and response is not None:
            self._form_responses(deferred, response)
        if not deferred or preconditioner is None:
            return
        missing = {d.layer.base for d in deferred} - set(preconditioner)
        if missing:
            raise KeyError(f"preconditioner missing for layers {sorted(missing)}")
        exact = self.projection is None
        scaled: dict[tuple, tuple] = {}
        for d in deferred:
            info, pre = d.layer.info, preconditioner[d.layer.base]
            _check_preconditioner(info, pre, exact)
            if exact:  # u = P ⊙ G on the formed rows (summed over repeated calls: P is linear)
                rows = self._rows[info.name][d.micro]
                u = rows * pre.full.reshape(1, -1).to(device=rows.device, dtype=rows.dtype)
                self._update_rows.setdefault(info.name, {})[d.micro] = u
                continue
            key = (info.name, d.a.device, d.compute_dtype)
            if key not in scaled:
                scaled[key] = kernels.scale_projections(*d.layer.matrices(d.a.device, d.compute_dtype), pre.rho,
                                                        pre.gamma)
            u = kernels.update_row(d.a, d.ds, d.mask, scaled[key], d.out_dtype, d.scale)
            self._store(self._update_rows, info, d.micro, d.layer.mixed(u))

    def _form_responses(self, deferred: list[_Deferred], response: dict[str, Response]) -> None:
        """y = M ⊙ G per deferred call: on the formed row in exact mode, else Σ_k of the update
        row with ρ = x_k, γ = y_k (M's SVD factors), summed over repeated calls like G."""
        missing = {d.layer.base for d in deferred} - set(response)
        if missing:
            raise KeyError(f"response missing for layers {sorted(missing)}")
        exact = self.projection is None
        for d in deferred:
            info, res = d.layer.info, response[d.layer.base]
            if exact:
                if res.full is None or tuple(res.full.shape) != (info.d_out, info.d_in_aug):
                    raise ValueError(f"layer {info.name!r}: exact capture needs the response's full "
                                     f"(d_out, d_in_aug) = {(info.d_out, info.d_in_aug)} matrix")
                rows = self._rows[info.name][d.micro]
                self._response_rows.setdefault(info.name, {})[d.micro] = (
                    rows * res.full.reshape(1, -1).to(device=rows.device, dtype=rows.dtype))
                continue
            if res.x.shape[1:] != (info.d_out,) or res.y.shape[1:] != (info.d_in_aug,) or len(res.x) != len(res.y):
                raise ValueError(f"layer {info.name!r}: response factors of shapes {tuple(res.x.shape)}, "
                                 f"{tuple(res.y.shape)} for (k, {info.d_out}) and (k, {info.d_in_aug})")
            matrices = d.layer.matrices(d.a.device, d.compute_dtype)
            y = None
            for xk, yk in zip(res.x, res.y):
                part = kernels.update_row(d.a, d.ds, d.mask, kernels.scale_projections(*matrices, xk, yk),
                                          d.out_dtype, d.scale)
                y = part if y is None else y + part
            self._store(self._response_rows, info, d.micro, d.layer.mixed(y))

    def deferred_bytes(self) -> int:
        """Bytes held by the factors of deferred update rows (what deferring costs now)."""
        self._worker.drain()
        return sum(t.numel() * t.element_size() for d in self._deferred for t in (d.a, d.ds)
                   if isinstance(t, torch.Tensor))

    def _collect(self, rows: dict[str, dict[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
        self._worker.drain()
        out = {}
        for name, layer in self._layers.items():
            parts = rows.get(name)
            if parts:
                out[name] = torch.cat([parts[k] for k in sorted(parts)], dim=0)
            else:
                out[name] = torch.zeros(0, layer.dim)
        return out

    def pop_gradients(self) -> dict[str, torch.Tensor]:
        """gradients() followed by reset(): for streaming one optimizer step at a time."""
        grads = self.gradients()
        self.reset()
        return grads

    def pop_rows(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(gradients(), updates()) followed by reset()."""
        rows = self.gradients(), self.updates()
        self.reset()
        return rows

    # ------------------------------------------------------------------ hooks
    def _mask_for(self, a: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """The padding mask as (B, T, 1) in dtype on a's device, or None if it does not apply."""
        m = self._mask
        if m is None or a.dim() < 3:  # no sequence dim (e.g. a pooled head): nothing to mask
            return None
        if tuple(a.shape[:2]) != tuple(m.shape):
            raise ValueError(
                f"layer {name!r}: padding mask of shape {tuple(m.shape)} does not match the "
                f"input's (batch, seq) = {tuple(a.shape[:2])}"
            )
        key = (a.device, dtype)
        cached = self._mask_cache.get(key)
        if cached is None:
            cached = m.to(device=a.device, dtype=dtype).unsqueeze(-1)
            self._mask_cache[key] = cached
        if a.dim() > 3:  # extra middle dims: broadcast the (B, S) mask over them
            cached = cached.reshape(cached.shape[:2] + (1,) * (a.dim() - 2))
        return cached

    def _forward_hook(self, layer: _Layer, module: nn.Module, args: tuple, output) -> None:
        if not self._active or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        if self._only is not None and layer.member != self._only:
            return
        if self._backward_seen:
            self._micro += 1
            self._backward_seen = False
        a = args[0]
        device_type = a.device.type
        out_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        autocast = torch.is_autocast_enabled(device_type)
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast else a.dtype
        # Context managers cost real time per call (49 layers x every step): enter only if needed.
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            a = a.detach()  # with constant projections, no autograd graph is built
            a_update = update_side = a_deferred = None
            if self.projection is None:
                mask = self._mask_for(a, layer.info.name, out_dtype)
                a_factor = kernels.augment(a, layer.info.has_bias, mask, out_dtype)
            else:
                mask = self._mask_for(a, layer.info.name, compute_dtype)
                w, b, _ = layer.matrices(a.device, compute_dtype)
                a_factor = kernels.project_activations(kernels.cast(a, compute_dtype), w, b, mask)
                if layer.preconditioner is not None:  # (a ⊙ γ) P_aᵀ via γ-scaled columns of P_a
                    w_u, b_u, update_side = layer.update_matrices(a.device, compute_dtype)
                    a_update = kernels.project_activations(kernels.cast(a, compute_dtype), w_u, b_u, mask)
                elif self.defer_updates:  # the raw input waits for the step's P
                    a_deferred = kernels.cast(a, compute_dtype)
        batch = a.shape[0]
        if a_factor.dim() != 3:  # (B, d) or (B, *, S, d) inputs -> (B, T, r_a or d_in_aug)
            if a_update is not None:
                a_update = a_update.reshape(batch, -1, a_update.shape[-1])
            if a_deferred is not None:
                a_deferred = a_deferred.reshape(batch, -1, a_deferred.shape[-1])
            a_factor = a_factor.reshape(batch, -1, a_factor.shape[-1])
            if mask is not None:  # (B, S, 1, ..) -> one entry per flattened token
                mask = mask.expand(a.shape[:-1] + (1,)).reshape(batch, -1, 1)
        pending = _Pending(self._micro, self._generation, a_factor, mask, batch, compute_dtype, out_dtype)
        if layer.preconditioner is not None:  # projected: ρ-scaled P_s; exact: the full diagonal
            full = layer.preconditioner.full
            pending.update = (a_update, update_side) if a_update is not None else (None, full.reshape(1, -1))
        elif self.defer_updates:
            pending.deferred_a = a_deferred if a_deferred is not None else True
        output.register_hook(functools.partial(self._backward_hook, layer, pending))

    def _backward_hook(self, layer: _Layer, pending: _Pending, grad: torch.Tensor) -> None:
        if not self._active or pending.generation != self._generation or pending.consumed:
            return  # outside the block, from before a reset, or a second backward of one graph
        pending.consumed = True
        self._backward_seen = True
        scale = 1.0 / self._loss_scale  # the scale in force for this backward
        background = self.background if self.background is not None else grad.is_cuda
        if background:
            stream = torch.cuda.current_stream(grad.device) if grad.is_cuda else None
            self._worker.submit(self._record, layer, pending, grad, scale, stream)
        else:
            self._record(layer, pending, grad, scale, None)

    def _record(self, layer: _Layer, pending: _Pending, grad: torch.Tensor, scale: float, stream) -> None:
        """Project the output gradient, form the per-sample product, store it under its micro-batch."""
        info = layer.info
        device_type = grad.device.type
        # Backward normally runs with grad mode off and autocast inactive; guard the rare cases
        # (create_graph=True, backward() inside an autocast block) without paying for it always.
        guard_grad = torch.is_grad_enabled()
        guard_autocast = torch.is_autocast_enabled(device_type)
        if stream is not None and not self._worker.on_autograd_thread():
            self._worker.bind_cuda_device(grad.device)
        with (
            torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext(),
            torch.no_grad() if guard_grad else contextlib.nullcontext(),
            torch.autocast(device_type, enabled=False) if guard_autocast else contextlib.nullcontext(),
        ):
            ds = grad if grad.dim() == 3 else grad.reshape(pending.batch, -1, info.d_out)
            if self.projection is None:
                ds_factor = kernels.cast(ds, pending.out_dtype)
                if pending.mask is not None:
                    ds_factor = ds_factor * pending.mask
            else:
                _, _, p_s = layer.matrices(grad.device, pending.compute_dtype)
                ds_factor = kernels.project_output_grads(kernels.cast(ds, pending.compute_dtype), p_s, pending.mask)
            g = kernels.per_sample_product(ds_factor, pending.a_factor, pending.out_dtype, scale)
            u = self._update_row(pending, ds, g, scale) if pending.update is not None else None
            deferred = pending.deferred_a
            if isinstance(deferred, torch.Tensor):
                deferred = _Deferred(layer, pending.micro, deferred, kernels.cast(ds, pending.compute_dtype),
                                     pending.mask, pending.compute_dtype, pending.out_dtype, scale)
            elif deferred:  # exact mode: the formed row itself waits
                deferred = _Deferred(layer, pending.micro, None, None, None, pending.compute_dtype, pending.out_dtype,
                                     scale)
        # free them even if autograd keeps the hook alive
        pending.a_factor = pending.update = pending.deferred_a = None
        if pending.generation != self._generation:
            return  # reset while this was queued
        self._store(self._rows, info, pending.micro, layer.mixed(g))
        if u is not None:
            self._store(self._update_rows, info, pending.micro, layer.mixed(u))
        if deferred:
            self._deferred.append(deferred)

    @staticmethod
    def _update_row(pending: _Pending, ds: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
        """u = P ⊙ G: the exact diagonal on the formed G, or the factored one through the scaled factors."""
        a_update, side = pending.update
        if a_update is None:
            return g * side.to(device=g.device, dtype=g.dtype)
        ds_update = kernels.project_output_grads(kernels.cast(ds, pending.compute_dtype), side, pending.mask)
        return kernels.per_sample_product(ds_update, a_update, pending.out_dtype, scale)

    @staticmethod
    def _store(store: dict[str, dict[int, torch.Tensor]], info: LayerInfo, micro: int, g: torch.Tensor) -> None:
        """Keep a micro-batch's rows; a layer that ran twice in one micro-batch adds up."""
        rows = store.setdefault(info.name, {})
        previous = rows.get(micro)
        if previous is None:
            rows[micro] = g
        elif previous.shape == g.shape:  # the layer ran more than once in this micro-batch
            rows[micro] = previous + g
        else:
            raise RuntimeError(
                f"layer {info.name!r} ran twice in one micro-batch with batch sizes "
                f"{previous.shape[0]} and {g.shape[0]}; call cap.next_micro_batch() between "
                "forwards of different micro-batches"
            )
