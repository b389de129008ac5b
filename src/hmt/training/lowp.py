"""Frozen weights cast once: under bf16/fp16 autocast, every ``nn.Linear`` call casts its fp32
weight to the low precision anew. For the backbone's frozen weights (LoRA training) that cast is
the same every call, and on a CPU it costs more than the matmul it feeds (a third of a bf16
training step on SmolLM2-135M, ``benchmarks/teaching_cost.py``). This keeps one low-precision
copy of each frozen weight for the run: the same numbers autocast computes, without the casts.
The trainer uses it on the CPU only: on a GPU the cast is cheap and the copy costs 2 bytes per
frozen weight of device memory."""

from __future__ import annotations

import contextlib
import types
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


def _linear_with_cast_weight(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    device = x.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == self._hmt_low_weight.dtype:
        return F.linear(x, self._hmt_low_weight, self.bias)  # what autocast would cast self.weight to
    return F.linear(x, self.weight, self.bias)


@contextlib.contextmanager
def frozen_weights_cast(modules: Iterable[nn.Module], dtype: torch.dtype) -> Iterator[int]:
    """Within the block, each frozen ``nn.Linear`` (weight without ``requires_grad``, in fp32) of
    ``modules`` reads a ``dtype`` copy of its weight whenever autocast to ``dtype`` is on; outside
    autocast it reads its own weight as usual. The parameters themselves are not touched (their
    values, dtype, versions and state dict stay as they are); the copies go when the block ends.
    Yields how many weights were cast (0 for fp32 training or a backbone with no frozen linears)."""
    patched = []
    try:
        if dtype in (torch.bfloat16, torch.float16):
            seen = set()
            for root in modules:
                for module in root.modules():
                    weight = getattr(module, "weight", None)
                    if (type(module) is not nn.Linear or id(module) in seen or weight is None or weight.requires_grad
                            or weight.dtype != torch.float32 or "forward" in module.__dict__):
                        continue
                    seen.add(id(module))
                    module._hmt_low_weight = weight.detach().to(dtype)
                    module.forward = types.MethodType(_linear_with_cast_weight, module)
                    patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
            del module._hmt_low_weight
