"""Recording a training run for attribution: the Recorder a training step calls (the built-in
job's ranks, a Ray Train train_func, a script under the deepspeed launcher, the HF callback)."""

from rayattr.record.errors import NonFiniteLoss
from rayattr.record.recorder import RECORDED, Recorder, projection_spec, state_dict_bytes

__all__ = ["NonFiniteLoss", "RECORDED", "Recorder", "projection_spec", "state_dict_bytes"]
