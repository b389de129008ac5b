"""Several processes: the accelerator of a run (precision, DDP over gloo on CPUs, FSDP2) and the
collectives that make FSDP's shards whole again or lay whole tensors out as shards."""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import compat
from ..constants import IGNORE_INDEX
from .config import TrainConfig


def accelerator_for(config: TrainConfig, notes: list[str]):
    """The ``accelerate.Accelerator`` of a run: its precision (``auto``: bf16 on a GPU that has it),
    DDP over gloo when several processes run without a GPU, FSDP2 there when the launch asks for
    FSDP. What the machine changes of the config is appended to ``notes``."""
    from accelerate import Accelerator

    precision = config.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():  # fp16 autocast is for GPUs
        notes.append("precision: fp16 needs a CUDA GPU and this machine has none: the run is in fp32")
        precision = "fp32"
    # Several processes without a GPU (torchrun / accelerate launch --multi_gpu on a CPU
    # machine): accelerate uses gloo only when told the run is on the CPU.
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # A process whose rows never reach some parameters in a step (a one-segment row never searches
    # the cache) must still join every gradient all-reduce: DDP finds the parameters left unused.
    from accelerate.utils import DistributedDataParallelKwargs

    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision, cpu=cpu_ddp,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if cpu_ddp and fsdp_requested():
        compat.accelerate_fsdp_on_cpu(accelerator)
    return accelerator


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config (distributed_type: FSDP) says so in the environment."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def full_tensor(tensor):
    """The whole tensor of an FSDP shard (a DTensor; a collective: every process must call it); others as they are."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def full_tree(value):
    if isinstance(value, dict):
        return {k: full_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full_tree(v) for v in value)
    return full_tensor(value).cpu() if torch.is_tensor(value) else value


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, the same on every process) laid out like ``param`` (sharded under FSDP)."""
    if not hasattr(param, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements)


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's state dict, gathered from every process's shards (on every process)."""
    return {name: full_tensor(value.detach()).cpu() for name, value in model.state_dict().items()}


def pad_to_longest_across(batch: dict, accelerator, pad_id: int) -> dict:
    """Right-pad a micro-batch to the longest one of any process (labels -100, mask 0)."""
    length = torch.tensor([batch["input_ids"].shape[1]], device=accelerator.device)
    longest = int(accelerator.gather(length).max())
    extra = longest - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    return {k: torch.nn.functional.pad(v, (0, extra), value=fill[k]) if k in fill else v for k, v in batch.items()}
