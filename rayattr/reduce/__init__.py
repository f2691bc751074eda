"""The reducer: chains segment K's, scores with test gradients, writes values and aggregates."""

from rayattr.reduce.aggregate import phase_edges, write_outputs
from rayattr.reduce.chain import chain_segments
from rayattr.reduce.gradients import final_model, mean_loss, text_gradients, validation_gradient

__all__ = ["chain_segments", "final_model", "mean_loss", "phase_edges", "text_gradients", "validation_gradient", "write_outputs"]
