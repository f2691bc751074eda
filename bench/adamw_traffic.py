#!/usr/bin/env python
"""Bytes the ranks put into collectives per optimizer step, by what they carry: DeepSpeed's
gradient reduction against the all-reduce of v's row and column sums that AdamW's step's own P
needs (rayattr/optim/adam_state.py), counted on 2 ranks under ZeRO-1 (gloo, CPU).

Each rank trains the built-in job's model (or the larger one) on random tokens through a
DeepSpeed engine; the bench wraps torch.distributed's collectives in each rank and counts the
bytes of the tensors handed to them, during the engine's backward and step and during the read
of P after the step.

    python bench/adamw_traffic.py            # the built-in job's model (GPT-2 2 x 64)
    python bench/adamw_traffic.py --large    # GPT-2 4 x 256, micro-batch 4 x 128
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rayattr.config import Config  # noqa: E402

COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "reduce")


# where each collective takes what a rank sends: (position, keyword); the gathers' outputs
# come first and repeat every rank's input, so only the input counts
SENT = {"all_gather": (1, "tensor"), "all_gather_into_tensor": (1, "input_tensor"),
        "reduce_scatter_tensor": (1, "input_tensor"), "reduce_scatter": (1, "input_list"),
        "all_reduce_coalesced": (0, "tensors")}


def sent_bytes(name: str, args: tuple, kwargs: dict) -> int:
    at, key = SENT.get(name, (0, "tensor"))
    value = args[at] if len(args) > at else kwargs.get(key)
    tensors = value if isinstance(value, (list, tuple)) else [value]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class Counter:
    """Bytes passed to each collective, under the phase named by `phase`."""

    def __init__(self):
        self.phase = "other"
        self.bytes: dict[str, int] = defaultdict(int)

    def install(self) -> None:
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue

            def counted(*args, _fn=fn, _name=name, **kwargs):
                self.bytes[self.phase] += sent_bytes(_name, args, kwargs)
                return _fn(*args, **kwargs)

            setattr(dist, name, counted)


def rank_main(rank: int, world: int, port: int, config: dict, steps: int, queue) -> None:
    from rayattr.optim.spec import resolve_optimizer
    from rayattr.optim.adam_state import read_preconditioners
    from rayattr.train.backend import join_process_group
    from rayattr.model.loss import micro_batch_loss
    from rayattr.train.engine import build_engine
    from rayattr.model.build import build_model

    cfg = Config.from_dict(config)
    # torch.distributed's env:// rendezvous, as the deepspeed launcher sets it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0", LOCAL_SIZE="1")
    join_process_group(cfg)
    torch.manual_seed(rank)
    model = build_model(cfg.model, 259, cfg.data.seq_len, seed=0)
    engine = build_engine(cfg, model, steps)
    spec = resolve_optimizer(cfg)
    layers = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")]
    counter = Counter()
    counter.install()
    b, s = cfg.train.micro_batch, cfg.data.seq_len
    for _ in range(steps):
        ids = torch.randint(0, 259, (b, s))
        mask = torch.ones_like(ids)
        counter.phase = "gradient reduction (backward + engine.step)"
        engine.backward(micro_batch_loss(engine, ids, mask, ids))
        engine.step()
        counter.phase = "AdamW P statistics (after the step)"
        pre, k = read_preconditioners(engine, layers, spec)
        assert pre is not None and k >= 1
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        queue.put((dict(counter.bytes), n_params, len(layers)))
    dist.barrier()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--large", action="store_true", help="GPT-2 4 layers x 256, micro-batch 4 x 128")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    d = {"train": {"ranks": 2, "micro_batch": 8, "deepspeed": {"zero_optimization": {"stage": 1},
                                                                "gradient_clipping": 1.0}}}
    if args.large:
        d["model"] = {"n_layer": 4, "n_embd": 256, "n_head": 4}
        d["data"] = {"seq_len": 128}
        d["train"]["micro_batch"] = 4
    cfg = Config.from_dict(d).validate()
    from rayattr.train.backend import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(rank_main, args=(2, free_port(), cfg.to_dict(redact=False), args.steps, queue),
                       nprocs=2, start_method="spawn")
    counts, n_params, n_layers = queue.get()
    grad = counts.get("gradient reduction (backward + engine.step)", 0) / args.steps
    stats = counts.get("AdamW P statistics (after the step)", 0) / args.steps
    m = cfg.model
    print(f"2 ranks, ZeRO-1, gloo; GPT-2 {m.n_layer} x {m.n_embd}, {n_params / 1e6:.2f} M params, "
          f"{n_layers} captured layers; {args.steps} steps; bytes one rank hands to collectives per step:")
    print(f"  gradient reduction (backward + engine.step): {grad / 1e3:10.1f} kB")
    print(f"  AdamW P statistics (after the step):         {stats / 1e3:10.1f} kB  = {100 * stats / grad:.2f} % "
          "of the gradient reduction")


if __name__ == "__main__":
    main()
