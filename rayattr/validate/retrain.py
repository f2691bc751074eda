"""RetrainWorker: one DeepSpeed rank that replays a run's trajectory with occurrences removed
(or reweighted: a partial removal, or every occurrence along a direction).

A gang of these (one per rank of the original run, Ray Train workers) starts once and then runs
counterfactual after counterfactual: each starts from the run's initial weights with a fresh engine and
optimizer, follows the same batch plan and schedule, and gives each occurrence the loss weight
the counterfactual sets (Removal.loss_weights: 0 for a removed one; train/engine.py). Nothing
is captured. Rank 0 returns the final validation loss and, when asked, the largest difference
from the run's recorded final weights.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from safetensors.torch import load

from rayattr.config import Config
from rayattr.data import TokenizedDataset, load_tokenizer
from rayattr.data.run_data import rank_tokens
from rayattr.model.gradients import mean_loss
from rayattr.store import Run, StoreOptions
from rayattr.train.backend import join_process_group
from rayattr.model.loss import micro_batch_loss
from rayattr.train.engine import build_engine
from rayattr.model.build import build_model
from rayattr.train.quiet import quiet_known_noise
from rayattr.validate.counterfactuals import Removal
from rayattr.validate.errors import ValidationError
from rayattr.store.layout import FINAL_WEIGHTS, INITIAL_WEIGHTS, VALIDATION_DATA


class RetrainWorker:
    """One rank of a retraining gang: a Ray Train worker (rayattr/validate/gangs.py)."""

    def __init__(self, rank: int, world_size: int, config: dict, run_uri: str,
                 storage_options: dict | None = None):
        self.rank, self.world_size = rank, world_size
        self.cfg = cfg = Config.from_dict(config)
        quiet_known_noise(expect_gpu=cfg.train.use_gpu)
        self.run = Run.open_uri(run_uri, options=StoreOptions(storage_options=storage_options or {}))
        self.device = join_process_group(cfg)  # Ray Train made the group
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.data = rank_tokens(self.run, rank)  # this rank's rows of each step (data/shards.py)
        self.num_steps = int(self.run.manifest["num_steps"])
        self.initial = load(self.run.read_bytes(INITIAL_WEIGHTS))
        self.validation = (TokenizedDataset(self.run.read_table(VALIDATION_DATA), self.tokenizer,
                                            cfg.data.seq_len) if rank == 0 else None)

    def retrain(self, removal: dict) -> dict[str, Any]:
        """Train the whole trajectory without `removal`'s occurrences; rank 0 returns the
        final validation loss (and, for the baseline, the distance to the run's final weights)."""
        r = Removal.from_dict(removal)
        t0 = time.perf_counter()
        t = self.cfg.train
        model = build_model(self.cfg.model, self.tokenizer.vocab_size, self.cfg.data.seq_len, seed=t.seed)
        model.load_state_dict(self.initial)
        engine = build_engine(self.cfg, model, self.num_steps)
        removed = 0
        for step in range(self.num_steps):
            for micro in range(t.grad_accum):
                b = self.data.micro_batch(step, micro)
                ids = b["ids"].numpy()
                removed += int(r.removes(step, ids).sum())  # occurrences whose weight changed
                weights = torch.from_numpy(r.loss_weights(step, ids).astype(np.float32))
                loss = micro_batch_loss(engine, b["input_ids"].to(self.device), b["attention_mask"].to(self.device),
                                        b["labels"].to(self.device), weights.to(self.device))
                if not math.isfinite(loss.item()):
                    raise ValidationError(f"retrain {r.kind} {r.name!r}: loss is {loss.item()} at step {step}")
                engine.backward(loss)
                engine.step()
        out: dict[str, Any] = {"rank": self.rank, "removed": removed, "seconds": time.perf_counter() - t0}
        if self.rank == 0:
            engine.module.eval()
            out["loss"] = mean_loss(engine.module, self.validation)
            if r.kind == "baseline":
                out["max_abs_diff"] = _max_abs_diff(engine.module, load(self.run.read_bytes(FINAL_WEIGHTS)))
        if hasattr(engine, "destroy"):
            engine.destroy()
        return out


def _max_abs_diff(module: torch.nn.Module, reference: dict[str, torch.Tensor]) -> float:
    state = module.state_dict()
    missing = sorted(set(reference) - set(state))
    if missing:
        raise ValidationError(f"retrained model lacks weights {missing[:3]} of the run's final model")
    return max(float((state[k].detach().float().cpu() - v.float()).abs().max()) for k, v in reference.items())

