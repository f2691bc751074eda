"""The one typed configuration of a rayattr run, loaded from YAML.

Every field has a default, so an empty file (or no file) is the built-in demo run. Unknown or
mistyped keys are errors that name the key and suggest the closest valid one. The resolved
config is written into the run's manifest, so every run can be replayed from its own record.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from rayattr.errors import RayattrError


class ConfigError(RayattrError, ValueError):
    """A configuration that cannot be run: names the offending key or value."""


@dataclass
class ModelConfig:
    family: str = "gpt2"
    """HuggingFace causal-LM family built from a config with random init: "gpt2" or "llama"."""
    factory: str | None = None
    """Instead of `family`: "module:function" returning a torch.nn.Module causal LM; called as f(vocab_size, seq_len)."""
    n_layer: int = 2
    """Transformer blocks."""
    n_embd: int = 64
    """Hidden width."""
    n_head: int = 2
    """Attention heads."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments for the HuggingFace config class (passed through)."""


@dataclass
class BuiltinDataConfig:
    kind: str = "docstrings"
    """"docstrings": six standard-library docstring families and `corrupted` (near-exchangeable
    clean sources); "graded": sources of graded true value, from near-duplicates of the validation
    texts to pure noise (rayattr/data/graded.py), for checking per-source answers."""
    n_train: int = 1536
    """Training samples of the built-in standard-library docstring corpus."""
    n_validation: int = 128
    """Held-out validation samples (clean sources only)."""
    corrupted_fraction: float = 0.15
    """Share of training samples in the deliberately corrupted source `corrupted` (kind "docstrings")."""
    max_chars: int | None = None
    """Longest sample in UTF-8 bytes; None: data.seq_len − 1, so that every text with its eos
    fits in data.seq_len tokens and none is truncated (DataConfig.builtin_max_chars)."""


@dataclass
class DataConfig:
    train: str | list[str] | None = None
    """Parquet/JSONL file(s) or directory with `text` and `source` (optional `id`); local or s3://. None = built-in corpus."""
    validation: str | list[str] | None = None
    """Validation file(s), same format; required when `train` is given."""
    pretokenized: bool = False
    """The files hold token ids in an `input_ids` list column (optional `id` and `source`; a file
    without `source` is its own source), as Megatron and HuggingFace pipelines hand data over.
    Rows are used as they are: no eos is added, a row longer than seq_len is an error, and every
    id must be below the vocab_size of `tokenizer` (which must be the one that made them)."""
    copy: bool = False
    """Copy `train` into the run even when it sits in the store's own filesystem or bucket. By
    default such data stays where it is: the run records its files' URLs, sizes and versions and
    refuses to resume or show texts if they changed. Data from elsewhere is always copied."""
    tokenizer: str = "byte"
    """"byte" (byte-level) or a local HuggingFace tokenizer directory."""
    seq_len: int = 64
    """Tokens per sample (truncated / right-padded)."""
    builtin: BuiltinDataConfig = field(default_factory=BuiltinDataConfig)
    """Settings of the built-in corpus."""
    stage: str = "auto"
    """Where the data stage runs: "cluster" (Ray Data tasks over the cluster, the driver holds
    nothing per row), "driver" (the same steps in the driver process), or "auto": the driver for
    the built-in corpus, which the driver generates and holds anyway (Ray Data's fixed start-up,
    about 10-20 s, would be most of the stage), the cluster for training files."""

    @property
    def on_cluster(self) -> bool:
        """Whether the data stage runs as Ray Data tasks (given Ray is up)."""
        return self.stage == "cluster" or (self.stage == "auto" and self.train is not None)

    @property
    def builtin_max_chars(self) -> int:
        """The built-in corpus's longest text: builtin.max_chars, else what fits seq_len."""
        return self.builtin.max_chars or max(1, self.seq_len - 1)


@dataclass
class OptimizerConfig:
    """The optimizer the attribution models (docs/method.md §2 SGD, §7 AdamW). DeepSpeed's own
    `train.deepspeed.optimizer` block (type SGD, Adam or AdamW) may be used instead: it
    resolves to the same settings (rayattr/optim/spec.py); giving both is an error."""

    type: str = "adamw"
    """"adamw" (torch.optim.AdamW semantics, the default) or "sgd" (plain SGD at train.lr, no momentum)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW's (β₁, β₂): the momentum's and the second moment's decay; read only with adamw."""
    eps: float = 1e-8
    """AdamW's ε in the preconditioner 1/(√v̂ + ε); read only with adamw."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay λ: each step scales the weights by 1 − lr_t·λ; adamw only."""


@dataclass
class TrainConfig:
    ranks: int = 2
    """DeepSpeed ranks, one Ray Train worker each."""
    micro_batch: int = 8
    """Samples per rank per micro-step (DeepSpeed train_micro_batch_size_per_gpu)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (DeepSpeed gradient_accumulation_steps)."""
    epochs: int = 2
    """Passes over the training data."""
    steps: int | None = None
    """Stop after this many optimizer steps (None = all epochs)."""
    lr: float = 0.002
    """Peak learning rate of train.optimizer (when the DeepSpeed config has no optimizer; a
    DeepSpeed scheduler then moves it per step)."""
    seed: int = 0
    """Seed of model init and data order."""
    use_gpu: bool = False
    """One GPU per rank (NCCL) instead of CPU (gloo)."""
    checkpoint_every: int = 0
    """DeepSpeed checkpoint interval in steps (0 = none: a restart retrains from step 0)."""
    states_every: int = 0
    """Keep the full training state (weights, and Adam's m and v, in float32) every this many
    steps in the run's states/ (0 = none), so that `rayattr exact` follows the run's own
    trajectory rather than a float64 replay of it (docs/method.md §10). Small models only:
    each state is 3× the model; `rayattr plan` counts them."""
    max_restarts: int = 2
    """Times training restarts from the last checkpoint after a rank dies (Ray Train FailureConfig.max_failures)."""
    placement: str = "PACK"
    """Placement strategy of the ranks (Ray Train ScalingConfig): PACK, SPREAD or STRICT_SPREAD (one per node)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimizer: adamw (default) or sgd, with its settings."""
    deepspeed: dict[str, Any] = field(default_factory=lambda: {
        "zero_optimization": {"stage": 1},
        "gradient_clipping": 1.0,
        "scheduler": {"type": "WarmupCosineLR",
                      "params": {"total_num_steps": "auto", "warmup_num_steps": "auto",
                                 "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1}},
    })
    """DeepSpeed config passed through (zero_optimization, bf16/fp16, scheduler, optimizer...).
    Batch-size keys are filled from micro_batch/grad_accum/ranks; a scheduler's
    total_num_steps / warmup_num_steps may be "auto" (the run's steps / a tenth of them). The
    default: ZeRO-1, clipping at 1.0, linear warm-up then cosine decay to a tenth of train.lr.
    Giving this key replaces the whole default."""


@dataclass
class CaptureConfig:
    rank: int = 16
    """Projection rank r for both Kronecker factors (p = r*r per layer)."""
    seed: int = 0
    """Projection seed (the same matrices are regenerated at query time), and with
    curvature="sampled" a seed of the label draws: a run recorded again at another seed is an
    independent estimate of the same trajectory's values."""
    kind: str = "gaussian"
    """"gaussian" or "rademacher" projections."""
    mix: int | None = None
    """A dense random projection after the Kronecker one, from its rank² numbers per layer to
    `mix` (then p = mix): more accurate inner products at the same p, for the Kronecker one's
    cost (docs/method.md §5, §9). Needs embed.error_blocks: 1 (the blocks would share the
    Kronecker stage's error)."""
    members: int = 1
    """Independent estimates of every value in one run: each layer is projected this many times
    (member j with its own matrices) and, with curvature="sampled", each member draws labels of
    its own; every member runs its own recursion, the value is their mean and value_se their
    spread (docs/method.md §8). Rows, K's and the label draws cost this many times as much.
    Replaces embed.error_blocks (set it to 1)."""
    layers: list[str] | None = None
    """fnmatch patterns of module names to capture (None = every Linear/Conv1D)."""
    curvature: str = "empirical"
    """"empirical" (Fisher of recorded gradients, the paper) or "sampled" (sampled-label Fisher)."""
    curvature_fraction: float = 0.5
    """Share of each micro-batch used for sampled-label pseudo-gradients."""
    curvature_draws: int = 1
    """Label draws per sampled sample, each a forward and backward of its own: the estimate
    (|B|/m) Σ ĝ ĝᵀ is unbiased at any m, but at few rows its spread adds spurious sharp
    directions (η·λ_max far above the run's own), which more draws average out (docs/method.md §3)."""
    dtype: str = "float32"
    """Stored gradient dtype: float32, bfloat16 or float16."""
    preconditioner: str = "lookahead"
    """AdamW: which second moment v the update rows' P = 1/(√v̂ + ε) comes from (docs/method.md §7).
    "lookahead": v_t, the one the step's own update divides by, read right after that update:
    each captured layer's input and output gradient wait until the step's end for it (no second
    pass); "lagged": v as it stands before the step, read every `precondition_every` steps (no
    waiting factors, for a rank short of memory, but it overstates P wherever gradients grow)."""
    precondition_every: int = 1
    """AdamW with preconditioner "lagged": re-read Adam's second moment v for the update rows
    every this many steps; checkpoint_every must be a multiple of it, so a resumed run reads the
    same v. "lookahead" reads v_t every step and needs 1."""
    v_response: bool = False
    """AdamW: also record each occurrence's second-moment response row y = D_t ⊙ ḡ_t ⊙ g (store
    kind "v_response") and carry Q next to R in the segments and the reduce, so that the values
    include how removing the occurrence lowers Adam's v in later steps (docs/method.md §7,
    "v's response"). Needs preconditioner "lookahead". The ranks gather each captured layer's
    whole m and v at every step (small models: the rows need M_t = D_t ⊙ ḡ_t entry by entry)."""
    v_response_rank: int = 1
    """With v_response: the rank k of M_t's truncated SVD that the projected rows use, at k
    update-row projections per layer and step (M_t is signed, so v's row and column sums do not
    factor it; k ≥ min(d_out, d_in + 1) is exact)."""


@dataclass
class EmbedConfig:
    segments: int | None = None
    """Influence-checkpoint segments, one actor each (None = one per available CPU/GPU)."""
    keep_sample_embeddings: bool = True
    """Write per-occurrence final embeddings (needed by `rayattr query`)."""
    phases: int = 10
    """Equal step buckets for the per-source x phase values."""
    dtype: str = "float32"
    """Precision of the recursion in the segment actors (float64 for exact comparisons)."""
    error_blocks: int = 2
    """q: the recursion also runs on the q×q blocks of each projected layer, whose spread gives
    every value a standard error (values/samples.parquet value_se); 1 = off. Needs capture.rank
    divisible by q."""
    joint_layers: bool = False
    """One K across all captured layers, (Σ p)² numbers, instead of one p × p K per layer: the
    curvature between layers pulls a perturbation back too, and on the default AdamW run even
    the exact Hessian kept per layer loses the last quarter's order (docs/method.md §3, §9).
    K, R, the chain and its links grow with the square of the captured size (`rayattr plan`)."""
    momentum_curvature: bool = False
    """AdamW: K's curvature term through Adam's momentum, K_t = α K − R_t Σ u gᵀ, the exact K of
    the linearised run (docs/method.md §7), instead of α K − η K Σ u gᵀ, which spends the
    curvature's pull at once. Doubles K's work and memory in the segments (a second sweep, C and
    D) and writes a second row per occurrence. Not with capture.v_response."""
    unstable: str = "refuse"
    """Where the recursion is unstable (η·λ_max past the run's stability edge, or K exploding):
    "refuse" the run (DivergenceError), or "cut" there: occurrences from that step back get no
    value (manifest attributable_from), later ones are valued as usual (docs/method.md §9). A
    loss spike in warm-up makes the default AdamW run's true curvature ~30× past its edge."""
    clip_response: bool = False
    """At steps gradient clipping acted on, give the recursion and the values the clipped step's
    own response to a sample, κ (I − ĝĝᵀ) g, instead of κ g (dvemb.clipped_step_rows; docs/method.md
    §9): the component along the batch's mean gradient, which clipping takes out, made the values
    3–7× too large at the last step of bench/regime.py's clipped runs. Off until it has been
    measured on more runs than those."""


@dataclass
class StoreConfig:
    uri: str = "./rayattr_runs"
    """Root URI of runs: a local path, file://, or s3://bucket/prefix."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec/s3fs options (endpoint_url, ...). Prefer the AWS environment for credentials;
    these are never written into the run's manifest."""
    steps_per_shard: int = 8
    """Optimizer steps per gradient shard."""


@dataclass
class Config:
    run_id: str | None = None
    """Run name under the store root (None = timestamped)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    store: StoreConfig = field(default_factory=StoreConfig)

    # ---------------------------------------------------------------- (de)serialisation

    @classmethod
    def from_dict(cls, data: dict | None) -> "Config":
        return _build(cls, data or {}, "")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "Config":
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        return cls.from_dict(data)

    def to_dict(self, redact: bool = True) -> dict:
        d = dataclasses.asdict(self)
        if redact:  # credentials and endpoints stay out of manifests and logs
            del d["store"]["storage_options"]
        return d

    def with_overrides(self, **dotted: Any) -> "Config":
        """Config with "section.key" overrides applied (None values are ignored)."""
        d = self.to_dict(redact=False)
        for key, value in dotted.items():
            if value is None:
                continue
            node = d
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return Config.from_dict(d)

    def validate(self) -> "Config":
        t, c = self.train, self.capture
        for key in ("train.ranks", "train.micro_batch", "train.grad_accum", "train.epochs", "train.steps",
                    "capture.rank", "capture.mix", "capture.members", "capture.precondition_every", "capture.v_response_rank",
                    "store.steps_per_shard",
                    "data.seq_len", "embed.phases",
                    "embed.segments", "embed.error_blocks", "model.n_layer", "model.n_embd", "model.n_head",
                    "data.builtin.n_train", "data.builtin.n_validation", "data.builtin.max_chars"):
            value = self._get(key)
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if not (math.isfinite(t.lr) and t.lr > 0):
            raise ConfigError(f"train.lr must be a positive number, got {t.lr}")
        if self.data.builtin.kind not in ("docstrings", "graded"):
            raise ConfigError(f"data.builtin.kind must be 'docstrings' or 'graded', got {self.data.builtin.kind!r}")
        if not 0 <= self.data.builtin.corrupted_fraction < 1:
            raise ConfigError(f"data.builtin.corrupted_fraction must be in [0, 1), got {self.data.builtin.corrupted_fraction}")
        if t.checkpoint_every < 0 or t.max_restarts < 0 or t.states_every < 0:
            raise ConfigError("train.checkpoint_every, train.states_every and train.max_restarts must be >= 0")
        if t.placement not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError(f"train.placement must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {t.placement!r}")
        if self.embed.unstable not in ("refuse", "cut"):
            raise ConfigError(f"embed.unstable must be 'refuse' or 'cut', got {self.embed.unstable!r}")
        if c.curvature not in ("empirical", "sampled"):
            raise ConfigError(f"capture.curvature must be 'empirical' or 'sampled', got {c.curvature!r}")
        if c.kind not in ("gaussian", "rademacher"):
            raise ConfigError(f"capture.kind must be 'gaussian' or 'rademacher', got {c.kind!r}")
        if c.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"capture.dtype must be float32, bfloat16 or float16, got {c.dtype!r}")
        if c.curvature_draws < 1:  # the type is checked where the config is read
            raise ConfigError(f"capture.curvature_draws must be an integer >= 1, got {c.curvature_draws}")
        if not 0 < c.curvature_fraction <= 1:
            raise ConfigError(f"capture.curvature_fraction must be in (0, 1], got {c.curvature_fraction}")
        if self.embed.dtype not in ("float32", "float64"):
            raise ConfigError(f"embed.dtype must be float32 or float64, got {self.embed.dtype!r}")
        if (self.data.train is None) != (self.data.validation is None):
            raise ConfigError("data.train and data.validation must be given together (or neither, for the built-in corpus)")
        if self.data.stage not in ("auto", "cluster", "driver"):
            raise ConfigError(f"data.stage must be auto, cluster or driver, got {self.data.stage!r}")
        if self.data.pretokenized and self.data.train is None:
            raise ConfigError("data.pretokenized needs data.train and data.validation: the built-in corpus is text")
        if self.model.factory is None and self.model.family not in ("gpt2", "llama"):
            raise ConfigError(f"model.family must be 'gpt2' or 'llama' (or set model.factory), got {self.model.family!r}")
        q = self.embed.error_blocks
        if q > 1 and c.members > 1:
            raise ConfigError(f"capture.members {c.members} with embed.error_blocks {q}: the members' spread is the "
                              "values' standard error; set embed.error_blocks: 1")
        if q > 1 and c.mix is not None:
            raise ConfigError(f"capture.mix {c.mix} with embed.error_blocks {q}: the blocks of a mixed projection "
                              "share its Kronecker stage's error, so their spread would understate it; set "
                              "embed.error_blocks: 1 (no standard errors)")
        if q > 1 and c.rank % q:
            raise ConfigError(f"capture.rank {c.rank} is not divisible by embed.error_blocks {q}: the standard "
                              f"errors need the projection cut into {q}×{q} blocks; choose a rank divisible by "
                              f"{q}, or embed.error_blocks: 1 (no standard errors)")
        self._validate_model()
        check_deepspeed(t.deepspeed)
        return self

    def _validate_model(self) -> None:
        m = self.model
        if m.factory is not None:
            module, sep, fn = str(m.factory).partition(":")
            if not (isinstance(m.factory, str) and sep and module and fn.isidentifier()):
                raise ConfigError(f"model.factory must look like 'module:function', got {m.factory!r}")
        if not isinstance(m.extra, dict) or not all(isinstance(k, str) for k in m.extra):
            raise ConfigError(f"model.extra must be a mapping of config keyword arguments, got {m.extra!r}")

    def _get(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    def differences(self, other: "Config", ignore: tuple[str, ...] = ()) -> list[str]:
        """Dotted keys whose values differ, as "key: self_value != other_value" lines."""
        a, b = _flatten(self.to_dict()), _flatten(other.to_dict())
        keys = sorted(k for k in set(a) | set(b)
                      if a.get(k) != b.get(k) and not any(k == i or k.startswith(i + ".") for i in ignore))
        return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in keys]

    @property
    def global_batch(self) -> int:
        return self.train.micro_batch * self.train.ranks * self.train.grad_accum


# ZeRO stages rayattr records under: 3 shards the parameters themselves, which the capture
# hooks (whole weight gradients per layer) and the Adam state reads do not support
ZERO_STAGES = (0, 1, 2)


def check_deepspeed(ds: Any) -> None:
    """train.deepspeed: a mapping whose zero_optimization stage rayattr supports, and whose
    sections DeepSpeed reads as mappings are mappings."""
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed must be a mapping (the DeepSpeed config), got {type(ds).__name__}")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"train.deepspeed.zero_optimization must be a mapping, got {zero!r}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise ConfigError(f"train.deepspeed.zero_optimization.stage must be a whole number, got {stage!r}")
    if stage == 3:
        raise ConfigError("train.deepspeed.zero_optimization.stage 3 (ZeRO-3) is not supported: it partitions "
                          "the parameters, and rayattr captures each layer's whole weight gradient and reads "
                          "Adam's state per parameter; use stage 0, 1 or 2")
    if stage not in ZERO_STAGES:
        raise ConfigError(f"train.deepspeed.zero_optimization.stage must be 0, 1 or 2, got {stage}")
    for key in ("optimizer", "scheduler", "fp16", "bf16"):
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(f"train.deepspeed.{key} must be a mapping, got {ds[key]!r}")
    clip = ds.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip < 0:
        raise ConfigError(f"train.deepspeed.gradient_clipping must be a number >= 0, got {clip!r}")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and prefix + k not in ("train.deepspeed", "model.extra"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<top>'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {sorted(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            kwargs[key] = _build(sub, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _typed(value, sub, f"{prefix}{key}")
    return cls(**kwargs)


def _typed(value: Any, hint: Any, key: str) -> Any:
    """`value` checked against the field's type hint (ints are accepted where floats are)."""
    if _matches(value, hint):
        return float(value) if hint is float else value
    raise ConfigError(f"config key '{key}' must be {_describe(hint)}, got {value!r} ({type(value).__name__})")


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # YAML's `true` is a bool, and bool is an int in Python: not a count
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) for k in value)
    raise TypeError(f"config type {hint!r} is not supported")  # a bug in this module, not in the YAML


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> Config:
    """Config from an optional YAML file plus dotted overrides, validated."""
    cfg = Config.from_yaml(path) if path else Config()
    return cfg.with_overrides(**overrides).validate()
