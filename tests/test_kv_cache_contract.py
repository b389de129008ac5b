"""Contract tests for :mod:`hmt.kv_cache`: what it relies on in transformers' KV caches.

``hmt.kv_cache`` edits transformers' cache objects (layer classes, ``keys`` / ``values``,
sliding-window bookkeeping) to keep rows of different lengths in one batched cache. These
tests pin each thing it relies on, on tiny models of every architecture the suite uses, so
that a transformers upgrade that changes one fails here first, with a message naming it.
The fix then belongs in ``src/hmt/kv_cache.py`` alone.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers

from hmt import backbone as bb
from hmt import kv_cache as kv

from .conftest import ARCHITECTURES, VOCAB, _configs, make_backbone

CASES = ARCHITECTURES + ["gemma3-window3"]  # the last: a sliding window shorter than the rows
TF = f"transformers {transformers.__version__}"


def make(arch: str) -> torch.nn.Module:
    if arch != "gemma3-window3":
        return make_backbone(arch)
    from transformers import AutoModelForCausalLM

    config = _configs()["gemma3"]
    config.sliding_window, config.layer_types = 3, ["sliding_attention", "full_attention"]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def embed(backbone, token_ids: torch.Tensor) -> torch.Tensor:
    return bb.unwrap(backbone).get_input_embeddings()(token_ids)


def prefill(backbone, rows: list[torch.Tensor]):
    """One cache over ``rows`` (all of one length)."""
    batch = torch.stack(rows)
    positions = torch.arange(batch.shape[1]).expand(batch.shape[0], -1)
    return kv.prefill(backbone, embed(backbone, batch), positions)


def alone(backbone, row: torch.Tensor, q: int) -> torch.Tensor:
    """Final hidden states of the last ``q`` positions of ``row`` run without a cache."""
    positions = torch.arange(len(row))[None]
    hidden = bb.final_hidden(backbone, embed(backbone, row[None]), torch.ones_like(positions), positions)
    return hidden[0, -q:]


@pytest.fixture(params=CASES)
def case(request):
    return request.param


@torch.no_grad()
def test_the_stack_takes_and_returns_a_cache_by_the_name_kv_cache_uses(case):
    backbone = make(case)
    stack = bb.decoder_stack(backbone)
    name = kv.cache_argument(stack)
    assert name in inspect.signature(stack.forward).parameters, (
        f"{TF}: {type(stack).__name__}.forward takes neither `cache` nor `past_key_values`; "
        "kv_cache.cache_argument must learn the new name")
    row = ids(6, 0)
    hidden, cache = prefill(backbone, [row])
    assert cache is not None, f"{TF}: {type(stack).__name__} returned no cache as out[{name!r}] with use_cache=True"
    torch.testing.assert_close(hidden[0], alone(backbone, row, 6), atol=1e-5, rtol=1e-4,
                               msg=lambda m: f"{TF}: prefill is not the stack run without a cache: {m}")


@torch.no_grad()
def test_cache_layers_are_the_exact_kinds_kv_cache_pads(case):
    """``stackable`` checks exact layer types; a new default layer class would silently turn
    batched decoding into one lane per group of rows (correct, slower): fail here instead."""
    types = kv._layer_types()
    assert types, f"{TF}: transformers.cache_utils no longer has DynamicLayer and DynamicSlidingWindowLayer"
    _, cache = prefill(make(case), [ids(5, 1)])
    layers = kv._layers(cache)
    assert layers, f"{TF}: {type(cache).__name__} has no per-layer list `.layers` (nor .self_attention_cache.layers)"
    found = sorted({type(layer).__name__ for layer in layers})
    assert kv.stackable(cache), (
        f"{TF}: {type(cache).__name__} layers are {found}, not exactly {[t.__name__ for t in types]}; "
        "kv_cache.stackable refuses them")
    assert not kv.stackable(object()) and not kv.stackable(None)


@torch.no_grad()
def test_layer_attributes_kv_cache_reads_and_writes(case):
    """Per layer: ``keys`` / ``values`` ``(B, heads, held, head_dim)``, a full layer holding every
    position, a sliding one its last ``sliding_window - 1`` (``is_sliding``, ``sliding_window``)
    and counting the positions seen in ``cumulative_length``."""
    backbone = make(case)
    T = 7
    _, cache = prefill(backbone, [ids(T, 2), ids(T, 3)])
    sliding = 0
    for i, layer in enumerate(kv._layers(cache)):
        where = f"{TF}: layer {i} ({type(layer).__name__})"
        for attr in ("keys", "values"):
            t = getattr(layer, attr, None)
            assert isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[0] == 2, (
                f"{where}: `{attr}` is no longer a (batch, heads, positions, head_dim) tensor: "
                f"{type(t).__name__} {tuple(t.shape) if isinstance(t, torch.Tensor) else ''}")
        if getattr(layer, "is_sliding", False):
            sliding += 1
            assert isinstance(getattr(layer, "sliding_window", None), int), f"{where}: no int `sliding_window`"
            assert getattr(layer, "cumulative_length", None) == T, (
                f"{where}: `cumulative_length` is {getattr(layer, 'cumulative_length', None)!r}, not the "
                f"{T} positions seen; kv_cache sets it to a padded cache's width")
        assert layer.keys.shape[-2] == kv._held(layer, T), (
            f"{where}: holds {layer.keys.shape[-2]} positions after {T}, kv_cache expects {kv._held(layer, T)} "
            "(a sliding window keeping W - 1)")
    if case == "gemma3-window3":
        assert sliding == 1, f"{TF}: Gemma-3's sliding-window layer no longer reports `is_sliding` ({sliding} do)"


@torch.no_grad()
def test_stacked_rows_of_different_lengths_step_as_they_would_alone(case):
    """The padded-cache convention: rows right-aligned, left padding hidden by the 2-D mask,
    positions from 0 per row. Stacked, stepped twice, one row dropped (trimming the padding
    the other no longer needs), stepped again: every row equals the same tokens run alone."""
    backbone = make(case)
    short, long = ids(5, 4), ids(9, 5)
    _, cache = prefill(backbone, [short])
    _, other = prefill(backbone, [long])
    kv.stack(cache, other, 9)
    lengths, width = [5, 9], 9
    rows = [short, long]
    for q, seed in ((2, 6), (1, 7)):
        new = torch.stack([ids(q, seed), ids(q, seed + 10)])
        hidden, cache = kv.step(backbone, cache, embed(backbone, new), lengths, width)
        rows = [torch.cat([r, n]) for r, n in zip(rows, new)]
        for i, r in enumerate(rows):
            torch.testing.assert_close(hidden[i], alone(backbone, r, q), atol=1e-5, rtol=1e-4, msg=lambda m: (
                f"{TF}: row {i} of a stacked, left-padded cache (lengths {lengths}, width {width}) differs from "
                f"the row alone after a {q}-position step: the 2-D mask, position ids or sliding-window "
                f"bookkeeping changed meaning. {m}"))
        lengths, width = [n + q for n in lengths], width + q
    kv.select_rows(cache, torch.tensor([0]), lengths[0])  # the long row leaves; 4 padding columns go
    new = ids(1, 8)[None]
    hidden, cache = kv.step(backbone, cache, embed(backbone, new), lengths[:1], lengths[0])
    torch.testing.assert_close(hidden[0], alone(backbone, torch.cat([rows[0], new[0]]), 1), atol=1e-5, rtol=1e-4,
                               msg=lambda m: f"{TF}: after select_rows trimmed the padding, the row differs: {m}")


@torch.no_grad()
def test_select_rows_without_a_width_keeps_rows_as_they_are(case):
    backbone = make(case)
    a, b = ids(6, 9), ids(6, 10)
    _, cache = prefill(backbone, [a, b])
    kv.select_rows(cache, torch.tensor([1]))
    new = ids(1, 11)[None]
    hidden, _ = kv.step(backbone, cache, embed(backbone, new), [6], 6)
    torch.testing.assert_close(hidden[0], alone(backbone, torch.cat([b, new[0]]), 1), atol=1e-5, rtol=1e-4,
                               msg=lambda m: f"{TF}: Cache.batch_select_indices no longer keeps the rows it names: {m}")


def test_sliding_layers_can_record_the_past_on_transformers_5():
    """``can_crop`` (and so incremental encoding under a short sliding window) needs
    ``DynamicSlidingWindowLayer.activate_past_recording``, present from transformers 5."""
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x has no activate_past_recording; kv_cache.can_crop says so")
    assert hasattr(kv._layer_types()[1], "activate_past_recording"), (
        f"{TF}: DynamicSlidingWindowLayer.activate_past_recording is gone; kv_cache.keep_past and can_crop use it")
    assert kv.can_crop(make("gemma3-window3"), 10)


@torch.no_grad()
def test_crop_drops_the_last_positions(case):
    """The encoding lane's pattern: feed [token, T], read at T, crop T off again; repeat.
    The second read equals a run of every token and T without a cache."""
    backbone = make(case)
    n = 6
    if not kv.can_crop(backbone, n + 2):
        pytest.skip(f"{TF}: a sliding window shorter than {n + 2} positions cannot be cropped (kv_cache.can_crop)")
    row, marker = ids(n, 12), ids(1, 13)  # the marker stands in for HMT's summary prompt T
    _, cache = prefill(backbone, [row])
    kv.keep_past(cache)
    for seed in (14, 15):
        token = ids(1, seed)
        inputs = embed(backbone, torch.cat([token, marker])[None])
        hidden, cache = kv.step(backbone, cache, inputs, [len(row)], len(row))
        kv.crop(cache, 1)
        row = torch.cat([row, token])
        expected = alone(backbone, torch.cat([row, marker]), 1)
        torch.testing.assert_close(hidden[0, -1:], expected, atol=1e-5, rtol=1e-4, msg=lambda m: (
            f"{TF}: after crop(cache, 1) the next step differs from a run without a cache: "
            f"Cache.crop(-1) no longer drops exactly the last position. {m}"))
