"""The LM head and the next-token loss over the segments of one call, for HMT and its baselines.

Position t of a call is scored against token t + 1 (labels as for a Hugging Face causal LM,
shifted here; -100 and padding are ignored). :func:`score_segment` turns one segment's final
hidden states into logits and/or summed NLL; without logits to return it never holds the
``(B, l, vocab)`` float logits at once (:func:`scored_nll`). :class:`CallScores` gathers the
segments of a call into :class:`hmt.HMTOutput`'s fields.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import backbone as bb
from .constants import IGNORE_INDEX

# Scoring without returning logits runs the LM head on slices of at most this many
# (row, position, vocab) elements: 64 positions of a 49k vocabulary for one row on the CPU.
SCORE_ELEMENTS = 64 * 49152
SCORE_ELEMENTS_CUDA = 2**27


def autograd(tracked: bool):
    """No autograd for an untracked segment (evidence-sparse BPTT); the caller's mode otherwise."""
    return contextlib.nullcontext() if tracked else torch.no_grad()


def run_segment(function: Callable, *args, recompute: bool = False):
    """``function(*args)``; ``recompute``: under gradient checkpointing (only the inputs kept, the
    segment recomputed in backward)."""
    if recompute:
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(B, l)`` next-token NLL of ``logits (B, l, V)`` (in float32) against ``targets (B, l)``; 0 where ignored."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view_as(targets)


def scored_per_segment(targets: torch.Tensor, L: int, num_segments: int) -> list[int]:
    """How many positions of each segment carry a target, read on the host in one go."""
    B, T = targets.shape
    scored = F.pad(targets != IGNORE_INDEX, (0, num_segments * L - T))
    return scored.view(B, num_segments, L).sum((0, 2)).tolist()


def scored_nll(backbone: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
               num_scored: Optional[int] = None) -> torch.Tensor:
    """Summed NLL ``(B,)`` of ``hidden (B, l, d)`` against ``targets (B, l)``, never holding
    the ``(B, l, vocab)`` float logits at once: the LM head and the loss run on slices of
    positions, and with autograd on each slice is recomputed in backward instead of keeping
    its logits (so training memory does not grow with vocab x tokens). Given ``num_scored``
    (the positions with a target, counted on the host), the head runs on those positions
    only, gathered without a device read: none at all for a segment without targets."""
    B, width = targets.shape
    if num_scored is None or num_scored == B * width:
        return _chunked_nll(backbone, hidden.flatten(0, 1), targets.flatten()).view(B, width).sum(1)
    if num_scored == 0:
        return hidden.new_zeros(B, dtype=torch.float32)
    # The num_scored flat positions with a target (topk of a known size: no host read).
    index = torch.topk((targets != IGNORE_INDEX).flatten().to(torch.int8), num_scored, sorted=False).indices
    nll = _chunked_nll(backbone, hidden.flatten(0, 1).index_select(0, index), targets.flatten().index_select(0, index))
    return nll.new_zeros(B).index_add(0, torch.div(index, width, rounding_mode="floor"), nll)


def _chunked_nll(backbone: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL ``(N,)`` of ``hidden (N, d)`` against ``targets (N,)``, the head run on
    slices within an element budget, each recomputed in backward when autograd is on."""
    N = targets.shape[0]
    budget = SCORE_ELEMENTS_CUDA if hidden.is_cuda else SCORE_ELEMENTS
    chunk = max(1, min(N, budget // bb.vocab_size(backbone)))
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    parts = []
    for start in range(0, N, chunk):
        args = (backbone, hidden[start : start + chunk], targets[start : start + chunk])
        parts.append(run_segment(_slice_nll, *args, recompute=recompute))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _slice_nll(backbone: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return token_nll(bb.lm_logits(backbone, hidden.unsqueeze(0)), targets.unsqueeze(0)).squeeze(0)


@dataclass
class SegmentScore:
    """What the LM head makes of one segment: ``logits (B, l, V)`` (when kept), the summed
    ``nll (B,)`` and the ``count (B,)`` of scored tokens (when there are labels)."""

    logits: Optional[torch.Tensor] = None
    nll: Optional[torch.Tensor] = None
    count: Optional[torch.Tensor] = None


def score_segment(backbone: nn.Module, hidden: torch.Tensor, targets: Optional[torch.Tensor], want_logits: bool,
                  num_scored: Optional[int] = None) -> SegmentScore:
    """The LM head on a segment's final hidden states ``(B, l, d)`` (its own positions only) and
    the loss against ``targets (B, l)``. ``num_scored``: see :func:`scored_nll`."""
    score = SegmentScore()
    if want_logits:
        score.logits = bb.lm_logits(backbone, hidden)  # (B, l, V): segment positions only
    if targets is not None:
        if want_logits:
            score.nll = token_nll(score.logits, targets).sum(1)
        else:
            score.nll = scored_nll(backbone, hidden, targets, num_scored)
        score.count = (targets != IGNORE_INDEX).sum(1)
    return score


class CallScores:
    """The segments' scores of one call, gathered into :class:`hmt.HMTOutput`'s fields.

    ``labels (B, T)`` left-aligned as the loop reads them (None: no loss); ``want_logits``: keep
    the logits (False scores the labelled positions only, see :func:`scored_nll`).
    """

    def __init__(self, labels: Optional[torch.Tensor], segment_length: int, num_segments: int, want_logits: bool):
        self.L, self.want_logits = segment_length, want_logits
        self.targets = None
        if labels is not None:  # position t is scored against token t + 1
            B = labels.shape[0]
            self.targets = torch.cat([labels[:, 1:], labels.new_full((B, 1), IGNORE_INDEX)], dim=1)
        # Scored positions per segment, read on the host once: without logits to return, the LM
        # head runs on those positions only (none at all for a segment without labels).
        self.scored = (scored_per_segment(self.targets, segment_length, num_segments)
                       if self.targets is not None and not want_logits else None)
        self.logits, self.nll, self.count = [], [], []

    def segment(self, s: int, width: int) -> tuple[Optional[torch.Tensor], Optional[int]]:
        """Segment ``s``'s targets ``(B, width)`` (None without labels) and its scored positions (None: unknown)."""
        L = self.L
        targets = self.targets[:, s * L : s * L + width] if self.targets is not None else None
        return targets, None if self.scored is None else self.scored[s]

    def add(self, score: SegmentScore) -> None:
        if self.targets is not None:
            self.nll.append(score.nll)
            self.count.append(score.count)
        if self.want_logits:
            self.logits.append(score.logits)

    def fields(self, restore: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """``logits`` (put back in the caller's layout by ``restore``) and the loss fields."""
        fields = {}
        if self.want_logits:
            fields["logits"] = restore(torch.cat(self.logits, dim=1))
        if self.targets is not None:
            segment_nll, segment_tokens = torch.stack(self.nll, 1), torch.stack(self.count, 1)
            nll_sum, num_tokens = segment_nll.sum(1), segment_tokens.sum(1)
            total = num_tokens.sum()
            loss = nll_sum.sum() / total.clamp(min=1) if int(total) > 0 else nll_sum.sum() * float("nan")
            fields.update(loss=loss, segment_nll=segment_nll, segment_tokens=segment_tokens, nll_sum=nll_sum,
                          num_tokens=num_tokens)
        return fields
