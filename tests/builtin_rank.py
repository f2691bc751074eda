"""One DeepSpeed rank on the built-in corpus, joined to a gloo group by hand, for the tests that
compare a rank's own step-time reads (P_t, v's response rows) with a float64 brute force."""

from __future__ import annotations

import os

import ray

from rayattr.capture import select_layers
from rayattr.config import Config
from rayattr.data import BatchPlan, TokenizedDataset, load_tokenizer
from rayattr.data.corpus import builtin_corpus
from rayattr.model.build import build_model
from rayattr.optim.spec import resolve_optimizer
from rayattr.train.backend import join_process_group
from rayattr.train.engine import build_engine
from s3server import pick_ports


class BuiltinRank:
    """The rank's engine, its share of the batch plan and the model's linear layers; a test's
    actor subclasses it with its own `compare(steps)`."""

    def __init__(self, config: dict, rank: int, world: int, port: int):
        cfg = self.cfg = Config.from_dict(config)
        self.rank, self.world = rank, world
        # torch.distributed's env:// rendezvous, as the deepspeed launcher sets it
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_SIZE="1")
        join_process_group(cfg)
        tok = load_tokenizer(cfg.data.tokenizer)
        b = cfg.data.builtin
        train, _ = builtin_corpus(n_train=b.n_train, n_validation=b.n_validation,
                                  corrupted_fraction=b.corrupted_fraction, seed=cfg.train.seed, max_chars=b.max_chars)
        self.data = TokenizedDataset(train, tok, cfg.data.seq_len)
        t = cfg.train
        self.plan = BatchPlan(len(self.data), t.micro_batch, world, t.grad_accum, t.epochs, t.seed)
        self.engine = build_engine(cfg, build_model(cfg.model, tok.vocab_size, cfg.data.seq_len, seed=t.seed))
        self.spec = resolve_optimizer(cfg)
        self.layers = list(select_layers(self.engine.module))  # every layer a capture can record

    def _batch(self, step: int, micro: int):
        b = self.data.batch(self.plan.rank_slice(step, self.rank, micro))
        return b["input_ids"], b["attention_mask"], b["labels"]


def compare_on_ranks(actor, cfg: Config, ranks: int, steps: int) -> list:
    """Start `ranks` of the remote class `actor` as one group, run `compare(steps)` on each and
    return their results; the actors are killed whatever happens."""
    port = pick_ports(1)[0]
    actors = [actor.remote(cfg.to_dict(redact=False), r, ranks, port) for r in range(ranks)]
    try:
        return ray.get([a.compare.remote(steps) for a in actors])
    finally:
        for a in actors:
            ray.kill(a)
