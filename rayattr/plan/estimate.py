"""Storage, memory and time estimates of a run from its Config, before running it (`rayattr plan`).

Sizes are exact where the code fixes them: the hooked layers and their projected widths come
from building the model on the meta device (no weights allocated) and asking `GradientCapture`
for its layer dims, as the rank actors do; steps come from the same `BatchPlan`. Bytes follow
the store's formats (Arrow IPC rows, float32 embeddings, p x p K matrices). Times are a simple
rate model over per-actor throughputs (`Throughput`), whose defaults are this repo's measured
numbers where there are any (see each field) and labelled assumptions where not.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch

from rayattr.capture.projection import member_of
from rayattr.config import Config, ConfigError, load_config
from rayattr.errors import USER_ERROR_EXIT, RayattrError, error_line
from rayattr.optim.spec import resolve_optimizer
from rayattr.math.dvemb import scan_rounds
from rayattr.data.limits import BATCH_ROWS as DATA_BATCH_ROWS
from rayattr.data.limits import BUCKET_IDS, TASK_ROWS
from rayattr.exact.limits import checkpoint_bytes, default_every, segment_graph_bytes
from rayattr.embed.limits import READ_CHUNK, WRITE_CHUNK, WRITE_CHUNK_BYTES
from rayattr.model.limits import VALIDATION_ROWS
from rayattr.reduce.aggregate import BOOTSTRAP_MAX_N
from rayattr.report.limits import MEDIAN_CAP, SCAN_ROWS
from rayattr.report.units import human_bytes
from rayattr.store.reader import WINDOW_BYTES
from rayattr.store.shard import META_COLUMNS
from rayattr.store.writer import MAX_BUFFER_BYTES, QUEUE_DEPTH

MB = 1e6
GIB = 1 << 30
_DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
# Arrow IPC per row besides the layer columns: step, sample_id, position (int64), rank (int32),
# the source string's int32 offset (+ its characters, counted separately)
_ROW_META_BYTES = 8 + 8 + 8 + 4 + 4
# Arrow IPC framing, fitted to encode_shard output (tests/test_plan.py checks it): per record
# batch (one per step and writer) ~80 bytes of buffer metadata per column; per file the schema
# twice (header and footer, ~120 bytes per column) and a 24-byte footer block per batch
_BATCH_COLUMN_OVERHEAD = 80
_FILE_COLUMN_OVERHEAD = 240
_FILE_BATCH_OVERHEAD = 24
_VALUE_ROW_BYTES = 48  # values/ tables: ids, step, epoch, position, value (+ source)


# ---------------------------------------------------------------------------- throughputs

@dataclass(frozen=True)
class Throughput:
    """Per-actor rates the time estimates divide by. `Throughput.cpu()`/`h100()` are the defaults."""

    train_flops: float
    """Effective model FLOP/s of one rank, counting 6 x params x tokens per training step."""
    train_step_s: float
    """Fixed cost per optimizer step and rank (DeepSpeed step, all-reduce latency, Python)."""
    capture_overhead: float
    """Fractional slowdown of a training step from the capture hooks."""
    embed_flops: float
    """Matmul FLOP/s of one segment actor (the recursion and finalize products)."""
    embed_layer_step_s: float
    """Fixed cost per step and captured layer in a segment actor (decode, stack, sums, encode)."""
    store_write_mbps: float
    """One writer's committed-write MB/s to the store."""
    store_read_mbps: float
    """One reader's MB/s from the store (checksums verified)."""
    actor_start_s: float
    """Starting a stage's actors (placement group, process, imports, DeepSpeed init)."""
    reduce_rows_per_s: float
    """Occurrence rows per second the driver concatenates, groups and writes in the reduce."""
    data_mbps_per_cpu: float = 70.0
    """Text MB per second and CPU the data stage's tasks read, check and route (measured: the
    block functions on 153,600 150-character rows, 0.32 CPU s; tokenising the trained rows is
    apart and small with steps capped; BENCHMARKS.md, data path)."""
    data_start_s: float = 10.0
    """The data stage's fixed cost: Ray Data's executions, their tasks and its exchange. Assumed:
    on 2 shared cores under load average 15-38 it was 26-86 s whatever the corpus (BENCHMARKS.md)."""

    @classmethod
    def cpu(cls, s3: bool = False) -> "Throughput":
        """Calibrated on the default run on 2 CPUs (192 steps x 16 samples; two runs measured
        train 20-29 s, embed 10.7-15.5 s with 2 segments, reduce 0.35-0.9 s). A segment's
        compute() alone took 0.44 s for 96 steps x 9 layers (0.5 ms per layer-step): the embed
        stage there is mostly actor start-up. Store rates from bench/store_throughput.py
        (docs/store.md: local 150/212 MB/s, SeaweedFS S3 41/141 MB/s on the same 2 cores).
        The capture overhead is inside train_step_s: the calibration run had it on."""
        return cls(train_flops=2e10, train_step_s=0.06, capture_overhead=0.0, embed_flops=2e10,
                   embed_layer_step_s=0.0005, store_write_mbps=41 if s3 else 150,
                   store_read_mbps=141 if s3 else 212, actor_start_s=10.0, reduce_rows_per_s=2e5)

    @classmethod
    def h100(cls, s3: bool = True) -> "Throughput":
        """GPU ranks: capture overhead 15.5 % is measured (13-18 % for GPT-2 124M on an H100,
        bench/capture_overhead.py --full). Assumed, not measured here: 40 % MFU of 989 TFLOP/s
        bf16, 30 TFLOP/s fp32 in segment actors, 1 ms per layer-step (2x the CPU measurement:
        host-device copies), 50 ms per step for ZeRO communication, and S3 at the measured
        SeaweedFS rates (a real S3 bucket is usually faster per connection)."""
        return cls(train_flops=0.40 * 989e12, train_step_s=0.05, capture_overhead=0.155,
                   embed_flops=30e12, embed_layer_step_s=0.001, store_write_mbps=41 if s3 else 150,
                   store_read_mbps=141 if s3 else 212, actor_start_s=60.0, reduce_rows_per_s=2e5)

    @classmethod
    def for_config(cls, cfg: Config) -> "Throughput":
        s3 = cfg.store.uri.startswith("s3://")
        return cls.h100(s3) if cfg.train.use_gpu else cls.cpu(s3)


# ---------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class LayerPlan:
    """One captured layer: its shape and projected width p."""

    name: str
    d_in: int
    d_out: int
    has_bias: bool
    p: int


@dataclass
class Plan:
    """Everything `estimate` predicts; bytes are bytes, times are seconds."""

    n_params: int
    vocab_size: int
    seq_len: int
    n_samples: int
    epochs: int
    steps: int
    global_batch: int
    ranks: int
    nodes: int
    segments: int
    devices: int
    """CPUs (or GPUs) the segment actors share."""
    per_source: bool
    """True: no per-sample final embeddings (embed.keep_sample_embeddings false)."""
    layers: list[LayerPlan]
    grad_dtype: str
    embed_dtype: str
    curvature_rows_per_step: int
    """Sampled-label pseudo-gradient rows per step (0 with the empirical curvature)."""
    update_rows: bool
    """AdamW: every occurrence also stores an update row u = P g (docs/method.md §7)."""
    response_rows: bool
    """AdamW with capture.v_response: every occurrence also stores a second-moment response row
    y, and each segment keeps Q beside K and R (docs/method.md §7, "v's response")."""
    n_sources: int
    storage: dict[str, float] = field(default_factory=dict)
    """Stored bytes per kind of object, in the chosen mode."""
    storage_per_sample: float = 0.0
    """Total stored bytes keeping per-sample embeddings."""
    storage_per_source: float = 0.0
    """Total stored bytes without them."""
    objects: int = 0
    """Gradient shard objects (+ as many commit entries) written by the ranks."""
    memory: dict[str, float] = field(default_factory=dict)
    """Peak bytes of each memory term, keyed "<process>: <what>"."""
    process_memory: dict[str, float] = field(default_factory=dict)
    """Peak bytes per process (the sum of its terms)."""
    traffic: dict[str, float] = field(default_factory=dict)
    """Bytes a rank sends into collectives per optimizer step, by what they carry."""
    time: dict[str, float] = field(default_factory=dict)
    """Wall seconds per stage."""
    data_stage: dict[str, float] = field(default_factory=dict)
    """The data stage's Ray Data tasks: read tasks, file tasks, memory each, bytes read, CPUs."""
    throughput: Throughput | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_dim(self) -> int:
        """P = sum of the layers' p: numbers stored per sample."""
        return sum(lay.p for lay in self.layers)

    @property
    def tokens(self) -> int:
        return self.steps * self.global_batch * self.seq_len

    @property
    def occurrences(self) -> int:
        """Rows every per-occurrence table has: steps x global batch."""
        return self.steps * self.global_batch

    @property
    def grad_bytes_per_sample(self) -> int:
        return self.total_dim * _DTYPE_BYTES[self.grad_dtype]

    @property
    def storage_total(self) -> float:
        return sum(self.storage.values())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(total_dim=self.total_dim, tokens=self.tokens, occurrences=self.occurrences,
                 grad_bytes_per_sample=self.grad_bytes_per_sample, storage_total=self.storage_total)
        return d


# ---------------------------------------------------------------------------- inputs

def captured_layers(cfg: Config, vocab_size: int) -> tuple[list[LayerPlan], int, int]:
    """The layers the rank actors hook with their p, the parameter count, and the numbers in
    the state dict (tied weights count twice there: the saved weights hold both).

    Builds the configured model on the meta device (shapes only, nothing allocated) and asks
    GradientCapture, with the rank actors' projection and layer patterns, for its layers.
    """
    from rayattr.capture import GradientCapture
    from rayattr.model.build import build_model
    from rayattr.record.recorder import projection_spec

    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size, cfg.data.seq_len, seed=cfg.train.seed)
    cap = GradientCapture(model, projection=projection_spec(cfg), layers=cfg.capture.layers)
    dims, infos = cap.layer_dims(), cap.layer_info()
    layers = [LayerPlan(n, i.d_in, i.d_out, i.has_bias, dims[n]) for n, i in infos.items()]
    return (layers, sum(p.numel() for p in model.parameters()),
            sum(v.numel() for v in model.state_dict().values()))


def resolve_vocab(cfg: Config, vocab_size: int | None) -> int:
    if vocab_size is not None:
        return int(vocab_size)
    from rayattr.data import load_tokenizer

    try:
        return load_tokenizer(cfg.data.tokenizer).vocab_size
    except Exception as e:  # a cluster-only tokenizer path: let the user say the size
        raise ConfigError(f"cannot load tokenizer {cfg.data.tokenizer!r} here ({e}); "
                          "pass its vocabulary size (--vocab)") from None


def resolve_samples(cfg: Config, n_samples: int | None, tokens: float | None) -> int:
    """Training samples: given, from tokens (full seq_len samples), or the built-in corpus size."""
    if n_samples is not None:
        return int(n_samples)
    if tokens is not None:
        return int(tokens // cfg.data.seq_len)
    if cfg.data.train is None:
        return cfg.data.builtin.n_train
    raise ConfigError(f"data.train is {cfg.data.train!r}: pass its size (--samples or --tokens)")


def resolve_devices(cfg: Config, nodes: int | None, per_node: int | None) -> tuple[int, int]:
    """(nodes, devices segment actors share): GPUs with use_gpu, else CPUs, summed over nodes."""
    if cfg.train.use_gpu:
        per_node = per_node or 8
        nodes = nodes or math.ceil(cfg.train.ranks / per_node)
    else:
        per_node = per_node or os.cpu_count() or 1
        nodes = nodes or 1
    return nodes, nodes * per_node


def half_precision(cfg: Config) -> bool:
    ds = cfg.train.deepspeed
    return any(ds.get(k, {}).get("enabled", False) for k in ("bf16", "fp16"))


def step_own_p(cfg: Config) -> bool:
    """AdamW whose update rows wait for the step's own P (capture.preconditioner "lookahead")."""
    return resolve_optimizer(cfg).adamw and cfg.capture.preconditioner == "lookahead"


def deferred_factor_bytes(cfg: Config, layers: list[LayerPlan]) -> float:
    """AdamW's step's own P: every captured call's input and output gradient (d_in + d_out per
    token, in the forward's dtype) kept from its forward to the step's end, for all of the
    rank's micro-batches of the step (capture/capture.py, defer_updates); and under AdamW with
    sampled-label curvature, those of every pseudo-gradient draw, lagged P or not (their P ĝ
    are formed at the step's end, record/recorder.py)."""
    t, c = cfg.train, cfg.capture
    rows = t.micro_batch * t.grad_accum if step_own_p(cfg) else 0
    if c.curvature == "sampled" and resolve_optimizer(cfg).adamw:
        rows += max(1, math.ceil(t.micro_batch * c.curvature_fraction)) * t.grad_accum * c.curvature_draws
    per_token = sum(lay.d_in + lay.d_out for lay in layers) * (2 if half_precision(cfg) else 4)
    return rows * cfg.data.seq_len * per_token


def response_state_bytes(layers: list[LayerPlan]) -> float:
    """v's response on a rank: per captured layer m_{t−1} kept (float64), m_t and v_t gathered
    whole (float32 and their float64 copies), M_t, its SVD's U and Vᵀ (float64): about ten
    float64 copies of the layer's d_out × d_in_aug (optim/adam_state.read_responses)."""
    return 10 * 8 * sum(lay.d_out * (lay.d_in + int(lay.has_bias)) for lay in layers)


def k_widths(cfg: Config, layers: list[LayerPlan]) -> list[int]:
    """The widths of the recursion's K matrices: one p × p per captured layer, or with
    embed.joint_layers one (Σ p) × (Σ p) per member of the projection (embed/blocks.py)."""
    if not cfg.embed.joint_layers:
        return [lay.p for lay in layers]
    widths: dict[int, int] = {}
    for lay in layers:
        j = member_of(lay.name)[1]
        widths[j] = widths.get(j, 0) + lay.p
    return list(widths.values())


def captured_count(layers: list[LayerPlan]) -> str:
    """"9 layers", or with capture.members "9 layers x 3 members"."""
    modules = len({member_of(lay.name)[0] for lay in layers})
    k = len(layers) // modules if modules else 1
    return f"{modules} layers" + (f" x {k} members" if k > 1 else "")


def statistic_numbers(layers: list[LayerPlan]) -> int:
    """The row and column sums of v that the factored P needs: d_out + d_in_aug per layer."""
    return sum(lay.d_out + lay.d_in + int(lay.has_bias) for lay in layers)


def step_traffic(cfg: Config, n_params: int, layers: list[LayerPlan]) -> dict[str, float]:
    """Bytes one rank puts into collectives per optimizer step: DeepSpeed's gradient reduction
    (every parameter's gradient, in the training dtype) and, under AdamW with partitioned
    state, the all-reduce of v's row and column sums in float32 (optim/adam_state.py), and with
    v's response the gathers of the captured layers' whole m and v."""
    t = cfg.train
    if t.ranks < 2:
        return {}
    stage = int(t.deepspeed.get("zero_optimization", {}).get("stage", 0))
    partitioned = stage >= 1 or half_precision(cfg)  # DeepSpeed's bf16 optimizer partitions too
    adamw = resolve_optimizer(cfg).adamw
    out = {"gradient reduction": n_params * (2 if half_precision(cfg) else 4),
           "AdamW P statistics": 4 * statistic_numbers(layers) if adamw and partitioned else 0.0}
    if adamw and partitioned and cfg.capture.v_response:
        # optim/adam_state.read_responses: m and v of every captured layer gathered whole (float32)
        out["v's response: m and v gathered"] = 2 * 4 * sum(lay.d_out * (lay.d_in + int(lay.has_bias))
                                                             for lay in layers)
    return out


def model_state_bytes(cfg: Config, n_params: int) -> float:
    """Per-rank weights + gradients + optimizer state under the DeepSpeed ZeRO stage (no activations)."""
    ds = cfg.train.deepspeed
    half = half_precision(cfg)
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    w = 2 if half else 4
    # fp32 master weights; AdamW's exp_avg and exp_avg_sq (SGD keeps none: momentum is refused)
    state = (4 if half else 0) + (8 if resolve_optimizer(cfg).adamw else 0)
    world = cfg.train.ranks
    return n_params * (w / (world if stage >= 3 else 1) + w / (world if stage >= 2 else 1)
                       + state / (world if stage >= 1 else 1))


def ipc_bytes(rows: int, batches: int, files: int, dtype: str, *, n_layers: int, total_dim: int,
              source_chars: int) -> float:
    """Bytes of gradient-shard files (Arrow IPC) holding `rows` rows in `batches` record batches."""
    cols = n_layers + len(META_COLUMNS)
    data = rows * (total_dim * _DTYPE_BYTES[dtype] + _ROW_META_BYTES + source_chars)
    return (data + batches * (_BATCH_COLUMN_OVERHEAD * cols + _FILE_BATCH_OVERHEAD)
            + files * _FILE_COLUMN_OVERHEAD * cols)


def builtin_sources(kind: str = "docstrings") -> tuple[int, int]:
    """(number of sources, mean name length) of the built-in corpus of that kind."""
    from rayattr.data.corpus import CLEAN_SOURCES, CORRUPTED_SOURCE
    from rayattr.data.graded import GRADED_SOURCES

    names = list(GRADED_SOURCES) if kind == "graded" else [*CLEAN_SOURCES, CORRUPTED_SOURCE]
    return len(names), round(sum(map(len, names)) / len(names))


# ---------------------------------------------------------------------------- memory

# Python objects per occurrence in a step record (int id, source str, int rank, list slots)
_PY_RECORD_BYTES = 140
# A commit entry in memory: the ShardCommit and its header/footer Parts, + one Part per step
_PY_ENTRY_BYTES, _PY_PART_BYTES = 600, 200
# Raw text bytes per token of a corpus (English text under a BPE tokenizer: ~4 characters)
_TEXT_BYTES_PER_TOKEN = 4
# report/html.SampleTotals: one sample's totals (id, source offset, value, count, se2) and its
# hash-table slot; held merged, as partial groups up to as many again, and sorted
_REPORT_SAMPLE_BYTES = 52
# Every process's interpreter with torch, pyarrow and Ray imported: a Ray worker measured at
# 0.30-0.34 GB before its first task (bench/scale.py, CPU torch; a CUDA context adds more)
_RUNTIME_BYTES = 0.35e9


# the segment actor's first phase, its shard of the validation gradient, as a process of the
# memory table: it is not summed with the sweep's terms (segment_actor_peak takes the larger)
VALIDATION_PHASE = "segment actor, validation shard"


def carried_rows(cfg: Config) -> int:
    """1 when the segments write a second local row per occurrence (embed.momentum_curvature
    on an AdamW run with momentum), else 0."""
    opt = resolve_optimizer(cfg)
    return int(bool(cfg.embed.momentum_curvature and opt.adamw and opt.beta1 > 0))


def link_matrices(cfg: Config, kinds: int) -> int:
    """p × p matrices per layer a segment keeps and its links carry: K (and R under AdamW, Q
    with v's response: `kinds`), and C, D of the full lower row under embed.momentum_curvature."""
    return kinds + 2 * carried_rows(cfg)


def memory_terms(cfg: Config, plan: Plan, *, kinds: int, wide: int, kfac: float, m_curv: int,
                 source_chars: int, n_val: int) -> dict[str, float]:
    """Peak bytes of every term of every process, keyed "<process>: <what>". The processes
    are the driver, each rank actor, each segment actor (in its two phases: its validation
    shard, then the sweep and chain) and `rayattr report`; the code each term follows is named beside it."""
    from rayattr.store.index import SPAN

    c, t = cfg.capture, cfg.train
    P, G, n = plan.total_dim, plan.global_batch, plan.n_samples
    steps, n_seg = plan.steps, plan.segments
    eb, gb = _DTYPE_BYTES[cfg.embed.dtype], _DTYPE_BYTES[c.dtype]
    sq = kfac * sum(w ** 2 for w in k_widths(cfg, plan.layers))
    rows_rank = t.micro_batch * t.grad_accum
    steps_seg = math.ceil(steps / n_seg)
    spr = cfg.store.steps_per_shard
    # the Kronecker factors, and the dense second stage (mix x rank²) where there is one
    proj = sum(c.rank * (lay.d_in + int(lay.has_bias) + lay.d_out) + (c.mix or 0) * c.rank ** 2
               for lay in plan.layers) * 4
    shard_cap = kinds * min(spr * rows_rank * P * gb, MAX_BUFFER_BYTES)
    entry = _PY_ENTRY_BYTES + _PY_PART_BYTES * spr
    phases = min(cfg.embed.phases, steps)
    chunk_steps = max(1, min(WRITE_CHUNK, steps_seg, WRITE_CHUNK_BYTES // (G * P * wide * eb)))
    seg_rows = steps_seg * G
    momentum = resolve_optimizer(cfg).beta1 > 0
    mats = link_matrices(cfg, kinds)
    terms = {
        # data/stage: a read task holds one block of texts, their slots per epoch and the token
        # rows of its used rows (at most all of them); the driver nothing per row
        "data task: one block": min(n, DATA_BATCH_ROWS) * (cfg.data.seq_len * (_TEXT_BYTES_PER_TOKEN + 4)
                                                            + 8 * (t.epochs + 2)),
        # store/index.compact: one chunk of one kind's commit entries, all ranks
        "driver: index compaction": t.ranks * math.ceil(SPAN / spr) * entry,
        # reduce/aggregate.write_outputs: one segment's values table (and its sorted copy), the
        # distinct sample ids per source (and union1d's copy), the bootstrap's kept values, the
        # merged final sums and the source embeddings
        "driver: reduce": 2 * seg_rows * _VALUE_ROW_BYTES + 2 * 8 * min(n, plan.occurrences)
                          + plan.n_sources * BOOTSTRAP_MAX_N * 8
                          + plan.n_sources * (phases + 1) * P * wide * 8,
        "rank: model + optimizer (no activations)": model_state_bytes(cfg, plan.n_params),
        # capture/capture.py (defer_updates): AdamW's update rows wait for the step's own P
        "rank: AdamW update-row factors (to the step's end)": deferred_factor_bytes(cfg, plan.layers),
        # optim/adam_state.py: v's row and column sums in float64, their flat copy, its float32
        # copy all-reduced, and the float64 CPU copy
        "rank: AdamW P statistics": (8 + 8 + 4 + 8) * statistic_numbers(plan.layers) if plan.update_rows else 0.0,
        # one step's rows as float32, the projections (CPU copy + device copy), writer buffers
        "rank: capture + writer": (kinds * rows_rank + m_curv / t.ranks) * P * 4 + 2 * kinds * proj
                                  + (QUEUE_DEPTH + 1) * shard_cap,
        # data/shards: a rank reads its own row group of one token file (store.steps_per_shard
        # steps of int32 ids) and makes that batch's input_ids, mask and labels as int64
        "rank: token rows of its steps": spr * rows_rank * cfg.data.seq_len * (4 + 3 * 8),
        # embed/segment: K (and R, Q with v's response, C and D under embed.momentum_curvature)
        # in the embed dtype; a suffix scan combine's two links in and one out, each with as many
        # float64 blocks, when per-sample embeddings are kept, else the forward scan's sums y (and
        # d, q) in and out; w, z, z_Q are vectors
        "segment actor: K, R and the chain": mats * sq * eb + (
            3 * mats * sq * 8 if not plan.per_source
            else 2 * kinds * plan.n_sources * phases * P * wide * 8),
        # GradientReader windows (one decoded, one prefetched) per kind read
        "segment actor: read windows": (kinds + ((1 + int(plan.update_rows)) if m_curv else 0))
                                       * 2 * min(READ_CHUNK * G * P * gb, WINDOW_BYTES),
        # one write chunk of local embeddings (blocks included; and carried rows under
        # embed.momentum_curvature) and the writer's queued shards
        "segment actor: one write chunk": (1 + carried_rows(cfg)) * (
            chunk_steps * G * P * wide * eb + min(chunk_steps * G * P * wide * 4, (QUEUE_DEPTH + 1) * MAX_BUFFER_BYTES)),
        # per-(source, phase) sums in float64 (+ the carried update rows under AdamW, + the carried
        # response rows with v's response)
        "segment actor: sums": (1 + int(momentum) + int(plan.response_rows)) * plan.n_sources * phases * P * wide * 8,
        # its step records while they load (then without their per-sample lists) and the index
        # entries of the manifests covering its steps, per kind read
        "segment actor: step records and index": seg_rows * (_PY_RECORD_BYTES + source_chars)
                                                 + kinds * t.ranks * math.ceil((steps_seg + SPAN) / spr) * entry,
        # SegmentWorker.validation_sum, before the sweep (freed before K is built): the model, the
        # row groups of one slice of its shard (at most two of data/run_data.VALIDATION_GROUP_ROWS),
        # the slice's per-sample gradients (float32, with the float64 sums beside) and tokens
        f"{VALIDATION_PHASE}: model and gradients": 4 * plan.n_params
                                                + min(2 * VALIDATION_ROWS, n_val) * cfg.data.seq_len * _TEXT_BYTES_PER_TOKEN
                                                + min(VALIDATION_ROWS, n_val) * (P * 4 + cfg.data.seq_len * 24)
                                                + P * 8,
        # exact/metagradient, `rayattr exact` (optional, one process): θ (and Adam's m, v) in float64
        # at ⌈√steps⌉ checkpoints, and one segment's float64 graph beside them (its activations)
        "exact (optional): state checkpoints (grow as √steps)": checkpoint_bytes(plan.n_params, steps, default_every(steps),
                                                                    resolve_optimizer(cfg).adamw),
        "exact (optional): one segment's graph (√steps × global batch)": segment_graph_bytes(
            G * cfg.data.seq_len, default_every(steps), cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head,
            cfg.data.seq_len, plan.vocab_size),
        # report/html.write_report streams values/samples.parquet: one batch of occurrences,
        # the per-sample totals (every distinct sample: the top and bottom k need them all,
        # so this grows with the corpus, not with the occurrences) and the median's last pass
        "report: per-sample totals (distinct samples)": 3 * min(n, plan.occurrences) * (_REPORT_SAMPLE_BYTES + source_chars)
                                                        + SCAN_ROWS * _VALUE_ROW_BYTES + MEDIAN_CAP * 8,
    }
    if plan.response_rows:
        # optim/adam_state.read_responses: every captured layer's whole m_{t−1} kept, m_t and v_t
        # gathered (float32 then float64), M_t and its SVD factors (float64)
        terms["rank: v's response (m, v gathered whole)"] = response_state_bytes(plan.layers)
    for proc in ("driver", "rank", "report", "segment actor", VALIDATION_PHASE, "exact (optional)"):
        terms[f"{proc}: runtime (Python, torch, Ray)"] = _RUNTIME_BYTES
    terms = {k: v for k, v in terms.items() if v or not k.startswith("rank: AdamW")}
    return dict(sorted(terms.items(), key=lambda kv: kv[0].split(":")[0]))  # grouped by process


def device_note(cfg: Config, plan: Plan, device_gb: float) -> str:
    """Whether a rank's GPU holds its model and optimizer state and AdamW's capture memory
    (activations, which depend on checkpointing, are not counted)."""
    state = plan.memory["rank: model + optimizer (no activations)"]
    factors = plan.memory.get("rank: AdamW update-row factors (to the step's end)", 0.0)
    need = state + factors + plan.memory.get("rank: AdamW P statistics", 0.0)
    head = (f"a rank's GPU holds {human_bytes(need)} before activations: model and optimizer "
            f"{human_bytes(state)}, AdamW's waiting update-row factors {human_bytes(factors)}")
    if need <= device_gb * GIB:
        return head + f"; fits {device_gb:g} GiB"
    t = cfg.train
    per_sample = factors / max(1, t.micro_batch * t.grad_accum)
    room = int((device_gb * GIB - state) // per_sample) if per_sample and device_gb * GIB > state else 0
    return (head + f"; more than {device_gb:g} GiB: the factors take {human_bytes(per_sample)} per sample of "
            f"the rank's step, so micro_batch x grad_accum <= {room} leaves activations "
            f"{human_bytes(device_gb * GIB - state - room * per_sample)}, "
            "or capture.preconditioner: lagged keeps none")


def segment_actor_peak(plan: Plan) -> float:
    """A segment actor's peak: the larger of its two phases (the validation shard's model is
    freed before the sweep)."""
    return max(plan.process_memory.get("segment actor", 0.0), plan.process_memory.get(VALIDATION_PHASE, 0.0))


def process_totals(memory: dict[str, float]) -> dict[str, float]:
    """Peak bytes per process: the sum of its terms."""
    out: dict[str, float] = {}
    for key, v in memory.items():
        proc = key.split(":")[0]
        out[proc] = out.get(proc, 0.0) + v
    return out


def memory_warnings(plan: Plan, node_gb: float) -> list[str]:
    """A warning for each term, process and node share that needs more than a node has."""
    node = node_gb * GIB
    out = [f"warning: {k} needs {human_bytes(v)}, more than a node's {node_gb:g} GiB"
           for k, v in plan.memory.items() if v > node]
    out += [f"warning: one {proc} needs {human_bytes(v)} in all, more than a node's {node_gb:g} GiB"
            for proc, v in plan.process_memory.items() if v > node]
    per_node = {"rank": (math.ceil(plan.ranks / plan.nodes), plan.process_memory.get("rank", 0.0)),
                "segment actor": (math.ceil(plan.segments / plan.nodes), segment_actor_peak(plan))}
    for proc, (k, one) in per_node.items():
        total = k * one
        if k > 1 and total > node >= one:
            out.append(f"warning: {k} {proc}s per node need {human_bytes(total)}, more than a node's {node_gb:g} GiB")
    return out


# ---------------------------------------------------------------------------- estimate

def estimate(cfg: Config, *, n_samples: int | None = None, tokens: float | None = None,
             vocab_size: int | None = None, segments: int | None = None, nodes: int | None = None,
             devices_per_node: int | None = None, per_source: bool | None = None,
             n_sources: int | None = None, source_chars: int = 16, actor_memory_gb: float | None = None,
             node_memory_gb: float | None = None, n_validation: int | None = None,
             throughput: Throughput | None = None, device_memory_gb: float | None = None) -> Plan:
    """Predict a run's sizes and times. Arguments override what the config cannot know:

    n_samples / tokens: training set size (required for file datasets); vocab_size: when the
    tokenizer is not available here; segments: embed.segments; nodes / devices_per_node: the
    cluster (default: one node of this machine's CPUs, or 8 GPUs per node); per_source: not
    keeping per-sample embeddings; n_sources / source_chars: distinct sources and their mean name
    length (default: the built-in corpus's, or 16 and 16);
    actor_memory_gb: a segment actor's memory budget (a note says whether one fits it);
    node_memory_gb: a node's memory: a warning for every process, and every node's share of
    processes, that needs more; n_validation: validation samples (default: the built-in's, or
    1 % of the training set); device_memory_gb: a rank's GPU memory (default 80), which the
    note on AdamW's capture memory compares against.
    """
    resolve_optimizer(cfg.validate())
    from rayattr.data.batching import BatchPlan

    t, c = cfg.train, cfg.capture
    vocab = resolve_vocab(cfg, vocab_size)
    n = resolve_samples(cfg, n_samples, tokens)
    bp = BatchPlan(n, t.micro_batch, t.ranks, t.grad_accum, t.epochs, t.seed)
    steps = min(bp.num_steps, t.steps or bp.num_steps)
    layers, n_params, n_state = captured_layers(cfg, vocab)
    nodes, devices = resolve_devices(cfg, nodes, devices_per_node)
    n_seg = max(1, min(steps, segments or cfg.embed.segments or devices))
    keep = cfg.embed.keep_sample_embeddings if per_source is None else not per_source
    tp = throughput or Throughput.for_config(cfg)
    if cfg.data.train is None and n_sources is None:
        n_sources, source_chars = builtin_sources(cfg.data.builtin.kind)
    n_sources = n_sources or 16
    n_val = n_validation or (cfg.data.builtin.n_validation if cfg.data.train is None else max(1, n // 100))
    G, L = bp.global_batch_size, len(layers)
    widths = k_widths(cfg, layers)  # the recursion's K's
    m_curv = (math.ceil(t.micro_batch * c.curvature_fraction) * t.grad_accum * t.ranks * c.curvature_draws
              if c.curvature == "sampled" else 0)
    plan = Plan(n_params=n_params, vocab_size=vocab, seq_len=cfg.data.seq_len, n_samples=n,
                epochs=t.epochs, steps=steps, global_batch=G, ranks=t.ranks, nodes=nodes,
                segments=n_seg, devices=devices, per_source=not keep, layers=layers,
                grad_dtype=c.dtype, embed_dtype=cfg.embed.dtype, curvature_rows_per_step=m_curv,
                update_rows=resolve_optimizer(cfg).adamw,
                response_rows=resolve_optimizer(cfg).adamw and c.v_response,
                n_sources=n_sources, throughput=tp)
    P = plan.total_dim

    # -- storage
    rows = plan.occurrences
    steps_seg = math.ceil(steps / n_seg)
    ipc = functools.partial(ipc_bytes, n_layers=L, total_dim=P, source_chars=source_chars)
    # training writers: one per rank, shards of steps_per_shard steps; segment writers: one per
    # segment, local embeddings in one shard, final ones in read-chunk shards
    spr = cfg.store.steps_per_shard
    # projection blocks (embed/blocks.py) ride along as extra layers: q² blocks of p/q² numbers
    # double the local embeddings and sums, and add p²/q² to each layer's K
    q = cfg.embed.error_blocks
    blocked = q >= 2 and c.rank % q == 0
    wide, kfac = (2, 1 + 1 / q ** 2) if blocked else (1, 1.0)
    train = ipc(rows, steps * t.ranks, t.ranks * math.ceil(steps / spr), c.dtype)
    # AdamW: "update" shards as large as the "train" ones, and with v's response "v_response" ones too
    kinds = 1 + int(plan.update_rows) + int(plan.response_rows)
    storage = {
        "train gradients": train,
        "update rows": train if plan.update_rows else 0.0,
        "v-response rows": train if plan.response_rows else 0.0,
        "curvature rows": ipc(steps * m_curv, steps * t.ranks, t.ranks * math.ceil(steps / spr), c.dtype,
                              source_chars=0) if m_curv else 0.0,
        # AdamW: the pseudo-gradients' update rows P ĝ beside them
        "curvature update rows": ipc(steps * m_curv, steps * t.ranks, t.ranks * math.ceil(steps / spr), c.dtype,
                                     source_chars=0) if m_curv and plan.update_rows else 0.0,
        "local embeddings": ipc(rows, steps, n_seg, "float32", n_layers=L * (1 + q * q if blocked else 1),
                                total_dim=P * wide),
        "final embeddings": ipc(rows, steps, n_seg * math.ceil(steps_seg / READ_CHUNK), "float32",
                                n_layers=L * (1 + q * q if blocked else 1), total_dim=P * wide),
        # under embed.momentum_curvature each occurrence's second local row, D^loc u
        "carried rows (embed.momentum_curvature)": carried_rows(cfg) * ipc(
            rows, steps, n_seg, "float32", n_layers=L * (1 + q * q if blocked else 1), total_dim=P * wide),
        # + R beside K under AdamW, + Q with v's response, + C and D under embed.momentum_curvature
        "K matrices": link_matrices(cfg, kinds) * kfac * n_seg * sum(w ** 2 for w in widths)
                      * _DTYPE_BYTES[cfg.embed.dtype],
        "values tables": 2 * rows * _VALUE_ROW_BYTES,
        # local and final sums: each segment holds the phases it overlaps; + source embeddings
        "source x phase sums": (2 * (cfg.embed.phases + n_seg - 1) * wide + 1) * n_sources * P * 8,
        "weights (initial + final)": 2 * 4 * n_state,  # float32 safetensors
        # train/states.py: the parameters (tied ones once) and Adam's m, v in float32 every
        # train.states_every steps
        "training states (train.states_every)": ((steps - 1) // t.states_every if t.states_every else 0)
                                                * (3 if resolve_optimizer(cfg).adamw else 1) * 4 * n_params,
    }
    plan.storage_per_sample = sum(storage.values())
    plan.storage_per_source = plan.storage_per_sample - storage["final embeddings"]
    if not keep:
        storage["final embeddings"] = 0.0
    plan.storage = storage
    plan.objects = t.ranks * math.ceil(steps / spr) * (kinds + (1 + int(plan.update_rows) if m_curv else 0))
    shard = train / max(1, plan.objects)
    if shard < 4 * MB:
        plan.notes.append(f"gradient shards average {human_bytes(shard)}: raise store.steps_per_shard "
                          "for fewer, larger objects (S3 requests)")

    # -- memory: every term of every process (docs/scale.md, "Memory")
    plan.memory = memory_terms(cfg, plan, kinds=kinds, wide=wide, kfac=kfac, m_curv=m_curv,
                               source_chars=source_chars, n_val=n_val)
    plan.process_memory = process_totals(plan.memory)
    plan.traffic = step_traffic(cfg, n_params, layers)
    if cfg.embed.joint_layers:  # the one term that grows with the square of the captured size
        width, k = widths[0], len(widths)
        each = f"one K of {width:,} x {width:,}" + (f" per member ({k} members)" if k > 1 else "")
        plan.notes.append(f"embed.joint_layers: {each} per segment "
                          f"({human_bytes(k * width ** 2 * _DTYPE_BYTES[cfg.embed.dtype])}, with R under AdamW twice), "
                          f"against {human_bytes(sum(lay.p ** 2 for lay in layers) * _DTYPE_BYTES[cfg.embed.dtype])} "
                          "for the per-layer K's; every step costs (Σ p)² per row")
    if t.use_gpu and plan.update_rows:
        plan.notes.append(device_note(cfg, plan, device_memory_gb or 80.0))
    if actor_memory_gb:
        need = segment_actor_peak(plan)
        plan.notes.append(f"segment actors need {human_bytes(need)} each, whatever their steps: "
                          + (f"fits {actor_memory_gb:g} GiB" if need <= actor_memory_gb * GIB
                             else f"more than {actor_memory_gb:g} GiB (lower embed dtype or capture rank)"))
    if node_memory_gb:
        plan.notes += memory_warnings(plan, node_memory_gb)

    # -- the data stage on the cluster (data/stage.py): read tasks over the corpus, one task per
    # token file and per id bucket; every CPU of the cluster (the devices, at least) reads
    on_cluster = cfg.data.on_cluster
    cpus = max(1, devices) if on_cluster else 1
    files = math.ceil(steps / spr)
    tokens_bytes = steps * G * cfg.data.seq_len * 4
    plan.data_stage = {"read tasks": max(1, math.ceil(n / min(TASK_ROWS, math.ceil(n / (2 * cpus))))),
                       "file tasks": files + max(1, min(cpus, math.ceil(n / BUCKET_IDS))),
                       "memory per read task": plan.memory["data task: one block"],
                       "memory per file task": tokens_bytes / files + spr * G * 64,
                       "bytes read": n * cfg.data.seq_len * _TEXT_BYTES_PER_TOKEN, "cpus": cpus,
                       "on cluster": float(on_cluster)}
    plan.time["data"] = ((tp.data_start_s if on_cluster else 0.0)
                         + plan.data_stage["bytes read"] / (tp.data_mbps_per_cpu * MB * cpus)
                         + tokens_bytes / (tp.store_write_mbps * MB * cpus))  # one writer per file task
    if not on_cluster and cfg.data.train is not None:
        plan.notes.append(f"data.stage: driver: the driver reads all {n:,} training rows and holds their ids and "
                          f"the used rows' tokens ({human_bytes(n * 12 + tokens_bytes)}); data.stage: cluster "
                          "keeps it flat")

    # -- time
    rows_rank, gb = t.micro_batch * t.grad_accum, _DTYPE_BYTES[c.dtype]
    flops_step = 6 * n_params * G * cfg.data.seq_len * (1 + (c.curvature_fraction * c.curvature_draws * c.members
                                                                if m_curv else 0))
    compute = flops_step / t.ranks / tp.train_flops * (1 + tp.capture_overhead) + tp.train_step_s
    write = rows_rank * (P * gb + _ROW_META_BYTES + source_chars) * (kinds + (m_curv / G if m_curv else 0))
    write_s = write / (tp.store_write_mbps * MB)  # a background thread: overlaps with compute
    plan.time["train"] = tp.actor_start_s + steps * max(compute, write_s)
    if write_s > compute:
        plan.notes.append("training is bound by gradient writes to the store "
                          f"({write_s:.3g} s vs {compute:.3g} s compute per step)")
    share = max(1.0, n_seg / devices)  # segment actors outnumbering devices share them
    sq = kfac * sum(w ** 2 for w in widths)
    rows_seg = steps_seg * G
    # embed.momentum_curvature sweeps twice (from [I, 0] and [0, I]) and writes a carried row
    # beside every local one
    sweeps = 1 + carried_rows(cfg)
    rec_flops = sweeps * steps_seg * sq * (4 * G if not m_curv else 2 * G + 4 * m_curv)
    io_in = ipc(kinds * rows_seg + steps_seg * m_curv, steps_seg * t.ranks, t.ranks, c.dtype)
    io_out = sweeps * ipc(rows_seg, steps_seg, 1, "float32")
    plan.time["embed"] = tp.actor_start_s + share * (
        steps_seg * L * tp.embed_layer_step_s + rec_flops / tp.embed_flops
        + io_in / (tp.store_read_mbps * MB) + io_out / (tp.store_write_mbps * MB))
    fin = (steps_seg * L * tp.embed_layer_step_s + 2 * rows_seg * sq / tp.embed_flops
           + io_out / (tp.store_read_mbps * MB) + (io_out / (tp.store_write_mbps * MB) if keep else 0))
    # with per-sample embeddings the suffix scan (math/dvemb.suffix_scan over segments 1..n-1 at
    # the devices' width): ⌈log2(n-1)⌉ rounds with a device per actor, each combine one p × p
    # product per layer (two with R); else the forward scan of the sums (keys × p² per layer,
    # segment after segment). The vector chain is p² either way
    chain = (scan_rounds(n_seg - 1, devices) * 2 * link_matrices(cfg, kinds) * sum(w ** 3 for w in widths) if keep
             else 2 * n_seg * n_sources * min(cfg.embed.phases, steps) * sum(w ** 2 for w in widths)
             ) / tp.embed_flops
    plan.time["reduce"] = share * fin + chain + rows / tp.reduce_rows_per_s
    return plan


# ---------------------------------------------------------------------------- output

def human_time(s: float) -> str:
    for unit, scale in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s:.3g} s"


def format_plan(plan: Plan) -> str:
    """The plan as the text `rayattr plan` prints."""
    widths = sorted({lay.p for lay in plan.layers})
    mode = "per-source (no per-sample embeddings)" if plan.per_source else "per-sample embeddings kept"
    lines = [
        f"model       {plan.n_params / 1e6:,.1f} M params, vocab {plan.vocab_size}, seq_len {plan.seq_len}",
        f"data        {plan.n_samples:,} samples x {plan.epochs} epoch(s) -> {plan.steps:,} steps x "
        f"{plan.global_batch} samples = {plan.tokens:.3g} tokens",
        f"cluster     {plan.nodes} node(s): {plan.ranks} rank actors, {plan.segments} segment actors "
        f"on {plan.devices} devices, 1 reducer (driver)",
        f"capture     {captured_count(plan.layers)}, p = {'/'.join(map(str, widths))} per layer, "
        f"P = {plan.total_dim:,} numbers = {human_bytes(plan.grad_bytes_per_sample)} per sample ({plan.grad_dtype})"
        + (f", {plan.curvature_rows_per_step} curvature rows per step" if plan.curvature_rows_per_step else "")
        + (", + an update row per sample (AdamW)" if plan.update_rows else "")
        + (", + a v-response row per sample" if plan.response_rows else ""),
        "",
        f"storage     ({mode})",
    ]
    lines += [f"  {k:<28}{human_bytes(v):>12}" for k, v in plan.storage.items() if v]
    lines += [f"  {'total':<28}{human_bytes(plan.storage_total):>12}",
              f"  {'per-sample mode total':<28}{human_bytes(plan.storage_per_sample):>12}",
              f"  {'per-source mode total':<28}{human_bytes(plan.storage_per_source):>12}",
              f"  {'gradient shards':<28}{plan.objects:>12,}  (+ as many commit entries)",
              "", "memory      (peak per process, by term)"]
    for proc, total in plan.process_memory.items():
        lines.append(f"  {proc:<48}{human_bytes(total):>12}")
        lines += [f"    {k.split(': ', 1)[1]:<46}{human_bytes(v):>12}"
                  for k, v in plan.memory.items() if k.split(":")[0] == proc]
    if plan.traffic:
        lines += ["", "traffic     (bytes a rank sends into collectives per step)"]
        lines += [f"  {k:<28}{human_bytes(v):>12}" for k, v in plan.traffic.items() if v]
    d = plan.data_stage
    if d:
        cluster = bool(d["on cluster"])
        where = (f"Ray Data on the cluster's {d['cpus']:.0f} CPUs; the driver holds nothing per row" if cluster
                 else "in the driver, the same steps in one process")
        reads, files = ("read tasks", "token file and id tasks") if cluster else ("read blocks", "token files and id checks")
        lines += ["", f"data stage  ({where})",
                  f"  {reads:<28}{d['read tasks']:>12,.0f}  ({human_bytes(d['memory per read task'])} each, "
                  f"{human_bytes(d['bytes read'])} read in all)",
                  f"  {files:<28}{d['file tasks']:>12,.0f}  ({human_bytes(d['memory per file task'])} each)"]
    lines += ["", "time        (wall, stages run one after another)"]
    lines += [f"  {k:<12}{human_time(v):>12}" for k, v in plan.time.items()]
    lines += [f"  {'total':<12}{human_time(sum(plan.time.values())):>12}"]
    tp = plan.throughput
    if tp is not None:
        lines += ["", "throughputs " + ", ".join(f"{k}={v:.3g}" for k, v in dataclasses.asdict(tp).items())]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command line

def parse_count(text: str) -> float:
    """'1e12', '1T', '500B', '2.5M' -> a number (K, M, B/G, T suffixes)."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    s = text.strip().upper()
    try:
        return float(s[:-1]) * scale[s[-1]] if s and s[-1] in scale else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 1e12, 1T, 500B)") from None


def plan_parser(prog: str = "rayattr plan") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Storage, memory and time estimates of a run.")
    p.add_argument("config", nargs="?", help="YAML config (default: the built-in demo run)")
    p.add_argument("--tokens", type=parse_count, help="training tokens per epoch (samples = tokens / seq_len)")
    p.add_argument("--samples", type=parse_count, help="training samples per epoch")
    p.add_argument("--vocab", type=int, help="vocabulary size (when the tokenizer is not available here)")
    p.add_argument("--segments", type=int, help="segment actors (default: embed.segments or one per device)")
    p.add_argument("--nodes", type=int, help="cluster nodes (default: enough for the ranks)")
    p.add_argument("--devices-per-node", type=int, help="GPUs (use_gpu) or CPUs per node for segment actors")
    p.add_argument("--per-source", action="store_true", default=None, help="no per-sample embeddings")
    p.add_argument("--per-sample", dest="per_source", action="store_false", help="keep per-sample embeddings")
    p.add_argument("--sources", type=int, help="distinct data sources (default: built-in corpus's, or 16)")
    p.add_argument("--actor-memory-gb", type=float, help="segment actor memory budget: whether one fits")
    p.add_argument("--node-memory-gb", type=float, help="a node's memory: warn for every process or term above it")
    p.add_argument("--device-memory-gb", type=float, help="a rank's GPU memory (default 80): AdamW capture note")
    p.add_argument("--validation-samples", type=parse_count, help="validation samples (default: built-in's or 1 %%)")
    p.add_argument("--store-write-mbps", type=float, help="one writer's store MB/s")
    p.add_argument("--store-read-mbps", type=float, help="one reader's store MB/s")
    p.add_argument("--train-flops", type=float, help="effective FLOP/s per rank (6 N tokens)")
    p.add_argument("--embed-flops", type=float, help="segment actor matmul FLOP/s")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def plan_main(argv: list[str] | None = None) -> int:
    """`rayattr plan CONFIG [flags]`: print the estimates; 2 on a config error."""
    args = plan_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        tp = Throughput.for_config(cfg)
        over = {"store_write_mbps": args.store_write_mbps, "store_read_mbps": args.store_read_mbps,
                "train_flops": args.train_flops, "embed_flops": args.embed_flops}
        tp = dataclasses.replace(tp, **{k: v for k, v in over.items() if v is not None})
        plan = estimate(cfg, n_samples=args.samples, tokens=args.tokens, vocab_size=args.vocab,
                        segments=args.segments, nodes=args.nodes, devices_per_node=args.devices_per_node,
                        per_source=args.per_source, n_sources=args.sources,
                        actor_memory_gb=args.actor_memory_gb, node_memory_gb=args.node_memory_gb,
                        device_memory_gb=args.device_memory_gb,
                        n_validation=int(args.validation_samples) if args.validation_samples else None,
                        throughput=tp)
    except RayattrError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT
    print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(plan_main())
