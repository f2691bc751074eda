"""Exact first-order values of a small run: its trajectory replayed in float64 and differentiated
end to end (docs/method.md §10). The reference that says, run by run and phase by phase, how far
the Data Value Embedding values hold."""

from rayattr.exact.metagradient import ExactResult, agreement, exact_values, write_exact
from rayattr.exact.replay import ExactError, Replay
from rayattr.exact.run import format_exact, run_exact

__all__ = ["ExactError", "ExactResult", "Replay", "agreement", "exact_values", "format_exact", "run_exact",
           "write_exact"]
