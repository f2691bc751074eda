"""Per-sample gradient capture: hooks on Linear / Conv1D layers that project each factor of a
sample's gradient as it streams past (docs/method.md §5).

    from rayattr.capture import GradientCapture, ProjectionSpec
    cap = GradientCapture(model, projection=ProjectionSpec(rank=16, seed=0), layers=None)
    with cap:
        per_sample_losses.sum().backward()
    grads = cap.gradients()   # {layer name: (B, p_layer)}
"""

from .capture import GradientCapture
from .layers import LayerInfo, select_layers
from .losses import per_sample_loss, token_counts
from .precondition import (
    Preconditioner,
    Response,
    adam_preconditioner,
    factor_second_moment,
    module_preconditioner,
    module_second_moment_response,
    response_factors,
    second_moment_response,
)
from .projection import ProjectionSpec, mixing_matrix, projection_matrices
from .pseudo import sample_labels, sampled_label_losses

__all__ = [
    "GradientCapture",
    "LayerInfo",
    "Preconditioner",
    "ProjectionSpec",
    "Response",
    "adam_preconditioner",
    "factor_second_moment",
    "module_preconditioner",
    "module_second_moment_response",
    "response_factors",
    "second_moment_response",
    "per_sample_loss",
    "mixing_matrix",
    "projection_matrices",
    "sample_labels",
    "sampled_label_losses",
    "select_layers",
    "token_counts",
]
