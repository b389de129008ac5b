"""The baselines: the plain backbone on the same segments as HMT, with the same weights.

HMT is measured against its backbone reading the same L-token segments without memory:

* ``disjoint`` -- each segment alone (the paper's baseline);
* ``sensory``  -- each segment prefixed by the last k tokens before it (positions from 0, no
  memory token): what sensory memory alone gives;
* ``sliding-W`` (evaluation only) -- each stretch of new tokens read with up to W tokens before it.

One computation serves every user: :func:`context_hidden` (the backbone over ``[context |
segment]``). :func:`read_segments` is ``HMT.forward(use_memory=False | "sensory")`` (what the
trainer trains and validates as a baseline); :func:`score_with_context` is what
:mod:`hmt.evaluate` scores a document with.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import backbone as bb
from .inputs import Batch
from .layout import gather_rows, pack_rows, run_packed
from .scoring import CallScores, autograd, run_segment, score_segment


def memory_mode(use_memory) -> tuple[bool, bool]:
    """``(memory on, sensory prefix only)`` for ``HMT.forward(use_memory=...)``: a truth value
    (memory on / the plain backbone on disjoint segments) or ``"sensory"`` (the plain backbone
    on sensory-prefixed segments). Any other string is an error, not a truthy "on"."""
    if isinstance(use_memory, str):
        if use_memory != "sensory":
            raise ValueError(f"use_memory must be True, False or 'sensory', got {use_memory!r}.")
        return False, True
    return bool(use_memory), False


def context_hidden(backbone: nn.Module, seg_ids: torch.Tensor, seg_lens: list[int],
                   context_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Final hidden states ``(B, l, d)`` of a segment's positions, the backbone reading each row's
    ``[context | segment]`` from position 0. ``seg_ids (B, l)`` with ``seg_lens`` real tokens per row;
    ``context_ids (B, c)`` (None or c = 0: none) read before every row that has tokens in the segment."""
    embed = bb.unwrap(backbone).get_input_embeddings()
    width = seg_ids.shape[1]
    parts = [(embed(seg_ids), seg_lens)]
    if context_ids is not None and context_ids.shape[1] > 0:
        c = context_ids.shape[1]
        parts.insert(0, (embed(context_ids), [c if n > 0 else 0 for n in seg_lens]))
    packed = pack_rows(parts)
    return gather_rows(run_packed(backbone, packed), packed.offsets[-1], width)


def read_segments(backbone: nn.Module, batch: Batch, segment_length: int, context: int, want_logits: bool,
                  selected: Optional[frozenset] = None, checkpointing: bool = False) -> dict:
    """The plain backbone over a call's segments, each read with the ``context`` tokens before it in
    the call (0: disjoint segments; k: the sensory-prefix baseline; the first segment has none).
    Returns :class:`hmt.HMTOutput`'s ``logits`` and loss fields; ``selected`` and ``checkpointing``
    as ``HMT.forward``'s ``grad_segments`` and ``checkpoint_segments``."""
    L = segment_length
    num_segments = batch.num_segments(L)
    scores = CallScores(batch.labels, L, num_segments, want_logits)
    for s in range(num_segments):
        seg_ids, seg_lens = batch.segment(s, L)
        targets, num_scored = scores.segment(s, seg_ids.shape[1])
        context_ids = batch.ids[:, max(0, s * L - context) : s * L] if context else None
        tracked = selected is None or s in selected
        scores.add(run_segment(_scored_segment, backbone, seg_ids, seg_lens, context_ids, targets, want_logits,
                               num_scored, tracked, recompute=checkpointing and tracked))
    return scores.fields(batch.restore)


def _scored_segment(backbone, seg_ids, seg_lens, context_ids, targets, want_logits, num_scored, tracked):
    with autograd(tracked):
        hidden = context_hidden(backbone, seg_ids, seg_lens, context_ids)
        return score_segment(backbone, hidden, targets, want_logits, num_scored)


@torch.no_grad()
def score_with_context(
    backbone: nn.Module, ids: torch.Tensor, segment_length: int, context: int, stride: Optional[int] = None
) -> tuple[list[float], list[int]]:
    """The backbone on chunks of ``stride`` tokens (default L), each read with up to ``context`` tokens before it.

    ``context=0`` gives disjoint segments, ``k`` the sensory-prefix protocol, ``W - stride``
    a sliding window of W. Every token of the document is scored once (the first unscored).
    Returns NLL sums and token counts per L-token segment.
    """
    device = bb.unwrap(backbone).get_input_embeddings().weight.device
    ids = ids.to(device).view(-1)
    T, L = ids.shape[0], segment_length
    step = stride or L
    token_nll = torch.zeros(max(T - 1, 0), dtype=torch.float64)
    for start in range(0, T, step):
        end = min(start + step, T)
        targets = ids[start + 1 : end + 1]  # the document's last token has no target
        chunk = ids[start:end].view(1, -1)
        hidden = context_hidden(backbone, chunk, [chunk.shape[1]], ids[max(0, start - context) : start].view(1, -1))
        logits = bb.lm_logits(backbone, hidden[0, : targets.shape[0]]).float()
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        token_nll[start : start + targets.shape[0]] = nll.double().cpu()
    blocks = range(0, T, L)
    return ([float(token_nll[b : b + L].sum()) for b in blocks], [int(token_nll[b : b + L].numel()) for b in blocks])
