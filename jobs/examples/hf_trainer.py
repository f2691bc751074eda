#!/usr/bin/env python
"""The HF Trainer, recorded for attribution with rayattr.integrations.hf.RecorderCallback.
Trains a tiny GPT-2 on the built-in corpus.

    python jobs/examples/hf_trainer.py --store /tmp/runs
    rayattr attribute <the run URI printed last>        # then: rayattr values <URI>

The last line of the output is the run's URI.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import rayattr  # noqa: E402
from rayattr.config import Config  # noqa: E402
from rayattr.data import TokenizedDataset, load_tokenizer  # noqa: E402
from rayattr.integrations.hf import RecorderCallback  # noqa: E402
from rayattr.train.model import build_model  # noqa: E402


class Samples(torch.utils.data.Dataset):
    """The run's training texts as the Trainer's items, each with its sample id."""

    def __init__(self, data: TokenizedDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        b = self.data.batch([i])
        return {"input_ids": b["input_ids"][0], "attention_mask": b["attention_mask"][0],
                "labels": b["labels"][0], "sample_id": b["ids"][0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="store root (local directory or s3://bucket/prefix)")
    p.add_argument("--run-id", help="run name under the store (default: timestamped)")
    args = p.parse_args(argv)

    cfg = Config.from_dict({
        "run_id": args.run_id, "store": {"uri": args.store, "steps_per_shard": 4},
        "data": {"seq_len": 32, "builtin": {"n_train": 96, "n_validation": 16, "max_chars": 96}},
        "train": {"ranks": 1, "micro_batch": 8, "epochs": 2, "lr": 0.3,
                  "optimizer": {"type": "sgd"}},  # the loop below trains with plain SGD
        "capture": {"rank": 4}, "embed": {"phases": 2},
    }).validate()
    run = rayattr.new_run(cfg)
    tok = load_tokenizer(cfg.data.tokenizer)
    data = TokenizedDataset(run.read_table("data/train.parquet"), tok, cfg.data.seq_len)
    # attribution rebuilds the final model from config.model, so build it from there too
    model = build_model(cfg.model, tok.vocab_size, cfg.data.seq_len, seed=cfg.train.seed)
    targs = TrainingArguments(
        output_dir=os.path.join(args.store, "_hf", run.run_id), per_device_train_batch_size=cfg.train.micro_batch,
        num_train_epochs=cfg.train.epochs, learning_rate=cfg.train.lr, optim="sgd", weight_decay=0.0,
        lr_scheduler_type="constant", max_grad_norm=1.0, remove_unused_columns=False, dataloader_drop_last=True,
        save_strategy="no", report_to=[], logging_steps=4, use_cpu=True, seed=cfg.train.seed)
    trainer = Trainer(model=model, args=targs, train_dataset=Samples(data), callbacks=[RecorderCallback(run, cfg)])
    trainer.train()
    print(run.uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
