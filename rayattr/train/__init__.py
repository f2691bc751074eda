"""Rank actors around DeepSpeed: worker (one rank's loop), backend (process group, DS config), trainer (driver)."""

from rayattr.train.model import build_model
from rayattr.train.trainer import train
from rayattr.train.worker import NonFiniteLoss, RankActor, RankWorker

__all__ = ["NonFiniteLoss", "RankActor", "RankWorker", "build_model", "train"]
