"""Which optimizer a run trains with, resolved from `train.optimizer` or DeepSpeed's own
`train.deepspeed.optimizer` block, and what the attribution refuses.

The mathematics covers plain SGD (docs/method.md §2–3) and AdamW with decoupled weight decay
(§7). Anything else — SGD momentum, L2-coupled Adam decay, AMSGrad, other optimizers — would
be attributed with the wrong recursion, so it is an error that names the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rayattr.config import ConfigError

if TYPE_CHECKING:
    from rayattr.config import Config

DS_KEY = "train.deepspeed.optimizer"
# DeepSpeed Adam/AdamW params that change nothing the attribution models
_DS_HARMLESS = {"torch_adam", "fused", "foreach"}


@dataclass(frozen=True)
class OptimizerSpec:
    """The resolved optimizer: what the rank builds and what the step records say."""

    type: str
    """"sgd" or "adamw"."""
    lr: float
    """Peak learning rate (a DeepSpeed scheduler moves it per step)."""
    beta1: float = 0.0
    """Adam's momentum β₁ (0 for SGD)."""
    beta2: float = 0.0
    """Adam's second-moment decay β₂ (0 for SGD)."""
    eps: float = 0.0
    """Adam's ε (0 for SGD)."""
    weight_decay: float = 0.0
    """Decoupled weight decay λ (0 for SGD)."""
    from_deepspeed: bool = False
    """True when it came from DeepSpeed's optimizer block."""

    @property
    def adamw(self) -> bool:
        return self.type == "adamw"


def resolve_optimizer(cfg: "Config") -> OptimizerSpec:
    """The run's optimizer; ConfigError naming the key for what the mathematics does not cover,
    the optimizer's own settings and the capture settings that do not go with it alike.
    Config.validate() checks each section on its own; every entry point (the job, `rayattr plan`,
    rayattr.new_run, the Recorder) resolves the optimizer right after it, before anything starts."""
    spec = _resolve(cfg.train)
    check_adamw_capture(cfg, spec)
    return spec


def _resolve(t) -> OptimizerSpec:
    block = (t.deepspeed or {}).get("optimizer")
    if block is not None:
        if dataclasses.asdict(t.optimizer) != dataclasses.asdict(type(t.optimizer)()):
            raise ConfigError(f"train.optimizer and {DS_KEY} are both set: give the optimizer in one place")
        return _from_deepspeed(block, t.lr)
    return _from_own(t.optimizer, t.lr)


def _from_own(opt, lr: float) -> OptimizerSpec:
    kind = str(opt.type).lower()
    if kind == "sgd":
        return OptimizerSpec("sgd", lr)
    if kind != "adamw":
        raise ConfigError(f"train.optimizer.type={opt.type!r}: rayattr attributes 'sgd' and 'adamw' "
                          "(docs/method.md §2, §7)")
    if len(opt.betas) != 2:
        raise ConfigError(f"train.optimizer.betas must be two numbers (β₁, β₂), got {opt.betas!r}")
    return _adamw("train.optimizer", lr, opt.betas[0], opt.betas[1], opt.eps, opt.weight_decay, False)


def _from_deepspeed(block: dict, default_lr: float) -> OptimizerSpec:
    kind = str(block.get("type", "")).lower()
    params = dict(block.get("params") or {})
    lr = float(params.pop("lr", default_lr))
    if kind == "sgd":
        for key in ("momentum", "weight_decay"):
            if params.get(key, 0):
                # momentum is a different recursion; SGD's L2 decay is not in K either
                raise ConfigError(f"{DS_KEY}.params.{key}={params[key]!r}: rayattr attributes plain SGD "
                                  "(no momentum, no weight decay); use train.optimizer.type: adamw for those")
        if params.get("nesterov"):
            raise ConfigError(f"{DS_KEY}.params.nesterov: rayattr attributes plain SGD")
        return OptimizerSpec("sgd", lr, from_deepspeed=True)
    if kind not in ("adam", "adamw"):
        raise ConfigError(f"{DS_KEY}.type={block.get('type')!r}: rayattr attributes SGD, Adam and AdamW "
                          "(docs/method.md §2, §7)")
    betas = params.pop("betas", (0.9, 0.999))
    eps = params.pop("eps", 1e-8)
    decay = params.pop("weight_decay", 0.0)
    # DeepSpeed's Adam is AdamW unless adam_w_mode is false (then decay is an L2 term inside v)
    w_mode = params.pop("adam_w_mode", True) if kind == "adam" else True
    if not w_mode and decay:
        raise ConfigError(f"{DS_KEY}.params.adam_w_mode=false with weight_decay: L2-coupled decay passes "
                          "through Adam's v, which docs/method.md §7 does not model; use AdamW")
    for key in ("amsgrad", "bias_correction"):
        if key in params and params.pop(key) != (key == "bias_correction"):
            raise ConfigError(f"{DS_KEY}.params.{key}: not covered by the AdamW recursion (docs/method.md §7)")
    unknown = sorted(set(params) - _DS_HARMLESS)
    if unknown:
        raise ConfigError(f"{DS_KEY}.params.{unknown[0]}: unknown to rayattr's AdamW; known: lr, betas, eps, "
                          "weight_decay, adam_w_mode")
    return _adamw(f"{DS_KEY}.params", lr, *_pair(betas), eps, decay, True)


def _pair(betas) -> tuple[float, float]:
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ConfigError(f"{DS_KEY}.params.betas must be two numbers, got {betas!r}")
    return float(betas[0]), float(betas[1])


def _adamw(prefix: str, lr, beta1, beta2, eps, decay, from_ds: bool) -> OptimizerSpec:
    for name, value, ok in (("betas", beta1, 0 <= beta1 < 1), ("betas", beta2, 0 <= beta2 < 1),
                            ("eps", eps, eps > 0), ("weight_decay", decay, decay >= 0)):
        if not (math.isfinite(float(value)) and ok):
            raise ConfigError(f"{prefix}.{name}: {value!r} is out of range")
    return OptimizerSpec("adamw", float(lr), float(beta1), float(beta2), float(eps), float(decay), from_ds)


def check_adamw_capture(cfg: "Config", spec: OptimizerSpec) -> None:
    """Capture settings that do not go with AdamW yet, and the refresh/checkpoint alignment."""
    c, t = cfg.capture, cfg.train
    if c.v_response and not spec.adamw:
        raise ConfigError("capture.v_response: v's response is Adam's second moment; it needs an AdamW run")
    if cfg.embed.momentum_curvature and not spec.adamw:
        raise ConfigError("embed.momentum_curvature: K's curvature through Adam's momentum needs an AdamW run")
    if not spec.adamw:
        return
    if cfg.embed.momentum_curvature and c.v_response:
        raise ConfigError("embed.momentum_curvature does not go with capture.v_response yet (Q would join [K, R]'s "
                          "full link); turn one off")
    if c.v_response and c.preconditioner != "lookahead":
        # y = D_t ⊙ ḡ_t ⊙ g needs the step's mean gradient, known only after the step's update
        raise ConfigError("capture.v_response needs capture.preconditioner: lookahead (its rows need the step's "
                          "own m_t and v_t, read after the update)")
    if c.preconditioner not in ("lookahead", "lagged"):
        raise ConfigError(f"capture.preconditioner must be 'lookahead' or 'lagged', got {c.preconditioner!r}")
    if c.preconditioner == "lookahead" and c.precondition_every != 1:
        raise ConfigError(f"capture.precondition_every={c.precondition_every} needs capture.preconditioner: lagged "
                          "(the lookahead reads each step's own v at every step)")
    if t.checkpoint_every and t.checkpoint_every % c.precondition_every:
        # a resumed rank re-reads v at its checkpoint: that must be a refresh step
        raise ConfigError(f"train.checkpoint_every={t.checkpoint_every} must be a multiple of "
                          f"capture.precondition_every={c.precondition_every}")


def check_param_groups(optimizer, layers: dict[str, Any]) -> None:
    """Refuse per-group learning rates or weight decays within one captured layer: its K and
    its preconditioned row assume one lr_t and one λ for the weight and the bias."""
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    for name, module in layers.items():
        params = [p for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if p is not None]
        groups = {group_of[id(p)] for p in params if id(p) in group_of}
        for key in ("lr", "weight_decay"):
            values = {optimizer.param_groups[i].get(key) for i in groups}
            if len(values) > 1:
                raise ConfigError(f"optimizer param groups give layer {name!r} different {key} values "
                                  f"{sorted(values)}: per-group {key} within a layer is not supported")
