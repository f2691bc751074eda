"""A CPU rank joins its process group whatever DeepSpeed's extension cache holds: a lock file
left by a rank killed while loading DeepSpeed's shared-memory op does not hold it up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from s3server import pick_ports

ROOT = Path(__file__).resolve().parent.parent

JOIN = """
import os
from rayattr.config import Config
from rayattr.train.backend import join_process_group
device = join_process_group(Config())
import torch.distributed as dist
print("joined", device, dist.get_rank(), dist.get_world_size())
"""


def test_a_stale_extension_lock_does_not_hold_up_a_cpu_rank(tmp_path):
    # what a rank killed inside DeepSpeed's build_shm_op leaves behind (torch's FileBaton, in
    # the op's build folder under TORCH_EXTENSIONS_DIR)
    lock = tmp_path / "extensions" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "PYTHONPATH": str(ROOT),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(pick_ports(1)[0]), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_SIZE": "1"}
    out = subprocess.run([sys.executable, "-c", JOIN], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "joined cpu 0 1" in out.stdout
    assert lock.exists()  # nobody took it: the op was not loaded
