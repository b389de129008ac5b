"""Generation with memory that keeps working while decoding.

The prompt is read segment by segment like any input; its last segment stays *open*.
Decoding appends tokens to the open segment using the backbone's KV cache over
``[P_n | sensory | E_n]``. When the segment holds L tokens and another token arrives, the
segment is closed exactly as in reading (the trailing P_n is fed to write m_n, the cache
takes it, the last k tokens become sensory memory) and decoding continues in a new one.

Exactness: the memory token P_n of a segment depends on its first j tokens (the
representation encoding S_n = backbone([T | E_n[0:j) | T]) at the trailing T). While the
open segment holds t < j tokens, P_n changes with every new token, so the augmented prefix
``[P_n | sensory | E_n[0:t)]`` is recomputed at each step (every position after P_n
attends to it: nothing of the previous step's prefix can be reused); from the j-th token
on P_n is final and decoding is KV-cached. The encoding pass itself is causal and starts
at position 0, so it is *incremental*: a KV cache over ``[T | E_0 .. E_{t-1}]`` takes each
new token and the trailing T as one 2-position step, S_n is read at T, and T is cropped
off the cache again. The result equals, token for token, running a full
:meth:`HMT.forward` over prompt + generated tokens and taking the argmax.

``exact_retrieval=False`` trades that equality for speed: each segment opened while
decoding searches the cache once, queried with the latest tokens available (the sensory
tokens and what the segment holds), and the whole segment decodes from the KV cache.

Batched decoding (:class:`_DecodeBatch`). Every row is its own stream (:class:`_Row`:
closed-segment memory plus the open segment's ids), but the backbone runs once per kind of
work per step, for all rows that need it:

* A :class:`_Lane` is one batched KV cache shared by several rows, padded as
  :mod:`hmt.kv_cache` describes (each row right-aligned, its padding masked, its position ids
  from 0), so every row computes what it would alone. Rows join with the cache of their own
  prefix run (the lane and the newcomers are padded to the wider of the two) and leave by an
  index select, after which the padding that every remaining row shares is trimmed. The
  lane keeps the rows' lengths; :mod:`hmt.kv_cache` does everything to the cache itself.
* The *decode lane* holds ``[P_n | sensory | E_open]`` of every row whose P_n is final. One
  call per step feeds each of them its new token -- or, for a row whose segment is full,
  its P_n: that is the trailing memory token that closes the segment ("last" extraction).
  One LM-head call follows.
* The *encoding lane* (exact mode) holds ``[T | E_0 .. E_{t-1}]`` of the rows whose P_n is
  not final: one 2-position call per step for all of them.
  Rows new to it first run ``[T | E_0 .. E_{t-2}]`` (one call per length t).
* Rows whose P_n is not final recompute their prefix without a cache, all in one packed
  call. When P_n becomes final (t = j; at once in fast mode, without retrieval or with an
  empty cache, where one batched search serves the whole segment) the rows run their
  prefixes once more with a cache -- one call per prefix length, so nothing is padded --
  and join the decode lane.
* Closing with a pooled extraction strategy recomputes the segment per row (once per L
  tokens). A row that stops (eos) leaves its lanes and costs nothing further.

A cache that is not :func:`hmt.kv_cache.stackable` (layers other than plain dynamic or dynamic
sliding-window ones) cannot be padded this way; rows then share a lane only with the rows
that started it together (of one length), and a lane of one row costs one call per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import backbone as bb
from . import kv_cache as kv
from .layout import run_packed
from .memory import MemoryState

_PREFILL_SEGMENTS = 8  # segments per call while reading a prompt
_watchers: list[Callable[[str, str], None]] = []  # see watch_decoding


@contextlib.contextmanager
def watch_decoding(callback: Callable[[str, str], None]):
    """A timing hook: inside the block, every decoder that :meth:`hmt.HMT.generate` builds calls
    ``callback(part, event)``, ``event`` being ``"start"`` or ``"end"``, around each part of its work:

    * ``"setup"``: the decoder's set-up (the open segments' prefill, before the first token);
    * ``"step"``: one decode step (every active row takes a token and gets the next logits),
      and within a step ``"cached_step"`` (the batched KV-cached step), ``"close"`` (writing m_n),
      ``"encode"`` (the incremental encoding step), ``"recompute"`` (prefixes run again without a
      cache), ``"reopen"`` (prefixes run once more with a cache, joining the decode lane) and
      ``"search_once"`` (fast mode: encoding and search once per segment).

    Parts nest as calls do ("end" comes on an exception too). Outside a block the decoder does
    nothing more. The benchmarks time decoding with it."""
    _watchers.append(callback)
    try:
        yield
    finally:
        _watchers.remove(callback)


def _watched(part: str):
    """Report ``part`` to the :func:`watch_decoding` callbacks around the decorated method."""
    def decorate(method):
        @functools.wraps(method)
        def watched(self, *args, **kwargs):
            if not _watchers:
                return method(self, *args, **kwargs)
            for callback in list(_watchers):
                callback(part, "start")
            try:
                return method(self, *args, **kwargs)
            finally:
                for callback in list(_watchers):
                    callback(part, "end")

        return watched

    return decorate


@dataclass
class GenerateOutput:
    """``sequences (B, T + new)``: prompts followed by generated tokens (pad after a row stops);
    ``memory_state``: the memory after the last token, its last segment left open."""

    sequences: torch.Tensor
    memory_state: MemoryState


# ============================================================================ KV lanes
class _Lane:
    """Rows that decode from one batched KV cache (see the module docstring and :mod:`hmt.kv_cache`).

    ``keep_past``: sliding-window layers keep every entry until :meth:`crop` (the encoding
    lane crops its trailing T after each step, which must not cost a window entry).
    """

    def __init__(self, backbone, cache, rows: list[int], length: int, keep_past: bool = False):
        self.backbone, self.keep_past = backbone, keep_past
        self.device = bb.unwrap(backbone).get_input_embeddings().weight.device
        self.cache, self.width = cache, length
        self.rows, self.lengths = list(rows), [length] * len(rows)  # stream ids in batch order, real positions
        self.shared = kv.stackable(cache)  # else the lane keeps the rows it started with, all of one length
        self._keep_past()

    def _keep_past(self) -> None:
        if self.keep_past:
            kv.keep_past(self.cache)

    def join(self, rows: list[int], cache, length: int) -> bool:
        """Take ``rows`` with their ``cache`` of ``length`` positions each; False if they cannot share."""
        if not (self.shared and kv.stackable(cache)):
            return False
        self.width = max(self.width, length)
        kv.stack(self.cache, cache, self.width)
        self.rows += rows
        self.lengths += [length] * len(rows)
        self._keep_past()
        return True

    def drop(self, rows) -> None:
        """Let ``rows`` go; trim the left padding every remaining row shares."""
        keep = [i for i, r in enumerate(self.rows) if r not in rows]
        if len(keep) == len(self.rows):
            return
        self.rows, self.lengths = [self.rows[i] for i in keep], [self.lengths[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, device=self.device)
        if self.shared:  # trim the padding every remaining row shares
            self.width = max(self.lengths)
            kv.select_rows(self.cache, index, self.width)
        else:  # one length: nothing to trim
            kv.select_rows(self.cache, index)

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """Feed ``embeds (n, q, d)`` (one row each, in lane order); return their hidden states."""
        q = embeds.shape[1]
        hidden, self.cache = kv.step(self.backbone, self.cache, embeds, self.lengths, self.width)
        self.width += q
        self.lengths = [n + q for n in self.lengths]
        return hidden

    def crop(self, q: int) -> None:
        """Remove the last ``q`` positions of every row."""
        kv.crop(self.cache, q)
        self.width -= q
        self.lengths = [n - q for n in self.lengths]


class _Lanes:
    """A set of lanes: one when the caches can be padded and stacked, else one per batch of rows
    that started together."""

    def __init__(self, backbone, keep_past: bool = False):
        self.backbone, self.keep_past = backbone, keep_past
        self.lanes: list[_Lane] = []

    def __contains__(self, row: int) -> bool:
        return any(row in lane.rows for lane in self.lanes)

    @property
    def rows(self) -> list[int]:
        return [r for lane in self.lanes for r in lane.rows]

    def add(self, rows: list[int], cache, length: int) -> None:
        """``rows`` with their batched ``cache``, ``length`` positions each."""
        if not any(lane.join(rows, cache, length) for lane in self.lanes):
            self.lanes.append(_Lane(self.backbone, cache, rows, length, self.keep_past))

    def drop(self, rows) -> None:
        rows = set(rows)
        for lane in self.lanes:
            lane.drop(rows)
        self.lanes = [lane for lane in self.lanes if lane.rows]

    def step(self, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``inputs[row] (q, d)`` for every row of every lane -> hidden states ``(q, d)`` per row."""
        out = {}
        for lane in self.lanes:
            hidden = lane.step(torch.stack([inputs[r] for r in lane.rows]))
            out.update(zip(lane.rows, hidden))
        return out

    def crop(self, q: int) -> None:
        for lane in self.lanes:
            lane.crop(q)


# ============================================================================ streams
def _groups(rows: list[int], key) -> list[list[int]]:
    """``rows`` grouped by ``key(row)``, in order of first appearance."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return list(groups.values())


@dataclass
class _Row:
    """One stream: the memory of its closed segments and the open segment."""

    state: MemoryState
    open_ids: list[int]
    memory_token: Optional[torch.Tensor] = None  # (r, d) P_n of the open segment as it stands
    final: bool = False  # P_n will not change: the prefix lives in the decode lane
    logits: Optional[torch.Tensor] = None  # (V,) predicting the next token


class _DecodeBatch:
    """The streams of one ``generate`` call decoding together: every row's state and the lanes
    they share; :meth:`advance` takes one token per active row."""

    @_watched("setup")
    def __init__(self, model, states: list[MemoryState], open_ids: list[list[int]], exact: bool = True):
        self.model, self.exact = model, exact
        self.rows = [_Row(state, list(ids)) for state, ids in zip(states, open_ids)]
        if any(not row.open_ids for row in self.rows):
            raise ValueError("every stream needs an open segment to decode from")
        self.decode_lanes = _Lanes(model.backbone)  # [P_n | sensory | E_open], P_n final
        self.encoding_lanes = _Lanes(model.backbone, keep_past=True)  # [T | E_0 .. E_{t-2}], P_n not final
        self.incremental = kv.can_crop(model.backbone, model.config.representation_length + 2)
        self._refresh(list(range(len(self.rows))))

    # ---------------------------------------------------------------- helpers
    def _padded(self, id_lists: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """Token-id lists as one right-padded ``(n, longest)`` tensor, and their lengths."""
        lengths = [len(ids) for ids in id_lists]
        ids = torch.zeros(len(id_lists), max(lengths), dtype=torch.long, device=self.model.embedding_layer.weight.device)
        for i, row in enumerate(id_lists):
            ids[i, : lengths[i]] = torch.tensor(row, dtype=torch.long)
        return ids, lengths

    def _embed(self, ids: list[int]) -> torch.Tensor:
        """``(len(ids), d)`` input embeddings."""
        layer = self.model.embedding_layer
        return layer(torch.tensor(ids, dtype=torch.long, device=layer.weight.device))

    def _searches_each_step(self, r: int) -> bool:
        """Exact mode with a cache to search: P_n follows the open segment's first j tokens."""
        state = self.rows[r].state
        has_memory = state.cache.shape[1] > 0 and bool(state.cache_mask.any())
        return self.exact and self.model.config.use_retrieval and has_memory

    # ---------------------------------------------------------------- the steps
    @_watched("step")
    def advance(self, tokens: dict[int, int], stopping: set[int] = frozenset()) -> None:
        """Each row of ``tokens`` takes its token and gets the next logits (``stopping`` rows:
        the memory takes the token, no logits are computed and the row leaves its lanes)."""
        model = self.model
        L = model.config.segment_length
        closing = {r for r in tokens if len(self.rows[r].open_ids) == L}
        by_lane = {r for r in closing if r in self.decode_lanes and model.config.extraction_strategy == "last"
                   and model.config.memory_tokens == 1 and model.config.memory_write == "state"}
        # rows that need no cached step now leave the decode lane first
        leaving = [r for r in self.decode_lanes.rows if (r in stopping or r in closing) and r not in by_lane]
        self.decode_lanes.drop(leaving)
        self.encoding_lanes.drop([r for r in self.encoding_lanes.rows if r in stopping])
        hidden = self._cached_step(tokens, by_lane) if self.decode_lanes.rows else {}
        if closing:
            self.decode_lanes.drop(closing)
            self.encoding_lanes.drop(closing)
            for r in sorted(closing):
                self._close(r, hidden.get(r) if r in by_lane else None)
        for r, token in tokens.items():
            self.rows[r].open_ids.append(token)
        cached = [r for r in hidden if r not in closing]
        if cached:  # one LM-head call for every row decoded from the cache
            logits = bb.lm_logits(model.backbone, torch.stack([hidden[r] for r in cached]))
            for r, row_logits in zip(cached, logits):
                self.rows[r].logits = row_logits
        self._refresh([r for r in tokens if r not in stopping and r not in self.decode_lanes])

    @_watched("cached_step")
    def _cached_step(self, tokens: dict[int, int], closing: set[int]) -> dict[int, torch.Tensor]:
        """One batched KV-cached step over the decode lane: each row's token, or its P_n
        (the trailing memory token) where the row closes its segment; last hidden states."""
        lane_rows = self.decode_lanes.rows
        embeds = self._embed([tokens[r] for r in lane_rows])
        inputs = {r: (self.rows[r].memory_token if r in closing else embeds[i : i + 1]) for i, r in enumerate(lane_rows)}
        return {r: h[-1] for r, h in self.decode_lanes.step(inputs).items()}

    @_watched("close")
    def _close(self, r: int, hidden: Optional[torch.Tensor]) -> None:
        """Close row ``r``'s full open segment as reading would: write m_n, carry sensory, new
        segment (the row has left its lanes)."""
        model, row = self.model, self.rows[r]
        ids = torch.tensor([row.open_ids], dtype=torch.long, device=row.state.sensory_ids.device)
        if hidden is not None:  # "last": m_n is the hidden state at the trailing P_n just fed
            memory = model.memory_generator(hidden.view(1, 1, -1))
            active = torch.ones(1, dtype=torch.bool, device=ids.device)
            lens = torch.tensor([ids.shape[1]], device=ids.device)
            row.state = row.state.push(memory, active, model.config.num_memory_embeddings).with_sensory(ids, lens, active)
        else:  # pooled strategies (or r memory tokens) need more hidden states: recompute the segment once
            row.state = model.memory_step(row.state, ids).state
        row.open_ids, row.memory_token, row.final = [], None, False

    def _refresh(self, rows: list[int]) -> None:
        """Rows without a KV cache over their prefix: memory token P_n, then the prefix."""
        if not rows:
            return
        model, j = self.model, self.model.config.representation_length
        searching = [r for r in rows if self._searches_each_step(r)]
        if searching:
            summaries = self._encode(searching)
            state = MemoryState.cat([self.rows[r].state for r in searching])
            recalled, _ = model.memory_search(summaries, state.cache, state.cache_mask)
            for r, token in zip(searching, recalled.to(model.embedding_layer.weight.dtype)):
                self.rows[r].memory_token = token.view(model.config.memory_tokens, -1)
                self.rows[r].final = len(self.rows[r].open_ids) >= j
            self.encoding_lanes.drop([r for r in searching if self.rows[r].final])
        once = [r for r in rows if r not in searching]
        if once:
            self._search_once(once)
        final = [r for r in rows if self.rows[r].final]
        if final:
            self._reopen(final)
        if len(final) < len(rows):
            self._recompute([r for r in rows if not self.rows[r].final])

    @_watched("encode")
    def _encode(self, rows: list[int]) -> torch.Tensor:
        """S_n ``(n, d)`` of each row (exact mode), incrementally: the encoding lane holds
        [T | E_0 .. E_{t-2}] of each row; one call feeds [E_{t-1}, T] to all of them, then T is
        cropped off again. Rows new to the lane first run [T | E_0 .. E_{t-2}] (one call per t)."""
        model, j = self.model, self.model.config.representation_length
        if not self.incremental:  # the whole encoding pass, batched
            ids, lengths = self._padded([self.rows[r].open_ids[:j] for r in rows])
            return model.representation_encoder(model.backbone, model.embedding_layer(ids), lengths)
        prompt = model.representation_encoder.summary_prompt.view(1, 1, -1).to(model.embedding_layer.weight.dtype)
        t = {r: min(len(self.rows[r].open_ids), j) for r in rows}
        for group in _groups([r for r in rows if r not in self.encoding_lanes], t.get):
            n = t[group[0]]
            ids = torch.tensor([self.rows[r].open_ids[: n - 1] for r in group], dtype=torch.long,
                               device=prompt.device).view(len(group), n - 1)
            embeds = torch.cat([prompt.expand(len(group), 1, -1), model.embedding_layer(ids)], dim=1)
            positions = torch.arange(n, device=embeds.device).view(1, -1).expand(len(group), -1)
            _, cache = kv.prefill(model.backbone, embeds, positions)
            self.encoding_lanes.add(group, cache, n)
        newest = self._embed([self.rows[r].open_ids[t[r] - 1] for r in rows]).unsqueeze(1)  # (n, 1, d)
        inputs = torch.cat([newest, prompt.expand(len(rows), 1, -1)], dim=1)
        hidden = self.encoding_lanes.step(dict(zip(rows, inputs)))
        self.encoding_lanes.crop(1)
        return torch.stack([hidden[r][-1] for r in rows])

    @_watched("search_once")
    def _search_once(self, rows: list[int]) -> None:
        """P_n searched once for the whole segment (fast mode, no retrieval or nothing cached)."""
        model, j = self.model, self.model.config.representation_length
        queries = []
        for r in rows:
            row = self.rows[r]
            query = row.open_ids
            if not self.exact and len(query) < j:
                # one search per segment: query with the latest tokens there are (sensory + open)
                query = (row.state.sensory_ids[0, : int(row.state.sensory_lengths[0])].tolist() + query)[-j:]
            queries.append(query)
        ids, lengths = self._padded(queries)
        state = MemoryState.cat([self.rows[r].state for r in rows])
        recalled, _ = model.read_memory(state, model.embedding_layer(ids), lengths)
        for r, token in zip(rows, recalled.to(model.embedding_layer.weight.dtype)):
            self.rows[r].memory_token, self.rows[r].final = token.view(model.config.memory_tokens, -1), True

    def _prefix(self, rows: list[int]):
        """``[P_n | sensory | E_open]`` of ``rows``, packed."""
        model = self.model
        states = [self.rows[r].state for r in rows]
        sensory_ids = torch.cat([s.sensory_ids for s in states])
        sensory_lens = torch.cat([s.sensory_lengths for s in states]).tolist()
        ids, lengths = self._padded([self.rows[r].open_ids for r in rows])
        memory_token = torch.stack([self.rows[r].memory_token for r in rows])  # (n, r, d)
        return model.augmented_inputs(memory_token, sensory_ids, sensory_lens, model.embedding_layer(ids), lengths,
                                      write_slot=False)

    @_watched("reopen")
    def _reopen(self, rows: list[int]) -> None:
        """P_n is final: run the rows' prefixes once with a KV cache (one call per prefix length,
        so no row is padded) and let them join the decode lane."""
        first = self.model.token_piece - 2 + self.model.config.memory_tokens  # [sink] P_n: positions before sensory
        width = {r: first + int(self.rows[r].state.sensory_lengths[0]) + len(self.rows[r].open_ids) for r in rows}
        for group in _groups(rows, width.get):
            packed = self._prefix(group)
            hidden, cache = kv.prefill(self.model.backbone, packed.embeds, packed.position_ids)
            logits = bb.lm_logits(self.model.backbone, hidden[:, -1])
            for r, row_logits in zip(group, logits):
                self.rows[r].logits = row_logits
            self.decode_lanes.add(group, cache, width[group[0]])

    @_watched("recompute")
    def _recompute(self, rows: list[int]) -> None:
        """P_n still changes: the rows' prefixes from scratch, no cache, one packed call."""
        packed = self._prefix(rows)
        hidden = run_packed(self.model.backbone, packed)
        last = torch.tensor(packed.lengths, device=hidden.device) - 1
        logits = bb.lm_logits(self.model.backbone, hidden[torch.arange(len(rows), device=hidden.device), last])
        for r, row_logits in zip(rows, logits):
            self.rows[r].logits = row_logits

    def memory(self) -> MemoryState:
        states = []
        for row in self.rows:
            ids = torch.tensor([row.open_ids], dtype=torch.long, device=row.state.pending_ids.device)
            states.append(row.state.with_pending(ids, torch.tensor([len(row.open_ids)], device=ids.device)))
        return MemoryState.cat(states)


def _logits_processors(config):
    from transformers.generation import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if config.repetition_penalty not in (None, 1.0):
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.do_sample:
        if config.temperature not in (None, 1.0):
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k not in (None, 0):
            processors.append(TopKLogitsWarper(config.top_k))
        if config.top_p not in (None, 1.0):
            processors.append(TopPLogitsWarper(config.top_p))
    return processors


@torch.no_grad()
def generate(model, input_ids, attention_mask, generation_config, memory_state, streamer, generator,
             exact_retrieval: bool, overrides: dict) -> GenerateOutput:
    """:meth:`hmt.HMT.generate` (see it for the arguments; ``overrides``: its keyword arguments)."""
    from transformers import GenerationConfig

    config = GenerationConfig.from_dict({**(generation_config.to_dict() if generation_config is not None else {}),
                                         **overrides})
    if config.max_new_tokens is None:
        raise ValueError("generate() needs max_new_tokens (or a GenerationConfig with max_new_tokens).")
    if config.num_beams not in (None, 1):
        raise ValueError("HMT.generate supports greedy decoding and sampling, not beam search (num_beams=1).")
    if input_ids is None:  # continue a stream from its memory alone
        if memory_state is None and model.memory_state is None:
            raise ValueError("generate(None) continues a stream: give memory_state= or use the stateful memory.")
        source = memory_state if memory_state is not None else model.memory_state
        if not bool((source.pending_lengths > 0).all()):
            raise ValueError("generate(None) needs an open segment in every stream; pass prompt input_ids instead.")
        B = source.batch_size
        ids = input_ids = torch.zeros(B, 0, dtype=torch.long, device=source.pending_ids.device)
        lengths = [0] * B
    else:
        ids, _, _, _, lengths = model.check_inputs(input_ids, attention_mask)
        B = ids.shape[0]
    if streamer is not None and B != 1:
        raise ValueError("A streamer works with a batch of one sequence, as in transformers.")
    explicit = memory_state is not None
    state = memory_state if explicit else model.memory_state
    if state is None:
        state = model.new_memory(B)
    elif state.batch_size != B:
        raise ValueError(f"The memory holds {state.batch_size} streams but the prompt batch has {B}; call clear_memory().")
    eos = config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    pad = config.pad_token_id if config.pad_token_id is not None else (min(eos) if eos else 0)
    processors = _logits_processors(config)
    L = model.config.segment_length

    was_training = model.training
    model.eval()
    states, open_ids = [], []
    for row in range(B):
        row_state = state.select([row])
        prompt = ids[row, : lengths[row]]
        pending = row_state.pending_ids[0, : int(row_state.pending_lengths[0])]
        tokens = torch.cat([pending, prompt])  # an open segment continues with the prompt
        row_state = dataclasses.replace(row_state, pending_lengths=torch.zeros_like(row_state.pending_lengths))
        closed = (len(tokens) - 1) // L * L  # every segment but the last closes now
        # Read the closed segments a few at a time: one call would keep per-segment outputs
        # (retrieval weights, memories) of the whole prompt that generation never uses.
        for start in range(0, closed, _PREFILL_SEGMENTS * L):
            chunk = tokens[None, start : min(start + _PREFILL_SEGMENTS * L, closed)]
            row_state = model(chunk, memory_state=row_state, return_logits=False).memory_state
        states.append(row_state)
        open_ids.append(tokens[closed:].tolist())
    batch = _DecodeBatch(model, states, open_ids, exact_retrieval)
    if streamer is not None and lengths[0]:
        streamer.put(ids[:, : lengths[0]].cpu())

    new_tokens = torch.full((B, config.max_new_tokens), pad, dtype=torch.long, device=ids.device)
    done = [False] * B
    for step in range(config.max_new_tokens):
        tokens, stopping = {}, set()
        for row in range(B):
            if done[row]:
                continue
            scores = batch.rows[row].logits.float().view(1, -1)
            if len(processors):  # only they read the history
                history = torch.cat([ids[row : row + 1, : lengths[row]], new_tokens[row : row + 1, :step]], dim=1)
                scores = processors(history, scores)
            if config.do_sample:
                token = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))
            else:
                token = int(scores.argmax(-1))
            new_tokens[row, step] = tokens[row] = token
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token in eos:
                done[row] = True
                stopping.add(row)
        batch.advance(tokens, stopping)  # the memory takes every token, the last one too
        if all(done):
            new_tokens = new_tokens[:, : step + 1]
            break
    if streamer is not None:
        streamer.end()
    model.train(was_training)
    final = batch.memory()
    if not explicit:
        model.memory_state = final
    return GenerateOutput(sequences=torch.cat([input_ids.to(new_tokens.device), new_tokens], dim=1), memory_state=final)
