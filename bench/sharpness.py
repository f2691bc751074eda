"""How sharp is a finished run where it ends? The Hessian's top eigenvalue against the curvature
the values use, without the whole exact pass (`rayattr exact` reports the same figures).

    python bench/sharpness.py RUN [--iterations 25]

At the run's final weights, in float64 (rayattr/exact/replay.py's model and loss), on the last
step's global batch, with Hessian-vector products (rayattr/exact/sharpness.py):

- η·λ_max(H) by power iteration: the step's true sharpness (a recursion step K = I − η·H flips a
  direction once η·λ > 1; plain gradient descent drifts to η·λ ≈ 2, the "edge of stability");
- η·⟨w, H w⟩/‖w‖² and η·‖H w‖/‖w‖ for w the validation loss's gradient: how far one step back
  turns the direction the values are measured along;
- beside them the run's own `max_eta_lambda` (run.json): η·λ_max of the empirical Fisher of the
  projected per-sample gradients, which is what the segment actors measure and K contains.

SGD runs only; no retraining; a minute or two for the built-in model at batch 256.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rayattr.exact.replay import Replay  # noqa: E402
from rayattr.exact.sharpness import end_sharpness  # noqa: E402
from rayattr.store import Run  # noqa: E402
from rayattr.store.layout import FINAL_WEIGHTS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--iterations", type=int, default=25)
    args = ap.parse_args()
    replay = Replay(Run.open_uri(args.run))
    final = load(replay.run.read_bytes(FINAL_WEIGHTS))
    params = {n: final[n].double().requires_grad_(True) for n in replay.initial}
    with torch.enable_grad():
        w = torch.autograd.grad(replay.val_loss(params), list(params.values()))
    print(json.dumps(end_sharpness(replay, {n: x.detach() for n, x in params.items()}, list(w), args.iterations),
                     indent=1))


if __name__ == "__main__":
    main()
