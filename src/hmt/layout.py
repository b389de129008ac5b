"""Packing variable-length pieces into one left-aligned, right-padded batch for the backbone.

Every row of an augmented segment is the concatenation of pieces whose lengths differ
between rows (a shorter last segment, less sensory memory early in a stream). Rows are
packed left-aligned so that each row's positions run 0, 1, 2, ... exactly as if the row
were alone; padding goes at the end and is masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from . import backbone as bb


@dataclass
class Packed:
    embeds: torch.Tensor  # (B, T, d)
    attention_mask: Optional[torch.Tensor]  # (B, T) long, None when no row is padded
    position_ids: torch.Tensor  # (B, T)
    offsets: list[list[int]]  # offsets[p][b]: where piece p starts in row b
    lengths: list[int]  # real positions per row


def pack_rows(parts: Sequence[tuple[torch.Tensor, Sequence[int]]]) -> Packed:
    """Concatenate ``parts`` row by row.

    Args:
        parts: ``(tensor (B, n_p, d), lengths)`` where row b uses the first
            ``lengths[b] <= n_p`` vectors of the piece.
    """
    # A piece whose rows all use the same number of vectors is cut to that width, so the
    # common cases (no sensory memory yet, every row full) take the padding-free path.
    parts = [(_cut_to_common_length(piece, lengths), list(lengths)) for piece, lengths in parts]
    first = parts[0][0]
    B, d, device = first.shape[0], first.shape[-1], first.device
    offsets, running = [], [0] * B
    for _, lengths in parts:
        offsets.append(list(running))
        running = [r + n for r, n in zip(running, lengths)]
    total = max(running)
    uniform = all(all(n == t.shape[1] for n in lengths) for t, lengths in parts)
    if uniform:  # the common case: no padding anywhere, a plain concatenation
        embeds = torch.cat([t for t, _ in parts], dim=1)
        mask = None
    else:
        # Scatter each piece to its row offsets; unused slots go to a spare last column.
        embeds = first.new_zeros(B, total + 1, d)
        for (piece, lengths), offs in zip(parts, offsets):
            n = piece.shape[1]
            if n == 0:
                continue
            steps = torch.arange(n, device=device).view(1, n)
            start = torch.as_tensor(offs, device=device).view(B, 1)
            used = steps < torch.as_tensor(lengths, device=device).view(B, 1)
            index = torch.where(used, start + steps, torch.full_like(steps, total))
            embeds = embeds.scatter(1, index.unsqueeze(-1).expand(B, n, d), piece.to(embeds.dtype))
        embeds = embeds[:, :total]
        mask = (torch.arange(total, device=device).view(1, total) < torch.as_tensor(running, device=device).view(B, 1)).long()
    positions = torch.arange(total, device=device).view(1, total).expand(B, total)
    return Packed(embeds, mask, positions, offsets, running)


def _cut_to_common_length(piece: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    if len(set(lengths)) == 1 and lengths[0] < piece.shape[1]:
        return piece[:, : lengths[0]]
    return piece


def run_packed(backbone: nn.Module, packed: Packed) -> torch.Tensor:
    """Final hidden states ``(B, T, d)`` of the backbone over a packed batch."""
    # Without padding the positions are the backbone's default 0..T-1. Passing them anyway
    # would make transformers look for packed sequences in them, a host synchronisation per call.
    positions = None if packed.attention_mask is None else packed.position_ids
    return bb.final_hidden(backbone, packed.embeds, packed.attention_mask, positions)


def gather_rows(hidden: torch.Tensor, starts: Sequence[int], width: int) -> torch.Tensor:
    """``hidden[b, starts[b] : starts[b] + width]`` for every row -> ``(B, width, d)``.

    Rows whose span runs past the end are clamped (those positions are padding anyway).
    """
    B, T, d = hidden.shape
    if len(set(starts)) == 1 and starts[0] + width <= T:
        return hidden[:, starts[0] : starts[0] + width]
    index = torch.as_tensor(starts, device=hidden.device).view(B, 1) + torch.arange(width, device=hidden.device)
    index = index.clamp(max=T - 1)
    return hidden.gather(1, index.unsqueeze(-1).expand(B, width, d))
