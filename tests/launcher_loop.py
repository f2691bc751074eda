"""A user's own DeepSpeed loop with the Recorder, as a launcher starts it (torchrun and the
`deepspeed` launcher both set RANK, WORLD_SIZE, MASTER_ADDR...): tests/test_recorder_launcher.py.

    python -m torch.distributed.run --nproc_per_node N tests/launcher_loop.py RUN_URI

Each step's global batch is the same 8 samples whatever N is: rank r trains its 8/N of them.
ZeRO 0 with clipping, so the Recorder takes the gradient norm before engine.step() itself.
"""

import sys

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

import rayattr
from rayattr.config import Config
from rayattr.data import TokenizedDataset, load_tokenizer
from rayattr.store import Run
from rayattr.model.loss import micro_batch_loss
from rayattr.model.build import build_model

GLOBAL_BATCH, STEPS = 8, 3

deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
run = Run.open_uri(sys.argv[1], mode="record")
cfg = Config.from_dict(run.manifest["config"])
tok = load_tokenizer(cfg.data.tokenizer)
data = TokenizedDataset(run.read_table("data/train.parquet"), tok, cfg.data.seq_len)
model = build_model(cfg.model, tok.vocab_size, cfg.data.seq_len, seed=0)
micro = GLOBAL_BATCH // world
engine, *_ = deepspeed.initialize(
    model=model, optimizer=torch.optim.SGD(model.parameters(), lr=cfg.train.lr),
    config={"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
            "train_batch_size": GLOBAL_BATCH, "zero_optimization": {"stage": 0}, "gradient_clipping": 0.5,
            "steps_per_print": 10**9})
recorder = rayattr.Recorder(engine, run, cfg)  # rank and world size from torch.distributed
for step in range(STEPS):
    idx = np.arange(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)[rank * micro:(rank + 1) * micro]
    b = data.batch(idx)
    with recorder.step(b["ids"].tolist()):
        loss = micro_batch_loss(engine, b["input_ids"], b["attention_mask"], b["labels"])
        recorder.add_loss(loss)
        engine.backward(loss)
        engine.step()
recorder.finish()
