"""HMT: a three-level memory (sensory, short-term, long-term) around any causal LM.

One segment n, as in ``docs/algorithm.md`` (L new tokens H_n with embeddings E_n):

1. S_n = backbone([T | E_n[0:j) | T]) at the trailing T       (representation encoding)
2. P_n = softmax(S_n W_q (M W_k)^T / sqrt(d_h)) M              (memory search over the cache M)
3. h   = backbone([P_n | sensory | E_n | P_n]), positions 0..   (augmented segment)
4. logits = lm_head(h[segment positions])                      (aligned with input_ids)
5. m_n = h[trailing P_n]; push onto the cache, FIFO at N       (memory write)
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass
from typing import Collection, Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers.utils import ModelOutput

from . import backbone as bb
from .config import HMTConfig
from .constants import IGNORE_INDEX
from .fingerprint import backbone_record
from .layout import gather_rows, pack_rows, run_packed
from .memory import MemoryEmbeddingGenerator, MemorySearch, MemoryState, RepresentationEncoder

BACKBONE_PREFIX = "backbone."  # state_dict names of the backbone's tensors inside HMT
# Scoring without returning logits runs the LM head on slices of at most this many
# (row, position, vocab) elements: 64 positions of a 49k vocabulary for one row on the CPU.
_SCORE_ELEMENTS = 64 * 49152
_SCORE_ELEMENTS_CUDA = 2**27
_ENCODE_POSITIONS_CUDA = 65536  # positions per batched encoding pass on a GPU without autograd


def memory_mode(use_memory) -> tuple[bool, bool]:
    """``(memory on, sensory prefix only)`` for ``HMT.forward(use_memory=...)``: a truth value
    (memory on / the plain backbone on disjoint segments) or ``"sensory"`` (the plain backbone
    on sensory-prefixed segments). Any other string is an error, not a truthy "on"."""
    if isinstance(use_memory, str):
        if use_memory != "sensory":
            raise ValueError(f"use_memory must be True, False or 'sensory', got {use_memory!r}.")
        return False, True
    return bool(use_memory), False


@dataclass
class HMTOutput(ModelOutput):
    """What :meth:`HMT.forward` returns (indexable like a dict: ``out["logits"]``).

    Attributes:
        loss: mean next-token cross-entropy over the scored tokens (when ``labels`` given).
        logits: ``(B, T, vocab)`` aligned with ``input_ids`` (None with ``return_logits=False``).
        memory_state: the memory after this call.
        retrieval_weights: per segment, ``(B, C)`` weights of the memory search over the
            cache as it stood (empty for the first segment of a stream).
        retrieved_segments: per segment, ``(B, C)`` index of the segment that wrote each
            cache entry (-1 for an empty slot): pairs with ``retrieval_weights``.
        memory_embeddings: ``(B, S, d)`` the memory m_n written by each segment of the call.
        nll_sum: ``(B,)`` summed next-token negative log-likelihood (when ``labels`` given).
        num_tokens: ``(B,)`` tokens scored.
        segment_nll, segment_tokens: ``(B, S)`` the same per segment.
    """

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    memory_state: Optional[MemoryState] = None
    retrieval_weights: Optional[list] = None
    retrieved_segments: Optional[list] = None
    memory_embeddings: Optional[torch.Tensor] = None
    nll_sum: Optional[torch.Tensor] = None
    num_tokens: Optional[torch.Tensor] = None
    segment_nll: Optional[torch.Tensor] = None
    segment_tokens: Optional[torch.Tensor] = None


@dataclass
class MemoryStep:
    """What :meth:`HMT.memory_step` returns for one segment."""

    hidden: torch.Tensor  # (B, l, d) final hidden states of the segment's positions
    state: MemoryState  # the memory after the segment
    memory: torch.Tensor  # (B, d) m_n, the memory it wrote
    weights: torch.Tensor  # (B, C) the search's weights over the cache as it stood
    retrieved_segments: torch.Tensor  # (B, C) the segment that wrote each cache entry (-1: empty)


@dataclass
class _Step:
    """What one segment produces."""

    state: Optional[MemoryState] = None
    memory: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    retrieved_segments: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    nll: Optional[torch.Tensor] = None
    count: Optional[torch.Tensor] = None


class HMT(nn.Module):
    """Hierarchical Memory Transformer around a Hugging Face causal LM.

    Args:
        backbone: any ``*ForCausalLM`` that accepts ``inputs_embeds`` (a PEFT-wrapped one too).
        config: :class:`HMTConfig`; ``hidden_dim`` is taken from the backbone when None.

    Calls are stateful like the walkthrough's: the memory persists across calls until
    :meth:`clear_memory`. Pass ``memory_state=`` to work functionally instead.
    """

    def __init__(self, backbone: nn.Module, config: Optional[HMTConfig] = None):
        super().__init__()
        config = dataclasses.replace(config) if config is not None else HMTConfig()
        width = bb.embedding_dim(backbone)
        if config.hidden_dim is None:
            config.hidden_dim = width
        elif config.hidden_dim != width:
            raise ValueError(
                f"HMTConfig.hidden_dim={config.hidden_dim} contradicts the backbone, whose input "
                f"embeddings (and LM-head input) are {width} wide. Set hidden_dim={width} or leave "
                "it None. (For OPT models this is word_embed_proj_dim, not hidden_size.)"
            )
        limit = bb.max_positions(backbone)
        if limit is not None and config.augmented_length > limit:
            raise ValueError(
                f"An augmented segment has k + L + 2 = {config.augmented_length} positions but the "
                f"backbone supports {limit}. Lower segment_length or sensory_memory_size."
            )
        bb.check_decomposition(backbone)  # refuse a backbone whose logits HMT would get wrong
        self.config = config
        self.backbone = backbone
        self.representation_encoder = RepresentationEncoder(config)
        self.memory_search = MemorySearch(config)
        self.memory_generator = MemoryEmbeddingGenerator(config)
        self._init_memory_parameters()
        self._state: Optional[MemoryState] = None
        self.backbone_at_init = backbone_record(backbone)  # what save_pretrained compares against

    @torch.no_grad()
    def _init_memory_parameters(self) -> None:
        # Start T and the initial memory near the token-embedding distribution, so an
        # untrained HMT feeds the backbone inputs of a familiar scale.
        table = self.embedding_layer.weight
        # On the CPU (the seeded generator's device) whatever device the backbone is on.
        mean, std = table.float().mean(0).cpu(), table.float().std().cpu()
        generator = torch.Generator().manual_seed(0)
        for param in (self.representation_encoder.summary_prompt, self.memory_search.initial_memory):
            noise = torch.randn(param.shape, generator=generator) * 0.1 * std
            param.copy_(mean + noise)
        if self.config.memory_compression == "embedding":
            self.memory_generator.compression.bias.copy_(mean)
        elif self.config.memory_compression == "norm":  # memories at the scale of token embeddings
            self.memory_generator.gain.fill_(table.float().pow(2).mean().sqrt().cpu().item())
        ref = table
        for module in (self.representation_encoder, self.memory_search, self.memory_generator):
            module.to(device=ref.device, dtype=ref.dtype)

    # ------------------------------------------------------------------ walkthrough API
    @property
    def embedding_layer(self) -> nn.Module:
        """The backbone's input-embedding layer (token ids -> ``(…, d)``)."""
        return bb.unwrap(self.backbone).get_input_embeddings()

    @property
    def memory_state(self) -> Optional[MemoryState]:
        """The memory the stateful calls carry (None after :meth:`clear_memory`); its ``save``
        records this model as the writer."""
        if self._state is not None:
            self._state._writer = weakref.ref(self)
        return self._state

    @memory_state.setter
    def memory_state(self, state: Optional[MemoryState]) -> None:
        if state is not None:
            state.check_fits(self)  # another configuration, backbone or adapter; bad ids; NaN
        self._state = state

    @property
    def memory_cache(self) -> "MemoryCacheView":
        """The long-term cache of the stateful memory; ``len()`` is the number of memories held."""
        return MemoryCacheView(self._state)

    def clear_memory(self) -> None:
        """Forget everything: empty cache, no sensory memory."""
        self._state = None

    def detach_memory(self) -> None:
        """Keep the stateful memory but cut its autograd history (between training steps)."""
        if self._state is not None:
            self._state = self._state.detach()

    def get_memory_stats(self) -> dict:
        """Sizes of the stateful memory (for a batch: the largest row; per row in ``cache_sizes``)."""
        state = self._state
        cache_sizes = state.cache_sizes.tolist() if state is not None else []
        sensory = state.sensory_lengths.tolist() if state is not None else []
        return {
            "cache_size": max(cache_sizes, default=0),
            "max_cache_size": self.config.num_memory_embeddings,
            "sensory_memory_active": any(n > 0 for n in sensory),
            "sensory_memory_size": max(sensory, default=0),
            "segments_processed": max(state.segments_seen.tolist(), default=0) if state is not None else 0,
            "batch_size": state.batch_size if state is not None else 0,
            "cache_sizes": cache_sizes,
            "pending_tokens": max(state.pending_lengths.tolist(), default=0) if state is not None else 0,
        }

    def new_memory(self, batch_size: int) -> MemoryState:
        """An empty memory for ``batch_size`` streams, on the backbone's device and dtype."""
        ref = self.embedding_layer.weight
        return MemoryState.empty(batch_size, self.config, device=ref.device, dtype=ref.dtype)

    # ------------------------------------------------------------------ own parameters
    @staticmethod
    def is_own(name: str) -> bool:
        """Whether the parameter or buffer ``name`` (of ``named_parameters``/``state_dict``) is
        HMT's own (T, initial memory, W_q, W_k, compression), not the backbone's."""
        return not name.startswith(BACKBONE_PREFIX)

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        """HMT's own tensors, by ``state_dict`` name (what a memory-only checkpoint holds)."""
        return {k: v for k, v in self.state_dict().items() if self.is_own(k)}

    def with_backbone(self, backbone: Optional[nn.Module] = None, config: Optional[HMTConfig] = None) -> "HMT":
        """A new HMT around ``backbone`` (default: this one's) with ``config`` (default: this
        one's), carrying over those of this model's own parameters that still fit (a module the
        new config adds starts fresh). E.g. the recurrence model of a trained HMT:
        ``model.with_backbone(config=dataclasses.replace(model.config, use_retrieval=False))``."""
        fresh = HMT(self.backbone if backbone is None else backbone, config or self.config)
        target = fresh.state_dict()
        fitting = {k: v for k, v in self.own_state_dict().items() if k in target and target[k].shape == v.shape}
        fresh.load_state_dict(fitting, strict=False)
        return fresh.train(self.training)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory, trained_backbone: Optional[str] = None, dtype: Optional[torch.dtype] = None):
        """Write HMT's parameters (plus LoRA or backbone weights if trained) and config, atomically.

        ``trained_backbone``: ``"none"``, ``"lora"`` or ``"full"``; by default from what was trained
        (a PEFT backbone is ``"lora"``; a backbone whose weights changed since HMT was built around
        it, or that came from a full checkpoint, ``"full"``; ``requires_grad`` alone says nothing). ``dtype``
        stores the weights in another precision (e.g. ``torch.bfloat16``); loading casts back.
        """
        from . import checkpoint

        return checkpoint.save(self, directory, trained_backbone, dtype)

    @classmethod
    def from_pretrained(cls, backbone: nn.Module, directory, **config_overrides) -> "HMT":
        """Rebuild an HMT written by :meth:`save_pretrained` around ``backbone``.

        Checks the backbone is the one it was trained on; applies saved LoRA weights.
        """
        from . import checkpoint

        return checkpoint.load(cls, backbone, directory, **config_overrides)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        input_ids: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        generation_config=None,
        memory_state: Optional[MemoryState] = None,
        streamer=None,
        generator: Optional[torch.Generator] = None,
        exact_retrieval: bool = True,
        **kwargs,
    ):
        """Generate with memory; prompts of any length, outputs of any length.

        Args:
            input_ids: ``(B, T)`` prompts (pad on the left for a batch of different lengths,
                with ``attention_mask``); each row is its own stream. None continues the
                streams of ``memory_state`` (or the stateful memory) where they stopped.
            generation_config: a ``transformers.GenerationConfig``; keyword arguments
                (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
                ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``) override it.
            memory_state: start from this memory; None: the stateful memory (updated).
            streamer: e.g. ``transformers.TextStreamer`` (batch of one).
            generator: a ``torch.Generator`` for reproducible sampling.
            exact_retrieval: True (default): tokens equal the argmax of full forwards; the
                first j tokens of a segment opened while decoding recompute the segment
                (its memory token depends on them). False: one search per segment,
                KV-cached throughout (faster, no longer equal to a full forward).

        Returns:
            :class:`hmt.generation.GenerateOutput` with ``sequences (B, T + new)`` and the
            ``memory_state`` after the last token (its last segment left open).
        """
        from .generation import generate

        return generate(self, input_ids, attention_mask, generation_config, memory_state, streamer, generator,
                        exact_retrieval, **kwargs)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        use_memory: Union[bool, str] = True,
        memory_state: Optional[MemoryState] = None,
        return_logits: bool = True,
        detach_every: Optional[int] = None,
        checkpoint_segments: bool = False,
        grad_segments: Optional[Collection[int]] = None,
    ) -> HMTOutput:
        """Read ``input_ids`` segment by segment.

        Args:
            input_ids: ``(B, T)`` token ids, any T >= 1.
            attention_mask: ``(B, T)`` 1 for real tokens; each row one contiguous block
                (right or left padding). None: all real.
            labels: ``(B, T)`` targets as for a Hugging Face causal LM (shifted inside;
                -100 and padding are ignored). Gives ``loss`` and the NLL fields.
            use_memory: False runs the plain backbone on the same disjoint L-token
                segments (no sensory, no memory tokens) and leaves the memory untouched:
                the paper's baseline. ``"sensory"`` runs the plain backbone on each
                segment prefixed by the last k tokens before it in ``input_ids`` (the
                sensory-prefix baseline, positions from 0, no memory token; the first
                segment of the call has no prefix), also leaving the memory untouched.
            memory_state: start from this memory (functional use); the stateful memory is
                then neither read nor written. None: use and update the stateful memory.
            return_logits: False skips keeping ``(B, T, vocab)`` logits, so a long document
                is scored in memory independent of its length.
            detach_every: truncated BPTT: detach the whole memory (cache and sensory
                hand-off) after every ``detach_every`` segments.
            checkpoint_segments: gradient checkpointing per segment: keep only the memory
                between segments and recompute each segment during backward.
            grad_segments: evidence-sparse BPTT: the indices of this call's segments that run
                with autograd (for a batch, the union over its rows). The others run without it:
                a forward pass only, their memories entering the cache detached, while the
                memories of the selected segments keep their graph through the cache. None: all
                (full BPTT); every index selected is exactly full BPTT.

        Returns:
            :class:`HMTOutput`.
        """
        use_memory, sensory_only = memory_mode(use_memory)
        ids, mask, labels, starts, lengths = self.check_inputs(input_ids, attention_mask, labels)
        if detach_every is not None and (not isinstance(detach_every, int) or detach_every < 1):
            raise ValueError(f"detach_every must be a positive integer or None, got {detach_every!r}.")
        B = ids.shape[0]
        selected = _grad_selection(grad_segments)
        explicit = memory_state is not None
        state = memory_state if explicit else self._state
        if not use_memory:
            pass  # the plain backbone: the memory is neither read nor written
        elif state is None:
            state = self.new_memory(B)
        elif state.batch_size != B:
            raise ValueError(
                f"The memory holds {state.batch_size} streams but input_ids has batch size {B}. "
                "Call clear_memory() to start new streams, or pass memory_state= for this batch."
            )
        else:
            state.validate(self.config)

        new_mask, prefix = mask, None
        if use_memory and bool(state.pending_lengths.any()):
            # An open segment (left by generate) continues: its tokens are read first.
            ids, mask, labels, prefix = self._prepend_pending(state, ids, labels, lengths)
            lengths = [p + n for p, n in zip(prefix, lengths)]
            state = dataclasses.replace(state, pending_lengths=torch.zeros_like(state.pending_lengths))

        L, k = self.config.segment_length, self.config.sensory_memory_size
        targets = None
        if labels is not None:  # position t is scored against token t + 1
            targets = torch.cat([labels[:, 1:], labels.new_full((B, 1), IGNORE_INDEX)], dim=1)
        num_segments = -(-max(lengths) // L)
        checkpointing = checkpoint_segments and torch.is_grad_enabled()
        # Everything the loop needs to know about lengths is known on the host here, once: the
        # loop itself never waits on the device (no .item(), no tensors built from lists).
        lengths_on_device = mask.sum(1)
        sensory_lens = state.sensory_lengths.tolist() if use_memory else None
        encodings = _SegmentEncodings(self, ids, lengths, state, checkpointing, selected) if use_memory else None
        # Scored positions per segment, read on the host once: without logits to return, the LM
        # head runs on those positions only (none at all for a segment without labels).
        scored = _scored_per_segment(targets, L, num_segments) if targets is not None and not return_logits else None
        logits, weights, retrieved, memories, seg_nll, seg_count = [], [], [], [], [], []
        for s in range(num_segments):
            seg_ids = ids[:, s * L : (s + 1) * L]
            seg_lens = [min(max(n - s * L, 0), L) for n in lengths]
            seg_targets = targets[:, s * L : s * L + seg_ids.shape[1]] if targets is not None else None
            # What the segment reads besides its tokens: the memory, the sensory prefix ids, or nothing.
            if use_memory:
                carried = _Carried(state, encodings.summary(s), sensory_lens,
                                   (lengths_on_device - s * L).clamp(0, L))
            elif sensory_only:
                carried = ids[:, max(0, s * L - k) : s * L]
            else:
                carried = None
            tracked = selected is None or s in selected
            args = (carried, seg_ids, seg_lens, seg_targets, use_memory, return_logits,
                    None if scored is None else scored[s], tracked)
            if checkpointing and tracked:
                # Recompute the segment in backward: activations of only one segment live at a time.
                step = torch.utils.checkpoint.checkpoint(self._segment, *args, use_reentrant=False)
            else:
                step = self._segment(*args)
            if use_memory:
                sensory_lens = [min(n, k) if n > 0 else old for n, old in zip(seg_lens, sensory_lens)]
                state = step.state
                memories.append(step.memory)
                weights.append(step.weights)
                retrieved.append(step.retrieved_segments)
                if detach_every is not None and (s + 1) % detach_every == 0:
                    state = state.detach()
            if seg_targets is not None:
                seg_nll.append(step.nll)
                seg_count.append(step.count)
            if return_logits:
                logits.append(step.logits)

        if use_memory:
            state = state.trimmed()
            if not explicit:
                self._state = state
        # Every field goes in at construction: transformers 4.x ModelOutput only indexes
        # (out["logits"]) the fields it was built with.
        fields = {"memory_state": state if use_memory else memory_state}
        if use_memory:
            fields.update(retrieval_weights=weights, retrieved_segments=retrieved,
                          memory_embeddings=torch.stack(memories, dim=1))
        if return_logits:
            logits = torch.cat(logits, dim=1)
            if prefix is not None:  # drop the open segment's positions
                logits = gather_rows(logits, prefix, new_mask.shape[1])
            fields["logits"] = self._restore_positions(logits, new_mask, starts)
        if targets is not None:
            segment_nll, segment_tokens = torch.stack(seg_nll, 1), torch.stack(seg_count, 1)
            nll_sum, num_tokens = segment_nll.sum(1), segment_tokens.sum(1)
            total = num_tokens.sum()
            loss = nll_sum.sum() / total.clamp(min=1) if int(total) > 0 else nll_sum.sum() * float("nan")
            fields.update(loss=loss, segment_nll=segment_nll, segment_tokens=segment_tokens, nll_sum=nll_sum,
                          num_tokens=num_tokens)
        out = HMTOutput(**fields)
        return out

    # ------------------------------------------------------------------ one segment
    def read_memory(
        self, state: MemoryState, token_embeds: torch.Tensor, lengths: list[int], summary: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """P_n ``(B, d)`` and the search weights ``(B, C)`` for a segment whose embeddings are ``token_embeds``.

        ``summary``: S_n ``(B, d)`` when already computed (the forward pass encodes several
        segments in one batched call); None: encode the segment here when the search needs it.
        """
        if summary is None and self.config.use_retrieval and state.cache.shape[1] > 0:
            summary = self.representation_encoder(self.backbone, token_embeds, lengths)
        return self.memory_search(summary, state.cache, state.cache_mask)

    def augmented_inputs(self, memory_token, sensory_ids, sensory_lengths, token_embeds, lengths, write_slot=True):
        """The augmented segment ``[P_n | sensory | E_n | P_n]`` packed row by row (see ``layout``).

        ``memory_token (B, 1, d)``; ``sensory_ids (B, k)`` with ``sensory_lengths`` real ones;
        ``token_embeds (B, l, d)`` with ``lengths`` real ones. The leading P_n is what the segment
        reads; ``write_slot=False`` leaves out the trailing one (where m_n is written), as
        decoding and causal scoring do while the segment is still open.
        """
        ones = [1] * memory_token.shape[0]
        memory_token = memory_token.to(token_embeds.dtype)
        parts = [(memory_token, ones), (self.embedding_layer(sensory_ids), sensory_lengths), (token_embeds, lengths)]
        return pack_rows(parts + [(memory_token, ones)] if write_slot else parts)

    def _segment(self, carried, seg_ids, seg_lens, seg_targets, use_memory: bool, want_logits: bool,
                 num_scored: Optional[int] = None, tracked: bool = True) -> "_Step":
        """One segment: memory read, backbone pass, LM head on segment positions, loss, memory write.

        ``carried`` is the memory state with ``use_memory``; else the ``(B, <=k)`` sensory prefix ids
        for the sensory-prefix baseline (every row with tokens in this segment has a full previous
        one), or None for disjoint segments. ``num_scored``: how many of the segment's positions
        carry a target (known on the host: without logits, the head runs on those only).
        ``tracked=False`` runs the segment without autograd (evidence-sparse BPTT); its memory
        still enters the cache through an op with autograd, so earlier memories keep their graph.
        """
        step = _Step()
        if use_memory:
            read = self.memory_step(carried.state, seg_ids, seg_lens, summary=carried.summary,
                                    sensory_lengths=carried.sensory_lengths, lengths=carried.lengths, trim=False,
                                    tracked=tracked)
            hidden, step.state, step.memory, step.weights, step.retrieved_segments = (
                read.hidden, read.state, read.memory, read.weights, read.retrieved_segments)
        else:
            with _autograd(tracked):
                hidden = self._plain_segment(seg_ids, seg_lens, carried)
        with _autograd(tracked):
            if want_logits:
                step.logits = bb.lm_logits(self.backbone, hidden)  # (B, l, V): segment positions only
            if seg_targets is not None:
                if want_logits:
                    step.nll = _token_nll(step.logits, seg_targets).sum(1)
                else:
                    step.nll = self._scored_nll(hidden, seg_targets, num_scored)
                step.count = (seg_targets != IGNORE_INDEX).sum(1)
        return step

    def _scored_nll(self, hidden: torch.Tensor, targets: torch.Tensor, num_scored: Optional[int] = None) -> torch.Tensor:
        """Summed NLL ``(B,)`` of ``hidden (B, l, d)`` against ``targets (B, l)``, never holding
        the ``(B, l, vocab)`` float logits at once: the LM head and the loss run on slices of
        positions, and with autograd on each slice is recomputed in backward instead of keeping
        its logits (so training memory does not grow with vocab x tokens). Given ``num_scored``
        (the positions with a target, counted on the host), the head runs on those positions
        only, gathered without a device read: none at all for a segment without targets."""
        B, width = targets.shape
        if num_scored is None or num_scored == B * width:
            return self._chunked_nll(hidden.flatten(0, 1), targets.flatten()).view(B, width).sum(1)
        if num_scored == 0:
            return hidden.new_zeros(B, dtype=torch.float32)
        # The num_scored flat positions with a target (topk of a known size: no host read).
        index = torch.topk((targets != IGNORE_INDEX).flatten().to(torch.int8), num_scored, sorted=False).indices
        nll = self._chunked_nll(hidden.flatten(0, 1).index_select(0, index), targets.flatten().index_select(0, index))
        return nll.new_zeros(B).index_add(0, torch.div(index, width, rounding_mode="floor"), nll)

    def _chunked_nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-position NLL ``(N,)`` of ``hidden (N, d)`` against ``targets (N,)``, the head run on
        slices within an element budget, each recomputed in backward when autograd is on."""
        N = targets.shape[0]
        budget = _SCORE_ELEMENTS_CUDA if hidden.is_cuda else _SCORE_ELEMENTS
        chunk = max(1, min(N, budget // bb.vocab_size(self.backbone)))
        recompute = torch.is_grad_enabled() and hidden.requires_grad
        parts = []
        for start in range(0, N, chunk):
            args = (hidden[start : start + chunk], targets[start : start + chunk])
            if recompute:
                parts.append(torch.utils.checkpoint.checkpoint(self._slice_nll, *args, use_reentrant=False))
            else:
                parts.append(self._slice_nll(*args))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _slice_nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _token_nll(bb.lm_logits(self.backbone, hidden.unsqueeze(0)), targets.unsqueeze(0)).squeeze(0)

    def memory_step(self, state: MemoryState, seg_ids: torch.Tensor, seg_lens: Optional[list[int]] = None, *,
                    summary: Optional[torch.Tensor] = None, sensory_lengths: Optional[list[int]] = None,
                    lengths: Optional[torch.Tensor] = None, trim: bool = True, tracked: bool = True) -> "MemoryStep":
        """One step of the algorithm (steps 1-5 of ``docs/algorithm.md``): memory and segment in,
        segment output and the next memory out. ``forward``, generation and evaluation all read
        segments through it.

        Args:
            state: the memory before the segment.
            seg_ids: ``(B, l)`` the segment's token ids, left-aligned, ``l <= L``.
            seg_lens: real tokens per row (default: all ``l``); a row with 0 leaves its memory as is.
            summary, sensory_lengths, lengths: what the caller already knows (S_n ``(B, d)`` from a
                batched encoding pass; ``state.sensory_lengths`` as a list; ``seg_lens`` as a device
                tensor), sparing device round trips a loop over segments should not wait on.
            trim: False leaves the cache untrimmed (see :meth:`MemoryState.push`).
            tracked: False reads the segment without autograd (evidence-sparse BPTT): its hidden
                states and memory carry no graph, but the cache update still runs with autograd,
                so the memories already cached keep theirs.

        Returns:
            :class:`MemoryStep`: ``hidden (B, l, d)`` final hidden states of the segment's positions
            (the LM head's input), the next ``state``, the written ``memory (B, d)``, the search
            ``weights (B, C)`` over the cache as it stood and the ``retrieved_segments (B, C)`` that wrote it.
        """
        if seg_lens is None:
            seg_lens = [seg_ids.shape[1]] * seg_ids.shape[0]
        width = seg_ids.shape[1]
        retrieved_segments = state.cache_segments
        if sensory_lengths is None:
            sensory_lengths = state.sensory_lengths.tolist()
        with _autograd(tracked):
            token_embeds = self.embedding_layer(seg_ids)  # (B, l, d)
            recalled, weights = self.read_memory(state, token_embeds, seg_lens, summary)
            # [P_n | sensory | E_n | P_n]: the leading P_n is read by the segment, the trailing
            # one (right after each row's last real token) is where m_n is written.
            packed = self.augmented_inputs(recalled.unsqueeze(1), state.sensory_ids, sensory_lengths, token_embeds,
                                           seg_lens)
            hidden = run_packed(self.backbone, packed)  # (B, T_aug, d)
            segment_hidden = gather_rows(hidden, packed.offsets[2], width)  # (B, l, d)
            memory = self.memory_generator(hidden, packed.attention_mask)  # (B, d)
        if lengths is None:
            lengths = torch.as_tensor(seg_lens, device=seg_ids.device)
        active = lengths > 0
        state = state.push(memory, active, self.config.num_memory_embeddings, trim=trim)
        state = state.with_sensory(seg_ids, lengths, active)
        return MemoryStep(segment_hidden, state, memory, weights, retrieved_segments)

    def _plain_segment(self, seg_ids: torch.Tensor, seg_lens: list[int], prefix_ids=None) -> torch.Tensor:
        B, width = seg_ids.shape
        parts = [(self.embedding_layer(seg_ids), seg_lens)]
        if prefix_ids is not None and prefix_ids.shape[1] > 0:
            k = prefix_ids.shape[1]
            parts.insert(0, (self.embedding_layer(prefix_ids), [k if n > 0 else 0 for n in seg_lens]))
        packed = pack_rows(parts)
        return gather_rows(run_packed(self.backbone, packed), packed.offsets[-1], width)

    @staticmethod
    def _prepend_pending(state: MemoryState, ids, labels, lengths):
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

    # ------------------------------------------------------------------ inputs
    def check_inputs(self, input_ids, attention_mask=None, labels=None):
        """Validate inputs as ``forward`` takes them (clear errors); return left-aligned ids, mask,
        labels, per-row starts (first real position) and lengths (a list), on the model's device."""
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
        vocab = bb.vocab_size(self.backbone)
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"input_ids holds ids in [{low}, {high}] but the backbone's vocabulary has {vocab} "
                "entries (0 .. vocab-1). Was the text tokenised with another tokenizer?"
            )
        device = self.embedding_layer.weight.device  # inputs may come from the CPU (a tokenizer's tensors)
        ids = input_ids.long().to(device)
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

    @staticmethod
    def _restore_positions(logits: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Undo the left-alignment and zero the padding positions."""
        if bool((mask == 0).any()):
            logits = logits * mask.unsqueeze(-1).to(logits.dtype)
        if bool(starts.any()):
            B, T, V = logits.shape
            index = (torch.arange(T, device=logits.device).view(1, T) - starts.view(B, 1)) % T
            logits = logits.gather(1, index.unsqueeze(-1).expand(B, T, V))
        return logits


def _autograd(tracked: bool):
    """No autograd for an untracked segment (evidence-sparse BPTT); the caller's mode otherwise."""
    return contextlib.nullcontext() if tracked else torch.no_grad()


def _grad_selection(grad_segments) -> Optional[frozenset]:
    """``forward``'s ``grad_segments`` as a set of segment indices (None: every segment)."""
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


def _scored_per_segment(targets: torch.Tensor, L: int, num_segments: int) -> list[int]:
    """How many positions of each segment carry a target, read on the host in one go."""
    B, T = targets.shape
    scored = F.pad(targets != IGNORE_INDEX, (0, num_segments * L - T))
    return scored.view(B, num_segments, L).sum((0, 2)).tolist()


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(B, l)`` next-token NLL of ``logits (B, l, V)`` (in float32) against ``targets (B, l)``; 0 where ignored."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view_as(targets)


@dataclass
class _Carried:
    """What a memory segment reads besides its tokens: the state, and what the loop already knows of it."""

    state: MemoryState
    summary: Optional[torch.Tensor]  # S_n (B, d) from a batched encoding pass, or None
    sensory_lengths: list[int]  # state.sensory_lengths, on the host
    lengths: torch.Tensor  # (B,) real tokens of each row in this segment, on the device


class _SegmentEncodings:
    """The representation encodings S_n of a call's segments, computed ahead in batched passes.

    S_n depends only on segment n's first j tokens and T, never on the memory, so the encoding
    passes of several segments run as one backbone call (segments stacked along the batch)
    before the recurrence needs them: half as many sequential backbone calls. How many
    segments go in one call: all of them when autograd keeps every segment's activations
    anyway; otherwise as many as fit in the positions of one augmented pass (on a GPU, up to
    ``_ENCODE_POSITIONS_CUDA``), so that reading a long document stays flat in memory.
    """

    def __init__(self, model: "HMT", ids: torch.Tensor, lengths: list[int], state: MemoryState, checkpointing: bool,
                 selected: Optional[frozenset] = None):
        config = model.config
        self.model, self.ids, self.lengths, self.checkpointing = model, ids, lengths, checkpointing
        self.selected = selected  # evidence-sparse BPTT: the segments encoded with autograd (None: all)
        self.L, self.j = config.segment_length, config.representation_length
        self.num_segments = -(-max(lengths) // self.L)
        # The first segment of a stream searches nothing (empty cache): no encoding needed.
        self.first = 0 if state.cache.shape[1] > 0 else 1
        self.enabled = config.use_retrieval
        B = ids.shape[0]
        positions = _ENCODE_POSITIONS_CUDA if ids.is_cuda else B * config.augmented_length
        self.read_group = max(1, positions // (B * (self.j + 2)))  # segments per call without autograd
        self.group = self.num_segments if torch.is_grad_enabled() and not checkpointing else self.read_group
        self.cache: dict[int, torch.Tensor] = {}

    def summary(self, s: int) -> Optional[torch.Tensor]:
        if not self.enabled or s < self.first:
            return None
        if s not in self.cache:
            later = range(s, self.num_segments)
            if self.selected is None:
                self.cache = self._encode(list(later)[: self.group])
            elif s in self.selected:  # the tracked segments: one call with autograd
                self.cache.update(self._encode([t for t in later if t in self.selected]))
            else:  # the others without autograd, in groups as when reading
                with torch.no_grad():
                    self.cache.update(self._encode([t for t in later if t not in self.selected][: self.read_group]))
        return self.cache.pop(s)

    def _encode(self, segments: list) -> dict[int, torch.Tensor]:
        L, j, B = self.L, self.j, self.ids.shape[0]
        heads = [self.ids[:, s * L : s * L + j] for s in segments]
        width = max(h.shape[1] for h in heads)
        stacked = torch.cat([F.pad(h, (0, width - h.shape[1])) for h in heads])  # (G*B, <=j), segment-major
        takes = [min(max(n - s * L, 0), j) for s in segments for n in self.lengths]
        model = self.model

        def encode(token_ids):
            return model.representation_encoder(model.backbone, model.embedding_layer(token_ids), takes)

        if self.checkpointing and torch.is_grad_enabled():
            summaries = torch.utils.checkpoint.checkpoint(encode, stacked, use_reentrant=False)
        else:
            summaries = encode(stacked)
        return {s: part for s, part in zip(segments, summaries.split(B))}


class MemoryCacheView:
    """Read-only view of the stateful cache: ``len()``, indexing (oldest first), tensors."""

    def __init__(self, state: Optional[MemoryState]):
        self.state = state

    def __len__(self) -> int:
        return 0 if self.state is None else int(self.state.cache_sizes.max())

    def __getitem__(self, index: int) -> torch.Tensor:
        """The ``index``-th memory (oldest first) of the first stream, ``(d,)``."""
        if self.state is None:
            raise IndexError("the memory cache is empty")
        return self.state.memories(0)[index]

    @property
    def embeddings(self) -> torch.Tensor:
        """``(B, C, d)`` right-aligned cache (see :class:`MemoryState`)."""
        if self.state is None:
            raise ValueError("the memory cache is empty")
        return self.state.cache

    def __repr__(self) -> str:
        return f"MemoryCacheView(size={len(self)})"
