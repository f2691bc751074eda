"""The step's own preconditioner P_t, read right after the real step from each rank's own
partition of Adam's v (rayattr/optim/adam_state.py), against a brute-force float64 reference
of v_t = β₂ v_{t−1} + (1 − β₂)(κ_t ḡ_t)² formed before the step from one more unhooked pass
(ḡ_t averaged over ranks, clipped as DeepSpeed clips): on one rank (ZeRO-0) and on two ranks
under ZeRO-1 (partitioned v, partition sums all-reduced), clipping active. The deferred
update rows formed with it equal the rows of hooks that had the reference P from the start."""

from __future__ import annotations


import numpy as np
import pytest
import ray
import torch

from rayattr.capture import GradientCapture, adam_preconditioner
from rayattr.capture.precondition import in_gradient_orientation
from rayattr.record import projection_spec
from rayattr.optim.adam_state import adam_step_count, full_exp_avg_sq, read_preconditioners
from rayattr.model.loss import micro_batch_loss
from builtin_rank import BuiltinRank, compare_on_ranks
from test_pipeline_adamw import adamw_config


def reference_mean_gradient(model, micro_batches, world: int) -> dict[str, torch.Tensor]:
    """ḡ_t in float64 by brute force: the step's micro-batch losses differentiated on detached
    copies of the weights (DeepSpeed's hooks never see them), divided by the accumulation
    steps and averaged over ranks as DeepSpeed does."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    copies = {n: p.detach().clone().requires_grad_() for n, p in named}
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    for ids, mask, labels in micro_batches:
        loss = micro_batch_loss(lambda **kw: torch.func.functional_call(model, copies, (), kw), ids, mask, labels)
        for (n, _), g in zip(named, torch.autograd.grad(loss / len(micro_batches), list(copies.values()),
                                                        allow_unused=True)):
            if g is not None:
                total[n] += g.double()
    for g in total.values():
        if world > 1:
            torch.distributed.all_reduce(g)
            g /= world
    return total


def reference_preconditioners(engine, layers, spec, micro_batches, world):
    """{layer: P from v_t} with v_t = β₂ v_{t−1} + (1 − β₂)(κ_t ḡ_t)², the full diagonal kept."""
    model = engine.module
    grads = reference_mean_gradient(model, micro_batches, world)
    clipping = float(engine.gradient_clipping() or 0.0)
    norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads.values())))
    kappa = min(1.0, clipping / (norm + 1e-6)) if clipping > 0 else 1.0
    k = adam_step_count(engine)
    names = {id(p): n for n, p in model.named_parameters()}

    def v_after(param):
        g = kappa * grads[names[id(param)]]
        before = full_exp_avg_sq(engine, param).double() if k else torch.zeros_like(g)
        return spec.beta2 * before + (1 - spec.beta2) * g * g

    out = {}
    for name in layers:
        module = model.get_submodule(name)
        bias = v_after(module.bias) if getattr(module, "bias", None) is not None else None
        out[name] = adam_preconditioner(in_gradient_orientation(module, v_after(module.weight)), bias, k + 1,
                                        spec.beta2, spec.eps, full=True)
    return out, kappa


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-30)).max())


@ray.remote(num_cpus=1)
class StepRank(BuiltinRank):
    """One DeepSpeed rank that compares the step's own P with the brute-force reference."""

    def compare(self, steps: int) -> dict[str, list[float]]:
        """Per step, the largest relative differences against the reference: the factored ρ·γ
        and the full diagonal read after the step, and the deferred update rows; and κ_t."""
        out = {"factored": [], "full": [], "rows": [], "kappa": []}
        proj = projection_spec(self.cfg)
        model = self.engine.module
        for step in range(steps):
            batches = [self._batch(step, micro) for micro in range(self.cfg.train.grad_accum)]
            ref, kappa = reference_preconditioners(self.engine, self.layers, self.spec, batches, self.world)
            deferred = GradientCapture(model, projection=proj, layers=self.layers, defer_updates=True)
            known = GradientCapture(model, projection=proj, layers=self.layers, preconditioner=ref)
            with deferred, known:
                for ids, mask, labels in batches:
                    self.engine.backward(micro_batch_loss(self.engine, ids, mask, labels))
                    self.engine.step()
            factored, k = read_preconditioners(self.engine, self.layers, self.spec)
            full, k_full = read_preconditioners(self.engine, self.layers, self.spec, exact=True)
            assert k == k_full == step + 1
            deferred.finish_updates(factored)
            rows, expected = deferred.updates(), known.updates()
            outer = lambda p: p.rho[:, None] * p.gamma[None, :]  # noqa: E731
            out["factored"].append(max(relative(outer(factored[n]), outer(ref[n])) for n in self.layers))
            out["full"].append(max(relative(full[n].full, ref[n].full) for n in self.layers))
            out["rows"].append(max(float((rows[n] - expected[n]).abs().max() / expected[n].abs().max())
                                   for n in self.layers))
            out["kappa"].append(kappa)
        return out



@pytest.mark.parametrize("ranks, stage, accum", [(1, 0, 2), (2, 1, 1)], ids=["1 rank ZeRO-0", "2 ranks ZeRO-1"])
def test_step_preconditioner_is_v_t_of_the_step(local_ray, tmp_path, ranks, stage, accum):
    cfg = adamw_config(str(tmp_path), "step", stage=stage, preconditioner="lookahead", ranks=ranks,
                       micro_batch=16 // ranks // accum, grad_accum=accum)
    results = compare_on_ranks(StepRank, cfg, ranks, 6)
    for res in results:
        assert min(res["kappa"]) < 1.0, res["kappa"]  # clipping is active in these steps
        # the optimizer's float32 v against the float64 reference: float32 rounding
        assert np.max(res["factored"]) < 1e-5, res["factored"]
        assert np.max(res["full"]) < 1e-4, res["full"]
        assert np.max(res["rows"]) < 1e-5, res["rows"]
