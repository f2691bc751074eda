"""How `rayattr exact` spaces its checkpoints, without importing the replay."""

from __future__ import annotations

import math


def default_every(num_steps: int) -> int:
    """A checkpoint every ⌈√T⌉ steps: the checkpoints and one segment's graph then weigh alike."""
    return max(1, math.ceil(math.sqrt(num_steps)))


def checkpoint_bytes(num_params: int, num_steps: int, every: int, adamw: bool) -> int:
    """θ (and Adam's m and v) in float64 at every checkpoint: the part of the reverse pass's
    memory that grows with the run's steps (as √T at the default spacing)."""
    return math.ceil(num_steps / every) * (3 if adamw else 1) * num_params * 8


# Elements the float64 graph of one replayed step keeps per token, in units of a GPT-2 block's
# activation count (17·d + 2.5·heads·seq per layer, plus the logits' 2·vocab): the reverse pass
# differentiates through each step's gradient (a Hessian), so it keeps several times what one
# backward does. Measured on the built-in model (d 64, 2 layers, 2 heads, vocab 257): 5.0 at
# seq 32 × batch 256 (15.3 GB peak at 15 steps a segment), 6.3 at seq 64 × batch 16 (2.8 GB at 14).
GRAPH_ACTIVATION_FACTOR = 6.4


def segment_graph_bytes(tokens_per_step: int, every: int, n_layer: int, n_embd: int, n_head: int,
                        seq_len: int, vocab: int) -> int:
    """One segment's float64 graph: `every` steps of `tokens_per_step` tokens, each keeping its
    activations for a double backward. At the default spacing it grows as √T × the global batch."""
    per_token = GRAPH_ACTIVATION_FACTOR * (n_layer * (17 * n_embd + 2.5 * n_head * seq_len) + 2 * vocab)
    return math.ceil(every * tokens_per_step * per_token * 8)
