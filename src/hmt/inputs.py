"""What :meth:`hmt.HMT.forward` is given, checked and laid out as the segment loop reads it.

:func:`check_inputs` refuses bad ids, masks and labels with errors that say what to do, and
left-aligns every row (its real tokens first, padding after): row b of a segment loop then
holds its own positions 0, 1, 2, ... . :class:`Batch` keeps what is needed to put outputs back
in the caller's layout; :func:`open_pending` puts the tokens of an open segment (left by
generation) in front of a call's own; :func:`check_options` checks the loop's options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from .constants import IGNORE_INDEX
from .layout import gather_rows


def check_inputs(input_ids, attention_mask, labels, vocab: int, device: torch.device):
    """Validate inputs as ``forward`` takes them (clear errors); return left-aligned ids, mask,
    labels, per-row starts (first real position) and lengths (a list), on ``device``.
    ``vocab``: the backbone's vocabulary size."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}.")
    if input_ids.dtype in (torch.bool,) or input_ids.is_floating_point() or input_ids.is_complex():
        raise TypeError(
            f"input_ids must hold integer token ids (torch.long), got dtype {input_ids.dtype}. "
            "Pass the tokenizer's input_ids, not embeddings."
        )
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must have shape (batch, seq_len), got rank {input_ids.dim()} "
            f"{tuple(input_ids.shape)}. For one sequence use input_ids.unsqueeze(0)."
        )
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); give at least one token.")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(
            f"input_ids holds ids in [{low}, {high}] but the backbone's vocabulary has {vocab} "
            "entries (0 .. vocab-1). Was the text tokenised with another tokenizer?"
        )
    ids = input_ids.long().to(device)  # inputs may come from the CPU (a tokenizer's tensors)
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, T):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask must have the shape of input_ids {(B, T)}, got {shape}.")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token).")
        mask = attention_mask.long().to(device)
        edges = (mask[:, 1:] != mask[:, :-1]).sum(1) + mask[:, 0].ne(0).long() + mask[:, -1].ne(0).long()
        if bool((edges > 2).any()):
            rows = (edges > 2).nonzero().flatten().tolist()
            raise ValueError(
                f"attention_mask has holes in rows {rows}: each row's real tokens must be one "
                "contiguous block (padding only on the left or the right)."
            )
    lengths_t = mask.sum(1)
    if bool((lengths_t == 0).any()):
        rows = (lengths_t == 0).nonzero().flatten().tolist()
        raise ValueError(f"Rows {rows} of the batch are empty (attention_mask all 0); drop them.")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (B, T):
            raise ValueError(f"labels must be a tensor with the shape of input_ids {(B, T)}.")
        if labels.is_floating_point():
            raise TypeError(f"labels must hold integer token ids, got dtype {labels.dtype}.")
        labels = labels.long().to(device).masked_fill(mask == 0, IGNORE_INDEX)
        scored = labels[labels != IGNORE_INDEX]
        if scored.numel():
            low, high = int(scored.min()), int(scored.max())
            if low < 0 or high >= vocab:
                raise ValueError(
                    f"labels hold ids in [{low}, {high}] but the backbone's vocabulary has {vocab} entries "
                    f"(0 .. {vocab - 1}); mark positions not to score with -100."
                )
    starts = mask.argmax(1)  # first real position of each row
    if bool(starts.any()):  # left padding: move each row's tokens to the front
        index = (torch.arange(T, device=ids.device).view(1, T) + starts.view(B, 1)) % T
        ids, mask = ids.gather(1, index), mask.gather(1, index)
        labels = labels.gather(1, index) if labels is not None else None
    return ids, mask, labels, starts, lengths_t.tolist()


def check_options(detach_every, grad_segments) -> Optional[frozenset]:
    """Check ``forward``'s ``detach_every``; return its ``grad_segments`` as a set of segment
    indices (None: every segment)."""
    if detach_every is not None and (not isinstance(detach_every, int) or detach_every < 1):
        raise ValueError(f"detach_every must be a positive integer or None, got {detach_every!r}.")
    if grad_segments is None:
        return None
    if isinstance(grad_segments, torch.Tensor):
        grad_segments = grad_segments.flatten().tolist()
    try:
        selected = frozenset(int(s) for s in grad_segments)
    except (TypeError, ValueError):
        raise TypeError(f"grad_segments must be a collection of segment indices or None, got {grad_segments!r}.") from None
    if any(s < 0 for s in selected):
        raise ValueError(f"grad_segments holds negative segment indices: {sorted(selected)}.")
    return selected


@dataclass
class Batch:
    """A call's rows as the segment loop reads them (see :func:`check_inputs`).

    ``ids``, ``mask``, ``labels``: ``(B, T)`` left-aligned; ``lengths``: real tokens per row;
    ``starts``: ``(B,)`` where each row began in the caller's layout; ``caller_mask``: the mask of
    the caller's own tokens; ``prefix``: per row, tokens of an open segment read before them
    (:func:`open_pending`), None when there were none.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    labels: Optional[torch.Tensor]
    starts: torch.Tensor
    lengths: list[int]
    caller_mask: torch.Tensor
    prefix: Optional[list[int]] = None

    @classmethod
    def checked(cls, input_ids, attention_mask, labels, vocab: int, device: torch.device) -> "Batch":
        ids, mask, labels, starts, lengths = check_inputs(input_ids, attention_mask, labels, vocab, device)
        return cls(ids, mask, labels, starts, lengths, mask)

    @property
    def size(self) -> int:
        return self.ids.shape[0]

    def num_segments(self, segment_length: int) -> int:
        return -(-max(self.lengths) // segment_length)

    def segment(self, s: int, segment_length: int) -> tuple[torch.Tensor, list[int]]:
        """Segment ``s``: its ids ``(B, l)`` and the real tokens of each row in it."""
        L = segment_length
        return self.ids[:, s * L : (s + 1) * L], [min(max(n - s * L, 0), L) for n in self.lengths]

    def restore(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T', V)`` of the loop's positions -> the caller's layout ``(B, T, V)``:
        the open segment's positions dropped, the left-alignment undone, padding zeroed."""
        if self.prefix is not None:
            logits = gather_rows(logits, self.prefix, self.caller_mask.shape[1])
        return restore_positions(logits, self.caller_mask, self.starts)


def restore_positions(logits: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Undo the left-alignment and zero the padding positions."""
    if bool((mask == 0).any()):
        logits = logits * mask.unsqueeze(-1).to(logits.dtype)
    if bool(starts.any()):
        B, T, V = logits.shape
        index = (torch.arange(T, device=logits.device).view(1, T) - starts.view(B, 1)) % T
        logits = logits.gather(1, index.unsqueeze(-1).expand(B, T, V))
    return logits


def open_pending(batch: Batch, state):
    """An open segment (left by generation) continues: its tokens are read first. Returns the batch
    with each row's pending tokens in front of its own (their labels ignored) and the state
    without them; both as given when no row has an open segment. ``state``: a :class:`MemoryState`."""
    if not bool(state.pending_lengths.any()):
        return batch, state
    ids, mask, labels, prefix = prepend_pending(state, batch.ids, batch.labels, batch.lengths)
    lengths = [p + n for p, n in zip(prefix, batch.lengths)]
    batch = dataclasses.replace(batch, ids=ids, mask=mask, labels=labels, lengths=lengths, prefix=prefix)
    return batch, dataclasses.replace(state, pending_lengths=torch.zeros_like(state.pending_lengths))


def prepend_pending(state, ids, labels, lengths):
    """Left-aligned ``[pending | ids]`` per row (and labels, -100 on pending positions)."""
    prefix = state.pending_lengths.tolist()
    B = ids.shape[0]
    width = max(p + n for p, n in zip(prefix, lengths))
    joined = ids.new_zeros(B, width)
    joined_labels = ids.new_full((B, width), IGNORE_INDEX) if labels is not None else None
    for row, (p, n) in enumerate(zip(prefix, lengths)):
        joined[row, :p] = state.pending_ids[row, :p]
        joined[row, p : p + n] = ids[row, :n]
        if labels is not None:
            joined_labels[row, p : p + n] = labels[row, :n]
    mask = (torch.arange(width, device=ids.device).view(1, width) < torch.as_tensor(
        [p + n for p, n in zip(prefix, lengths)], device=ids.device).view(B, 1)).long()
    return joined, mask, joined_labels, prefix
