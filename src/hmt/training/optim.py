"""The optimisation every training loop of hmt goes through (``hmt train`` and the recall probe,
:func:`hmt.recall.train_recall`): parameter groups, the learning-rate schedule, one optimizer step."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ..model import HMT
from .config import TrainConfig


# The layer every training loop of hmt goes through (`hmt train` here, the recall probe in
# hmt.recall): parameter groups, the learning-rate schedule, the loss of a batch, one optimizer step.
def optimizer_groups(model: HMT, lr: float, hmt_lr: Optional[float] = None, weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups of the parameters that train: the backbone's at ``lr``, HMT's own (names not
    starting with ``backbone.``) at ``hmt_lr`` (``lr`` when None). Frozen parameters are left out."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in named if not HMT.is_own(n)]
    own = [p for n, p in named if HMT.is_own(n)]
    groups = [{"params": backbone, "lr": lr, "weight_decay": weight_decay}] if backbone else []
    if own:
        groups.append({"params": own, "lr": hmt_lr if hmt_lr is not None else lr, "weight_decay": weight_decay})
    return groups


def parameter_groups(model: HMT, config: TrainConfig) -> list[dict]:
    """The trained parameters as AdamW groups: the backbone's at ``lr``, HMT's own at ``hmt_lr``."""
    return optimizer_groups(model, config.lr, config.hmt_lr, config.weight_decay)


def lr_factor(step: int, *, warmup_steps: int, decay: str = "constant", steps: int = 1, decay_every: int = 100,
              decay_gamma: float = 0.8, floor: float = 0.0, pi_first: bool = False) -> float:
    """The learning rate at optimizer step ``step`` (from 0) as a fraction of the base rate: a linear
    warm-up over ``warmup_steps``, then ``decay``: ``"step"`` (x ``decay_gamma`` every ``decay_every``
    steps, the paper's), ``"cosine"`` (from 1 down to ``floor`` at ``steps``) or ``"constant"``.

    ``pi_first``: the cosine's angle computed as ``(pi * elapsed) / span`` rather than
    ``pi * (elapsed / span)``. The two round differently in the last bit at some steps; the recall
    probe (:func:`hmt.recall.lr_schedule`) has always used the first, ``hmt train`` the second, and
    each keeps its learning rates to the bit."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "step":
        return decay_gamma ** ((step - warmup_steps) // decay_every)
    if decay == "cosine":
        span = max(1, steps - warmup_steps)
        if pi_first:
            angle = math.pi * min(step - warmup_steps, span) / span
        else:
            angle = math.pi * min(1.0, (step - warmup_steps) / span)
        return floor + (1 - floor) / 2 * (1 + math.cos(angle))
    return 1.0


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """:func:`lr_factor` of a run, as ``torch.optim.lr_scheduler.LambdaLR`` takes it."""
    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=config.warmup_steps, decay=config.decay, steps=config.steps,
                         decay_every=config.decay_every, decay_gamma=config.decay_gamma)

    return factor


def make_optimizer(model: HMT, schedule: Callable[[int], float], lr: float, hmt_lr: Optional[float] = None,
                   weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)):
    """AdamW over :func:`optimizer_groups` and a ``LambdaLR`` scheduler with ``schedule`` (a step's
    fraction of the base rate, e.g. :func:`lr_lambda`): ``(optimizer, scheduler)``."""
    optimizer = torch.optim.AdamW(optimizer_groups(model, lr, hmt_lr, weight_decay), lr=lr, weight_decay=weight_decay,
                                  betas=betas)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def optimizer_step(optimizer, scheduler, params: Sequence[torch.Tensor], max_grad_norm: float,
                   clip: Callable = torch.nn.utils.clip_grad_norm_):
    """Clip the gradients of ``params`` to ``max_grad_norm`` (with ``clip``), step the optimizer and
    the schedule, clear the gradients; returns the norm before clipping."""
    norm = clip(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
