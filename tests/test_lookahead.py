"""The lookahead preconditioner (rayattr/train/lookahead.py) is the P the step's own update
divides by: formed before the step from one extra unhooked pass, it must equal the P read
from Adam's v right after the real step, on one rank and on two ranks under ZeRO-1 (where
the gradient average is an all-reduce and v a partitioned state)."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from rayattr.config import Config
from rayattr.data import BatchPlan, TokenizedDataset, load_tokenizer
from rayattr.data.corpus import builtin_corpus
from rayattr.optimizer import resolve_optimizer
from rayattr.train.adam_state import read_preconditioners
from rayattr.train.backend import free_port, join_process_group
from rayattr.train.engine import build_engine, micro_batch_loss
from rayattr.train.lookahead import lookahead_preconditioners
from rayattr.train.model import build_model
from test_pipeline_adamw import adamw_config


@ray.remote(num_cpus=1)
class LookaheadRank:
    """One DeepSpeed rank that compares the lookahead with what the optimizer does."""

    def __init__(self, config: dict, rank: int, world: int, port: int):
        cfg = self.cfg = Config.from_dict(config)
        self.rank, self.world = rank, world
        join_process_group(cfg, rank, world, "127.0.0.1", port)
        tok = load_tokenizer(cfg.data.tokenizer)
        b = cfg.data.builtin
        train, _ = builtin_corpus(n_train=b.n_train, n_validation=b.n_validation,
                                  corrupted_fraction=b.corrupted_fraction, seed=cfg.train.seed,
                                  max_chars=cfg.data.builtin_max_chars)
        self.data = TokenizedDataset(train, tok, cfg.data.seq_len)
        t = cfg.train
        self.plan = BatchPlan(len(self.data), t.micro_batch, world, t.grad_accum, t.epochs, t.seed)
        self.engine = build_engine(cfg, build_model(cfg.model, tok.vocab_size, cfg.data.seq_len, seed=t.seed))
        self.spec = resolve_optimizer(cfg)
        self.layers = [n for n, m in self.engine.module.named_modules() if type(m).__name__ in ("Linear", "Conv1D")]

    def compare(self, steps: int) -> list[float]:
        """Per step: the largest relative difference between lookahead and after-the-step P."""
        out = []
        for step in range(steps):
            batches = [self._batch(step, micro) for micro in range(self.cfg.train.grad_accum)]
            ahead, k = lookahead_preconditioners(self.engine, self.layers, self.spec, iter(batches),
                                                 self.cfg.train.grad_accum, self.world, exact=True)
            for ids, mask, labels in batches:
                self.engine.backward(micro_batch_loss(self.engine, ids, mask, labels))
                self.engine.step()
            after, k_after = read_preconditioners(self.engine, self.layers, self.spec, exact=True)
            assert k == k_after == step + 1
            out.append(max(float(((ahead[n].full - after[n].full).abs() / after[n].full).max()) for n in self.layers))
        return out

    def _batch(self, step: int, micro: int):
        b = self.data.batch(self.plan.rank_slice(step, self.rank, micro))
        return b["input_ids"], b["attention_mask"], b["labels"]


@pytest.mark.parametrize("ranks, stage", [(1, 0), (2, 1)], ids=["1 rank ZeRO-0", "2 ranks ZeRO-1"])
def test_lookahead_is_the_preconditioner_of_the_step(local_ray, tmp_path, ranks, stage):
    cfg = adamw_config(str(tmp_path), "look", stage=stage, preconditioner="lookahead", ranks=ranks,
                       micro_batch=16 // ranks)
    port = free_port()
    actors = [LookaheadRank.remote(cfg.to_dict(redact=False), r, ranks, port) for r in range(ranks)]
    try:
        diffs = ray.get([a.compare.remote(6) for a in actors])
    finally:
        for a in actors:
            ray.kill(a)
    # float32 optimizer state against the float64 lookahead; clipping is active in these steps
    for per_rank in diffs:
        assert np.max(per_rank) < 1e-4, per_rank
