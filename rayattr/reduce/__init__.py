"""The reducer: test gradients, and values and aggregates from the segments' outputs (the
segments chain among themselves: rayattr/embed/segment.py, docs/method.md §4)."""

from rayattr.reduce.aggregate import phase_edges, write_outputs
from rayattr.reduce.gradients import final_model, mean_loss, text_gradients, validation_gradient

__all__ = ["final_model", "mean_loss", "phase_edges", "text_gradients", "validation_gradient", "write_outputs"]
