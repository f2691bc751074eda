#!/usr/bin/env python
"""A user's own training loop: Ray Train's TorchTrainer around DeepSpeed, recorded for
attribution with rayattr.Recorder. Trains a tiny GPT-2 on the built-in corpus.

    python jobs/examples/ray_train_deepspeed.py --store /tmp/runs
    rayattr attribute <the run URI printed last>        # then: rayattr values <URI>

The last line of the output is the run's URI.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import rayattr  # noqa: E402
from rayattr.config import Config  # noqa: E402


def train_func(loop: dict) -> None:
    """One Ray Train worker: a plain DeepSpeed loop with the Recorder around each step."""
    import deepspeed
    import ray.train
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from rayattr.data import TokenizedDataset, load_tokenizer
    from rayattr.store import Run
    from rayattr.model.build import build_model

    cfg = Config.from_dict(loop["config"])
    run = Run.open_uri(loop["run"], mode="record")
    tok = load_tokenizer(cfg.data.tokenizer)
    data = TokenizedDataset(run.read_table("data/train.parquet"), tok, cfg.data.seq_len)
    # attribution rebuilds the final model from config.model, so build it from there too
    model = build_model(cfg.model, tok.vocab_size, cfg.data.seq_len, seed=cfg.train.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    ds_config = {"train_micro_batch_size_per_gpu": cfg.train.micro_batch, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
                 "gradient_clipping": 1.0, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    start = 0
    checkpoint = ray.train.get_checkpoint()  # a restarted worker group goes on from here
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            _, state = engine.load_checkpoint(d, tag="ckpt")
            start = state["step"]
    # takeover: Ray Train stops a failed worker group before it starts the next, so an earlier
    # writer of this rank still registered open is a dead one
    recorder = rayattr.Recorder(engine, run, cfg, takeover=True)

    sampler = DistributedSampler(range(len(data)), shuffle=True, seed=cfg.train.seed, drop_last=True)
    loader = DataLoader(range(len(data)), batch_size=cfg.train.micro_batch, sampler=sampler, drop_last=True)
    step = 0
    for epoch in range(cfg.train.epochs):
        sampler.set_epoch(epoch)
        for idx in loader:
            if step >= start:
                batch = data.batch(idx)
                with recorder.step(batch["ids"].tolist(), step=step, epoch=epoch):  # sources: from the run
                    loss = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  labels=batch["labels"]).loss
                    recorder.add_loss(loss)
                    engine.backward(loss)
                    engine.step()
                if (step + 1) % loop["checkpoint_every"] == 0:
                    recorder.flush()  # a checkpoint never runs ahead of what is recorded
                    with tempfile.TemporaryDirectory() as d:
                        engine.save_checkpoint(d, tag="ckpt", client_state={"step": step + 1}, save_latest=False)
                        ray.train.report({"loss": loss.item(), "step": step},
                                         checkpoint=ray.train.Checkpoint.from_directory(d))
            step += 1
    recorder.finish()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="store root (local directory or s3://bucket/prefix)")
    p.add_argument("--run-id", help="run name under the store (default: timestamped)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (DeepSpeed ranks)")
    args = p.parse_args(argv)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayattr.runtime.cluster import connect

    cfg = Config.from_dict({
        "run_id": args.run_id, "store": {"uri": args.store, "steps_per_shard": 4},
        "data": {"seq_len": 32, "builtin": {"n_train": 96, "n_validation": 16, "max_chars": 96}},
        "train": {"ranks": args.workers, "micro_batch": 8, "epochs": 2, "lr": 0.3,
                  "optimizer": {"type": "sgd"}},  # the loop below trains with plain SGD
        "capture": {"rank": 4}, "embed": {"phases": 2},
    }).validate()
    run = rayattr.new_run(cfg)  # the data and the config in the store, before any worker starts
    print(connect(), flush=True)
    trainer = TorchTrainer(
        train_func, train_loop_config={"run": run.uri, "config": cfg.to_dict(), "checkpoint_every": 4},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False),
        run_config=RunConfig(name=run.run_id, storage_path=os.path.abspath(os.path.join(args.store, "_ray_train"))
                             if "://" not in args.store else f"{args.store}/_ray_train",
                             failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)))
    trainer.fit()
    ray.shutdown()
    print(run.uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
