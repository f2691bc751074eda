"""How sharp is a finished run where it ends? The Hessian's top eigenvalue against the curvature
the values use.

    python bench/sharpness.py RUN [--step T] [--iterations 25]

At the run's final weights, in float64 (rayattr/exact/replay.py's model and loss), on the
global batch of step T (default: the last), with Hessian-vector products:

- lr·λ_max(H) by power iteration: the step's true sharpness (the recursion's K = I − lr·H
  flips a direction once lr·λ > 1; plain gradient descent drifts to lr·λ ≈ 2, the "edge of
  stability");
- lr·⟨w, H w⟩/‖w‖² and lr·‖H w‖/‖w‖ for w the validation loss's gradient: how much one step
  back turns the direction the values are measured along;
- beside them the run's own `max_eta_lambda` (run.json): η·λ_max of the empirical Fisher of the
  projected per-sample gradients, which is what the segment actors measure and K contains.

No retraining; a minute or two for the built-in model at batch 256.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rayattr.exact.replay import Replay  # noqa: E402
from rayattr.store import Run  # noqa: E402
from rayattr.store.layout import FINAL_WEIGHTS  # noqa: E402
from safetensors.torch import load  # noqa: E402


def norm(v: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((x * x).sum() for x in v))


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def sharpness(run: Run, step: int | None = None, iterations: int = 25, seed: int = 0) -> dict:
    replay = Replay(run)
    step = replay.num_steps - 1 if step is None else step
    final = load(run.read_bytes(FINAL_WEIGHTS))
    params = {n: final[n].double().requires_grad_(True) for n in replay.initial}
    leaves = [params[n] for n in replay.initial]
    batch, _ = replay.batch(step)
    grads = torch.autograd.grad(replay.per_sample(params, batch).mean(), leaves, create_graph=True)

    def hvp(v):
        return [x.detach() for x in torch.autograd.grad(grads, leaves, grad_outputs=v, retain_graph=True)]

    lr = replay.records[step].eta * replay.batch_size() / replay.records[step].clip  # the step's lr
    w = [x.detach() for x in torch.autograd.grad(replay.val_loss(params), leaves)]
    hw = hvp(w)
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in w]
    lam = 0.0
    for _ in range(iterations):
        n = norm(v)
        v = [x / n for x in v]
        hv = hvp(v)
        lam = float(dot(v, hv))
        v = hv
    return {"step": step, "lr": lr, "lr_lambda_max_H": lr * lam,
            "lr_rayleigh_val_grad": float(lr * dot(w, hw) / norm(w) ** 2),
            "lr_H_val_grad_ratio": float(lr * norm(hw) / norm(w)),
            "fisher_eta_lambda_max": run.manifest.get("max_eta_lambda")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--step", type=int)
    ap.add_argument("--iterations", type=int, default=25)
    args = ap.parse_args()
    print(json.dumps(sharpness(Run.open_uri(args.run), args.step, args.iterations), indent=1))


if __name__ == "__main__":
    main()
