"""Generation with memory that keeps working while decoding.

The prompt is read segment by segment like any input; its last segment stays *open*.
Decoding appends tokens to the open segment using the backbone's KV cache over
``[P_n | sensory | E_n]``. When the segment holds L tokens and another token arrives, the
segment is closed exactly as in reading (the trailing P_n is fed to write m_n, the cache
takes it, the last k tokens become sensory memory) and decoding continues in a new one.

Exactness: the memory token P_n of a segment depends on its first j tokens (the
representation encoding). While the open segment holds fewer than j tokens, P_n changes
with every new token, so the augmented prefix is recomputed at each step; from the j-th
token on P_n is final and decoding is KV-cached. The result equals, token for token,
running a full :meth:`HMT.forward` over prompt + generated tokens and taking the argmax.

``exact_retrieval=False`` trades that equality for speed: each segment opened while
decoding searches the cache once, queried with the latest tokens available (the sensory
tokens and what the segment holds), and the whole segment decodes from the KV cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from . import backbone as bb
from .layout import pack_rows
from .memory import MemoryState

if TYPE_CHECKING:
    from .model import HMT

_PREFILL_SEGMENTS = 8  # segments per call while reading a prompt


@dataclass
class GenerateOutput:
    """``sequences (B, T + new)``: prompts followed by generated tokens (pad after a row stops);
    ``memory_state``: the memory after the last token, its last segment open."""

    sequences: torch.Tensor
    memory_state: MemoryState


class _Stream:
    """One row's decoding state: closed-segment memory plus the open segment."""

    def __init__(self, model: "HMT", state: MemoryState, open_ids: list[int], exact: bool = True):
        self.model, self.state, self.open_ids, self.exact = model, state, list(open_ids), exact
        self.kv = None  # backbone KV cache over [P_n | sensory | E_open] once P_n is final
        self.recalled: Optional[torch.Tensor] = None  # (1, d) final P_n
        self.logits = self._reopen()  # (V,) predicting the next token

    # ---------------------------------------------------------------- internals
    def _p_is_final(self) -> bool:
        config, state = self.model.config, self.state
        empty = state.cache.shape[1] == 0 or not bool(state.cache_mask.any())
        return empty or not config.use_retrieval or not self.exact or len(self.open_ids) >= config.representation_length

    def _reopen(self) -> torch.Tensor:
        """Run ``[P_n | sensory | E_open]`` from scratch; keep its KV cache if P_n is final."""
        model = self.model
        device = model.embedding_layer.weight.device
        ids = torch.tensor([self.open_ids], dtype=torch.long, device=device)
        embeds = model.embedding_layer(ids)
        query = ids
        if not self.exact and len(self.open_ids) < model.config.representation_length:
            # one search per segment: query with the latest tokens there are (sensory + open)
            sensory_ids = self.state.sensory_ids[:, : int(self.state.sensory_lengths[0])]
            query = torch.cat([sensory_ids, ids], dim=1)[:, -model.config.representation_length :]
        recalled, _ = model.read_memory(self.state, model.embedding_layer(query), [query.shape[1]])
        sensory, sensory_lens = model.sensory_embeds(self.state)
        memory_token = recalled.unsqueeze(1).to(embeds.dtype)
        packed = pack_rows([(memory_token, [1]), (sensory[:, : sensory_lens[0]], sensory_lens), (embeds, [ids.shape[1]])])
        final = self._p_is_final()
        hidden, kv = _decoder(model.backbone, packed.embeds, packed.position_ids, None, use_cache=final)
        self.kv, self.recalled = (kv, recalled) if final else (None, None)
        return bb.lm_logits(model.backbone, hidden[0, -1])

    def _step_cached(self, embed: torch.Tensor) -> torch.Tensor:
        """Append one input vector ``(1, 1, d)`` through the KV cache; return its last hidden state."""
        position = torch.tensor([[self.kv.get_seq_length()]], device=embed.device)
        hidden, self.kv = _decoder(self.model.backbone, embed, position, self.kv, use_cache=True)
        return hidden[0, -1]

    def _close(self) -> None:
        """Close the full open segment as reading would: write m_n, carry sensory, new segment."""
        model = self.model
        device = model.embedding_layer.weight.device
        ids = torch.tensor([self.open_ids], dtype=torch.long, device=device)
        if model.config.extraction_strategy == "last" and self.kv is not None:
            hidden = self._step_cached(self.recalled.unsqueeze(1).to(model.embedding_layer.weight.dtype))
            memory = model.memory_generator(hidden.view(1, 1, -1))
            active = torch.ones(1, dtype=torch.bool, device=device)
            lens = torch.tensor([ids.shape[1]], device=device)
            self.state = self.state.push(memory, active, model.config.num_memory_embeddings).with_sensory(ids, lens, active)
        else:  # pooled strategies need every hidden state: recompute the segment once
            _, self.state, *_ = model._memory_segment(self.state, ids, [ids.shape[1]])
        self.open_ids, self.kv, self.recalled = [], None, None

    # ---------------------------------------------------------------- API
    def append(self, token: int) -> None:
        if len(self.open_ids) == self.model.config.segment_length:
            self._close()
        self.open_ids.append(token)
        if self.kv is not None:
            embed = self.model.embedding_layer(torch.tensor([[token]], device=self.model.embedding_layer.weight.device))
            self.logits = bb.lm_logits(self.model.backbone, self._step_cached(embed))
        else:
            self.logits = self._reopen()

    def memory(self) -> MemoryState:
        ids = torch.tensor([self.open_ids], dtype=torch.long, device=self.state.pending_ids.device)
        return self.state.with_pending(ids, torch.tensor([len(self.open_ids)], device=ids.device))


def _decoder(backbone, embeds, positions, kv, use_cache: bool):
    """Decoder stack over ``embeds`` with an optional KV cache (transformers 4.x and 5.x names)."""
    stack = bb.decoder(backbone)
    name = bb.cache_argument(stack)
    out = stack(inputs_embeds=embeds, position_ids=positions, use_cache=use_cache, return_dict=True, **{name: kv})
    return out.last_hidden_state, (out[name] if use_cache else None)


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
def generate(
    model: "HMT",
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    generation_config=None,
    memory_state: Optional[MemoryState] = None,
    streamer=None,
    generator: Optional[torch.Generator] = None,
    exact_retrieval: bool = True,
    **kwargs,
) -> GenerateOutput:
    from transformers import GenerationConfig

    config = GenerationConfig.from_dict({**(generation_config.to_dict() if generation_config is not None else {}), **kwargs})
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
        ids, _, _, _, lengths = model._check_inputs(input_ids, attention_mask, None)
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
    streams = []
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
        streams.append(_Stream(model, row_state, tokens[closed:].tolist(), exact_retrieval))
    if streamer is not None and lengths[0]:
        streamer.put(ids[:, : lengths[0]].cpu())

    new_tokens = torch.full((B, config.max_new_tokens), pad, dtype=torch.long, device=ids.device)
    done = [False] * B
    for step in range(config.max_new_tokens):
        for row, stream in enumerate(streams):
            if done[row]:
                continue
            scores = stream.logits.float().view(1, -1)
            if len(processors):  # only they read the history
                history = torch.cat([ids[row : row + 1, : lengths[row]], new_tokens[row : row + 1, :step]], dim=1)
                scores = processors(history, scores)
            if config.do_sample:
                token = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))
            else:
                token = int(scores.argmax(-1))
            new_tokens[row, step] = token
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token in eos:
                done[row] = True
            stream.append(token)  # the memory takes every token, the last one too
        if all(done):
            new_tokens = new_tokens[:, : step + 1]
            break
    if streamer is not None:
        streamer.end()
    model.train(was_training)
    final = MemoryState.cat([s.memory() for s in streams])
    if not explicit:
        model.memory_state = final
    return GenerateOutput(sequences=torch.cat([input_ids.to(new_tokens.device), new_tokens], dim=1), memory_state=final)
