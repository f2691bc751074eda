"""SegmentActor: one influence-checkpoint segment of the DVEmb recursion (docs/method.md §4).

`compute()` sweeps the segment's steps backwards from K = I, writing the local embeddings of
every occurrence, the segment matrix K per layer, and per-(source, phase) sums of local
embeddings. The reduce then chains the segments through the actors themselves
(docs/method.md §4): `chain_vectors` passes (w, z) = (S_ℓᵀ v, R_bᵀ v) for the validation
gradient v from the last segment backwards (O(p²) per layer); for the final embeddings every
actor gets its (S_ℓ, R_b) from a parallel suffix scan in ⌈log2 n⌉ rounds, `scan_link` (its
own element) and `compose_links` (one combine). Each actor holds its own K and at most a few
partial products, never every K.
`finalize(vectors, link)` scores every occurrence from the vectors and writes the final
embeddings from the link. Everything is read from and written to the store, so a restarted
actor redoes just its own segment.

AdamW (docs/method.md §7): the sweep also reads the update rows, carries R next to K (saved
beside it), and keeps per-(source, phase) sums of β₁^(b−t) u; z (and R_b) add the momentum
that leaks past the segment's end. With v's response (a run that recorded the rows y of kind
`V_RESPONSE_KIND`, manifest "v_response") it carries Q the same way with β₂: Q beside K, sums
of β₂^(b−t) y, and a third item in every link (z_Q = Q_bᵀ v in the vectors, Q_b in the
suffix link, the forward scan's q), subtracted where R's is added. With the curvature through
the momentum (embed.momentum_curvature) the sweep also carries C and D (saved beside R), the
links have a full lower row, and each occurrence's second local row D^loc u (what R_b acts on,
β₁^(b−t) u otherwise) is written beside its local embedding (kind `CARRIED_KIND`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from rayattr.runtime import hooks
from rayattr.math.dvemb import (Link, SegmentRecursion, carry_vectors_back, chain_vectors_back, clipped_step_rows,
                                compose_links, finalise_scores, finalise_step, segment_link)
from rayattr.embed.blocks import ProjectionBlocks
from rayattr.embed.inputs import SegmentInputs
from rayattr.embed.guard import DivergenceError, check_step, check_values, eta_lambda_max, stability_edge
from rayattr.embed.sums import SourcePhaseSums, chain_sums_forward
from rayattr.store import GradientReader, GradientWriter, Run, StoreOptions
from rayattr.store.layout import (ALL_SUMS, CARRIED_KIND, CURVATURE_KIND, CURVATURE_UPDATE_KIND, FINAL_KIND,
                                  LOCAL_KIND, UPDATE_KIND, V_RESPONSE_KIND,
                                  segment_carry_path, segment_cd_path, segment_cut_path, segment_k_path, segment_q_path, segment_r_path,
                                  segment_scores_path, segment_sums_path, segment_v_carry_path,
                                  segment_values_path)
from rayattr.embed.limits import READ_CHUNK, WRITE_CHUNK, WRITE_CHUNK_BYTES
from rayattr.embed.tensors import load_tensors, save_tensors
from rayattr.model.gradients import mean_of_sums, validation_gradient_sum


@dataclass(frozen=True)
class SegmentSpec:
    """What one segment actor works on."""

    index: int
    """Segment number ℓ (0 = earliest)."""
    start: int
    """First optimizer step of the segment."""
    end: int
    """One past its last step."""


class SegmentWorker:
    """The work of one segment (plain class; `SegmentActor` is its Ray actor)."""

    def __init__(self, run_uri: str, storage_options: dict | None, segment: SegmentSpec,
                 phase_edges: list[int], curvature: bool = False, dtype: str = "float32",
                 read_chunk: int = READ_CHUNK, keep_sample_embeddings: bool = True,
                 error_blocks: int = 2, updates: bool = False, momentum: float = 0.0,
                 write_chunk: int = WRITE_CHUNK, beta2: float = 0.0, clip_response: bool = False,
                 momentum_curvature: bool = False, cut_unstable: bool = False):
        torch.set_num_threads(1)  # one thread per segment: its actors run side by side on shared CPUs
        self.run = Run.open_uri(run_uri, options=StoreOptions(storage_options=storage_options or {}),
                                mode="record")
        self.seg = segment
        self.phase_edges = np.asarray(phase_edges)
        self.curvature = curvature
        self.dtype = getattr(torch, dtype)
        # local and final embeddings are stored in the recursion's precision (embed.dtype)
        self.store_dtype = "float64" if self.dtype == torch.float64 else "float32"
        self.read_chunk = read_chunk
        self.write_chunk = max(1, write_chunk)  # steps of local embeddings held before writing
        self.keep = keep_sample_embeddings
        # the recursion also runs on projection blocks, for each value's standard error
        self.blocks = ProjectionBlocks.for_run(self.run.manifest, error_blocks)
        self.layers = self.blocks.layers  # the model's layers
        self.dims = self.blocks.dims  # layers and block layers
        self.updates = updates  # AdamW: the run stored update rows (kind "update")
        self.momentum = momentum  # Adam's β₁
        # Adam's β₂ when the run recorded v's response rows (0: v frozen, no Q)
        self.beta2 = beta2
        self.clip_response = clip_response  # embed.clip_response: clipped steps' own rows
        if beta2 and not updates:
            raise ValueError("v's response (beta2 > 0) goes with an AdamW run's update rows")
        if momentum_curvature and beta2:
            raise ValueError("embed.momentum_curvature is not combined with v's response (capture.v_response)")
        # K's curvature through the momentum (dvemb.SegmentRecursion); nothing to do without momentum
        self.momentum_curvature = bool(momentum_curvature and momentum)
        # embed.unstable "cut": the sweep stops at the latest step where the recursion is unstable
        # (η·λ past the run's stability edge, or K exploding); earlier occurrences get no value
        self.cut_unstable = cut_unstable
        self.edge = stability_edge(momentum)  # SGD (no momentum): 2

    def phase_of(self, step: int) -> int:
        return int(np.searchsorted(self.phase_edges, step, side="right") - 1)

    # ------------------------------------------------------------------ the backward sweep

    def compute(self) -> dict[str, Any]:
        """Local embeddings, K and per-(source, phase) local sums of this segment."""
        if self.run.exists(segment_k_path(self.seg.index)):
            return {"segment": self.seg.index, "skipped": True,  # done before a restart
                    "node": ray.util.get_node_ip_address(), **self._recorded_cut()}
        t0 = time.perf_counter()
        s = self.seg
        records = self.run.step_records(s.start, s.end)
        # every step must come back with exactly its record's rows (refused otherwise); the
        # records' per-sample lists are then dropped: the rows come with the gradients
        inputs = SegmentInputs(self.run, s.index, s.start, s.end, records)
        etas = {r.step: replace(r, sample_ids=[], sources=[], ranks=[]) for r in records}
        span = (s.start, s.end)  # each reader opens only the index objects of this segment
        reader = GradientReader(self.run, kind="train", step_range=span)
        curv = GradientReader(self.run, kind=CURVATURE_KIND, step_range=span) if self.curvature else None
        # AdamW: the pseudo-gradients' update rows P ĝ, K's curvature term P H (docs/method.md §7)
        curv_u = (GradientReader(self.run, kind=CURVATURE_UPDATE_KIND, step_range=span)
                  if self.curvature and self.updates else None)
        upd = (AdamSteps(self.run, self.blocks, self.momentum, s.start, s.end, self.clip_response)
               if self.updates else None)
        resp = (ResponseRows(self.run, self.blocks, self.beta2, s.start, s.end, self.clip_response)
                if self.beta2 else None)
        chunk_steps = self.chunk_steps(max((len(r.sample_ids) for r in records), default=1))
        rec = SegmentRecursion(self.dims, dtype=self.dtype, momentum=self.momentum, beta2=self.beta2,
                               momentum_curvature=self.momentum_curvature)
        sums = SourcePhaseSums(self.dims)  # float64 whatever embed.dtype is
        carry = SourcePhaseSums(self.dims)  # Σ of the carried rows, for the momentum past the segment's end
        v_carry = SourcePhaseSums(self.dims)  # Σ β₂^(b−t) y, for v's response past the segment's end
        n_rows = 0
        worst = (0.0, -1)  # largest η·λ_max(H) and its step
        cut: dict | None = None  # embed.unstable "cut": the unstable step the sweep stopped at
        # Backwards in write chunks of chunk_steps steps (aligned on the segment's end, so a
        # restarted actor cuts the same chunks): each chunk's embeddings are written as soon as
        # it is swept, so memory is K (and R) plus one chunk, never the segment
        del records
        for wb in range(s.end, s.start, -chunk_steps):
            wa = max(s.start, wb - chunk_steps)
            chunk: list[tuple[Any, dict[str, torch.Tensor]]] = []
            for b in range(wb, wa, -self.read_chunk):
                a = max(wa, b - self.read_chunk)
                batches = reader.read_steps(a, b, dtype=self.dtype)
                inputs.check("train", a, b, batches, reader)
                curv_steps = curv.read_steps(a, b, dtype=self.dtype) if curv is not None else []
                if curv is not None:
                    inputs.check(CURVATURE_KIND, a, b, curv_steps, curv)
                curv_by_step = {c.step: self.blocks.augment(c.grads) for c in curv_steps}
                cu_by_step = {}
                if curv_u is not None:
                    cu_steps = curv_u.read_steps(a, b, dtype=self.dtype)
                    inputs.check(CURVATURE_UPDATE_KIND, a, b, cu_steps, curv_u)
                    cu_by_step = {c.step: c for c in cu_steps}
                    for c in curv_steps:  # each P ĝ beside its ĝ, rank by rank in the same order
                        if c.step not in cu_by_step or not np.array_equal(cu_by_step[c.step].ranks.numpy(), c.ranks.numpy()):
                            raise RuntimeError(f"step {c.step}: the curvature update rows do not match the curvature rows")
                del curv_steps
                u_by_step = upd.read(a, b, self.dtype) if upd is not None else {}
                if upd is not None:
                    inputs.check(UPDATE_KIND, a, b, list(u_by_step.values()), upd.reader)
                y_by_step = resp.read(a, b, self.dtype) if resp is not None else {}
                if resp is not None:
                    inputs.check(V_RESPONSE_KIND, a, b, list(y_by_step.values()), resp.reader)
                for batch in reversed(batches):
                    if cut is not None:
                        break
                    record = etas[batch.step]
                    rows = curv_by_step.get(batch.step) if curv else None
                    g = self.blocks.augment(batch.grads)  # the rows in the recursion's layers and blocks
                    u = y = cu = None
                    if upd is None:
                        # a clipped SGD step's rows turn the step (dvemb.clipped_step_rows): u ≠ g there
                        u = (self.blocks.augment(clipped_step_rows(batch.grads, batch.grads))
                             if self.clip_response and record.clip < 1.0 and rows is None else None)
                    else:
                        u = upd.rows(u_by_step, batch, record, raw=batch.grads)
                        y = resp.rows(y_by_step, batch, record, raw=batch.grads) if resp is not None else None
                        # κ_t·P ĝ, as the update rows hold κ_t (AdamSteps)
                        cu = ({n: record.clip * x for n, x in self.blocks.augment(cu_by_step[batch.step].grads).items()}
                              if rows is not None else None)
                    eta = record.eta if upd is None else upd.step_size(record)
                    # η·λ_max(P H) of the step as K sees it (κ in u under AdamW); the model's layers, not their blocks
                    el = eta_lambda_max({n: g[n] for n in self.layers}, eta,
                                        {n: rows[n] for n in self.layers} if rows else None, len(batch.sample_ids),
                                        updates=u, curvature_updates={n: cu[n] for n in self.layers}
                                        if rows and upd is not None else None)
                    if self.cut_unstable and el > self.edge:
                        cut = {"unstable_step": batch.step, "eta_lambda": el, "why": "past the stability edge"}
                        break
                    emb = rec.step(g, eta, rows, batch_size=len(batch.sample_ids), step=batch.step, updates=u,
                                   curvature_updates=cu, decay=record.decay if upd is not None else 1.0, v_rows=y)
                    # stops before this step's rows are written (and K, which marks the segment done)
                    try:
                        check_step(s.index, batch.step, rec.K, emb, el, self.momentum, self.updates)
                    except DivergenceError:
                        if not self.cut_unstable:
                            raise
                        cut = {"unstable_step": batch.step, "eta_lambda": el,
                               "why": "K or the embeddings exploding or not finite"}
                        break
                    if rec.carried is not None:  # with momentum: what R at the segment's end acts on
                        carry.add(batch.sources, self.phase_of(batch.step), rec.carried)
                    if y is not None:
                        v_carry.add(batch.sources, self.phase_of(batch.step), resp.carried(y, batch.step))
                    worst = max(worst, (el, batch.step))
                    sums.add(batch.sources, self.phase_of(batch.step), emb)
                    batch.grads = None  # keep the rows' ids, not their gradients
                    chunk.append((batch, emb, rec.carried if self.momentum_curvature else None))
                    n_rows += len(batch.sample_ids)
                    hooks.call("segment.compute", segment=s.index, step=s.end - batch.step)  # test seam
                if cut is not None:
                    break
            self._write_local(wa, wb, chunk)
            if cut is not None:
                break
        self.run.write_table(segment_sums_path(s.index), sums.to_table())
        if cut is not None:
            self.run.write_json(segment_cut_path(s.index), cut)
        if rec.R is not None:
            self.run.write_bytes(segment_r_path(s.index), save_tensors(rec.R))
            self.run.write_table(segment_carry_path(s.index), carry.to_table())
        if rec.D is not None:
            self.run.write_bytes(segment_cd_path(s.index, "C"), save_tensors(rec.C))
            self.run.write_bytes(segment_cd_path(s.index, "D"), save_tensors(rec.D))
        if rec.Q is not None:
            self.run.write_bytes(segment_q_path(s.index), save_tensors(rec.Q))
            self.run.write_table(segment_v_carry_path(s.index), v_carry.to_table())
        # K last: its presence marks the segment as done
        self.run.write_bytes(segment_k_path(s.index), save_tensors(rec.K))
        self._chain_inputs = (rec.K, rec.R, rec.Q, rec.C, rec.D)  # the chain needs them next: no read back
        # the driver warns once for the run, from every segment's worst step (pipeline.attribute)
        return {"segment": s.index, "steps": s.end - s.start, "occurrences": n_rows,
                "seconds": time.perf_counter() - t0, "node": ray.util.get_node_ip_address(),
                "max_eta_lambda": worst[0], "max_eta_lambda_step": worst[1], **(cut or {})}

    def _recorded_cut(self) -> dict:
        """The cut a finished sweep recorded ({} if it went through)."""
        path = segment_cut_path(self.seg.index)
        return self.run.read_json(path) if self.run.exists(path) else {}

    def chunk_steps(self, batch_rows: int) -> int:
        """Steps per write chunk: write_chunk, fewer if their local embeddings (block layers
        included) would pass WRITE_CHUNK_BYTES. Fixed by the run, so a restart cuts the same."""
        row = sum(self.dims.values()) * self.dtype.itemsize
        return max(1, min(self.write_chunk, WRITE_CHUNK_BYTES // max(1, batch_rows * row)))

    def _write_local(self, a: int, b: int, chunk: list) -> None:
        """One write chunk's local embeddings (and, under momentum_curvature, carried rows), in
        increasing step order (so they read back like gradients), by a writer of its own per kind:
        its "rank" is the chunk's first step, unique in the run, and its step_range the chunk. A
        restart skips what the chunk's writer committed."""
        kinds = [(LOCAL_KIND, 1)] + ([(CARRIED_KIND, 2)] if self.momentum_curvature else [])
        for kind, item in kinds:
            # takeover: an open writer of this chunk is this actor's own before Ray restarted it
            with GradientWriter(self.run, a, self.dims, kind=kind, dtype=self.store_dtype, takeover=True,
                                steps_per_shard=max(1, b - a), step_range=(a, b)) as w:
                done = _committed(w)
                for entry in reversed(chunk):
                    batch = entry[0]
                    if batch.step <= done:
                        continue  # written before a restart (K was not yet)
                    w.write_step(batch.step, batch.sample_ids.tolist(), batch.sources, entry[item],
                                 positions=list(batch.positions))

    # ------------------------------------------------------------------ chaining the segments

    def _own_chain_inputs(self) -> tuple:
        """This segment's K, (with momentum) local R, (with v's response) local Q and (under
        momentum_curvature) its link's lower row C, D, read once from the store."""
        if getattr(self, "_chain_inputs", None) is None:
            i = self.seg.index
            K = self.load_k()
            R = load_tensors(self.run.read_bytes(segment_r_path(i))) if self.momentum else None
            Q = load_tensors(self.run.read_bytes(segment_q_path(i))) if self.beta2 else None
            C, D = ((load_tensors(self.run.read_bytes(segment_cd_path(i, "C"))),
                     load_tensors(self.run.read_bytes(segment_cd_path(i, "D"))))
                    if self.momentum_curvature else (None, None))
            self._chain_inputs = (K, R, Q, C, D)
        return self._chain_inputs

    def validation_sum(self, n_shards: int, device: str = "cpu") -> tuple[dict[str, torch.Tensor], int]:
        """(Σ per-sample gradients, rows) of this segment's shard of the validation set at the
        final model (model/gradients.py). Each actor takes one shard before its sweep: the test
        side needs no process of its own, and nothing waits for CPUs the actors hold."""
        return validation_gradient_sum(self.run, self.seg.index, n_shards, device)

    def value_vectors(self, test_grad: dict[str, torch.Tensor]) -> tuple:
        """(w, z) of the last segment: w = v (block layers included), z = 0 (docs/method.md §4);
        with v's response (w, z, z_Q), z_Q = 0."""
        w = self.blocks.augment({n: g.to(torch.float64) for n, g in test_grad.items()})
        z = {n: torch.zeros_like(x) for n, x in w.items()} if self.momentum else None
        return (w, z, {n: torch.zeros_like(x) for n, x in w.items()}) if self.beta2 else (w, z)

    def shard_vectors(self, *shards: tuple[dict[str, torch.Tensor], int]) -> tuple:
        """value_vectors of v, the mean validation gradient, from the actors' validation_sum shards."""
        return self.value_vectors(mean_of_sums(list(shards)))

    def chain_vectors(self, vectors: tuple) -> tuple:
        """The previous segment's (w, z) from this one's: w_{ℓ-1} = K_ℓᵀ w_ℓ, z_{ℓ-1} =
        R^locᵀ_ℓ w_ℓ + β₁^(b−a) z_ℓ (docs/method.md §4, §7). O(p²) per layer."""
        K, R, Q, C, D = self._own_chain_inputs()
        w, z = vectors[:2]
        length = self.seg.end - self.seg.start
        w_prev, z_prev = chain_vectors_back(K, w, R, z, length, self.momentum, C, D)
        if not self.beta2:
            return w_prev, z_prev
        # z_Q{ℓ-1} = Q^locᵀ_ℓ w_ℓ + β₂^(b−a) z_Q{ℓ}
        return w_prev, z_prev, carry_vectors_back(Q, w, vectors[2], length, self.beta2)

    def scan_link(self) -> Link:
        """This segment's own element M_ℓ = [[K_ℓ, R^loc_ℓ, Q^loc_ℓ], [0, β₁^(b−a) I, 0],
        [0, 0, β₂^(b−a) I]] of the suffix scan, in float64 (dvemb.segment_link); R only with
        momentum, Q only with v's response; under momentum_curvature the lower row is [C_ℓ, D_ℓ]."""
        K, R, Q, C, D = self._own_chain_inputs()
        return segment_link(K, R, self.seg.end - self.seg.start, self.momentum, Q_loc=Q, beta2=self.beta2,
                            C_loc=C, D_loc=D)

    def compose_links(self, later: Link, own: Link) -> Link:
        """One combine of the suffix scan, ``later ∘ own`` (dvemb.compose_links): the driver
        passes both as object refs (pipeline/stages.py), so the actor keeps no scan state and
        a restarted one redoes just this combine."""
        return compose_links(later, own)

    def chain_sums(self, prev: tuple | None, last: bool = False, first: int = 0) -> tuple | None:
        """Forward scan (segment 0 first) finalising the per-(source, phase) sums without any
        suffix matrix (docs/method.md §4, §7): y_ℓ = K_ℓ y_{ℓ-1} + x_ℓ + R^loc_ℓ d_ℓ and
        d_{ℓ+1} = β₁^(b−a) d_ℓ + c_ℓ, with x the local sums and c the carried update rows.
        Returns (y_ℓ, d_{ℓ+1}) for the next segment; the last writes y, the final sums of the
        whole run, to `ALL_SUMS`. Used when no per-sample final embeddings are kept. `first`: the
        first attributable step (finalize): a segment wholly before it adds nothing, and the one
        that holds it starts the scan afresh (what came before passed an unstable step)."""
        if self.seg.end <= first:
            if last:
                self.run.write_table(ALL_SUMS, SourcePhaseSums(self.dims).to_table())
            return None
        if self.seg.start < first:
            prev = None
        K, R, Q, C, D = self._own_chain_inputs()
        local = SourcePhaseSums.from_table(self.run.read_table(segment_sums_path(self.seg.index)), self.dims)
        carry = (SourcePhaseSums.from_table(self.run.read_table(segment_carry_path(self.seg.index)), self.dims)
                 if self.momentum else None)
        v_carry = (SourcePhaseSums.from_table(self.run.read_table(segment_v_carry_path(self.seg.index)), self.dims)
                   if self.beta2 else None)
        link = chain_sums_forward(K, local, prev, R, carry, self.seg.end - self.seg.start, self.momentum,
                                  Q, v_carry, self.beta2, C, D)
        if last:
            self.run.write_table(ALL_SUMS, link[0].to_table())
            return None
        return link

    # ------------------------------------------------------------------ finalisation

    def finalize(self, vectors: tuple, link: Link | None = None, embeddings: bool = True,
                 first: int = 0) -> dict[str, Any]:
        """Values of every occurrence from the vector chain's (w, z) of this segment, in float64:
        e·w + β₁^(b−t) u·z per layer (docs/method.md §4, §7); per-(source, phase, layer) scores
        from the local sums the same way. `link`, the suffix scan's M_{n-1} ⋯ M_{ℓ+1} (a Link;
        None for the last segment: S = I, R_b = 0), gives the final embeddings (kept per sample
        when keep_sample_embeddings) and the final per-(source, phase) sums; `embeddings` False
        skips both (the sums then come from `chain_sums`). `first`: the first attributable step
        (embed.unstable "cut"): earlier occurrences get no value, and a segment wholly before it
        writes empty tables (its K and links, past an unstable step, are never read)."""
        t0 = time.perf_counter()
        s = self.seg
        start = max(s.start, first)
        if start >= s.end:
            return self._finalize_nothing(embeddings, t0)
        w, z = vectors[:2]
        w = {n: x.to(torch.float64) for n, x in w.items()}
        z = {n: x.to(torch.float64) for n, x in z.items()} if z is not None and self.momentum else None
        zq = {n: x.to(torch.float64) for n, x in vectors[2].items()} if self.beta2 else None
        S0, r_end = (link.S, link.R) if link is not None else (None, None)
        S = ({n: (S0[n] if S0 is not None else torch.eye(p, dtype=torch.float64)).to(self.dtype)
              for n, p in self.dims.items()} if embeddings else None)
        R_end = ({n: m.to(self.dtype) for n, m in r_end.items()}
                 if r_end is not None and self.momentum and embeddings else None)
        # Q at the segment's end: zero for the last segment (no link)
        Q_end = ({n: m.to(self.dtype) for n, m in link.Q.items()}
                 if link is not None and self.beta2 and embeddings else None)
        raw = RawRows(self.run, s.start, s.end) if self.clip_response else None
        upd = (AdamSteps(self.run, self.blocks, self.momentum, s.start, s.end, self.clip_response, raw)
               if z is not None else None)
        resp = (ResponseRows(self.run, self.blocks, self.beta2, s.start, s.end, self.clip_response, raw)
                if zq is not None else None)
        full = self.run.step_records(start, s.end)
        inputs = SegmentInputs(self.run, s.index, start, s.end, full)  # every step's local rows, or a refusal
        records = {r.step: replace(r, sample_ids=[], sources=[], ranks=[])  # rows come with the embeddings
                   for r in full}
        del full
        epochs = {t: r.epoch for t, r in records.items()}
        reader = GradientReader(self.run, kind=LOCAL_KIND, step_range=(start, s.end))
        carried = (GradientReader(self.run, kind=CARRIED_KIND, step_range=(start, s.end))
                   if self.momentum_curvature and z is not None else None)
        # block layers too: a query's scores get their standard errors from them
        writer = (GradientWriter(self.run, s.index, self.dims, kind=FINAL_KIND, dtype=self.store_dtype, takeover=True,
                                 steps_per_shard=self.read_chunk, step_range=(s.start, s.end))
                  if self.keep and embeddings else None)
        done = _committed(writer)
        n_rows = 0
        # the values stream into their table one read chunk at a time (atomic: nothing if a
        # value is bad); memory is one chunk of local embeddings, never the segment
        with self.run.table_writer(segment_values_path(s.index)) as out:
            for a in range(start, s.end, self.read_chunk):
                b = min(s.end, a + self.read_chunk)
                u_by_step = upd.read(a, b, self.dtype) if upd is not None else {}
                y_by_step = resp.read(a, b, self.dtype) if resp is not None else {}
                if raw is not None:
                    raw.chunk(a, b, self.dtype)
                cols: dict[str, list] = {k: [] for k in VALUE_COLUMNS}
                batches = reader.read_steps(a, b, dtype=self.dtype)
                inputs.check(LOCAL_KIND, a, b, batches, reader, by_rank=False)
                c_by_step = {}
                if carried is not None:
                    c_steps = carried.read_steps(a, b, dtype=self.dtype)
                    inputs.check(CARRIED_KIND, a, b, c_steps, carried, by_rank=False)
                    c_by_step = {c.step: c for c in c_steps}
                for batch in batches:
                    c = _carried_rows(c_by_step, batch) if carried is not None else None
                    u = upd.rows(u_by_step, batch, records[batch.step]) if upd is not None else None
                    y = resp.rows(y_by_step, batch, records[batch.step]) if resp is not None else None
                    value, se = self.blocks.combine(
                        finalise_scores(batch.grads, w, z, u, self.momentum, s.end - batch.step, y, zq, self.beta2,
                                        carried=c))
                    check_values(value, torch.full((len(value),), batch.step), f"segment {s.index}")
                    if writer is not None and batch.step > done:  # a restart keeps what was committed
                        final = finalise_step(batch.grads, S, R_end, u, self.momentum, s.end - batch.step,
                                              y, Q_end, self.beta2, carried=c)
                        writer.write_step(batch.step, batch.sample_ids.tolist(), batch.sources, final,
                                          positions=list(batch.positions))
                    k = len(batch.sample_ids)
                    cols["sample_id"].append(batch.sample_ids.numpy())
                    cols["source"].append(np.asarray(batch.sources, dtype=object))
                    cols["step"].append(np.full(k, batch.step))
                    cols["epoch"].append(np.full(k, epochs[batch.step]))
                    cols["position"].append(np.asarray(batch.positions))
                    cols["value"].append(value.numpy())
                    # the projection's standard error of the value (null without blocks)
                    cols["value_se"].append(se.numpy() if se is not None else np.full(k, np.nan))
                    n_rows += k
                if cols["step"]:
                    out.write(values_table(cols))
        if writer is not None:
            writer.close()
        local = SourcePhaseSums.from_table(self.run.read_table(segment_sums_path(s.index)), self.dims)
        carry = (SourcePhaseSums.from_table(self.run.read_table(segment_carry_path(s.index)), self.dims)
                 if z is not None else None)
        v_carry = (SourcePhaseSums.from_table(self.run.read_table(segment_v_carry_path(s.index)), self.dims)
                   if zq is not None else None)
        self.run.write_table(segment_scores_path(s.index),
                             source_phase_scores(local, carry, w, z, self.layers, v_carry, zq, self.blocks.weight))
        if embeddings:
            sums = local.transformed(S)
            if R_end is not None:
                sums.add_vectors(carry.transformed(R_end))
            if Q_end is not None:  # v's response: - Q_b Σ β₂^(b−t) y
                sums.add_vectors(v_carry.transformed(Q_end).scaled(-1.0))
            self.run.write_table(segment_sums_path(s.index, final=True), sums.to_table())
        return {"segment": s.index, "occurrences": n_rows, "seconds": time.perf_counter() - t0}

    def _finalize_nothing(self, embeddings: bool, t0: float) -> dict[str, Any]:
        """finalize of a segment wholly before the first attributable step: empty tables."""
        i = self.seg.index
        self.run.write_table(segment_values_path(i), VALUES_SCHEMA.empty_table())
        self.run.write_table(segment_scores_path(i), SCORES_SCHEMA.empty_table())
        if embeddings:
            self.run.write_table(segment_sums_path(i, final=True), SourcePhaseSums(self.dims).to_table())
        return {"segment": i, "occurrences": 0, "seconds": time.perf_counter() - t0}

    def load_k(self) -> dict[str, torch.Tensor]:
        return load_tensors(self.run.read_bytes(segment_k_path(self.seg.index)))


VALUE_COLUMNS = ("sample_id", "source", "step", "epoch", "position", "value", "value_se")
VALUES_SCHEMA = pa.schema([("sample_id", pa.int64()), ("source", pa.string()), ("step", pa.int64()),
                           ("epoch", pa.int64()), ("position", pa.int64()), ("value", pa.float64()),
                           ("value_se", pa.float64())])


def values_table(cols: dict[str, list]) -> pa.Table:
    """Rows of a segment's values table from per-step column arrays (NaN se -> null)."""
    arrays = {k: np.concatenate(cols[k]) for k in VALUE_COLUMNS}
    return pa.table({k: pa.array(arrays[k], VALUES_SCHEMA.field(k).type, from_pandas=k == "value_se")
                     for k in VALUE_COLUMNS}, schema=VALUES_SCHEMA)


def source_phase_scores(local: SourcePhaseSums, carry: SourcePhaseSums | None, w: dict[str, torch.Tensor],
                        z: dict[str, torch.Tensor] | None, layers, v_carry: SourcePhaseSums | None = None,
                        zq: dict[str, torch.Tensor] | None = None, weight: float = 1.0) -> pa.Table:
    """Per (source, phase, real layer): Σ of the occurrences' values, from the summed local
    embeddings and carried update rows, Σe·w + (Σβ₁^(b−t)u)·z (float64; docs/method.md §4),
    with v's response - (Σβ₂^(b−t)y)·z_Q; times `weight` (1/members: a value is the members' mean)."""
    keys = sorted(local.sum)
    rows = {"source": [], "phase": [], "layer": [], "n_occurrences": [], "value": []}
    for key in keys:
        for n in layers:
            v = float(local.sum[key][n] @ w[n])
            if z is not None and carry is not None and key in carry.sum:
                v += float(carry.sum[key][n] @ z[n])
            if zq is not None and v_carry is not None and key in v_carry.sum:
                v -= float(v_carry.sum[key][n] @ zq[n])
            rows["source"].append(key[0])
            rows["phase"].append(key[1])
            rows["layer"].append(n)
            rows["n_occurrences"].append(local.count[key])
            rows["value"].append(v * weight)
    return pa.table(rows, schema=SCORES_SCHEMA)


SCORES_SCHEMA = pa.schema([("source", pa.string()), ("phase", pa.int64()), ("layer", pa.string()),
                           ("n_occurrences", pa.int64()), ("value", pa.float64())])


class RawRows:
    """A segment's raw gradient rows, for a pass that holds only the update rows or the local
    embeddings (finalize) when a clipped step's own rows need them (embed.clip_response): the
    current chunk's, read once at its first clipped step."""

    def __init__(self, run: Run, start: int, end: int):
        self.reader = GradientReader(run, kind="train", step_range=(start, end))
        self._chunk: tuple[int, int, torch.dtype] | None = None
        self._rows: dict[int, Any] | None = None

    def chunk(self, a: int, b: int, dtype: torch.dtype) -> None:
        self._chunk, self._rows = (a, b, dtype), None

    def of(self, batch) -> dict[str, torch.Tensor]:
        if self._rows is None:
            a, b, dtype = self._chunk if self._chunk is not None else (batch.step, batch.step + 1, torch.float32)
            self._rows = {r.step: r for r in self.reader.read_steps(a, b, dtype=dtype)}
        found = self._rows.get(batch.step)
        if found is None or found.sample_ids.tolist() != batch.sample_ids.tolist():
            raise RuntimeError(f"step {batch.step}: the gradient rows do not match the update rows")
        return found.grads


def clipped_rows(rows: dict[str, torch.Tensor], batch, record, clip_response: bool,
                 raw: dict[str, torch.Tensor] | None, reader: RawRows | None) -> dict[str, torch.Tensor]:
    """rows as the step's own response: turned at a clipped step with embed.clip_response
    (dvemb.clipped_step_rows, from `raw` or the segment's RawRows), else as they are."""
    if not (clip_response and record.clip < 1.0):
        return rows
    if raw is None and reader is None:
        raise RuntimeError(f"step {batch.step}: a clipped step's own rows need its raw gradient rows")
    return clipped_step_rows(raw if raw is not None else reader.of(batch), rows)


class AdamSteps:
    """A segment's view of an AdamW run's update rows and step records (docs/method.md §7).

    Clipping scales ḡ_t by κ_t, and the momentum carries that scaled change into every later
    update s at lr_s, not κ_s·lr_s. So the recursion gets η_s = lr_s/|B| (the recorded
    κ_s·lr_s/|B| over κ_s) and each occurrence's row κ_t·u; K_s's curvature term, η_s·(κ_s U)ᵀG,
    comes out as κ_s·lr_s/|B| as before.
    """

    def __init__(self, run: Run, blocks: ProjectionBlocks, momentum: float, start: int, end: int,
                 clip_response: bool = False, raw: RawRows | None = None):
        self.reader = GradientReader(run, kind=UPDATE_KIND, step_range=(start, end))
        self.clip_response, self.raw = clip_response, raw
        self.blocks, self.momentum, self.end = blocks, momentum, end

    def read(self, a: int, b: int, dtype: torch.dtype) -> dict[int, Any]:
        return {u.step: u for u in self.reader.read_steps(a, b, dtype=dtype)}

    def rows(self, by_step: dict[int, Any], batch, record, raw: dict[str, torch.Tensor] | None = None
             ) -> dict[str, torch.Tensor]:
        """κ_t·u of the step's occurrences, block layers included, in the batch's row order. With
        embed.clip_response, at a clipped step u is the clipped step's row (dvemb.clipped_step_rows),
        which needs the step's raw rows: `raw` where the caller holds them (the sweep), else the
        segment's :class:`RawRows`."""
        u = by_step.get(batch.step)
        if u is None or u.sample_ids.tolist() != batch.sample_ids.tolist():
            raise RuntimeError(f"step {batch.step}: the update rows do not match the gradient rows")
        if record.adam_step is not None and record.adam_step != batch.step + 1:
            # the momentum weights index Adam's counter by the step (no skipped updates)
            raise RuntimeError(f"step {batch.step}: Adam's step counter is {record.adam_step}, not "
                               f"{batch.step + 1} (a skipped update); not supported with AdamW")
        if abs(record.beta1 - self.momentum) > 0:
            raise RuntimeError(f"step {batch.step}: recorded β₁ {record.beta1} differs from the run's {self.momentum}")
        return {n: record.clip * g for n, g in self.blocks.augment(
            clipped_rows(u.grads, batch, record, self.clip_response, raw, self.raw)).items()}

    @staticmethod
    def step_size(record) -> float:
        """η_t = lr_t/|B| of an applied step (0 for a skipped one), without κ_t."""
        return record.eta / record.clip if record.clip > 0 else 0.0


class ResponseRows:
    """A segment's view of an AdamW run's second-moment response rows y = D_t ⊙ ḡ_t ⊙ g
    (docs/method.md §7, "v's response"; store kind `V_RESPONSE_KIND`). ḡ_t is the clipped mean
    gradient v_t saw and g the raw row, so, as for the update rows (:class:`AdamSteps`), the
    occurrence's row is κ_t·y and the recursion's η_s = lr_s/|B|."""

    def __init__(self, run: Run, blocks: ProjectionBlocks, beta2: float, start: int, end: int,
                 clip_response: bool = False, raw: RawRows | None = None):
        self.reader = GradientReader(run, kind=V_RESPONSE_KIND, step_range=(start, end))
        self.blocks, self.beta2, self.end = blocks, beta2, end
        self.clip_response, self.raw = clip_response, raw

    def read(self, a: int, b: int, dtype: torch.dtype) -> dict[int, Any]:
        return {y.step: y for y in self.reader.read_steps(a, b, dtype=dtype)}

    def rows(self, by_step: dict[int, Any], batch, record, raw: dict[str, torch.Tensor] | None = None
             ) -> dict[str, torch.Tensor]:
        """κ_t·y of the step's occurrences, block layers included, in the batch's row order. y is
        linear in the sample's gradient, so with embed.clip_response a clipped step's y turns as
        u does (dvemb.clipped_step_rows on y): v sees κ (I − ĝĝᵀ) g, not κ g."""
        y = by_step.get(batch.step)
        if y is None or y.sample_ids.tolist() != batch.sample_ids.tolist():
            raise RuntimeError(f"step {batch.step}: the v-response rows do not match the gradient rows")
        if record.beta2 is not None and abs(record.beta2 - self.beta2) > 0:
            raise RuntimeError(f"step {batch.step}: recorded β₂ {record.beta2} differs from the run's {self.beta2}")
        return {n: record.clip * g for n, g in self.blocks.augment(
            clipped_rows(y.grads, batch, record, self.clip_response, raw, self.raw)).items()}

    def carried(self, rows: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """β₂^(b−t)·(κ_t y): what of the occurrence's row v carries past the segment."""
        w = self.beta2 ** (self.end - step)
        return {n: w * r for n, r in rows.items()}


def _carried_rows(by_step: dict[int, Any], batch) -> dict[str, torch.Tensor]:
    """The step's carried rows (momentum_curvature), checked to be the local embeddings' rows."""
    c = by_step.get(batch.step)
    if c is None or c.sample_ids.tolist() != batch.sample_ids.tolist():
        raise RuntimeError(f"step {batch.step}: the carried rows do not match the local embeddings")
    return c.grads


def _committed(writer: GradientWriter | None) -> int:
    """Last step a (restarted) segment's writer already committed, -1 if none."""
    last = writer.last_committed_step if writer is not None else None
    return -1 if last is None else last


SegmentActor = ray.remote(SegmentWorker)
