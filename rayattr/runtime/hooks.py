"""Test seams: named points in the training and embedding code where a test can act, e.g. kill
the process as a lost node would, or turn a loss non-finite.

Nothing is registered in production, and no configuration or environment variable registers
anything: only code running in the process can (the fault tests do it from a sitecustomize on
a PYTHONPATH of their own, tests/faultsite). Points: "rank.step" (rank, step), "rank.loss"
(the loss; rank, step), "driver.train" (step), "segment.compute" (segment, step), "index.compact" (kind, chunk, at).
"""

from __future__ import annotations

from typing import Any, Callable

_registry: dict[str, list[Callable[..., Any]]] = {}


def register(point: str, fn: Callable[..., Any]) -> None:
    """Run fn at `point`: fn(**at) for call(), fn(value, **at) -> value for passed()."""
    _registry.setdefault(point, []).append(fn)


def clear() -> None:
    _registry.clear()


def registered() -> dict[str, int]:
    """Point -> number of hooks (empty in production)."""
    return {p: len(fns) for p, fns in _registry.items()}


def call(point: str, **at: Any) -> None:
    for fn in _registry.get(point, ()):
        fn(**at)


def passed(point: str, value: Any, **at: Any) -> Any:
    """`value` after every hook at `point` has seen it (unchanged when there is none)."""
    for fn in _registry.get(point, ()):
        value = fn(value, **at)
    return value
