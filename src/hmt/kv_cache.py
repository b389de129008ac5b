"""The fence around transformers' KV cache: everything HMT does to a cache's internals.

Generation keeps several rows in one batched KV cache although their prefixes differ in
length. Transformers has no public API for that, so this module edits its cache objects:
each layer's ``keys`` / ``values`` tensors ``(B, heads, positions, head_dim)``, a sliding
window layer's ``sliding_window`` / ``cumulative_length`` / ``activate_past_recording``, and
the layer classes ``DynamicLayer`` and ``DynamicSlidingWindowLayer``. Nothing else in hmt
touches them; ``tests/test_kv_cache_contract.py`` pins what this relies on, so a
transformers upgrade that changes it fails there first, naming what changed.

The convention of a *padded* cache: a cache ``width`` positions wide holds each row's
entries right-aligned, left-padded with zero keys and values; a row holding ``n`` real
positions has position ids ``0 .. n-1`` and a 2-D attention mask hides its padding, so every
row computes what it would alone. A sliding-window layer holds only its last ``W - 1``
entries; its ``cumulative_length`` (what the mask builder reads) is kept equal to ``width``.

API (``cache`` is what the backbone's decoder stack returns):

* :func:`prefill` -- a new cache over ``embeds``; :func:`step` -- feed rows of a padded cache.
* :func:`stackable` -- whether :func:`stack` and a ``width`` in :func:`select_rows` apply.
* :func:`stack` -- append another cache's rows; :func:`select_rows` -- keep some rows (and
  trim the padding they all share); :func:`crop` -- drop the last positions of every row.
* :func:`keep_past` / :func:`can_crop` -- make cropping safe under a sliding window.
* :func:`cache_argument` -- the stack's name for the cache argument.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import backbone as bb


def cache_argument(stack: nn.Module) -> str:
    """The decoder stack's KV-cache argument: ``cache`` in transformers 5.x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(stack.forward).parameters else "past_key_values"


def _run(backbone: nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor, cache, attention_mask=None):
    stack = bb.decoder_stack(backbone)
    name = cache_argument(stack)
    out = stack(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask, use_cache=True,
                return_dict=True, **{name: cache})
    return out.last_hidden_state, out[name]


def prefill(backbone: nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor):
    """Run the decoder stack over ``embeds (B, T, d)`` at ``position_ids (B, T)`` (no padding);
    return its final hidden states ``(B, T, d)`` and a new cache over the ``T`` positions."""
    return _run(backbone, embeds, position_ids, None)


def step(backbone: nn.Module, cache, embeds: torch.Tensor, lengths: list[int], width: int):
    """Feed ``embeds (n, q, d)`` to the ``n`` rows of a padded ``cache`` ``width`` wide whose rows
    hold ``lengths`` real positions; return hidden states ``(n, q, d)`` and the cache, now
    ``width + q`` wide."""
    device = embeds.device
    held = torch.tensor(lengths, device=device).view(-1, 1)
    positions = held + torch.arange(embeds.shape[1], device=device)
    mask = None
    if any(n != width for n in lengths):  # left padding to hide
        mask = (torch.arange(width + embeds.shape[1], device=device) >= width - held).long()
    return _run(backbone, embeds, positions, cache, mask)


def crop(cache, q: int) -> None:
    """Remove the last ``q`` positions of every row (see :func:`can_crop`)."""
    cache.crop(-q)


# ---------------------------------------------------------------------------- layers
def _layers(cache) -> list:
    """The per-layer caches (self-attention ones for an encoder-decoder cache); [] if not layered."""
    cache = getattr(cache, "self_attention_cache", cache)
    return list(getattr(cache, "layers", None) or [])


def _layer_types() -> tuple:
    try:
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    except ImportError:  # transformers without per-layer caches
        return ()
    return DynamicLayer, DynamicSlidingWindowLayer


def stackable(cache) -> bool:
    """Whether rows of ``cache`` can be padded and stacked: plain dynamic (sliding-window) layers
    only (exact types: a subclass may keep more state than keys and values)."""
    types = _layer_types()
    layers = _layers(cache)
    return bool(types and layers) and all(type(layer) in types for layer in layers)


def _held(layer, width: int) -> int:
    """Entries a layer holds for a cache ``width`` positions wide (a sliding window keeps W - 1)."""
    return min(width, layer.sliding_window - 1) if getattr(layer, "is_sliding", False) else width


def _aligned(layer, width: int, rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of ``layer`` (``rows`` of them) right-aligned to a cache ``width`` wide."""
    out = []
    for t in (layer.keys, layer.values):
        t = t if rows is None else t.index_select(0, rows)
        n, have = _held(layer, width), t.shape[-2]
        out.append(F.pad(t, (0, 0, n - have, 0)) if have < n else t[..., have - n :, :])
    return out[0], out[1]


def _set_width(layer, width: int) -> None:
    if getattr(layer, "is_sliding", False):
        layer.cumulative_length = width  # the positions seen, as the masks read them


def stack(cache, other, width: int) -> None:
    """Append the rows of ``other`` to ``cache`` (both :func:`stackable`), in place; every row
    right-aligned to ``width`` (at least either cache's width)."""
    for mine, theirs in zip(_layers(cache), _layers(other)):
        if mine.keys is None or theirs.keys is None:  # a layer without a cache of its own
            continue
        (k0, v0), (k1, v1) = _aligned(mine, width), _aligned(theirs, width)
        mine.keys, mine.values = torch.cat([k0, k1]), torch.cat([v0, v1])
        _set_width(mine, width)


def select_rows(cache, index: torch.Tensor, width: Optional[int] = None) -> None:
    """Keep the rows ``index`` of ``cache``, in place. ``width``: right-align them to it (a
    :func:`stackable` cache; fewer than its width trims the padding all kept rows share);
    None: keep them as they are (any cache)."""
    if width is None:
        cache.batch_select_indices(index)
        return
    for layer in _layers(cache):
        if layer.keys is not None:
            layer.keys, layer.values = _aligned(layer, width, index)
            _set_width(layer, width)


# ---------------------------------------------------------------------------- cropping
def keep_past(cache) -> None:
    """Let sliding-window layers keep every entry until :func:`crop` (transformers 5.x), so that
    cropping the last positions never costs an entry of the window."""
    for layer in _layers(cache):
        if hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()


def can_crop(backbone: nn.Module, length: int) -> bool:
    """Whether a cache over ``length`` positions (after :func:`keep_past`) can drop its last one
    again. A sliding window shorter than that forgets entries unless its layers can record the
    past (transformers 5.x)."""
    window = getattr(bb.text_config(backbone), "sliding_window", None)
    if not isinstance(window, int) or window >= length:
        return True
    types = _layer_types()
    return bool(types) and hasattr(types[1], "activate_past_recording")
