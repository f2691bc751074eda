"""Which modules are captured, and their gradient shapes.

Supported layers compute s = W a + b per token: torch.nn.Linear (weight d_out x d_in) and
HuggingFace's GPT-2 Conv1D (weight stored d_in x d_out). Shapes come from the modules'
own attributes rather than weight.shape, which DeepSpeed ZeRO-3 empties between uses.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Iterable

import torch
from torch import nn

try:  # transformers is a dependency, but the capture must not break if its layout moves
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - exercised only without transformers
    Conv1D = None

SUPPORTED_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """Static description of one captured layer."""

    name: str
    """Module name as given by model.named_modules() (the key in gradients())."""
    d_in: int
    """Input features (without the bias column)."""
    d_out: int
    """Output features."""
    has_bias: bool
    """Whether the bias is captured as an extra, last input column of 1s."""

    @property
    def d_in_aug(self) -> int:
        """Input width of G including the bias column."""
        return self.d_in + int(self.has_bias)


def is_supported(module: nn.Module) -> bool:
    """True for the layer types whose per-sample gradient can be captured."""
    return isinstance(module, SUPPORTED_TYPES)


def layer_info(name: str, module: nn.Module) -> LayerInfo:
    """Shapes of a Linear / Conv1D module."""
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        return LayerInfo(name, module.in_features, module.out_features, has_bias)
    if Conv1D is not None and isinstance(module, Conv1D):
        return LayerInfo(name, module.nx, module.nf, has_bias)
    raise TypeError(f"module {name!r} of type {type(module).__name__} is not Linear or Conv1D")


def select_layers(model: nn.Module, patterns: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Trainable Linear/Conv1D modules of `model` whose name matches any fnmatch pattern.

    patterns=None selects all of them. Layers whose weight is frozen are skipped (their
    gradient is never used). Raises ValueError if nothing matches, so a typo is not silent.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    pats = None if patterns is None else list(patterns)
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not is_supported(module) or not module.weight.requires_grad:
            continue
        if pats is None or any(fnmatch.fnmatchcase(name, p) for p in pats):
            chosen[name] = module
    if not chosen:
        raise ValueError(
            f"no trainable Linear/Conv1D layer of {type(model).__name__} matches layers={pats!r}"
        )
    return chosen


def weight_as_matrix(module: nn.Module) -> torch.Tensor:
    """A layer's weight in the (d_out x d_in) orientation used for G."""
    w = module.weight
    return w if isinstance(module, nn.Linear) else w.t()
