#!/usr/bin/env python
"""The HF Trainer, recorded for attribution with rayattr.integrations.hf.RecorderCallback.
Trains a tiny GPT-2 on the built-in corpus, under DeepSpeed (ZeRO 0) where it is installed.

    python jobs/examples/hf_trainer.py --store /tmp/runs [--no-deepspeed]
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
from rayattr.store import Run  # noqa: E402
from rayattr.model.build import build_model  # noqa: E402


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


def deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def launched() -> int:
    """The world size a launcher (deepspeed, torchrun) set up; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def single_process_env() -> None:
    """DeepSpeed wants a process group even for one process: without a launcher this process
    is rank 0 of 1 (HF's advice for DeepSpeed in a notebook)."""
    if "RANK" not in os.environ:
        from rayattr.train.backend import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


def create_on_rank_zero(cfg: Config):
    """Rank 0 creates the run; under a launcher the other ranks open it by its URI."""
    import torch.distributed as dist

    if launched() == 1:
        return rayattr.new_run(cfg)
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # DeepSpeed and the Trainer use this group
    uri = [rayattr.new_run(cfg).uri if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(uri, src=0)
    return uri[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="store root (local directory or s3://bucket/prefix)")
    p.add_argument("--run-id", help="run name under the store (default: timestamped)")
    p.add_argument("--no-deepspeed", action="store_true", help="the Trainer without DeepSpeed")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="the Trainer's optimizer (adamw: torch AdamW, each step's update rows with its own P)")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    args = p.parse_args(argv)

    world = launched()  # the same global batch of 8 on 1, 2, 4 or 8 ranks
    # the optimizer the attribution models is the one the Trainer builds below
    adamw = dict(type="adamw", betas=[0.9, 0.95], eps=1e-8, weight_decay=0.01)
    optimizer, lr = (adamw, 3e-3) if args.optimizer == "adamw" else ({"type": "sgd"}, 0.3)
    cfg = Config.from_dict({
        "run_id": args.run_id, "store": {"uri": args.store, "steps_per_shard": 4},
        "data": {"seq_len": 32, "builtin": {"n_train": 96, "n_validation": 16, "max_chars": 96}},
        "train": {"ranks": world, "micro_batch": 8 // world // args.grad_accum, "grad_accum": args.grad_accum,
                  "epochs": 2, "lr": lr, "optimizer": optimizer},
        "capture": {"rank": 4}, "embed": {"phases": 2},
    }).validate()
    ds = None if args.no_deepspeed or not deepspeed_installed() else {
        # the Trainer fills the "auto"s from its own arguments (batch, accumulation, clipping)
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": 0}}
    if ds is not None:
        single_process_env()
    run = create_on_rank_zero(cfg)
    uri = run if isinstance(run, str) else run.uri
    tok = load_tokenizer(cfg.data.tokenizer)
    data = TokenizedDataset(Run.open_uri(uri).read_table("data/train.parquet"), tok, cfg.data.seq_len)
    # attribution rebuilds the final model from config.model, so build it from there too
    model = build_model(cfg.model, tok.vocab_size, cfg.data.seq_len, seed=cfg.train.seed)
    targs = TrainingArguments(
        output_dir=os.path.join(args.store, "_hf", uri.rstrip("/").rsplit("/", 1)[-1]),
        per_device_train_batch_size=cfg.train.micro_batch, gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=cfg.train.epochs, learning_rate=cfg.train.lr,
        optim="adamw_torch" if args.optimizer == "adamw" else "sgd", adam_beta1=adamw["betas"][0],
        adam_beta2=adamw["betas"][1], adam_epsilon=adamw["eps"],
        weight_decay=adamw["weight_decay"] if args.optimizer == "adamw" else 0.0,
        lr_scheduler_type="constant", max_grad_norm=1.0, remove_unused_columns=False, dataloader_drop_last=True,
        save_strategy="no", report_to=[], logging_steps=4, use_cpu=not torch.cuda.is_available(), seed=cfg.train.seed, deepspeed=ds)
    trainer = Trainer(model=model, args=targs, train_dataset=Samples(data))
    trainer.add_callback(RecorderCallback(uri, cfg, trainer=trainer))  # the Trainer: for its DeepSpeed engine
    trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        print(uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
